# Tests of the fgclip RoIAlign operator (kernels/roi_align) against torchvision.ops.roi_align.
# The session fixture builds the native library with run/build_ext.sh (quick when up to date).
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels.roi_align import (
    _lib,
    boxes_to_rois,
    ops,
    pool_boxes,
    pool_rois,
    roi_align,
    roi_align_reference,
    select_backend,
)
from tests.builders import make_rois

ROOT = Path(__file__).resolve().parents[1]
tv_roi_align = torchvision.ops.roi_align


pytestmark = pytest.mark.usefixtures("built_library")


SWEEP = [
    (aligned, sr, out, scale)
    for aligned in (True, False)
    for sr in (-1, 1, 2)
    for out in (1, 2, 7)
    for scale in (1.0, 1 / 16)
]


@pytest.mark.parametrize("aligned,sampling_ratio,out,scale", SWEEP)
def test_forward_backward_match_torchvision(aligned, sampling_ratio, out, scale):
    gen = torch.Generator().manual_seed(hash((aligned, sampling_ratio, out, scale)) % 2**31)
    n, c, h, w = 4, 5, 13, 11
    x = torch.randn(n, c, h, w, generator=gen, requires_grad=True)
    rois = make_rois(gen, n, h, w, 48, scale, empty_images=(1,))
    args = (out, scale, sampling_ratio, aligned)
    expect = tv_roi_align(x, rois, *args)
    got = roi_align(x, rois, *args)
    assert got.shape == expect.shape == (48, c, out, out)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    # Boxes wholly outside the map pool to exactly zero, as in torchvision.
    assert expect[5].abs().max() == 0 and got[5].abs().max() == 0

    g = torch.randn(expect.shape, generator=gen)
    (g_expect,) = torch.autograd.grad(expect, x, g)
    (g_got,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(g_got, g_expect, atol=1e-5, rtol=1e-5)
    assert g_got[1].abs().max() == 0  # image without boxes gets no gradient


@pytest.mark.parametrize("aligned", [True, False])
def test_samples_exactly_on_map_borders(aligned):
    # One sample per box (sampling_ratio=1, 1x1) at the centre t: hits the validity limits
    # (-1 and size are still inside) and the clamping edges (0, size - 1) exactly.
    n, c, h, w = 1, 3, 6, 5
    x = torch.randn(n, c, h, w, requires_grad=True)
    off = 0.5 if aligned else 0.0
    ts = [-1.5, -1.0, -0.5, 0.0, 2.25, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5]
    rois = torch.tensor(
        [[0, tx - 1 + off, ty - 1 + off, tx + 1 + off, ty + 1 + off] for tx in ts for ty in ts]
    )
    expect = tv_roi_align(x, rois, 1, 1.0, 1, aligned)
    got = roi_align(x, rois, 1, 1.0, 1, aligned)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=0)
    assert (expect != 0).any() and (expect == 0).any()  # both sides of the borders are exercised
    g = torch.randn(expect.shape)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, g)[0], torch.autograd.grad(expect, x, g)[0], atol=1e-5, rtol=0
    )
    ref = roi_align_reference(x, rois, 1, 1.0, 1, aligned)
    torch.testing.assert_close(ref, expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("aligned,sampling_ratio,out,scale", SWEEP[::3])
def test_reference_matches_torchvision(aligned, sampling_ratio, out, scale):
    gen = torch.Generator().manual_seed(7)
    n, c, h, w = 3, 4, 12, 9
    x = torch.randn(n, c, h, w, generator=gen, requires_grad=True)
    rois = make_rois(gen, n, h, w, 30, scale)
    args = (out, scale, sampling_ratio, aligned)
    expect = tv_roi_align(x, rois, *args)
    got = roi_align_reference(x, rois, *args)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    g = torch.randn(expect.shape, generator=gen)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, g)[0], torch.autograd.grad(expect, x, g)[0], atol=1e-5, rtol=0
    )
    # In float64 the compiled op and the reference agree to rounding.
    xd, rd = x.detach().double(), rois.double()
    torch.testing.assert_close(
        roi_align(xd, rd, *args), roi_align_reference(xd, rd, *args), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"]
)
@pytest.mark.parametrize("out", [1, 7])
def test_half_precision_matches_fp32(dtype, tol, out):
    # Same quantised inputs in both dtypes: the only differences are the final roundings of the
    # fp32 accumulations, bounded by a few ulps of the output dtype.
    gen = torch.Generator().manual_seed(3)
    n, c, h, w = 3, 6, 14, 14
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    rois = make_rois(gen, n, h, w, 24)
    x_lo = x.clone().requires_grad_()
    x_32 = x.float().requires_grad_()
    y_lo = roi_align(x_lo, rois, out, 1.0, -1, True)
    y_32 = roi_align(x_32, rois, out, 1.0, -1, True)
    assert y_lo.dtype == dtype
    torch.testing.assert_close(y_lo.float(), y_32, atol=tol, rtol=tol)
    g = torch.randn(y_32.shape, generator=gen).to(dtype)
    (g_lo,) = torch.autograd.grad(y_lo, x_lo, g)
    (g_32,) = torch.autograd.grad(y_32, x_32, g.float())
    assert g_lo.dtype == dtype
    torch.testing.assert_close(g_lo.float(), g_32, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("out,sampling_ratio", [(1, -1), (3, 2)])
def test_channels_last_token_layout(dtype, out, sampling_ratio):
    # The model's dense map is a (B, h*w, C) token tensor viewed as (B, C, h, w): channels-last
    # memory, read in place by the NHWC kernels. C = 70 spans a full and a partial channel block.
    gen = torch.Generator().manual_seed(23)
    b, c, h, w = 3, 70, 9, 12
    tokens = torch.randn(b, h * w, c, generator=gen).to(dtype).requires_grad_()
    fmap = tokens.transpose(1, 2).reshape(b, c, h, w)
    assert not fmap.is_contiguous() and fmap.is_contiguous(memory_format=torch.channels_last)
    seen = []
    fmap.register_hook(seen.append)  # (retain_grad would store a contiguous copy)
    rois = make_rois(gen, b, h, w, 40, empty_images=(1,))
    dense = fmap.detach().contiguous().requires_grad_()  # same values, NCHW memory
    y_cl = roi_align(fmap, rois, out, 1.0, sampling_ratio, True)
    y_nchw = roi_align(dense, rois, out, 1.0, sampling_ratio, True)
    # Same per-element operations in the same order as the NCHW kernels.
    torch.testing.assert_close(y_cl, y_nchw, atol=1e-6, rtol=1e-6)
    g = torch.randn(y_cl.shape, generator=gen).to(dtype)
    y_cl.backward(g)
    y_nchw.backward(g)
    # The gradient keeps the channels-last layout, so the token gradient needs no copy.
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert tokens.grad.is_contiguous()
    torch.testing.assert_close(seen[0], dense.grad, atol=1e-6, rtol=1e-6)
    if dtype == torch.float32:
        expect = tv_roi_align(fmap.detach(), rois, out, 1.0, sampling_ratio, True)
        torch.testing.assert_close(y_cl, expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio,out", [(-1, 1), (-1, (2, 3)), (2, 2)])
def test_gradcheck_float64(aligned, sampling_ratio, out):
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [
            [0, 1.2, 0.5, 4.3, 5.1],
            [1, -1.0, -0.5, 3.0, 8.2],  # partly outside
            [1, 2.2, 2.2, 2.2, 2.2],  # zero area
            [0, 0.3, 1.7, 5.9, 6.4],
        ],
        dtype=torch.float64,
    )

    def f(t):
        return roi_align(t, rois, out, 1.0, sampling_ratio, aligned, backend="cpu")

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    xl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(f, (xl,))


def test_backward_is_bit_deterministic():
    # Many overlapping boxes per image: a scatter with atomics would reorder these sums.
    gen = torch.Generator().manual_seed(11)
    n, c, h, w = 4, 64, 24, 24
    x = torch.randn(n, c, h, w, generator=gen, requires_grad=True)
    rois = make_rois(gen, n, h, w, 256)
    g = torch.randn(256, c, 2, 2, generator=gen)

    def grad():
        return torch.autograd.grad(roi_align(x, rois, 2, 1.0, -1, True), x, g)[0]

    first = grad()
    for _ in range(3):
        assert torch.equal(grad(), first)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the summation order does not depend on the thread count
        assert torch.equal(grad(), first)
    finally:
        torch.set_num_threads(threads)


def test_pool_boxes_matches_upstream_per_image_loop():
    # FG-CLIP: normalised xyxy boxes, scaled by the grid, 1x1 adaptive, aligned=True.
    gen = torch.Generator().manual_seed(5)
    b, d, side, m = 6, 16, 14, 4
    fmap = torch.randn(b, d, side, side, generator=gen)
    lo = torch.rand(b, m, 2, generator=gen) * 0.7
    boxes = torch.cat([lo, lo + 0.05 + torch.rand(b, m, 2, generator=gen) * 0.3], dim=-1)
    counts = torch.tensor([4, 0, 2, 4, 1, 3])
    expect = torch.cat(
        [
            tv_roi_align(fmap[i : i + 1], [boxes[i, : counts[i]] * side], (1, 1), 1.0, -1, True)
            for i in range(b)
        ]
    )[:, :, 0, 0]
    got = pool_boxes(fmap, boxes, counts)
    assert got.shape == (int(counts.sum()), d)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    per_image = [boxes[i, : counts[i]] for i in range(b)]
    torch.testing.assert_close(pool_boxes(fmap, per_image), got, atol=0, rtol=0)


def test_boxes_to_rois_layouts():
    boxes = torch.tensor(
        [[[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]], [[0.2, 0.2, 0.4, 0.9], [9, 9, 9, 9]]]
    )
    rois = boxes_to_rois(boxes, counts=[2, 1], grid_size=(10, 20))
    expect = torch.tensor([[0, 2.0, 2.0, 10.0, 6.0], [0, 0, 0, 20, 10], [1, 4.0, 2.0, 8.0, 9.0]])
    torch.testing.assert_close(rois, expect)
    torch.testing.assert_close(boxes_to_rois([boxes[0], boxes[1, :1]], grid_size=(10, 20)), expect)
    assert boxes_to_rois([torch.zeros(0, 4)]).shape == (0, 5)
    # torchvision-style list of absolute boxes is accepted directly by roi_align.
    x = torch.randn(2, 3, 10, 20)
    torch.testing.assert_close(
        roi_align(x, [boxes[0] * 10, boxes[1, :1] * 10], 2, aligned=True),
        tv_roi_align(x, [boxes[0] * 10, boxes[1, :1] * 10], 2, aligned=True),
        atol=1e-5,
        rtol=0,
    )


def test_edge_cases():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    empty = roi_align(x, torch.zeros(0, 5), (2, 3), aligned=True)
    assert empty.shape == (0, 3, 2, 3)
    (g,) = torch.autograd.grad(empty.sum(), x)
    assert torch.equal(g, torch.zeros_like(x))
    with pytest.raises(ValueError, match="batch index"):
        roi_align(x, torch.tensor([[2.0, 0, 0, 1, 1]]), 1)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(x, torch.zeros(3, 4), 1)
    # Meta tensors go through the registered fake kernel (torch.compile tracing).
    meta = torch.ops.fgclip.roi_align(
        torch.empty(2, 3, 5, 5, device="meta"),
        torch.empty(7, 5, device="meta"),
        1.0,
        2,
        3,
        -1,
        True,
    )
    assert meta.shape == (7, 3, 2, 3)


def test_torch_compile_fullgraph():
    # The fake kernels and the lock-free library check let dynamo trace the op without breaks.
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 0.0, 0.5, 7.0, 7.0]])

    def f(t):
        return roi_align(t, rois, 2, aligned=True).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(f(x), x)
    assert torch.equal(g_compiled, g_eager)


