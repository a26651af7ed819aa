"""Tiled contrastive losses (chunked PyTorch, Triton) against the float64 naive reference.

Every case compares the loss and the gradients of both feature matrices, the scale and (sigmoid)
the bias with the float64 reference evaluated on the same (dtype-rounded) inputs. Errors are
relative: loss |x - ref| / max(|ref|, 1) (the loss is a difference of O(scale) terms, so fp32
resolves it to ~1e-7 absolute; at B = 1 softmax it is exactly 0); each gradient
max|x - ref| / max(max|ref|, 1e-6). Triton runs under TRITON_INTERPRET=1 on
CPU (set by conftest), where bf16 operands are upcast before tl.dot.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.contrastive import (
    pair_losses,
    sigmoid_contrastive_loss,
    sigmoid_contrastive_reference,
    softmax_contrastive_loss,
    softmax_contrastive_reference,
)

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2)}  # (loss, gradients)
TIGHT = dict(rtol=1e-5, atol=1e-5)  # fp32 results against float64


def _features(R, C, D, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(R, D, generator=g), dim=-1)
    b = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    # Positives correlated with their rows, as in training, so the softmax is not uniform.
    b[offset : offset + R] = F.normalize(b[offset : offset + R] + 0.5 * a, dim=-1)
    return a, b


def _run(fn, a, b, scale, bias):
    leaves = [x.detach().clone().requires_grad_() for x in (a, b, scale, bias)]
    loss = fn(*leaves)
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return loss.detach(), grads


def _check(kind, impl, R, C, D, dtype, offset=0, symmetric=True, chunk=48, scale=14.3):
    a, b = _features(R, C, D, offset)
    a, b = a.to(dtype), b.to(dtype)
    s, t = torch.tensor(scale), torch.tensor(-2.5)
    if kind == "softmax":
        fn = lambda a, b, s, t: (
            softmax_contrastive_loss(
                a, b, s, offset=offset, symmetric=symmetric, impl=impl, chunk_size=chunk
            )
            + 0 * t
        )
        ref_fn = lambda a, b, s, t: (
            softmax_contrastive_reference(a, b, s, offset, symmetric) + 0 * t
        )
    else:
        fn = lambda a, b, s, t: sigmoid_contrastive_loss(
            a, b, s, t, offset=offset, impl=impl, chunk_size=chunk
        )
        ref_fn = lambda a, b, s, t: sigmoid_contrastive_reference(a, b, s, t, offset)
    loss, grads = _run(fn, a, b, s, t)
    ref_loss, ref_grads = _run(ref_fn, a.double(), b.double(), s.double(), t.double())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    loss_tol, grad_tol = TOL[dtype]
    err = (loss.double() - ref_loss).abs().item() / max(ref_loss.abs().item(), 1.0)
    assert err <= loss_tol, f"loss {loss.item()} vs {ref_loss.item()}: rel err {err:.2e}"
    for name, g, rg in zip(("dA", "dB", "dscale", "dbias"), grads, ref_grads, strict=True):
        err = (g.double() - rg).abs().max().item() / max(rg.abs().max().item(), 1e-6)
        assert err <= grad_tol, f"{name}: rel err {err:.2e}"


SHAPES = [(B, D) for B in (1, 7, 130) for D in (3, 64, 200)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["chunked", "triton", "naive"])
def test_square_matches_float64_reference(impl, kind, B, D, dtype):
    _check(kind, impl, B, B, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("R,C,offset", [(7, 130, 0), (7, 130, 123), (5, 21, 10), (1, 3, 2)])
def test_rectangular_with_row_offset(impl, kind, R, C, offset, dtype):
    # Local rows against global columns, as on data-parallel rank offset // R.
    _check(kind, impl, R, C, 64, dtype, offset=offset, symmetric=False)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_triton_several_feature_and_k_tiles(kind):
    # D = 300 > 256: two BLOCK_K slices in every logit tile and two BLOCK_D output tiles (the
    # interpreter config), so the feature-tiled backward and its dscale partials are exercised.
    _check(kind, "triton", 70, 70, 300, torch.float32)


@pytest.mark.parametrize("chunk", [1, 3, 64, 4096])
def test_chunk_sizes(chunk):
    _check("softmax", "chunked", 37, 37, 20, torch.float32, chunk=chunk)


def test_max_scale_no_overflow():
    # exp(x - lse) at scale 100 (the clamp) with strongly aligned pairs.
    for impl in ("chunked", "triton"):
        _check("softmax", impl, 33, 33, 16, torch.float32, scale=100.0)
        _check("sigmoid", impl, 33, 33, 16, torch.float32, scale=100.0)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_pair_losses_rows_and_columns(impl):
    # Per-row and per-column losses of a square batch, against per-element float64 formulas.
    a, b = _features(13, 13, 24, 0)
    s, t = torch.tensor(7.0), torch.tensor(-1.0)
    x = s.double() * (a.double() @ b.double().T)
    target = torch.arange(13)
    row, col = pair_losses(a, b, s, kind="softmax", rows=True, cols=True, impl=impl)
    torch.testing.assert_close(row.double(), F.cross_entropy(x, target, reduction="none"), **TIGHT)
    torch.testing.assert_close(
        col.double(), F.cross_entropy(x.T, target, reduction="none"), **TIGHT
    )
    row, col = pair_losses(a, b, s, t, kind="sigmoid", rows=True, cols=True, impl=impl)
    z = 2 * torch.eye(13, dtype=torch.float64) - 1
    nll = -F.logsigmoid(z * (x + t.double()))
    torch.testing.assert_close(row.double(), nll.sum(1), **TIGHT)
    torch.testing.assert_close(col.double(), nll.sum(0), **TIGHT)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_primitives_without_positives(impl, kind):
    # The tile primitives on a block with no positives (what the ring uses for other ranks'
    # blocks): statistics and their gradients for arbitrary upstream g_row, g_col.
    from kernels.contrastive import primitives

    prims = primitives(impl)
    a, b = _features(11, 70, 40, 0)
    a, b = a.double().requires_grad_(), b.double().requires_grad_()
    s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    g_row, g_col = torch.rand(11, generator=g), torch.rand(70, generator=g)
    x = s * (a @ b.T) + t
    if kind == "softmax":
        ref_row, ref_col = torch.logsumexp(x, 1), torch.logsumexp(x, 0)
    else:
        ref_row, ref_col = F.softplus(x).sum(1), F.softplus(x).sum(0)
    ((ref_row * g_row).sum() + (ref_col * g_col).sum()).backward()
    a32, b32, s32, t32 = (
        a.detach().float(),
        b.detach().float(),
        s.detach().float(),
        t.detach().float(),
    )
    row, col = prims.fwd(a32, b32, s32, t32, kind, True, True, 16, None)
    torch.testing.assert_close(row.double(), ref_row.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(col.double(), ref_col.detach(), rtol=1e-6, atol=1e-5)
    da, db, ds, dt = prims.bwd(a32, b32, s32, t32, kind, row, g_row, col, g_col, 16, None)
    for got, ref in ((da, a.grad), (db, b.grad), (ds, s.grad), (dt, t.grad)):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err <= 1e-5, err


def test_chunked_saves_no_logit_matrix():
    # What autograd keeps between forward and backward is O(B * d): the inputs, the scale/bias
    # and two length-B statistics, never a B x B tensor.
    B, D = 512, 8
    a, b = (x.requires_grad_() for x in _features(B, B, D, 0))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        softmax_contrastive_loss(a, b, torch.tensor(10.0), impl="chunked", chunk_size=64)
    assert saved and max(saved) <= B * D, saved
    assert sum(saved) < 8 * B * D, saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        softmax_contrastive_loss(a, b, torch.tensor(10.0), impl="naive")
    assert max(saved) >= B * B  # the check above can fail: naive does keep the logits


def test_rejects_bad_arguments():
    a, b = _features(4, 6, 8, 0)
    with pytest.raises(ValueError, match="square"):
        softmax_contrastive_loss(a, b, torch.tensor(1.0), symmetric=True)
    with pytest.raises(ValueError, match="outside"):
        softmax_contrastive_loss(a, b, torch.tensor(1.0), offset=3, symmetric=False)
    with pytest.raises(ValueError, match="unknown"):
        softmax_contrastive_loss(a, a, torch.tensor(1.0), impl="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_triton_on_gpu_matches_reference(kind, dtype):
    # The compiled (non-interpreted) kernels with GPU tile sizes, incl. several D tiles.
    for B, D in [(1, 3), (130, 200), (1000, 512), (257, 768)]:
        a, b = _features(B, B, D, 0)
        a, b = a.cuda().to(dtype), b.cuda().to(dtype)
        s, t = torch.tensor(14.3, device="cuda"), torch.tensor(-2.5, device="cuda")
        if kind == "softmax":
            fn = lambda a, b, s, t: softmax_contrastive_loss(a, b, s, impl="triton") + 0 * t
            rf = lambda a, b, s, t: softmax_contrastive_reference(a, b, s) + 0 * t
        else:
            fn = lambda a, b, s, t: sigmoid_contrastive_loss(a, b, s, t, impl="triton")
            rf = lambda a, b, s, t: sigmoid_contrastive_reference(a, b, s, t)
        loss, grads = _run(fn, a, b, s, t)
        ref_loss, ref_grads = _run(rf, a.double(), b.double(), s.double(), t.double())
        loss_tol, grad_tol = TOL[dtype]
        assert (loss.double() - ref_loss).abs() / max(ref_loss.abs().item(), 1.0) <= loss_tol
        for g, rg in zip(grads, ref_grads, strict=True):
            err = (g.double() - rg).abs().max() / max(rg.abs().max().item(), 1e-6)
            assert err <= grad_tol
