"""The one place that picks the contrastive-loss implementation.

auto: the fused Triton kernels on CUDA, the chunked PyTorch tiles elsewhere. "naive" (the full
B x B logits, OpenCLIP style) only when asked for. "triton" off CUDA is an error unless the
Triton interpreter is on (TRITON_INTERPRET=1, how the CPU tests run the kernels).
Also which dtype the embeddings enter the losses in (`upcast_loss_inputs`).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

_log = logging.getLogger(__name__)


def resolve_implementation(name: str, device: torch.device | str) -> str:
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "chunked"
        if importlib.util.find_spec("triton") is None:
            _log.warning("loss.implementation=auto on CUDA without triton: using chunked")
            return "chunked"
        return "triton"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "loss.implementation=triton needs a CUDA device (or TRITON_INTERPRET=1 set before "
            "triton is imported, for tests); use auto or chunked on CPU"
        )
    if name not in ("triton", "chunked", "naive"):
        raise ValueError(f"unknown loss.implementation {name!r}")
    return name


def upcast_loss_inputs(setting: bool | str, device: torch.device | str) -> bool:
    """precision.loss_in_fp32: whether the embeddings are upcast to fp32 before the losses.

    auto = only off CUDA. On CUDA bf16 embeddings go in as they are: every implementation
    accumulates in fp32 inside (Triton: native bf16 dots into fp32 logits, statistics and
    gradients; chunked / naive upcast each tile), and the Triton dots run on the bf16 tensor
    cores instead of 3xTF32 (fewer registers, no spilling tile). On CPU the embeddings are fp32
    already unless params are bf16, where the fp32 path is the faster one.
    """
    if setting == "auto":
        return torch.device(device).type != "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"precision.loss_in_fp32 must be true, false or auto, got {setting!r}")