def test_backend_dispatch(monkeypatch):
    x = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0]])
    assert select_backend("cpu") == "cpu"
    assert select_backend("cpu", "reference") == "reference"
    with pytest.raises(ValueError):
        select_backend("cpu", "cuda")
    torch.testing.assert_close(
        roi_align(x, rois, 2, backend="reference"), roi_align(x, rois, 2), atol=1e-6, rtol=0
    )
    # Library missing: "auto" falls back to the reference with one warning; explicit "cpu" raises
    # with the build command.
    missing = _lib.LibStatus(False, False, Path("/nowhere"), ("/nowhere/lib.so not found",))
    monkeypatch.setattr(_lib, "load", lambda: missing)
    monkeypatch.setattr(ops, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="run/build_ext.sh"):
        assert select_backend("cpu") == "reference"
    with pytest.raises(RuntimeError, match="run/build_ext.sh"):
        select_backend("cpu", "cpu")


def test_env_override_and_missing_library(tmp_path):
    # Fresh interpreter: a loaded library cannot be unloaded from this one.
    code = textwrap.dedent(
        """
        import warnings, torch
        from kernels.roi_align import load_library, roi_align
        st = load_library()
        assert not st.cpu and "not found" in st.errors[0], st
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = roi_align(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0, 0, 2, 2.0]]), 1)
        assert any("build_ext.sh" in str(m.message) for m in w), [str(m.message) for m in w]
        assert torch.allclose(y, torch.ones(1, 1, 1, 1))
        print("ok")
        """
    )
    env = dict(os.environ, FGCLIP_EXT_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_cuda_without_extension_is_an_error(monkeypatch):
    # Issue 12: CUDA tensors but no CUDA kernel must stop the run, not fall back to the reference.
    cpu_only = _lib.LibStatus(
        True, False, Path("/b"), ("/b/libfgclip_roi_align_cuda.so not found",)
    )
    monkeypatch.setattr(_lib, "load", lambda: cpu_only)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "_warned_fallback", False)
    with pytest.raises(RuntimeError, match=r"cuda kernel unavailable.*build_ext\.sh.*not falling"):
        select_backend(torch.device("cuda", 0))
    assert select_backend("cuda", "reference") == "reference"  # forcing it stays possible
    assert select_backend("cpu") == "cpu"


