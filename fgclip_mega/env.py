"""Report which optional accelerators this machine has, which fallback is in use, and what a run
of a preset will actually use (device, precision, attention, loss, RoIAlign and decode kernels,
asked from `fgclip_mega.runtime`, the one place that decides them).

    python -m fgclip_mega.env                        # a table (run of preset fgclip_vit_b16)
    python -m fgclip_mega.env --preset tiny --json   # one JSON object

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
    from fgclip_mega.config import preset as make_preset
    from fgclip_mega.runtime import resolve_runtime

    try:
        return resolve_runtime(make_preset(preset)).describe()
    except Exception as e:  # noqa: BLE001 - e.g. attention_backend=flash without flash-attn
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--preset", default="fgclip_vit_b16", help="the run to resolve")
    args = parser.parse_args(argv)
    feats = probe()
    run = run_settings(args.preset)
    if args.json:
        print(json.dumps({**{f.name: asdict(f) for f in feats}, "run": run}))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
