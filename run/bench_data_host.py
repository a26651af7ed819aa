"""Host budget per GPU: samples/s per CPU core of the loader's host path, and cores per GPU.

    .venv/bin/python run/bench_data.py [--num-images 3072] [--batch-size 128] [--mfu 0.4]

Data: `--num-images` distinct photographs cut from scikit-image's (data_prep/photos.py), longer
side 384-640 px, JPEG q90, each a FineHARD record at stage-2 shapes: a long caption of ~260
tokens (cut to 248), a short caption, 8 boxes, every box with a short and a long phrase and 10
hard negatives. Built once into --work with build_shards (shard_size 1024), then read back.

Each variant runs in this process on ONE core (torch and DALI at one thread, no reader
processes); its rate is samples per CPU-second of the process and its children, so it reads as
samples/s per core and is little changed by other jobs on a shared machine (the wall-clock rate
is printed beside it):
  host_gpu_decode  what the host does per batch when DALI decodes on the GPU (mixed): the
                   SampleSource batch (block reads, in-memory shuffle, tokens re-cut to the
                   contexts, boxes, region coins, hard negatives) plus the loader's packing
                   (`batch_from_arrays`: flat RoIs, hard rows, text trimming) and key lookup;
                   JPEG bytes are handed over, not decoded;
  host_gpu_decode_per_sample  the same before this benchmark's changes (the baseline);
  host_gpu_decode_dali  host_gpu_decode with the source inside a DALI CPU pipeline that
                   decodes nothing: adds DALI's copies of the outputs and its executor (the
                   host-to-device copies of the mixed path are not measured: no GPU here);
  dali_cpu_<px>    the DALI loader with CPU decode (libjpeg-turbo) + torch resize + normalise;
  pil_<px>         the PIL reference loader (PIL decode + resize).
Then `cores_per_gpu`: per preset (B/16 at 224, L/14 at 336, stage 2 with 8 boxes and 10
negatives), samples/s one GPU runs at the stated MFU (`training_flops` model FLOPs per sample at
the measured text lengths and box counts, `gpu_peak_flops` of --gpu), divided by each variant's
samples/s per core.
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

WORDS = (
    "a the red green blue small large wooden metal old bright dark soft round square striped "
    "shiny table window person cat dog sky street building tree road light shadow corner wall "
    "floor near behind beside under above holding standing sitting looking with and of on in"
).split()
BOXES, NEGATIVES = 8, 10
RECORDS_VERSION = "v2"  # bump when the records change (the photos are reused)


def _text(rng, n_words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def make_records(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """root/ann.jsonl + root/images: n stage-2 FineHARD records on distinct photographs."""
    import numpy as np

    from data_prep.photos import jpeg, photo_crops

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    t0 = time.time()
    for i, arr in enumerate(photo_crops(n, seed=seed, sides=(384, 640))):
        name = f"{i // 1000:03d}/{i:07d}.jpg"
        (images / name).parent.mkdir(exist_ok=True)
        if not (images / name).is_file():  # the photos are the same for every record version
            (images / name).write_bytes(jpeg(arr))
        boxes = []
        for _ in range(BOXES):
            x0, y0 = rng.uniform(0, 0.6, 2)
            x1, y1 = x0 + rng.uniform(0.1, 0.4), y0 + rng.uniform(0.1, 0.4)
            boxes.append({
                "bbox": [round(float(v), 4) for v in (x0, y0, x1, y1)],
                "short_expr": _text(rng, 5),
                "long_expr": _text(rng, 14),
                "flag_short_neg": 1,
                "short_expr_negs": {str(k): _text(rng, 5) for k in range(NEGATIVES)},
            })  # fmt: skip
        lines.append(json.dumps({
            "f_path": name, "caption": _text(rng, 260) + ".",  # ~270 tokens: cut at 248
            "short_caption": _text(rng, 12), "bbox_info": boxes,
        }))  # fmt: skip
        if (i + 1) % 500 == 0:
            rate = (i + 1) / (time.time() - t0)
            print(f"[bench_data] photos {i + 1}/{n} ({rate:.0f}/s, ETA {(n - i - 1) / rate:.0f} s)",
                  file=sys.stderr)  # fmt: skip
    ann = root / f"ann_{RECORDS_VERSION}.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    return ann, images


def prepare(work: Path, n: int, seed: int, workers: int) -> Path:
    from fgclip_mega.data.build import build_shards

    raw = work / f"photos_{n}_s{seed}"
    ann = raw / f"ann_{RECORDS_VERSION}.jsonl"
    if not ann.is_file():
        make_records(raw, n, seed)
    out = work / f"shards_photos_{n}_s{seed}_{RECORDS_VERSION}"
    build_shards(str(ann), str(raw / "images"), str(out), shard_size=1024, workers=workers,
                 progress=False)  # fmt: skip
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads, ns resolution) and of its children (psutil:
    10 ms ticks; the variants here start none)."""
    import psutil

    total = time.process_time()
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def per_sample_batch(src, step: int) -> dict:
    """`SampleSource.batch` as it was before it was vectorised: ~20 numpy calls per sample (the
    baseline of host_gpu_decode_per_sample, and the reference of tests/test_source_batch.py)."""
    import numpy as np

    from fgclip_mega.data.schema import allocate_outputs
    from fgclip_mega.data.source import region_coins
    from fgclip_mega.data.tokenizer import fit_context

    spec = src.spec
    b, m, k = spec.batch_size, spec.max_boxes, spec.num_negatives
    s_ctx = spec.short_context
    first = spec.start + step * b
    dims = {"LONG": spec.long_context, "SHORT": s_ctx, "M": m, "K": k}
    out: dict = {"jpeg": [], **allocate_outputs(b, dims)}
    out["positions"][:] = np.arange(first, first + b)
    out["epochs"] = np.zeros(b, np.int64)
    for i, pos in enumerate(range(first, first + b)):
        epoch, offset = src.order.locate(pos)
        plan = src.order.plan(epoch)
        sid = int(plan.ids[offset])
        w = plan.window_of(offset)
        window = src._window(epoch, w)
        rows = {}  # global id -> (block, row), from the plan's (shard, lo, hi) spans
        for blk_i, (shard, lo, hi) in enumerate(plan.window_blocks[w]):
            start = int(src.order.offsets[shard] + lo)
            rows.update({start + r: (blk_i, r) for r in range(int(hi - lo))})
        block_idx, row = rows[sid]
        blk = window.blocks[block_idx]
        out["sample_ids"][i], out["epochs"][i] = sid, epoch
        out["jpeg"].append(blk.jpeg(row))
        out["long_tokens"][i] = fit_context(blk.long_tokens[row], spec.long_context)
        out["short_tokens"][i] = fit_context(blk.short_tokens[row], s_ctx)
        b0 = int(blk.box_offsets[row])
        n = min(int(blk.box_offsets[row + 1]) - b0, m)
        out["box_counts"][i] = n
        if n == 0:
            continue
        sl = slice(b0, b0 + n)
        out["boxes"][i, :n] = blk.boxes[sl]
        coins = region_coins(spec.seed, epoch, np.array([sid]), m)[0, :n]
        if spec.region_text == "short":
            coins[:] = False
        elif spec.region_text == "long":
            coins[:] = True
        short = fit_context(blk.box_short_tokens[sl], s_ctx)
        long = fit_context(blk.box_long_tokens[sl], s_ctx)
        out["region_tokens"][i, :n] = np.where(coins[:, None], long, short)
        out["hardneg_tokens"][i, :n, 0] = short
        out["hardneg_tokens"][i, :n, 1:] = fit_context(blk.neg_tokens[sl, :k], s_ctx)
        out["hardneg_valid"][i, :n] = blk.neg_flags[sl]
    return out