# Bad arguments: (label, input, rois, kwargs, exception, message). Each goes through the shared
# checker of both the compiled op and the reference, which must raise the same error.
def test_pool_rois_flat_equals_padded_and_torchvision():
    gen = torch.Generator().manual_seed(41)
    b, d, h, w, m = 4, 6, 7, 9, 5
    tokens = torch.randn(b, h * w, d, generator=gen)  # the model's (B, h*w, D) layout
    fmap = tokens.transpose(1, 2).reshape(b, d, h, w)
    lo = torch.rand(b, m, 2, generator=gen) * 0.7
    boxes = torch.cat([lo, lo + 0.02 + torch.rand(b, m, 2, generator=gen) * 0.3], dim=-1)
    counts = torch.tensor([5, 0, 2, 3])
    rois = boxes_to_rois(boxes, counts)  # (R, 5) normalised, built on the host
    flat = pool_rois(fmap, rois)
    assert flat.shape == (10, d, 1, 1)
    torch.testing.assert_close(flat[:, :, 0, 0], pool_boxes(fmap, boxes, counts), atol=0, rtol=0)
    torch.testing.assert_close(pool_rois(tokens, rois, grid_size=(h, w)), flat, atol=0, rtol=0)
    scaled = rois * torch.tensor([1.0, w, h, w, h])
    for out in (1, (2, 3)):
        expect = tv_roi_align(fmap, scaled, out, 1.0, -1, True)
        torch.testing.assert_close(pool_rois(fmap, rois, out), expect, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="63 tokens are not a square grid"):
        pool_rois(tokens, rois)


