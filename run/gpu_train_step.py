"""Training steps of FG-CLIP on a GPU, each case with the features run/gpu_check.py must cover.

Runs the real training loop (fgclip_mega.train.loop.train: NCCL process group of one, megatron
DDP + optimizer, Triton losses, CUDA RoIAlign) on the embedded synthetic data, one case after the
other in this process, and prints one JSON line per case: loss parts of every step, finite or
not, what each option checked, wall time, peak GPU memory. Part of run/gpu_check.py.

A case is `preset:stage[:option+option...]`; options:
  distopt   megatron DDP with overlap_grad_reduce and the distributed optimizer
  ckpt      activation checkpointing (parallel.activation_checkpointing)
  siglip    the sigmoid loss (loss.kind=sigmoid, SigLIP's temperature and bias init)
  eval      the evaluation suite at the end (train.eval_batches=1)
  sdpa      the whole run under torch.nn.attention.sdpa_kernel([FLASH, CUDNN]): the math (and
            mem-efficient) backends are disallowed, so a call SDPA cannot give to flash or cuDNN
            raises; a direct bf16 SDPA probe first shows the context works
  syncdebug steps >= 2 under torch.cuda.set_sync_debug_mode("error"): any host sync in a whole
            training step raises, except megatron's gradient-norm read (one per step, allowed
            and counted: the trainer's documented sync)
Without nvidia-dali (the lent GPU machine lacks it) the loader is the PIL reference loader.

  python run/gpu_train_step.py                              # the default cases
  python run/gpu_train_step.py --cases fgclip_vit_b16:regional:syncdebug --steps 3 --layers 2
  python run/gpu_train_step.py --cpu --cases tiny:global:distopt+ckpt   # CPU dry run (no GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

FEATURE_CASES = [
    "fgclip_vit_b16:global:distopt+ckpt+sdpa",
    "fgclip_vit_b16:global:siglip",
    "fgclip_vit_b16:regional:syncdebug+eval",
    # FG-CLIP 2: NaFlex batches of mixed budgets (padding masks in SDPA: memory-efficient or
    # cuDNN only), the stage-1-frozen heads under DDP overlap, the CMR margin on the device.
    "fgclip2_base_naflex:regional:distopt+sdpa+syncdebug",
]
PRESET_CASES = ["fgclip_vit_b16:regional", "fgclip_vit_l14_336:regional"]
OPTIONS = ("distopt", "ckpt", "siglip", "eval", "sdpa", "syncdebug")


@dataclasses.dataclass
class Case:
    preset: str
    stage: str
    options: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Case:
        preset, _, rest = text.partition(":")
        stage, _, opts = rest.partition(":")
        options = tuple(o for o in opts.split("+") if o)
        bad = [o for o in options if o not in OPTIONS]
        if not preset or bad or (stage or "global") not in ("global", "regional"):
            raise SystemExit(f"bad case {text!r}: want preset:stage[:{'+'.join(OPTIONS)}]")
        return cls(preset, stage or "global", options)

    def __str__(self) -> str:
        opts = "+".join(self.options)
        return f"{self.preset}:{self.stage}" + (f":{opts}" if opts else "")

    def overrides(self) -> list[str]:
        out = [f"train.stage={self.stage}"]
        if "distopt" in self.options:
            out += ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true"]
        if "ckpt" in self.options:
            out += ["parallel.activation_checkpointing=true"]
        if "siglip" in self.options:
            out += ["loss.kind=sigmoid", "model.logit_bias_init=-10"]
            out += ["model.logit_scale_init=2.3026"]
        out += [f"train.eval_batches={1 if 'eval' in self.options else 0}"]
        return out


def _has_field(section, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(section)}


def build_config(case: Case, args, work: Path):
    from fgclip_mega.presets import load_config

    tag = f"{case.preset}_{case.stage}_{'_'.join(case.options) or 'plain'}"
    overrides = case.overrides() + [
        f"train.steps={args.steps}",
        "train.log_interval=1",
        f"train.output_dir={work / tag}",
        f"data.micro_batch_size={args.micro_batch}",
        f"data.synthetic_num_samples={4 * args.micro_batch}",
        f"data.synthetic_dir={work / f'data_{case.preset}'}",
    ]
    if not args.cpu:
        overrides += ["precision.params_dtype=bf16", "precision.compute_dtype=bf16"]
    elif "distopt" not in case.options:
        # What CUDA's default (overlap_grad_reduce=None) resolves to, so the CPU dry run takes
        # the GPU's bucket path (megatron checks there that every param got its gradient).
        overrides += ["parallel.overlap_grad_reduce=true"]
    if args.layers:
        overrides += [f"model.vision.layers={args.layers}", f"model.text.layers={args.layers}"]
    cfg = load_config(case.preset, None, overrides)
    if _has_field(cfg.train, "global_batch_size"):
        cfg.train.global_batch_size = 0  # one micro-batch per step (no accumulation) here
    return cfg


class SyncDebug:
    """Sync debug mode "error" over whole training steps (from `first_step` on), with
    megatron's gradient-norm read allowed and counted per step."""

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.steps: list[int] = []
        self.allowed_per_step: list[int] = []
        self._allowed = 0
        self._active = False

    @contextlib.contextmanager
    def installed(self):
        import megatron.core.optimizer.clip_grads as clip_grads
        import megatron.core.optimizer.distrib_optimizer as distrib
        import megatron.core.optimizer.optimizer as optimizer

        from fgclip_mega.train import loop

        # Patched where megatron looks it up (a module global of each optimizer module).
        modules = [m for m in (optimizer, distrib, clip_grads) if hasattr(m, "get_grad_norm_fp32")]
        saved = {m: m.get_grad_norm_fp32 for m in modules}
        step_fn = loop.train_step

        def grad_norm(*a, **k):
            if not self._active:
                return saved[clip_grads](*a, **k)
            import torch

            self._allowed += 1
            torch.cuda.set_sync_debug_mode("default")
            try:
                return saved[clip_grads](*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        def step(run, batch, step_no):
            import torch

            if step_no < self.first_step:
                return step_fn(run, batch, step_no)
            torch.cuda.synchronize()  # what earlier work left must not count
            self._allowed, self._active = 0, True
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = step_fn(run, batch, step_no)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self._active = False
            self.steps.append(step_no)
            self.allowed_per_step.append(self._allowed)
            return out

        for m in modules:
            m.get_grad_norm_fp32 = grad_norm
        loop.train_step = step
        try:
            yield self
        finally:
            loop.train_step = step_fn
            for m, fn in saved.items():
                m.get_grad_norm_fp32 = fn


def sdpa_probe(head_dim: int) -> str:
    """A bf16 SDPA call that flash or cuDNN must take (math disallowed); returns which."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 197, head_dim, device="cuda", dtype=torch.bfloat16)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q)
            return backend.name
        except RuntimeError:
            continue
    raise RuntimeError(f"neither flash nor cuDNN SDPA takes bf16 head_dim {head_dim}")


def run_case(case: Case, args, work: Path) -> dict:
    import torch

    from fgclip_mega.runtime import resolve_runtime
    from fgclip_mega.train import loop

    cfg = build_config(case, args, work)
    runtime = resolve_runtime(cfg, torch.device("cuda" if not args.cpu else "cpu"))
    line: dict = {"case": str(case)}
    line["runtime"] = runtime.describe()
    checks: dict = {}
    contexts = contextlib.ExitStack()
    sync = None
    if "sdpa" in case.options:
        if args.cpu:
            checks["sdpa"] = "not checked: CPU dry run"
        elif runtime.attention != "sdpa":
            checks["sdpa"] = f"not applicable: attention is {runtime.attention}"
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            head_dim = cfg.model.vision.width // cfg.model.vision.heads
            checks["sdpa_probe"] = sdpa_probe(head_dim)
            contexts.enter_context(
                sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])
            )
            checks["sdpa"] = "whole run with FLASH/CUDNN only (math disallowed)"
    if "syncdebug" in case.options:
        if args.cpu:
            checks["sync_debug"] = "not checked: CPU dry run"
        else:
            sync = contexts.enter_context(SyncDebug(first_step=2).installed())
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with contexts:
        result = loop.train(cfg, keep_process_groups=True)
        import torch.distributed as dist

        line["backend"] = dist.get_backend()
        if not args.cpu and line["backend"] != "nccl":
            checks["backend_error"] = f"process group is {line['backend']}, not nccl"
        from fgclip_mega.parallel import destroy_parallel

        destroy_parallel()
    seconds = time.perf_counter() - start
    losses = [{k: round(v, 5) for k, v in step.items()} for step in result.losses]
    finite = bool(losses) and all(math.isfinite(v) for step in losses for v in step.values())
    ok = finite and len(losses) == args.steps and "backend_error" not in checks
    if sync is not None:
        checks["sync_debug_steps"] = sync.steps
        checks["allowed_grad_norm_syncs"] = sync.allowed_per_step
        ok = ok and bool(sync.steps) and all(n <= 1 for n in sync.allowed_per_step)
    if "eval" in case.options:
        checks["evals"] = result.evals
        ok = ok and bool(result.evals)
    if "siglip" in case.options:
        checks["loss_kind"] = cfg.loss.kind
    line.update(
        ok=ok,
        steps=len(losses),
        finite=finite,
        checks=checks,
        losses=losses,
        seconds_incl_build=round(seconds, 2),
        peak_gb=None if args.cpu else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        layers=args.layers or "preset",
        micro_batch=args.micro_batch,
        loader="dali" if importlib.util.find_spec("nvidia.dali") is not None else "pil",
    )
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="*", default=FEATURE_CASES, help="preset:stage[:opts] cases")
    p.add_argument("--presets", action="store_true", help="the full-depth preset cases instead")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=0, help="vision and text layers (0: preset's)")
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU (no GPU checks)")
    args = p.parse_args()
    cases = [Case.parse(c) for c in (PRESET_CASES if args.presets else args.cases)]

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"case": "all", "ok": False, "error": "no CUDA device"}))
        return 1
    failures = 0
    with tempfile.TemporaryDirectory(prefix="gpu_train_step_") as tmp:
        for case in cases:
            try:
                line = run_case(case, args, Path(tmp))
            except Exception as e:  # noqa: BLE001 - one failed case must not hide the others
                frame = traceback.extract_tb(e.__traceback__)[-1]  # megatron asserts say nothing
                where = f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"
                line = {"case": str(case), "ok": False, "error": f"{type(e).__name__}: {e}"}
                line["at"] = where
                traceback.print_exc()
                with contextlib.suppress(Exception):
                    from fgclip_mega.parallel import destroy_parallel

                    destroy_parallel()
            failures += not line["ok"]
            print(json.dumps(line), flush=True)
            if not args.cpu:
                torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
