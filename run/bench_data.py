"""Loader benchmarks. Two suites, each printing one JSON object per line (appended to --out).

    .venv/bin/python run/bench_data.py [--suite host] [--num-images 3072] [--mfu 0.4]
    .venv/bin/python run/bench_data.py --suite loaders [--num-samples 1024] [--batches 30]

host (default): the host budget per GPU at FG-CLIP stage-2 shapes, see `bench_data_host.py`:
    samples/s per CPU core of the loader's host path (read, shuffle, tokens, 248-token long
    captions, 8 boxes with 10 hard negatives each, box packing) with decode excluded (it runs on
    the GPU with DALI mixed) and included (DALI CPU, PIL) at 224 and 336 px, on a few thousand
    distinct real photographs; then the cores per GPU that B/16 and L/14-336 need at the step
    rate of the FLOP model at a stated MFU.
loaders: DALI (CPU decode, and mixed on a GPU) vs the pure-PIL loader on the same synthetic
    500x375 shards at --image-size, same thread budget; `speedup_vs_pil` against the PIL loader
    with the same resize semantics (named in `baseline`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "run"))

from data_prep.build_shards import build_shards  # noqa: E402
from data_prep.synthetic import generate  # noqa: E402
from data_prep.synthetic import parse_args as synthetic_args  # noqa: E402


def prepare(work: Path, num_samples: int, width: int, height: int, workers: int) -> Path:
    raw = work / f"raw_{num_samples}_{width}x{height}"
    if not (raw / "train.jsonl").is_file():
        generate(synthetic_args([
            "--out", str(raw), "--num-train", str(num_samples), "--num-val", "0", "--num-test",
            "0", "--width", str(width), "--height", str(height), "--workers", str(workers),
        ]))  # fmt: skip
    shards = work / f"shards_{num_samples}_{width}x{height}"
    # The builder is resumable: finished shards are reused on later runs.
    build_shards(str(raw / "train.jsonl"), str(raw / "images"), str(shards), shard_size=512,
                 workers=workers)  # fmt: skip
    return shards


def _cpu_seconds() -> float:
    """User + system CPU of this process and its live children (DALI's reader processes)."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def time_loader(loader, warmup: int, batches: int) -> tuple[float, float, int]:
    """(wall s, CPU s) for `batches` micro-batches after `warmup` ones, and samples timed.

    CPU seconds per sample are reported next to the wall-clock rate because this machine is
    shared: other jobs slow the wall clock much more than they change the work done per sample.
    """
    for _ in range(warmup):
        next(loader)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(loader))
    return time.perf_counter() - t0, _cpu_seconds() - c0, n


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if "--suite" in argv and argv[argv.index("--suite") + 1] == "loaders":
        i = argv.index("--suite")
        return loaders(argv[:i] + argv[i + 2 :])
    from bench_data_host import main as host

    return host([a for a in argv if a not in ("--suite", "host")])


def loaders(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "run/out/bench_data"))
    p.add_argument("--out", default=str(ROOT / "run/out/bench_data.jsonl"))
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=30, help="timed micro-batches per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed micro-batches per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per loader (median reported)")
    p.add_argument("--threads", type=int, default=2, help="DALI threads = PIL decode threads")
    p.add_argument("--py-workers", type=int, default=1, help="DALI shard-reader processes")
    p.add_argument("--plot", default=str(ROOT / "run/out/bench_data.png"), help="PNG bar chart")
    args = p.parse_args(argv)

    import torch

    from fgclip_mega.config import DataConfig
    from fgclip_mega.data.loader import DaliLoader, dali_cuda_devices
    from fgclip_mega.data.pil_loader import PilLoader
    from fgclip_mega.data.shards import open_shard_set

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = open_shard_set(prepare(work, args.num_samples, args.width, args.height, args.threads))
    cfg = DataConfig(
        shards=shards.root,
        micro_batch_size=args.batch_size,
        num_threads=args.threads,
        py_num_workers=args.py_workers,
    )
    variants = {  # name -> (loader class, config overrides, device, PIL baseline name)
        "pil": (PilLoader, {}, "cpu", "pil"),
        "pil_noaa": (PilLoader, {"resize_antialias": "off"}, "cpu", "pil_noaa"),
        "dali_cpu": (DaliLoader, {}, "cpu", "pil"),
        "dali_cpu_noaa": (DaliLoader, {"resize_antialias": "off"}, "cpu", "pil_noaa"),
    }
    if torch.cuda.is_available() and dali_cuda_devices() > 0:
        variants["dali_mixed"] = (DaliLoader, {"decode_device": "mixed"}, "cuda", "pil")
    runs: dict[str, list[float]] = {name: [] for name in variants}
    cpu_ms: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, int] = {}
    # Repeats interleave the loaders so that machine noise hits all of them alike.
    for _ in range(args.repeats):
        for name, (cls, overrides, device, _) in variants.items():
            run_cfg = DataConfig(**{**cfg.__dict__, **overrides})
            with cls(run_cfg, args.image_size, device=device, shards=shards) as loader:
                seconds, cpu, n = time_loader(loader, args.warmup, args.batches)
                if device == "cuda":
                    torch.cuda.synchronize()
            runs[name].append(n / seconds)
            cpu_ms[name].append(1e3 * cpu / n)
            counts[name] = n
    lines = []
    for name, (cls, overrides, device, baseline) in variants.items():
        rate = statistics.median(runs[name])
        lines.append(
            {
                "name": name,
                "samples_per_s": round(rate, 1),
                "speedup_vs_pil": round(rate / statistics.median(runs[baseline]), 3),
                "baseline": baseline,
                "runs_samples_per_s": [round(r, 1) for r in runs[name]],
                "cpu_ms_per_sample": round(statistics.median(cpu_ms[name]), 3),
                "cpu_speedup_vs_pil": round(
                    statistics.median(cpu_ms[baseline]) / statistics.median(cpu_ms[name]), 3
                ),
                "timed_samples_per_run": counts[name],
                "timer": f"perf_counter over {args.batches} batches after {args.warmup} warm-up",
                "batch_size": args.batch_size,
                "image_size": args.image_size,
                "source_size": [args.width, args.height],
                "threads": args.threads,
                "py_workers": args.py_workers if name.startswith("dali") else 0,
                "device": device,
                "antialias": overrides.get("resize_antialias", "on"),
                "decode": overrides.get("decode_device", "pil" if cls is PilLoader else "cpu"),
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
    with open(args.out, "a", encoding="utf-8") as fh:
        for line in lines:
            print(json.dumps(line))
            fh.write(json.dumps(line) + "\n")
    plot(lines, Path(args.plot))
    return lines


def plot(lines: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [line["name"] for line in lines]
    rates = [line["samples_per_s"] for line in lines]
    bars = ax.bar(
        names, rates, color=["tab:gray" if n.startswith("pil") else "tab:green" for n in names]
    )
    for bar, line in zip(bars, lines, strict=True):
        ax.annotate(
            f"{line['speedup_vs_pil']:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    ax.set_ylabel("samples/s")
    ax.set_title(f"loader throughput, {lines[0]['image_size']} px, {lines[0]['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
