"""The Triton bias + quick GELU kernels (run by the interpreter on CPU) against the float64
reference, forward and both gradients, over odd shapes and fp32 / bf16 / fp16 with per-dtype
tolerances; and the towers' MLP taking the kernel where the dispatch sends CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from kernels.bias_act import bias_quick_gelu, bias_quick_gelu_reference

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 5, 129), (2, 1100)])
def test_kernel_matches_float64_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    y = (torch.randn(shape, generator=gen) * 3).to(dtype)
    bias = torch.randn(shape[-1], generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)

    yk, bk = y.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    out = bias_quick_gelu(yk, bk)
    out.backward(grad)
    yr, br = y.double().requires_grad_(True), bias.double().requires_grad_(True)
    ref = bias_quick_gelu_reference(yr, br)
    ref.backward(grad.double())

    tol = TOL[dtype]
    assert out.dtype == dtype and yk.grad.dtype == dtype and bk.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(yk.grad.double(), yr.grad, rtol=tol, atol=tol)
    rows = max(1, y.numel() // shape[-1])
    torch.testing.assert_close(bk.grad.double(), br.grad, rtol=tol, atol=tol * rows**0.5)


def test_bad_bias_is_named():
    with pytest.raises(ValueError, match=r"bias must be \(F,\)"):
        bias_quick_gelu(torch.zeros(2, 3), torch.zeros(4))


def test_mlp_dispatch_takes_the_kernel_for_cuda_tensors(monkeypatch):
    """models/fused.bias_quick_gelu sends CUDA tensors to the Triton kernel (imitated here by
    reporting CPU tensors as CUDA) and keeps the torch path otherwise; both equal."""
    from fgclip_mega.models import fused

    calls = []
    real = fused.triton_bias_quick_gelu

    def counted(y, b):
        calls.append(y.shape)
        return real(y, b)

    y = torch.randn(4, 3, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    eager = fused.bias_quick_gelu(y, b)
    assert calls == []  # CPU: the torch autograd node
    monkeypatch.setattr(fused, "triton_bias_quick_gelu", counted)
    monkeypatch.setattr(fused, "_on_cuda", lambda t: True)
    kernel = fused.bias_quick_gelu(y, b)
    assert calls == [(4, 3, 16)]
    torch.testing.assert_close(kernel, eager, rtol=2e-6, atol=2e-6)
