"""Peak memory and time of the contrastive loss, forward + backward: naive vs chunked vs Triton.

Prints one JSON object per line: per (B, implementation) `peak_mb`, `ms` and the ratios to the
naive loss of the same B measured in the same run. Every case runs in a fresh subprocess so that
peaks do not leak between cases:
  CPU: peak = ru_maxrss after one forward + backward minus ru_maxrss once the inputs exist (after a
      tiny warm-up that starts the thread pools). ru_maxrss is the resident-set high-water mark of
      the process, so this is every byte the loss made resident (logits, softmax, gradients,
      allocator slack), an upper bound on its live tensors.
  CUDA: torch.cuda.max_memory_allocated() minus the allocation once the inputs exist.
Time: median of --repeats further forward + backward passes (CUDA: synchronised).
The naive loss is reference.softmax_contrastive_reference (full logits, F.cross_entropy both
ways, as OpenCLIP computes it); chunked and Triton are kernels.contrastive.ops.

  python run/bench_loss.py                    # B = 1k, 4k, 16k (and 64k on a GPU), d = 512
  python run/bench_loss.py --plot             # also run/out/bench_loss.png
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


def _loss_fn(impl: str, kind: str, chunk: int):
    from kernels.contrastive import (
        sigmoid_contrastive_loss,
        sigmoid_contrastive_reference,
        softmax_contrastive_loss,
        softmax_contrastive_reference,
    )

    if kind == "softmax":
        if impl == "naive":
            return lambda a, b, s, t: softmax_contrastive_reference(a, b, s)
        return lambda a, b, s, t: softmax_contrastive_loss(a, b, s, impl=impl, chunk_size=chunk)
    if impl == "naive":
        return lambda a, b, s, t: sigmoid_contrastive_reference(a, b, s, t)
    return lambda a, b, s, t: sigmoid_contrastive_loss(a, b, s, t, impl=impl, chunk_size=chunk)


def run_case(impl: str, B: int, D: int, kind: str, dtype: str, chunk: int, repeats: int) -> dict:
    import resource

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    fn = _loss_fn(impl, kind, chunk)

    def make(n):
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
        b = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
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

    step(make(64))  # warm-up: thread pools, kernels' compilation
    inputs = make(B)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        step(inputs)
    except torch.OutOfMemoryError:
        return {"oom": True}
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
    return {"peak_mb": peak / 2**20, "ms": 1e3 * statistics.median(times)}


def _subprocess_case(args, impl: str, B: int) -> dict:
    cmd = [sys.executable, __file__, "--case", impl, str(B), "--dim", str(args.dim),
           "--kind", args.kind, "--dtype", args.dtype, "--chunk", str(args.chunk),
           "--repeats", str(args.repeats)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = [r for r in rows if r["impl"] == impl and "ms" in r]
        Bs = [r["B"] for r in pts]
        axes[0].plot(Bs, [max(r["peak_mb"], 1e-2) for r in pts], "o-", label=impl)
        axes[1].plot(Bs, [r["ms"] for r in pts], "o-", label=impl)
    for ax, ylabel in zip(axes, ("peak memory (MB)", "forward + backward (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{rows[0]['kind']} contrastive loss, d = {rows[0]['d']}, {rows[0]['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", help="global batch sizes (default by device)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kind", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--chunk", type=int, default=1024, help="tile of the chunked path")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after the memory pass")
    p.add_argument("--impls", nargs="*", help="default: naive chunked (+ triton with CUDA)")
    p.add_argument("--plot", nargs="?", const=str(ROOT / "run/out/bench_loss.png"), default=None)
    p.add_argument("--case", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:
        impl, B = args.case[0], int(args.case[1])
        res = run_case(impl, B, args.dim, args.kind, args.dtype, args.chunk, args.repeats)
        print(json.dumps(res))
        return

    import torch

    cuda = torch.cuda.is_available()
    sizes = args.sizes or ([1024, 4096, 16384, 65536] if cuda else [1024, 4096, 16384])
    impls = args.impls or (["naive", "chunked", "triton"] if cuda else ["naive", "chunked"])
    device = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    rows = []
    for B in sizes:
        naive = None
        for impl in impls:
            res = _subprocess_case(args, impl, B)
            row = {"name": f"contrastive_{args.kind}_{impl}_B{B}_d{args.dim}_{args.dtype}",
                   "impl": impl, "kind": args.kind, "B": B, "d": args.dim,
                   "dtype": args.dtype, "device": device, **res}  # fmt: skip
            if impl == "chunked":
                row["chunk"] = args.chunk
            if impl == "naive":
                naive = res if "ms" in res else None
            if naive and "ms" in res:
                row["ratio_vs_naive_mem"] = res["peak_mb"] / max(naive["peak_mb"], 1e-9)
                row["ratio_vs_naive_time"] = res["ms"] / naive["ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.plot:
        _plot(rows, Path(args.plot))
        print(json.dumps({"name": "plot", "path": args.plot}))


if __name__ == "__main__":
    main()
