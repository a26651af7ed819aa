"""Bias add + quick GELU, x = y + b; out = x * sigmoid(1.702 x), as one Triton kernel forward
and one backward (plus the bias-gradient row sum): the fc1 epilogue of the CLIP towers' MLP on
GPUs when the blocks are not compiled.

reference.py: float64 oracle; triton_kernels.py: the kernels; ops.py: launcher and autograd.
"""

from kernels.bias_act.ops import bias_quick_gelu
from kernels.bias_act.reference import bias_quick_gelu_reference

__all__ = ["bias_quick_gelu", "bias_quick_gelu_reference"]