class HostSyncDetector(TorchDispatchMode):
    # Fails on ops that need a device->host sync (reading values back, data-dependent shapes)
    # when any of their tensors lives off the CPU. Host (CPU) tensors may be read freely.
    SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal",
                "allclose", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                "repeat_interleave", "tolist"}  # fmt: skip
    BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs or {}))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        bool_index = name in self.BOOL_INDEX_OPS and any(t.dtype == torch.bool for t in tensors)
        if any(t.device.type != "cpu" for t in tensors) and (name in self.SYNC_OPS or bool_index):
            raise AssertionError(f"host sync: {func}")
        # Device -> host copies (.cpu(), .tolist(), .to("cpu")) wait for the device.
        dev = (kwargs or {}).get("device")  # None: a dtype cast on the same device
        to_host = name == "_to_copy" and dev is not None and torch.device(dev).type == "cpu"
        if (to_host and args[0].device.type != "cpu") or (
            name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu"
        ):
            raise AssertionError(f"host sync (device to host copy): {func}")
        return func(*args, **(kwargs or {}))


def test_pool_rois_needs_no_host_sync():
    # Meta tensors stand in for GPU tensors: any op reading device values is caught before it
    # runs. The flat host-built rois form passes forward and backward; the detector does catch
    # the padded form's boolean masking.
    b, d, h, w = 3, 8, 6, 6
    tokens = torch.empty(b, h * w, d, device="meta", requires_grad=True)
    rois = torch.tensor([[0, 0.1, 0.1, 0.6, 0.5], [2, 0.0, 0.3, 1.0, 1.0]])
    with HostSyncDetector():
        out = pool_rois(tokens, rois, grid_size=(h, w))
        (grad,) = torch.autograd.grad(out.sum(), tokens)
    assert out.shape == (2, d, 1, 1) and out.device.type == "meta" and grad.shape == tokens.shape
    # Host rois bound for a device are still value-checked, on the host, before the copy.
    bad = rois.index_put((torch.tensor(1), torch.tensor(3)), torch.tensor(float("nan")))
    with HostSyncDetector(), pytest.raises(ValueError, match="rois row 1 is not finite"):
        pool_rois(tokens, bad, grid_size=(h, w))
    with pytest.raises(ValueError, match=r"rois row 0 has batch index 3.0 outside \[0, 3\)"):
        pool_rois(tokens, torch.tensor([[3.0, 0, 0, 1, 1]]), grid_size=(h, w))
    boxes = torch.empty(b, 4, 4, device="meta")
    counts = torch.ones(b, dtype=torch.int64, device="meta")
    fmap = tokens.detach().transpose(1, 2).reshape(b, d, h, w)
    with HostSyncDetector(), pytest.raises(AssertionError, match="host sync"):
        pool_boxes(fmap, boxes, counts)
    with HostSyncDetector(), pytest.raises(AssertionError, match="host sync"):
        fmap[counts > 0]


