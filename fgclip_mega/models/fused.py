"""The MLP's bias add and activation as one autograd node (fc1 runs with skip_bias_add).

Eager autograd records quick_gelu(y + b) as four nodes and keeps two (N, B, F) tensors for
backward: y + b and sigmoid(1.702 (y + b)). `BiasQuickGelu` keeps only the GEMM output y (and
the bias) and recomputes the rest in backward, as megatron's fused bias-GELU does; its forward
allocates two (N, B, F) tensors instead of four. On CUDA the same node runs as one Triton kernel
each way (kernels/bias_act). Under torch.compile (`parallel.compile_blocks`) the plain expression
is traced instead, and Inductor fuses it into the GEMM's neighbours.
megatron's own `bias_gelu_impl` is the tanh GELU (SigLIP's, not CLIP's quick GELU) and needs its
jit fuser (torch.compile) to fuse anything, so it is not used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ALPHA = 1.702  # quick GELU: x * sigmoid(1.702 x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(_ALPHA * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class BiasQuickGelu(torch.autograd.Function):
    """quick_gelu(y + bias); y (..., F), bias (F,)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, bias)
        x = y + bias
        return torch.sigmoid(x * _ALPHA).mul_(x)  # two allocations: x and the output

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, bias = ctx.saved_tensors
        x = y + bias
        s = torch.sigmoid(x * _ALPHA)
        # d/dx x s(ax) = s + a x s (1 - s) = s (1 + a x (1 - s))
        dx = x.mul_(_ALPHA).mul_(1 - s).add_(1).mul_(s).mul_(grad)
        dbias = dx.reshape(-1, dx.shape[-1]).sum(0)
        return dx.to(y.dtype), dbias.to(bias.dtype)


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def triton_bias_quick_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from kernels.bias_act import bias_quick_gelu as kernel

    return kernel(y, bias)


def bias_quick_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The one dispatch: traced math under torch.compile (Inductor fuses it), the Triton kernel
    for CUDA tensors (one kernel forward, one backward + the bias row sum), else the torch
    autograd node (the CPU path)."""
    if torch.compiler.is_compiling():
        return quick_gelu(y + bias)
    if _on_cuda(y):
        return triton_bias_quick_gelu(y, bias)
    return BiasQuickGelu.apply(y, bias)


def bias_gelu_tanh(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return gelu_tanh(y + bias)  # one GELU kernel already; the add stays separate in eager


# MLP activations by their HF `hidden_act` names: OpenAI CLIP's, and SigLIP's gelu_pytorch_tanh.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}
BIAS_ACTIVATIONS = {"quick_gelu": bias_quick_gelu, "gelu_tanh": bias_gelu_tanh}
