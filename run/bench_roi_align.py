# Benchmarks the fgclip RoIAlign op against torchvision.ops.roi_align and prints one JSON object
# per line: name, ms (median), speedup_vs_torchvision_per_image (torchvision per-image ms / ms,
# same device, case and pass). Also writes a bar chart of the speedups (--plot).
#
#   .venv/bin/python run/bench_roi_align.py [--device auto|cpu|cuda|all] [--plot PATH]
#
# Methods: tv_per_image = one torchvision call per image on feature[i:i+1], as upstream FG-CLIP;
# tv_batched = one torchvision call with (K, 5) rois; ours = torch.ops.fgclip.roi_align, one call
# (deterministic backward); on CUDA also ours_nondet (atomic backward) and ours_bf16.
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kernels.roi_align import boxes_to_rois, load_library, roi_align  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    n: int  # images
    c: int  # channels
    h: int
    w: int
    boxes_per_image: int
    out: int
    sampling_ratio: int
    aligned: bool
    spatial_scale: float
    # "nchw": contiguous (N, C, H, W). "tokens": the leaf is a (N, H*W, C) token tensor viewed as
    # (N, C, H, W) (channels-last memory), which is how the model produces its dense map.
    layout: str = "nchw"


CASES = [
    # FG-CLIP: ViT-B/16 @ 224 and ViT-L/14 @ 336, 4 boxes per image, 1x1 adaptive aligned pooling.
    Case("fgclip_b16_14x14", 64, 512, 14, 14, 4, 1, -1, True, 1.0),
    Case("fgclip_b16_14x14_tokens", 64, 512, 14, 14, 4, 1, -1, True, 1.0, "tokens"),
    Case("fgclip_l14_24x24", 64, 768, 24, 24, 4, 1, -1, True, 1.0),
    Case("fgclip_l14_24x24_tokens", 64, 768, 24, 24, 4, 1, -1, True, 1.0, "tokens"),
    # Detection head: 2 images x 256 proposals, 7x7 bins, stride-16 FPN level of an 800x1088 image.
    Case("detection_7x7_512boxes", 2, 256, 50, 68, 256, 7, 2, True, 1 / 16),
]


def as_feature_map(leaf: torch.Tensor, case: Case) -> torch.Tensor:  # (N, C, H, W)
    if case.layout == "tokens":
        return leaf.transpose(1, 2).reshape(case.n, case.c, case.h, case.w)
    return leaf


def make_inputs(case: Case, device: torch.device, gen: torch.Generator):
    if case.layout == "tokens":
        feats = torch.randn(case.n, case.h * case.w, case.c, generator=gen).to(device)
    else:
        feats = torch.randn(case.n, case.c, case.h, case.w, generator=gen).to(device)
    lo = torch.rand(case.n, case.boxes_per_image, 2, generator=gen) * 0.8
    size = 0.05 + torch.rand(case.n, case.boxes_per_image, 2, generator=gen) * 0.5
    boxes = torch.cat([lo, (lo + size).clamp(max=1.0)], dim=-1)  # (N, M, 4) normalised xyxy
    # Normalised -> feature grid -> input units (divide by spatial_scale).
    rois = boxes_to_rois(boxes, grid_size=(case.h, case.w))
    rois[:, 1:] /= case.spatial_scale
    return feats, rois.to(device)


def run_method(method: str, case: Case, feats: torch.Tensor, rois: torch.Tensor):
    args = (case.out, case.spatial_scale, case.sampling_ratio, case.aligned)
    if method == "tv_per_image":
        # Upstream: a Python loop over images, each call on a 1-image slice of the batch.
        per_image = [rois[rois[:, 0] == i, 1:] for i in range(case.n)]
        return lambda x: torch.cat(
            [torchvision.ops.roi_align(x[i : i + 1], [per_image[i]], *args) for i in range(case.n)]
        )
    if method == "tv_batched":
        return lambda x: torchvision.ops.roi_align(x, rois, *args)
    if method == "ours":
        return lambda x: roi_align(x, rois, *args)
    if method == "ours_nondet":
        return lambda x: roi_align(x, rois, *args, deterministic=False)
    if method == "ours_bf16":
        return lambda x: roi_align(x, rois, *args)
    raise ValueError(method)


