"""A few bf16 training steps of each FG-CLIP stage for the B/16 and L/14-336 presets, on a GPU.

Runs the real training loop (fgclip_mega.train.loop.train: megatron DDP + optimizer, Triton
losses, CUDA RoIAlign) on the embedded synthetic data, one case after the other in this process,
and prints one JSON line per case: loss parts of every step, whether all are finite, wall time,
peak GPU memory. Part of run/gpu_check.py.

Without nvidia-dali (the lent GPU machine lacks it) the loader is the PIL reference loader
(reported as "loader" in each line). Checkpoints go to a temporary folder, removed at the end.

  python run/gpu_train_step.py                              # all four cases, 3 steps each
  python run/gpu_train_step.py --cases fgclip_vit_b16:global --steps 5 --layers 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [
    "fgclip_vit_b16:global",
    "fgclip_vit_b16:regional",
    "fgclip_vit_l14_336:global",
    "fgclip_vit_l14_336:regional",
]


def run_case(preset: str, stage: str, args, work: Path) -> dict:
    import torch

    from fgclip_mega.config import load_config
    from fgclip_mega.train import loop

    overrides = [
        f"train.stage={stage}",
        f"train.steps={args.steps}",
        "train.log_interval=1",
        "train.eval_batches=0",
        f"train.output_dir={work / f'{preset}_{stage}'}",
        "precision.params_dtype=bf16",
        "precision.compute_dtype=bf16",
        f"data.micro_batch_size={args.micro_batch}",
        f"data.synthetic_num_samples={4 * args.micro_batch}",
        f"data.synthetic_dir={work / f'data_{preset}'}",
    ]
    if args.layers:
        overrides += [f"model.vision.layers={args.layers}", f"model.text.layers={args.layers}"]
    cfg = load_config(preset, None, overrides)

    # data.loader=auto decodes with PIL where DALI is absent (the lent GPU machine).
    loader = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "pil"
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = loop.train(cfg)
    seconds = time.perf_counter() - start
    losses = [{k: round(v, 5) for k, v in step.items()} for step in result.losses]
    finite = bool(losses) and all(math.isfinite(v) for step in losses for v in step.values())
    return {
        "case": f"{preset}:{stage}",
        "ok": finite and len(losses) == args.steps,
        "steps": len(losses),
        "finite": finite,
        "losses": losses,
        "seconds_incl_build": round(seconds, 2),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "layers": args.layers or "preset",
        "micro_batch": args.micro_batch,
        "loader": loader,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="*", default=CASES, help="preset:stage pairs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=0, help="vision and text layers (0: preset's)")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"case": "all", "ok": False, "error": "no CUDA device"}))
        return 1
    failures = 0
    with tempfile.TemporaryDirectory(prefix="gpu_train_step_") as tmp:
        for case in args.cases:
            preset, _, stage = case.partition(":")
            try:
                line = run_case(preset, stage or "global", args, Path(tmp))
            except Exception as e:  # noqa: BLE001 - one failed case must not hide the others
                line = {"case": case, "ok": False, "error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            failures += not line["ok"]
            print(json.dumps(line), flush=True)
            torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
