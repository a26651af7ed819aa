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
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from kernels.contrastive import (
    launcher,
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


# (R, C, offset, D): b = 1, C not a multiple of any tile or split (128 columns under the
# interpreter), positives at the start, the end and across slab boundaries, odd D.
RECT = [(1, 300, 0, 37), (1, 300, 299, 129), (70, 333, 200, 37), (130, 131, 1, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("R,C,offset,D", RECT)
def test_rectangular_many_tiles_and_slabs(impl, kind, R, C, offset, D, dtype, monkeypatch):
    # Small slabs (Triton backward: 64 x 64, or 1 x 128 at R = 1) and tiles (chunked: 16 x 16,
    # or 1 x 256), so rows and columns both span several of them; forward splits: 3 of 128.
    monkeypatch.setattr(launcher, "SLAB_ELEMS", 128)
    _check(kind, impl, R, C, D, dtype, offset=offset, symmetric=False, chunk=16)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_square_symmetric_many_slabs(impl, kind, monkeypatch):
    # Both directions (the column statistics and their G terms) across 3 x 3 slabs / tiles.
    monkeypatch.setattr(launcher, "SLAB_ELEMS", 128)
    _check(kind, impl, 150, 150, 21, torch.float32, chunk=64)


def test_forward_splits_fill_the_gpu(monkeypatch):
    # The launch policy on a 132-SM GPU (no kernel runs): few local rows against many columns
    # get enough column splits for ~2 programs per SM; every split is non-empty.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(launcher, "_num_sms", lambda index: 132)
    dev = torch.device("cuda", 0)
    for R, C in [(128, 8192), (256, 32768), (1024, 131072), (1, 8001), (256, 300)]:
        n, per = launcher._splits(R, C, dev)
        assert per % 128 == 0 and (n - 1) * per < C <= n * per, (R, C, n, per)
        programs = -(-R // 64) * n
        assert programs >= 2 * 132 or per <= 256, (R, C, n, per)
    assert launcher._splits(65536, 65536, dev)[0] == 1  # square: the rows alone fill the GPU


def test_slab_shape_bounds():
    for R, C in [(1, 10**6), (256, 32768), (1024, 131072), (65536, 65536), (3, 5)]:
        rs, cs = launcher.slab_shape(R, C)
        assert 1 <= rs <= R and 1 <= cs <= C
        assert rs * cs <= max(launcher.SLAB_ELEMS, 64 * 64)
        assert rs == min(R, launcher.SLAB_MAX_ROWS)  # all local rows in one slab


def test_triton_autotuned_tiles_reset_partials(monkeypatch):
    # Two tile configs under the interpreter with a timer that makes the later one (BLOCK_N 128)
    # win after the BLOCK_N 64 one wrote all its per-column-block dscale/dbias partials: the
    # result is right only if the partials are reset between autotuning runs.
    calls = []

    def later_is_faster(kernel_call, quantiles):
        kernel_call()
        calls.append(1)
        return [-float(len(calls))] * len(quantiles)

    tiles = ((64, 64, 1, 1), (64, 128, 1, 1))
    monkeypatch.setattr(launcher, "INTERPRETER_TILES", tiles)
    monkeypatch.setattr(launcher, "_cpu_bench", later_is_faster)
    launcher._tuned.cache_clear()
    try:
        _check("sigmoid", "triton", 20, 300, 16, torch.float32, offset=5, symmetric=False)
        assert calls, "the autotuner never benchmarked"
        assert launcher._tuned("grad", tiles).best_config.kwargs["BLOCK_N"] == 128
    finally:
        launcher._tuned.cache_clear()


class _LargestStorage(TorchDispatchMode):
    """Largest storage (bytes) of any tensor an op returns: allocations, not views' extents."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_rectangular_memory_never_holds_the_logits(kind, monkeypatch):
    # Forward + backward of b = 128 local rows against C = 1024 columns: no tensor anywhere
    # (kernel buffers, slabs, tiles, partials) is near the (R, C) logits; naive is.
    R, C, D = 128, 1024, 8
    monkeypatch.setattr(launcher, "SLAB_ELEMS", 1 << 13)  # slabs of 64 x 128
    # Kernel launches run unobserved: what the interpreter copies on the host is not the
    # kernels' memory (on a GPU they read their arguments in place), and observing it is slow.
    launch = launcher._launch

    def unobserved_launch(*args, **kwargs):
        with _disable_current_modes():
            launch(*args, **kwargs)

    monkeypatch.setattr(launcher, "_launch", unobserved_launch)
    a, b = _features(R, C, D, 512)
    s, t = torch.tensor(10.0), torch.tensor(-3.0)
    logits_bytes = R * C * 4
    bound = 4 * max(1 << 13, C * D)  # a slab / tile or an (C, D) fp32 gradient
    for impl in ("chunked", "triton", "naive"):
        leaves = [x.clone().requires_grad_() for x in (a, b, s, t)]
        mode = _LargestStorage()
        with mode:
            if kind == "softmax":
                loss = softmax_contrastive_loss(
                    *leaves[:3], offset=512, symmetric=False, impl=impl, chunk_size=64
                )
            else:
                loss = sigmoid_contrastive_loss(*leaves, offset=512, impl=impl, chunk_size=64)
            loss.backward()
        if impl == "naive":  # the measurement sees the logit matrix when there is one
            assert mode.largest >= logits_bytes, mode.largest
        else:
            assert mode.largest <= bound < logits_bytes / 8, (impl, mode.largest)


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


@pytest.mark.parametrize("R,C", [(11, 70), (5, 333)])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_primitives_without_positives(impl, kind, R, C, monkeypatch):
    # The tile primitives on a block with no positives (what the ring uses for other ranks'
    # blocks): statistics and their gradients for arbitrary upstream g_row, g_col; at C = 333
    # over 3 forward splits and 6 backward slabs.
    from kernels.contrastive import primitives

    monkeypatch.setattr(launcher, "SLAB_ELEMS", 64)
    prims = primitives(impl)
    a, b = _features(R, C, 40, 0)
    a, b = a.double().requires_grad_(), b.double().requires_grad_()
    s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    g_row, g_col = torch.rand(R, generator=g), torch.rand(C, generator=g)
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


# (R, C, D, offset): square (both directions) and rectangular (local rows against many
# columns: split forward, several backward slabs) with positives at a row offset.
GPU_CASES = [(1, 1, 3, 0), (130, 130, 200, 0), (1000, 1000, 512, 0), (257, 257, 768, 0)]
GPU_CASES += [(1, 8195, 37, 8000), (256, 32768 + 77, 512, 3 * 256), (129, 70001, 768, 69000)]


@pytest.mark.gpu
@pytest.mark.parametrize("R,C,D,offset", GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_triton_on_gpu_matches_reference(kind, dtype, R, C, D, offset):
    # The compiled (non-interpreted) kernels with autotuned GPU tiles.
    a, b = _features(R, C, D, offset)
    a, b = a.cuda().to(dtype), b.cuda().to(dtype)
    s, t = torch.tensor(14.3, device="cuda"), torch.tensor(-2.5, device="cuda")
    sym = R == C
    if kind == "softmax":
        fn = lambda a, b, s, t: (
            softmax_contrastive_loss(a, b, s, offset=offset, symmetric=sym, impl="triton") + 0 * t
        )
        rf = lambda a, b, s, t: softmax_contrastive_reference(a, b, s, offset, sym) + 0 * t
    else:
        fn = lambda a, b, s, t: sigmoid_contrastive_loss(a, b, s, t, offset=offset, impl="triton")
        rf = lambda a, b, s, t: sigmoid_contrastive_reference(a, b, s, t, offset)
    loss, grads = _run(fn, a, b, s, t)
    ref_loss, ref_grads = _run(rf, a.double(), b.double(), s.double(), t.double())
    loss_tol, grad_tol = TOL[dtype]
    err = (loss.double() - ref_loss).abs() / max(ref_loss.abs().item(), 1.0)
    assert err <= loss_tol, err.item()
    for name, g, rg in zip(("dA", "dB", "dscale", "dbias"), grads, ref_grads, strict=True):
        err = (g.double() - rg).abs().max() / max(rg.abs().max().item(), 1e-6)
        assert err <= grad_tol, (name, err.item())


@pytest.mark.gpu
def test_triton_on_gpu_memory_rectangular():
    # b = 1024 rows against 128K columns, bf16: the b x B fp32 logits would be 512 MB; the
    # loss's peak beyond its inputs stays at the slab (16 MB) plus O((b + B) D) gradients.
    R, C, D = 1024, 131072, 512
    a, b = _features(R, C, D, 0)
    a = a.cuda().bfloat16().requires_grad_()
    b = b.cuda().bfloat16().requires_grad_()
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    softmax_contrastive_loss(a, b, s, symmetric=False, impl="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = (R + C) * D * (4 + 2)  # fp32 accumulators and the bf16 .grad tensors
    assert peak <= 4 * launcher.SLAB_ELEMS + grads + (64 << 20), peak
    assert peak < R * C * 4 / 2, peak


# bf16 features into the Triton kernels (precision.loss_in_fp32=auto on CUDA): fp32 logits,
# statistics and G inside, G rounded once to bf16 for the dX / dY products (as on the GPU; the
# interpreter upcasts only the tl.dot operands). Errors relative as in _check, measured at
# (R, C, D) = (256, 256, 512) square and (64, 1024, 512) rectangular, scales 14.3 and 100
# (/tmp measurement, interpreter):
#   against float64 on the same bf16-rounded inputs: loss <= 1.1e-6, dA/dB <= 9.6e-3,
#     dscale <= 1.3e-5 (as fp32: saturated softmax at scale 100), dbias <= 4.7e-8;
#   against float64 on the fp32 inputs (what the bf16 features cost): loss <= 1.0e-4,
#     dA/dB <= 1.2e-2, dscale <= 8.1e-5, dbias <= 1.3e-5;
#   the fp32 path, for comparison: loss <= 7.2e-7, dA/dB <= 2.2e-4, dscale <= 1.3e-5.
BF16_TOL = {  # (vs rounded inputs, vs fp32 inputs): about 2x the measured maxima
    "loss": (3e-6, 2e-4),
    "dA": (2e-2, 2.5e-2),
    "dB": (2e-2, 2.5e-2),
    "dscale": (3e-5, 2e-4),
    "dbias": (1e-6, 3e-5),
}


def _errors(kind, R, C, D, offset, scale, dtype, ref_inputs):
    a, b = _features(R, C, D, offset)
    s, t = torch.tensor(scale), torch.tensor(-2.5)
    sym = R == C and offset == 0
    if kind == "softmax":
        fn = lambda a, b, s, t: (
            softmax_contrastive_loss(a, b, s, offset=offset, symmetric=sym, impl="triton") + 0 * t
        )
        rf = lambda a, b, s, t: softmax_contrastive_reference(a, b, s, offset, sym) + 0 * t
    else:
        fn = lambda a, b, s, t: sigmoid_contrastive_loss(a, b, s, t, offset=offset, impl="triton")
        rf = lambda a, b, s, t: sigmoid_contrastive_reference(a, b, s, t, offset)
    ai, bi = a.to(dtype), b.to(dtype)
    loss, grads = _run(fn, ai, bi, s, t)
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    ra, rb = (ai, bi) if ref_inputs == "rounded" else (a, b)
    ref_loss, ref_grads = _run(rf, ra.double(), rb.double(), s.double(), t.double())
    out = {"loss": (loss.double() - ref_loss).abs().item() / max(ref_loss.abs().item(), 1.0)}
    for name, g, rg in zip(("dA", "dB", "dscale", "dbias"), grads, ref_grads, strict=True):
        out[name] = (g.double() - rg).abs().max().item() / max(rg.abs().max().item(), 1e-6)
    return out


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("R,C,offset", [(128, 128, 0), (32, 512, 128)])
def test_triton_bf16_inputs_against_float64(kind, R, C, offset):
    # Training-like widths (D = 512) at a size the interpreter runs in seconds.
    for ref_inputs, col in (("rounded", 0), ("fp32", 1)):
        for scale in (14.3, 100.0):
            err = _errors(kind, R, C, 512, offset, scale, torch.bfloat16, ref_inputs)
            bad = {k: v for k, v in err.items() if v > BF16_TOL[k][col]}
            assert not bad, (ref_inputs, scale, err)
    # The fp32 kernels stay an order of magnitude closer on the gradients: the check above
    # is about bf16 rounding, not a loose kernel.
    err32 = _errors(kind, R, C, 512, offset, 14.3, torch.float32, "rounded")
    assert err32["dA"] < 1e-4 and err32["dB"] < 1e-4 and err32["loss"] < 1e-5, err32


def test_interpreter_upcasts_only_there_and_tiles_can_be_pinned(monkeypatch):
    # Under the interpreter bf16 operands are upcast before tl.dot (triton issue 11584); the
    # GPU launch constants use the native bf16 dot. FGCLIP_LOSS_TILE pins one tile on a GPU.
    assert launcher._fixed(512, torch.bfloat16)["UPCAST"] is True
    assert launcher.tiles("grad") == launcher.INTERPRETER_TILES
    gpu = launcher.gpu_constants(512, torch.bfloat16)
    assert gpu["UPCAST"] is False and gpu["BLOCK_K"] == 64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(launcher.TILE_ENV, raising=False)
    assert launcher._fixed(768, torch.bfloat16) == launcher.gpu_constants(768, torch.bfloat16)
    assert launcher.tiles("fwd") == launcher.GPU_TILES["fwd"]
    monkeypatch.setenv(launcher.TILE_ENV, "64,64,4,3")
    assert launcher.tiles("fwd") == launcher.tiles("grad") == ((64, 64, 4, 3),)
    for bad in ("64,64,4", "64,48,4,3", "a,b,c,d", "64,64,0,3"):
        monkeypatch.setenv(launcher.TILE_ENV, bad)
        with pytest.raises(ValueError, match=launcher.TILE_ENV):
            launcher.tiles("grad")


_AOT_SCRIPT = """
import json, sys, torch
from kernels.contrastive import aot, launcher
out = []
for kernel, flags in (
    ("fwd", dict(HAS_TARGET=True, SOFTMAX=False)),
    ("fwd", dict(HAS_TARGET=True, SOFTMAX=True)),
    ("grad", dict(HAS_TARGET=True, SOFTMAX=True, HAS_ROW=True, HAS_COL=True)),
):
    for tile in launcher.GPU_TILES[kernel]:
        out.append(aot.compile_tile(kernel, torch.bfloat16, 768, tile, flags).as_json())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_no_autotune_tile_spills_on_sm90_at_training_shapes():
    # Ahead-of-time sm_90 compiles (no GPU needed; ptxas's own report) of every tile the
    # autotuner may pick, bf16 features, D = 512 / 768 (one binary: BLOCK_K = 64 for both), with
    # the 16-divisibility the aligned training shapes give (b = 256..512 local rows, B up to 32K
    # columns). Each kernel in its flag variants with the most registers (all 52 binaries:
    # run/aot_loss_kernels.py, results in run/results/aot_loss_kernels_sm90.jsonl). Needs a
    # process without TRITON_INTERPRET, where triton.jit makes compilable functions.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", launcher.TILE_ENV)}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(reports) == 2 * len(launcher.GPU_TILES["fwd"]) + len(launcher.GPU_TILES["grad"])
    for r in reports:
        assert r["n_spills"] == 0, r
        assert 0 < r["n_regs"] <= 255 and r["shared"] <= 227 * 1024, r


def test_loss_inputs_stay_bf16_on_cuda_by_default():
    # precision.loss_in_fp32=auto (the default): train/step.py upcasts the embeddings only off
    # CUDA; on a GPU the bf16 embeddings go into the kernels tested above.
    from fgclip_mega.config import PrecisionConfig
    from fgclip_mega.losses.dispatch import upcast_loss_inputs
    from fgclip_mega.presets import load_config

    assert PrecisionConfig().loss_in_fp32 == "auto"
    assert upcast_loss_inputs("auto", torch.device("cuda", 0)) is False
    assert upcast_loss_inputs("auto", "cpu") is True
    assert upcast_loss_inputs(True, "cuda") is True and upcast_loss_inputs(False, "cpu") is False
    assert load_config("tiny", None, ["precision.loss_in_fp32=true"]).precision.loss_in_fp32 is True
    with pytest.raises(ValueError, match="loss_in_fp32"):
        upcast_loss_inputs("maybe", "cuda")
