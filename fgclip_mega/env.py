"""Report which optional accelerators this machine has, which fallback is in use, and what a run
of a preset will actually use (device, precision, attention, loss, RoIAlign and decode kernels,
asked from `fgclip_mega.runtime`, the one place that decides them).

    python -m fgclip_mega.env                        # a table (run of preset fgclip_vit_b16)
    python -m fgclip_mega.env --preset tiny --json   # one JSON object
    python -m fgclip_mega.env --preset fgclip_vit_l14_336 --world-size 64 --gpu-memory-gb 80

With a preset it also prints the per-GPU memory estimate of each stage's step
(profiling/memory.py) and the micro-batch and accumulation the trainer derives from the global
batch for that GPU (train/batching.py), beside the same with activation checkpointing toggled.

`import fgclip_mega` works without any of the optional pieces.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass


@dataclass
class Feature:
    name: str
    """What is probed."""
    available: bool
    """Whether it can be used on this machine now."""
    detail: str
    """Version or the reason it is missing."""
    fallback: str
    """What fgclip_mega uses instead when it is missing ('' when it is used)."""


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return f"import failed: {type(e).__name__}: {e}"
    return str(getattr(mod, "__version__", "installed"))


def _cuda_package(name: str, module: str, cuda: bool, fallback: str) -> Feature:
    """An optional CUDA-only package: used when it imports and a GPU is present."""
    version = _version(module)
    usable = bool(version) and cuda and not version.startswith("import failed")
    return Feature(name, usable, version or "not installed", "" if usable else fallback)


def probe() -> list[Feature]:
    import torch

    from fgclip_mega.runtime import cuda_available

    cuda = cuda_available()
    feats = [
        Feature(
            "torch",
            True,
            f"{torch.__version__} (built for CUDA {torch.version.cuda})",
            "",
        ),
        Feature(
            "cuda",
            cuda,
            torch.cuda.get_device_name(0) if cuda else "no CUDA device",
            "" if cuda else "CPU: gloo backend, megatron-core through parallel/cpu_compat.py",
        ),
    ]
    for name, module, fallback in (
        ("flash_attn", "flash_attn", "torch scaled_dot_product_attention"),
        ("apex", "apex", "torch LayerNorm / megatron-core local fused-op fallbacks"),
        ("transformer_engine", "transformer_engine", "megatron-core local (non-TE) layers"),
    ):
        feats.append(_cuda_package(name, module, cuda, fallback))
    mcore = _version("megatron.core")
    feats.append(Feature("megatron_core", bool(mcore), mcore or "not installed", ""))
    triton = _version("triton")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    feats.append(
        Feature(
            "triton",
            bool(triton) and (cuda or interp),
            f"{triton}{' (interpreter)' if interp else ''}" if triton else "not installed",
            "" if cuda else "chunked PyTorch contrastive loss (Triton runs only interpreted)",
        )
    )
    dali = _version("nvidia.dali")
    gpu_decode = False
    if dali and not dali.startswith("import failed"):
        from nvidia.dali import backend

        gpu_decode = backend.GetCUDADeviceCount() > 0
    feats.append(
        Feature(
            "dali_gpu_decode",
            gpu_decode,
            f"nvidia-dali {dali}" if dali else "nvidia-dali not installed",
            "" if gpu_decode else "DALI CPU decode (device='cpu', device_id=None)",
        )
    )
    roi = _roi_align_status()
    feats.append(roi)
    return feats


def _roi_align_status() -> Feature:
    from fgclip_mega.runtime import cuda_available
    from kernels.roi_align import load_library

    st = load_library()
    want_cuda = cuda_available()
    ok = st.cpu and (st.cuda or not want_cuda)
    kinds = [k for k, have in (("CPU", st.cpu), ("CUDA", st.cuda)) if have]
    detail = f"{'+'.join(kinds) or 'none'} kernels from {st.directory}"
    if st.errors:
        detail += f" ({'; '.join(st.errors)})"
    return Feature(
        "roi_align_ext",
        ok,
        detail,
        "" if ok else "pure-PyTorch reference (build with: bash run/build_ext.sh)",
    )


def run_settings(preset: str) -> dict[str, str]:
    """What a run of `preset` will use on this machine, resolved as the trainer resolves it."""
    from fgclip_mega.presets import preset as make_preset
    from fgclip_mega.runtime import resolve_runtime

    try:
        return resolve_runtime(make_preset(preset)).describe()
    except Exception as e:  # noqa: BLE001 - e.g. attention_backend=flash without flash-attn
        return {"error": f"{type(e).__name__}: {e}"}


def memory_plans(
    preset: str, world_size: int, gpu_memory_gb: float, global_batch: int | None = None
) -> dict:
    """Per stage: the batch plan of `preset` on `world_size` GPUs of `gpu_memory_gb` (1e9 bytes)
    and the plan with activation checkpointing toggled; an 'error' entry where none fits."""
    from fgclip_mega.config import ConfigError
    from fgclip_mega.presets import preset as make_preset
    from fgclip_mega.train.batching import plan_batch

    out: dict = {"gpu_memory_gb": gpu_memory_gb, "world_size": world_size}
    cfg = make_preset(preset)
    if cfg.model.family == "fgclip2":  # NaFlex: images hold up to this many patches
        out["patch_budget"] = cfg.data.max_patch_budget
    for stage in ("global", "regional"):
        per_stage = {}
        for variant in ("preset", "toggled"):
            cfg = make_preset(preset)
            if variant == "toggled":
                cfg.parallel.activation_checkpointing = not cfg.parallel.activation_checkpointing
            try:
                dp = cfg.parallel.data_parallel_size(world_size)
                plan = plan_batch(cfg, dp, gpu_memory_gb * 1e9, stage=stage,
                                  global_batch_size=global_batch)  # fmt: skip
            except ConfigError as e:
                per_stage[variant] = {"error": str(e)}
                continue
            per_stage[variant] = {
                "activation_checkpointing": cfg.parallel.activation_checkpointing,
                "global_batch_size": plan.global_batch_size,
                "fits": plan.fits,
                **plan.estimate.as_dict(),
            }
        out[stage] = per_stage
    return out


def _print_memory(preset: str, plans: dict) -> None:
    from fgclip_mega.profiling.memory import GIB

    print(
        f"\nmemory per GPU of preset {preset!r} on {plans['world_size']} GPUs of "
        f"{plans['gpu_memory_gb']:g} GB ({plans['gpu_memory_gb'] * 1e9 / GIB:.1f} GiB):"
    )
    if "patch_budget" in plans:
        print(f"  every image at data.max_patch_budget={plans['patch_budget']} patches: the "
              "worst case (a batch gets the smallest budget its largest image fits)")  # fmt: skip
    for stage in ("global", "regional"):
        for variant, p in plans[stage].items():
            label = f"stage {stage}, {'as preset' if variant == 'preset' else 'toggled'}"
            if "error" in p:
                print(f"  {label}: {p['error']}")
                continue
            ckpt = "on" if p["activation_checkpointing"] else "off"
            print(
                f"  {label} (checkpointing {ckpt}): global batch {p['global_batch_size']} = "
                f"micro-batch {p['micro_batch_size']} x DP {p['dp_size']} x accumulation "
                f"{p['accumulation']}; peak {p['total_gib']:.1f} GiB ({p['peak_phase']})"
                f"{'' if p['fits'] else '  DOES NOT FIT'}"
            )
            print("    " + ", ".join(f"{k} {v:.2f}" for k, v in p["parts_gib"].items()) + " GiB")
            acts = p["micro_batch_activations_gib"]
            print("    activations of one micro-batch: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in acts.items() if v) + " GiB")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--preset", default="fgclip_vit_b16", help="the run to resolve")
    parser.add_argument("--world-size", type=int, default=64, help="GPUs of the sized run")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per GPU, 1e9 bytes")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="default: the preset's train.global_batch_size")  # fmt: skip
    args = parser.parse_args(argv)
    from fgclip_mega.runtime import GPUUnusableError

    try:
        feats = probe()
    except GPUUnusableError as e:  # a GPU this torch cannot use: say so instead of a table
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = run_settings(args.preset)
    plans = memory_plans(args.preset, args.world_size, args.gpu_memory_gb, args.global_batch)
    if args.json:
        print(json.dumps({**{f.name: asdict(f) for f in feats}, "run": run, "memory": plans}))
        return 0
    width = max(len(f.name) for f in feats)
    for f in feats:
        mark = "yes" if f.available else "no "
        line = f"{f.name:<{width}}  {mark}  {f.detail}"
        if f.fallback:
            line += f"  -> fallback: {f.fallback}"
        print(line)
    print(f"\na run of preset {args.preset!r} here uses:")
    for key, value in run.items():
        print(f"  {key:<{width}}  {value}")
    _print_memory(args.preset, plans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