@pytest.mark.gpu
def test_pool_rois_cuda_no_sync_and_matches_cpu(built_library):
    assert built_library.cuda, f"CUDA RoIAlign kernel not loaded: {built_library.errors}"
    gen = torch.Generator().manual_seed(43)
    tokens = torch.randn(4, 14 * 14, 64, generator=gen)
    lo = torch.rand(9, 2, generator=gen) * 0.7
    rois = torch.cat([torch.randint(4, (9, 1), generator=gen).float(), lo, lo + 0.2], 1)
    tokens_gpu = tokens.cuda().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pool_rois(tokens_gpu, rois.pin_memory())
        (grad,) = torch.autograd.grad(out.square().sum(), tokens_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = tokens.clone().requires_grad_()
    expect = pool_rois(cpu, rois)
    torch.testing.assert_close(out.cpu(), expect, atol=1e-5, rtol=1e-5)
    (g_cpu,) = torch.autograd.grad(expect.square().sum(), cpu)
    torch.testing.assert_close(grad.cpu(), g_cpu, atol=1e-5, rtol=1e-5)
    # Non-finite rois already on the GPU are not inspected (a sync) but pool to zero, safely.
    bad = torch.tensor([[0, float("nan"), 1, 5, 5], [1, 1, 1, 1e12, 2]], device="cuda")
    y = torch.ops.fgclip.roi_align(tokens_gpu.detach().view(4, 14, 14, 64).permute(0, 3, 1, 2),
                                   bad, 1.0, 2, 2, -1, True)  # fmt: skip
    assert torch.equal(y.cpu(), torch.zeros(2, 64, 2, 2))


def _cuda_root():
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", shutil.which("nvcc")):
        if cand and Path(cand).name == "nvcc":
            cand = str(Path(cand).resolve().parents[1])
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return cand
    return None


@pytest.mark.slow
def test_cuda_sources_compile(tmp_path):
    # Compile-only check of the CUDA target with this machine's nvcc (no GPU needed).
    if torch.version.cuda is None or _cuda_root() is None:
        pytest.skip("no CUDA toolkit / CUDA-enabled torch on this machine")
    cmake = ROOT / ".venv" / "bin" / "cmake"
    cmake = str(cmake) if cmake.exists() else "cmake"
    ninja = ROOT / ".venv" / "bin" / "ninja"
    ninja = str(ninja) if ninja.exists() else "ninja"
    cuda = _cuda_root()
    cfg = [
        cmake, "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DFGCLIP_PYTHON={sys.executable}",
        "-DFGCLIP_WITH_CUDA=ON", "-DFGCLIP_CUDA_ARCHS=90",
        f"-DCUDA_TOOLKIT_ROOT_DIR={cuda}", f"-DCMAKE_CUDA_COMPILER={cuda}/bin/nvcc",
    ]  # fmt: skip
    proc = subprocess.run(cfg, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CUDA kernels: ON" in proc.stdout
    build = [cmake, "--build", str(tmp_path), "--target", "fgclip_roi_align_cuda"]
    proc = subprocess.run(build, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert (tmp_path / "lib" / "libfgclip_roi_align_cuda.so").is_file()


GPU_CASES = [
    (1, -1, True, 14, 14),
    (7, 2, True, 50, 68),
    (7, -1, False, 50, 68),
    (2, 1, True, 9, 5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("out,sampling_ratio,aligned,h,w", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_matches_cpu(built_library, out, sampling_ratio, aligned, h, w, dtype, channels_last):
    assert built_library.cuda, f"CUDA RoIAlign kernel not loaded: {built_library.errors}"
    gen = torch.Generator().manual_seed(17)
    n, c, k = 4, 32, 200
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = make_rois(gen, n, h, w, k, 1 / 16, empty_images=(2,))
    rois[-1, 0] = 9.0  # out-of-range batch index: pools to zero on CUDA (CPU raises)
    args = (out, 1 / 16, sampling_ratio, aligned)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    x_cpu = x.clone().requires_grad_()
    x_gpu = x.cuda().requires_grad_()
    y_cpu = roi_align(x_cpu, rois[:-1], *args)
    y_gpu = roi_align(x_gpu, rois.cuda(), *args, backend="cuda")
    torch.testing.assert_close(y_gpu[:-1].cpu().float(), y_cpu.float(), atol=tol, rtol=tol)
    assert y_gpu[-1].abs().max() == 0
    g = torch.randn(y_gpu.shape, generator=gen).to(dtype)
    (g_cpu,) = torch.autograd.grad(y_cpu, x_cpu, g[:-1])
    (g_det,) = torch.autograd.grad(roi_align(x_gpu, rois.cuda(), *args), x_gpu, g.cuda())
    assert g_det.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(g_det.cpu().float(), g_cpu.float(), atol=tol, rtol=tol)
    y_nd = roi_align(x_gpu, rois.cuda(), *args, deterministic=False)
    (g_nd,) = torch.autograd.grad(y_nd, x_gpu, g.cuda())
    torch.testing.assert_close(g_nd.cpu().float(), g_cpu.float(), atol=tol, rtol=tol)
    for _ in range(3):  # the default backward is bit-identical run to run on the GPU too
        (again,) = torch.autograd.grad(roi_align(x_gpu, rois.cuda(), *args), x_gpu, g.cuda())
        assert torch.equal(again, g_det)