def torch_trimmed_length(tokens, context: int, multiple: int = 8) -> int:
    """`batch.trimmed_length` as it was (torch bool reductions, ~7x numpy's cost here)."""
    from fgclip_mega.data.tokenizer import EOT_ID

    last = 0
    for t in tokens:
        rows = t.reshape(-1, t.shape[-1])
        if rows.shape[0] == 0:
            continue
        is_eot = rows == EOT_ID
        if not bool(is_eot.any(dim=1).all()):
            return context
        from_end = is_eot.flip(-1).int().argmax(dim=-1)
        last = max(last, rows.shape[-1] - int(from_end.min()))
    return min(context, -(-max(last, 1) // multiple) * multiple)


class HostPath:
    """The host work of the DALI mixed path, without DALI: what `DaliLoader.__next__` and its
    external source do per batch besides decoding (the images tensor is a placeholder)."""

    def __init__(self, cfg, image_size: int, per_sample: bool = False):
        import torch

        from fgclip_mega.data.stream import StreamLoader

        self.per_sample = per_sample
        self.stream = StreamLoader(cfg, image_size, 77, 248, 0, 1)
        self.images = torch.empty(cfg.micro_batch_size, 3, 1, 1, dtype=torch.uint8)
        self.source = None
        self.step = 0

    def __next__(self):
        from fgclip_mega.data.batch import batch_from_arrays
        from fgclip_mega.data.source import SampleSource

        if self.source is None:
            self.source = SampleSource(self.stream.spec)
        if self.per_sample:
            arrays = per_sample_batch(self.source, self.step)
        else:
            arrays = self.source.batch(self.step)
        self.step += 1
        arrays["epoch"] = 0
        keys = self.stream.keys_of(arrays["sample_ids"])
        if not self.per_sample:
            return batch_from_arrays(self.images, arrays, keys)
        import fgclip_mega.data.batch as batch_module

        new, batch_module.trimmed_length = batch_module.trimmed_length, torch_trimmed_length
        try:  # the baseline: the host path as it was before this benchmark's changes
            return batch_from_arrays(self.images, arrays, keys)
        finally:
            batch_module.trimmed_length = new

    def close(self) -> None:
        pass


class DaliHostPath(HostPath):
    """HostPath through DALI: the same SampleSource as DALI's external source in a CPU pipeline
    that decodes nothing (JPEG bytes pass through), so DALI's own per-batch work (copying the
    source's outputs into its buffers, the executor) is counted as it is in the mixed path."""

    def __init__(self, cfg, image_size: int):
        super().__init__(cfg, image_size)
        from nvidia.dali import fn, pipeline_def, types

        from fgclip_mega.data import schema
        from fgclip_mega.data.source import OUTPUTS, SampleSource

        kinds = {"uint8": types.UINT8, "int32": types.INT32, "int64": types.INT64,
                 "float32": types.FLOAT}  # fmt: skip
        source = SampleSource(self.stream.spec)
        dtypes = [kinds[f.dtype] for f in schema.OUTPUTS]

        @pipeline_def(batch_size=cfg.micro_batch_size, num_threads=1, device_id=None,
                      prefetch_queue_depth=1)  # fmt: skip
        def pipe():
            outs = fn.external_source(source=source, num_outputs=len(OUTPUTS), batch=True,
                                      batch_info=True, parallel=False, dtype=dtypes)  # fmt: skip
            return tuple(outs)

        self.names = OUTPUTS
        self.pipe = pipe()
        self.pipe.build()

    def __next__(self):
        import torch

        from fgclip_mega.data.batch import batch_from_arrays

        outs = self.pipe.run()
        arrays = {
            n: torch.from_numpy(o.as_array()) for n, o in zip(self.names[1:], outs[1:], strict=True)
        }
        arrays["epoch"] = 0
        keys = self.stream.keys_of(arrays["sample_ids"].numpy())
        return batch_from_arrays(self.images, arrays, keys)

    def close(self) -> None:
        import gc

        self.pipe = None
        gc.collect()


def measure(make, warmup: int, batches: int) -> dict:
    """Samples per CPU-second (process + children) and per wall-second over `batches`."""
    loader = make()
    try:
        for _ in range(warmup):
            next(loader)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        n, lens = 0, []
        for _ in range(batches):
            b = next(loader)
            n += len(b)
            lens.append((b.long_tokens.shape[1], b.short_tokens.shape[1],
                         len(b.region_rois), len(b.hard_rows)))  # fmt: skip
        cpu, wall = _cpu_seconds() - c0, time.perf_counter() - t0
    finally:
        loader.close()
    return {"per_core": n / cpu, "wall": n / wall, "cpu_ms_per_sample": 1e3 * cpu / n,
            "samples": n, "lens": lens}  # fmt: skip


def gpu_rates(batch: int, dp: int, lens: list[tuple], mfu: float, gpu: str) -> dict[str, dict]:
    """Samples/s per GPU of each preset at `mfu` (stage 2, the measured shapes)."""
    from fgclip_mega.presets import load_config
    from fgclip_mega.profiling.flops import training_flops
    from fgclip_mega.profiling.peak import gpu_peak_flops

    long_len = max(x[0] for x in lens)
    short_len = max(x[1] for x in lens)
    per_sample_boxes = statistics.mean(x[2] for x in lens) / batch
    per_sample_hard = statistics.mean(x[3] for x in lens) / batch
    peak = gpu_peak_flops(gpu)
    out = {}
    for preset in ("fgclip_vit_b16", "fgclip_vit_l14_336"):
        cfg = load_config(preset, None, ["train.stage=regional", f"data.max_boxes={BOXES}",
                                         f"data.num_hard_negatives={NEGATIVES}"])  # fmt: skip
        rep = training_flops(cfg, batch_size=batch, dp_size=dp, stage="regional",
                             long_len=min(long_len, cfg.model.text.long_context),
                             short_len=min(short_len, cfg.model.text.short_context),
                             boxes=round(per_sample_boxes * batch),
                             hard_boxes=round(per_sample_hard * batch))  # fmt: skip
        per_sample = rep.model_per_sample
        out[preset] = {
            "image_size": cfg.model.vision.image_size,
            "model_gflop_per_sample": round(per_sample / 1e9, 1),
            "samples_per_s_per_gpu": round(mfu * peak / per_sample, 1),
            "step_s": round(batch * per_sample / (mfu * peak), 4),
        }
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "run/out/bench_data"))
    p.add_argument("--out", default=str(ROOT / "run/out/bench_data.jsonl"))
    p.add_argument("--num-images", type=int, default=3072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128, help="micro-batch per GPU")
    p.add_argument("--dp", type=int, default=8, help="data-parallel GPUs (global batch)")
    p.add_argument("--batches", type=int, default=40, help="timed micro-batches, host path")
    p.add_argument("--decode-batches", type=int, default=3, help="timed, decoding variants")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs (median)")
    p.add_argument("--mfu", type=float, default=0.4, help="stated MFU of the GPU step")
    p.add_argument("--gpu", default="H100", help="GPU name for the peak FLOP/s (peak.py)")
    p.add_argument("--variants", default="host_gpu_decode_per_sample,host_gpu_decode,"
                   "host_gpu_decode_dali,dali_cpu_224,dali_cpu_336,pil_224,pil_336")  # fmt: skip
    p.add_argument("--label", default="", help="recorded in every line (e.g. before/after)")
    p.add_argument("--workers", type=int, default=2, help="build_shards workers (first run)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from fgclip_mega.config import DataConfig

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = prepare(work, args.num_images, args.seed, args.workers)
    base = dict(shards=str(shards / "index.json"), micro_batch_size=args.batch_size,
                max_boxes=BOXES, num_hard_negatives=NEGATIVES, num_threads=1,
                py_num_workers=0, prefetch_queue_depth=1)  # fmt: skip

    def maker(name: str):
        kind, _, px = name.rpartition("_")
        if name == "host_gpu_decode":
            return lambda: HostPath(DataConfig(**base), 224), args.batches
        if name == "host_gpu_decode_dali":
            return lambda: DaliHostPath(DataConfig(**base), 224), args.batches
        if name == "host_gpu_decode_per_sample":  # baseline: old per-sample batch, torch trim
            return lambda: HostPath(DataConfig(**base), 224, per_sample=True), args.batches
        size = int(px)
        if kind == "dali_cpu":
            from fgclip_mega.data.loader import DaliLoader

            return lambda: DaliLoader(DataConfig(**base), size), args.decode_batches
        if kind == "pil":
            from fgclip_mega.data.pil_loader import PilLoader

            return lambda: PilLoader(DataConfig(**base), size), args.decode_batches
        raise ValueError(f"unknown variant {name!r}")

    names = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        for name in names:
            make, batches = maker(name)
            runs[name].append(measure(make, args.warmup, batches))
            last = runs[name][-1]
            print(f"[bench_data] repeat {r + 1}/{args.repeats} {name}: "
                  f"{last['per_core']:.0f} samples/s/core", file=sys.stderr)  # fmt: skip
    common = {"label": args.label, "batch_size": args.batch_size, "boxes": BOXES,
              "negatives": NEGATIVES, "long_context": 248, "images": args.num_images,
              "source_px": "384-640 longer side, JPEG q90", "threads": 1,
              "cpu_count": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
    lines = []
    per_core = {}
    for name in names:
        rs = runs[name]
        per_core[name] = statistics.median(x["per_core"] for x in rs)
        lines.append({
            "name": name, "samples_per_s_per_core": round(per_core[name], 1),
            "cpu_ms_per_sample": round(statistics.median(x["cpu_ms_per_sample"] for x in rs), 3),
            "wall_samples_per_s": round(statistics.median(x["wall"] for x in rs), 1),
            "runs_per_core": [round(x["per_core"], 1) for x in rs],
            "timed_samples_per_run": rs[0]["samples"], **common,
        })  # fmt: skip
    lens = [x for rs in runs.values() for run in rs for x in run["lens"]]
    gpus = gpu_rates(args.batch_size, args.dp, lens, args.mfu, args.gpu)
    for preset, g in gpus.items():
        px = g["image_size"]
        cores = {}
        for name in names:
            if name.startswith("host_gpu_decode") or name.endswith(f"_{px}"):
                cores[name] = round(g["samples_per_s_per_gpu"] / per_core[name], 2)
        lines.append({"name": "cores_per_gpu", "preset": preset, "mfu": args.mfu,
                      "gpu": args.gpu, **g, "cores_per_gpu": cores,
                      "text_lengths": [max(x[0] for x in lens), max(x[1] for x in lens)],
                      **common})  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:
        for line in lines:
            print(json.dumps(line))
            fh.write(json.dumps(line) + "\n")
    return lines


if __name__ == "__main__":
    main()
