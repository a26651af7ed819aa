"""Peak memory and time of the contrastive loss, forward + backward: naive vs chunked vs Triton.

Prints one JSON object per line: per (case, implementation) `peak_mb`, `ms` and the ratios to the
naive loss of the same case measured in the same run. Cases: square B x B (symmetric InfoNCE /
SigLIP over one batch) and rectangular b x B (a data-parallel rank's b local rows against the B
gathered columns, row direction, positives at a row offset, as the all-gather loss calls the
kernels). On CPU every case runs in a fresh subprocess so that peaks do not leak between cases;
on CUDA one subprocess per implementation runs all cases:
  CPU: peak = ru_maxrss after one forward + backward minus ru_maxrss once the inputs exist (after a
      tiny warm-up that starts the thread pools; on CUDA the warm-up runs the case's shape and
      autotunes). ru_maxrss is the resident-set high-water mark of the process, so this is
      every byte the loss made resident (logits, softmax, gradients, allocator slack), an upper
      bound on its live tensors.
  CUDA: torch.cuda.max_memory_allocated() minus the allocation once the inputs exist.
Time: median of --repeats further forward + backward passes (CUDA: synchronised).
The naive loss is reference.softmax_contrastive_reference (full logits, F.cross_entropy both
ways, as OpenCLIP computes it); chunked and Triton are kernels.contrastive.ops.

  python run/bench_loss.py               # CPU: square B = 1k, 4k, 16k, d = 512, fp32
                                         # CUDA: square 1k..64k + rectangular b in {128, 256,
                                         # 1024} x B in {8K, 32K, 128K} x d in {512, 768} x
                                         # {fp32, bf16}
  python run/bench_loss.py --grid rect   # CPU: b in {128, 256} x B in {8K, 32K}, d 512, fp32
  python run/bench_loss.py --plot        # also run/out/bench_loss.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _loss_fn(impl: str, kind: str, chunk: int, offset: int, symmetric: bool):
    from kernels.contrastive import (
        sigmoid_contrastive_loss,
        sigmoid_contrastive_reference,
        softmax_contrastive_loss,
        softmax_contrastive_reference,
    )

    opts = dict(offset=offset, impl=impl, chunk_size=chunk)
    if kind == "softmax":
        if impl == "naive":
            return lambda a, b, s, t: softmax_contrastive_reference(a, b, s, offset, symmetric)
        return lambda a, b, s, t: softmax_contrastive_loss(a, b, s, symmetric=symmetric, **opts)
    if impl == "naive":
        return lambda a, b, s, t: sigmoid_contrastive_reference(a, b, s, t, offset)
    return lambda a, b, s, t: sigmoid_contrastive_loss(a, b, s, t, **opts)


def run_case(impl: str, case: dict, kind: str, chunk: int, repeats: int) -> dict:
    """One forward + backward for memory, then `repeats` timed ones; case: R, C, D, dtype."""
    import resource

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
    R, C, D = case["R"], case["C"], case["D"]
    square = R == C
    # Rectangular: this rank's R local rows against C gathered columns, positives at rank 1's
    # offset (R, or 0 if that does not fit), row direction only (as the all-gather loss calls it).
    offset = 0 if square or 2 * R > C else R
    fn = _loss_fn(impl, kind, chunk, offset, symmetric=square)

    def make(r, c):
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.nn.functional.normalize(torch.randn(r, D, generator=g), dim=-1)
        b = torch.nn.functional.normalize(torch.randn(c, D, generator=g), dim=-1)
        a = a.to(device, dt).requires_grad_()
        b = b.to(device, dt).requires_grad_()
        s = torch.tensor(14.3, device=device, requires_grad=True)
        t = torch.tensor(-10.0, device=device, requires_grad=True)
        return a, b, s, t

    def step(inputs):
        loss = fn(*inputs)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return loss

    try:
        # Warm-up. CUDA: at the case's shape (compilation and autotuning, keyed by shape);
        # CPU: tiny, since it only starts the thread pools and must not raise ru_maxrss.
        if cuda:
            step(make(R, C))
        else:
            n = min(R, 64)
            warm = _loss_fn(impl, kind, chunk, 0, symmetric=square)
            warm(*make(n, n if square else min(C, 2 * n))).backward()
        inputs = make(R, C)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(inputs)
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(repeats):
            for x in inputs:
                x.grad = None
            t0 = time.perf_counter()
            step(inputs)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        inputs = None
        if cuda:
            torch.cuda.empty_cache()
    return {"peak_mb": peak / 2**20, "ms": 1e3 * statistics.median(times)}


def _worker(args) -> None:
    # Runs the cases of --worker-cases (JSON list) with one implementation, one line each.
    for case in json.loads(args.worker_cases):
        res = run_case(args.worker, case, args.kind, args.chunk, args.repeats)
        print(json.dumps({**case, **res}), flush=True)


def _run_cases(args, impl: str, cases: list[dict], fresh_each: bool) -> list[dict]:
    """Results per case, from a fresh subprocess per case (CPU: ru_maxrss is a process-lifetime
    high-water mark) or one subprocess for all (CUDA: the peak counter is reset per case)."""
    groups = [[c] for c in cases] if fresh_each else [cases]
    out = []
    for group in groups:
        cmd = [sys.executable, __file__, "--worker", impl, "--worker-cases", json.dumps(group),
               "--kind", args.kind, "--chunk", str(args.chunk),
               "--repeats", str(args.repeats)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for case in group[len(done) :]:  # cases after a crash
            err = proc.stderr.strip().splitlines()
            done.append({**case, "error": err[-1] if err else f"exit {proc.returncode}"})
        out.extend(done)
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "ms" in r]
    square = [r for r in ok if r["shape"] == "square"]
    rect = [r for r in ok if r["shape"] == "rect"]
    if rect:  # one feature width and dtype of the rectangular grid, lines per (impl, b)
        d, dtype = rect[0]["d"], rect[0]["dtype"]
        rect = [r for r in rect if r["d"] == d and r["dtype"] == dtype]
    panels = [(square, "B", "global batch B (square B x B)", lambda r: r["impl"])]
    panels += [
        (rect, "B", "gathered columns B (b local rows)", lambda r: f"{r['impl']} b={r['b']}")
    ]
    panels = [p for p in panels if p[0]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 4 * len(panels)), squeeze=False)
    for (pts, xkey, xlabel, label), row_axes in zip(panels, axes, strict=True):
        for name in dict.fromkeys(label(r) for r in pts):
            line = [r for r in pts if label(r) == name]
            xs = [r[xkey] for r in line]
            row_axes[0].plot(xs, [max(r["peak_mb"], 1e-2) for r in line], "o-", label=name)
            row_axes[1].plot(xs, [r["ms"] for r in line], "o-", label=name)
        for ax, ylabel in zip(
            row_axes, ("peak memory (MB)", "forward + backward (ms)"), strict=True
        ):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    first = ok[0] if ok else rows[0]
    fig.suptitle(f"{first['kind']} contrastive loss, {first['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", help="square batch sizes (default by device)")
    p.add_argument("--dim", type=int, default=512, help="feature width of the square cases")
    p.add_argument("--kind", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="square cases")
    p.add_argument("--chunk", type=int, default=1024, help="tile of the chunked path")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after the memory pass")
    p.add_argument("--impls", nargs="*", help="default: naive chunked (+ triton with CUDA)")
    p.add_argument("--grid", choices=["square", "rect", "all"], help="default: all on CUDA, "
                   "square on CPU (where rect/all run a CPU-sized rectangular subset)")  # fmt: skip
    p.add_argument("--rows", type=int, nargs="*", help="rectangular: local rows b")
    p.add_argument("--cols", type=int, nargs="*", help="rectangular: gathered columns B")
    p.add_argument("--dims", type=int, nargs="*", help="rectangular: feature widths")
    p.add_argument("--dtypes", nargs="*", choices=["fp32", "bf16"], help="rectangular dtypes")
    p.add_argument("--plot", nargs="?", const=str(ROOT / "run/out/bench_loss.png"), default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-cases", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        _worker(args)
        return

    import torch

    cuda = torch.cuda.is_available()
    grid = args.grid or ("all" if cuda else "square")
    impls = args.impls or (["naive", "chunked", "triton"] if cuda else ["naive", "chunked"])
    device = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    cases = []
    if grid in ("square", "all"):
        sizes = args.sizes or ([1024, 4096, 16384, 65536] if cuda else [1024, 4096, 16384])
        cases += [dict(R=B, C=B, D=args.dim, dtype=args.dtype) for B in sizes]
    if grid in ("rect", "all"):
        # The grid on CUDA; on CPU a subset that runs in about a minute.
        rows = args.rows or ([128, 256, 1024] if cuda else [128, 256])
        cols = args.cols or ([8192, 32768, 131072] if cuda else [8192, 32768])
        dims = args.dims or ([512, 768] if cuda else [512])
        dtypes = args.dtypes or (["fp32", "bf16"] if cuda else ["fp32"])
        cases += [dict(R=b, C=B, D=d, dtype=dt) for dt in dtypes for d in dims for b in rows
                  for B in cols]  # fmt: skip
    results = {impl: _run_cases(args, impl, cases, fresh_each=not cuda) for impl in impls}
    out = []
    for i, case in enumerate(cases):
        base = results[impls[0]][i]  # the baseline (naive unless --impls says otherwise)
        for impl in impls:
            res = {k: v for k, v in results[impl][i].items() if k not in case}
            shape = "square" if case["R"] == case["C"] else "rect"
            B, b = case["C"], case["R"]
            tag = f"B{B}" if shape == "square" else f"b{b}_B{B}"
            row = {"name": f"contrastive_{args.kind}_{impl}_{tag}_d{case['D']}_{case['dtype']}",
                   "impl": impl, "kind": args.kind, "shape": shape, "b": b, "B": B,
                   "d": case["D"], "dtype": case["dtype"], "device": device, **res}  # fmt: skip
            if impl == "chunked":
                row["chunk"] = args.chunk
            if "ms" in res and "ms" in base:
                row[f"ratio_vs_{impls[0]}_mem"] = res["peak_mb"] / max(base["peak_mb"], 1e-9)
                row[f"ratio_vs_{impls[0]}_time"] = res["ms"] / base["ms"]
            out.append(row)
            print(json.dumps(row), flush=True)
    if args.plot:
        _plot(out, Path(args.plot))
        print(json.dumps({"name": "plot", "path": args.plot}))


if __name__ == "__main__":
    main()
