"""Launcher and autograd wrapper of the bias + quick GELU kernels.

Forward keeps only the GEMM output y and the bias for backward (as megatron's fused bias-GELU):
one (..., F) tensor instead of eager's two. The bias gradient is the fp32 row sum of the input
gradient the backward kernel writes (one torch reduction).
"""

from __future__ import annotations

import torch

from kernels.bias_act.reference import ALPHA

BLOCK = 1024


def _launch(kernel, *tensors: torch.Tensor, n: int, f: int) -> None:
    grid = (-(-n // BLOCK),)  # one program per BLOCK elements
    kernel[grid](*tensors, n, f, ALPHA=ALPHA, BLOCK=BLOCK)


def _check(y: torch.Tensor, bias: torch.Tensor) -> None:
    if bias.dim() != 1 or y.shape[-1] != bias.shape[0]:
        raise ValueError(
            f"bias must be (F,) with F = y's last dim; got y {tuple(y.shape)}, "
            f"bias {tuple(bias.shape)}"
        )
    if y.device != bias.device:
        raise ValueError(f"y on {y.device} but bias on {bias.device}")


class _BiasQuickGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        from kernels.bias_act.triton_kernels import bias_quick_gelu_fwd

        y = y.contiguous()
        out = torch.empty_like(y)
        _launch(bias_quick_gelu_fwd, y, bias.contiguous(), out, n=y.numel(), f=y.shape[-1])
        ctx.save_for_backward(y, bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from kernels.bias_act.triton_kernels import bias_quick_gelu_bwd

        y, bias = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(y)
        _launch(bias_quick_gelu_bwd, grad, y, bias.contiguous(), dx, n=y.numel(), f=y.shape[-1])
        dbias = dx.reshape(-1, dx.shape[-1]).sum(0, dtype=torch.float32)
        return dx, dbias.to(bias.dtype)


def bias_quick_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """quick_gelu(y + bias) with y (..., F), bias (F,), by the Triton kernels (CUDA tensors, or
    CPU tensors under TRITON_INTERPRET=1)."""
    _check(y, bias)
    return _BiasQuickGelu.apply(y, bias)