def time_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_device(device: torch.device, iters: int, warmup: int, cases: list[Case]):
    gen = torch.Generator().manual_seed(0)
    methods = ["tv_per_image", "tv_batched", "ours"]
    if device.type == "cuda":
        methods += ["ours_nondet", "ours_bf16"]
    for case in cases:
        feats, rois = make_inputs(case, device, gen)
        for mode in ("fwd", "fwd_bwd"):
            baseline = None
            for method in methods:
                x = feats.to(torch.bfloat16) if method == "ours_bf16" else feats
                x = x.detach().requires_grad_(mode == "fwd_bwd")
                op = run_method(method, case, feats, rois)
                k = rois.shape[0]
                g = torch.randn(k, case.c, case.out, case.out, device=device, dtype=x.dtype)

                def step(op=op, x=x, g=g, mode=mode, case=case):
                    if mode == "fwd":
                        with torch.no_grad():
                            op(as_feature_map(x, case))
                    else:
                        x.grad = None
                        op(as_feature_map(x, case)).backward(g)

                ms = time_ms(step, device, iters, warmup)
                baseline = ms if method == "tv_per_image" else baseline
                name = f"{device.type}/{case.name}/{mode}/{method}"
                yield {
                    "name": name,
                    "ms": round(ms, 4),
                    "speedup_vs_torchvision_per_image": round(baseline / ms, 3),
                    "device": device.type,
                    "case": case.name,
                    "pass": mode,
                    "method": method,
                    "threads": torch.get_num_threads(),
                }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["device"], r["case"], r["pass"]) for r in rows}, key=str)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "tv_per_image"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = []
        for grp in groups:
            hit = [
                r for r in rows if (r["device"], r["case"], r["pass"]) == grp and r["method"] == m
            ]
            vals.append(hit[0]["speedup_vs_torchvision_per_image"] if hit else 0.0)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, vals, width, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), ["\n".join(g) for g in groups], fontsize=7)
    ax.set_ylabel("speedup vs torchvision per-image loop (x)")
    ax.set_title("RoIAlign: fgclip op vs torchvision.ops.roi_align")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    # auto: the GPU when there is one (keeps GPU-machine runs short), else the CPU.
    ap.add_argument("--device", default="auto", choices=["auto", "all", "cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=0, help="timed iterations (default 5 CPU, 30 GPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cases", default="", help="comma-separated subset of case names")
    ap.add_argument(
        "--plot", default=str(ROOT / "run" / "out" / "bench_roi_align.png"), help="'' to skip"
    )
    a = ap.parse_args()
    status = load_library()
    if not status.cpu:
        sys.exit(f"compiled RoIAlign missing ({status.errors}): run `bash run/build_ext.sh`")
    cases = [c for c in CASES if not a.cases or c.name in a.cases.split(",")]
    has_cuda = torch.cuda.is_available()
    devices = []
    if a.device in ("all", "cpu") or (a.device == "auto" and not has_cuda):
        devices.append(torch.device("cpu"))
    if a.device in ("all", "cuda", "auto") and has_cuda:
        if not status.cuda:
            sys.exit(f"CUDA RoIAlign kernel missing ({status.errors}): run `bash run/build_ext.sh`")
        devices.append(torch.device("cuda"))
    rows = []
    for dev in devices:
        iters = a.iters or (5 if dev.type == "cpu" else 30)
        for row in bench_device(dev, iters, a.warmup, cases):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.plot:
        plot(rows, Path(a.plot))
        print(f"# plot written to {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
