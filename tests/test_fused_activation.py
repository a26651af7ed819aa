"""Issue 21 item 6: fc1's bias add and quick GELU as one autograd node (models/fused.py).

Checked against the unfused expression in float64 (values and both gradients), by gradcheck,
and for what it keeps for backward: one (N, B, F) tensor, where the unfused form kept two.
"""

from __future__ import annotations

import torch

from fgclip_mega.models.fused import BiasQuickGelu, bias_quick_gelu, quick_gelu


def _unfused(y, b):
    x = y + b
    return x * torch.sigmoid(1.702 * x)


def test_bias_quick_gelu_equals_unfused_math():
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(7, 3, 40, generator=g) * 3).requires_grad_()
    b = torch.randn(40, generator=g).requires_grad_()
    w = torch.randn(7, 3, 40, generator=g)
    (bias_quick_gelu(y, b) * w).sum().backward()
    y64, b64 = (t.detach().double().requires_grad_() for t in (y, b))
    ref = _unfused(y64, b64)
    (ref * w.double()).sum().backward()
    out = bias_quick_gelu(y.detach(), b.detach())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    # The same expression as the eager activation, bit for bit in the forward.
    assert torch.equal(out, quick_gelu(y.detach() + b.detach()))


def test_bias_quick_gelu_gradcheck():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 2, 6, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(BiasQuickGelu.apply, (y, b))


def test_mlp_keeps_one_wide_tensor_for_its_activation(world):
    from fgclip_mega.models.layers import MLP, megatron_config

    torch.manual_seed(0)
    tp_group = world.tp_group
    mlp = MLP(16, 64, 2, megatron_config(1, False, torch.float32), tp_group)
    x = torch.randn(5, 3, 16, requires_grad=True)
    saved = []

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == 64:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    # The GEMM output (for the activation's backward) and the activation (fc2's input).
    assert len({t.data_ptr() for t in saved}) == 2, [tuple(t.shape) for t in saved]
    y = torch.nn.functional.linear(x, mlp.fc1.weight)
    ref = torch.nn.functional.linear(quick_gelu(y + mlp.fc1.bias), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_unfused_form_kept_two_wide_tensors():
    """What the eager activation kept (the baseline of the test above)."""
    x = torch.randn(5, 3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quick_gelu(x + torch.zeros(64))
    assert len({t.data_ptr() for t in saved if t.dim() == 3}) == 2
