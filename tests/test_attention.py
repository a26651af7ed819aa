"""The attention dispatch against a plain softmax-attention reference written here."""

import math

import pytest
import torch

from fgclip_mega.models.attention import attention, flash_attn_installed, resolve_backend


def _reference(q, k, v, causal):
    # Independent of the module: a loop over query positions in float64; (B, N, H, hd) in/out.
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
    n = q.shape[-2]
    out = torch.empty_like(q)
    for i in range(n):
        keys = slice(0, i + 1) if causal else slice(0, n)
        s = (q[..., i : i + 1, :] @ k[..., keys, :].transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out[..., i : i + 1, :] = torch.softmax(s, dim=-1) @ v[..., keys, :]
    return out.transpose(1, 2)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 13, 3, 16), (3, 77, 2, 24), (2, 197, 5, 64)])
def test_backend_matches_reference(backend, causal, shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape) for _ in range(3))
    out = attention(q, k, v, causal=causal, backend=backend)
    assert out.shape == shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal), atol=2e-6, rtol=1e-5)


def test_causal_differs_from_full_and_first_token_attends_itself():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))  # (B, N, H, hd)
    causal = attention(q, k, v, causal=True, backend="sdpa")
    full = attention(q, k, v, causal=False, backend="sdpa")
    torch.testing.assert_close(causal[:, 0], v[:, 0])
    assert (causal - full).abs().max() > 1e-3


def test_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_backend("math", cpu, torch.float32) == "math"
    with pytest.raises(RuntimeError, match="needs a working flash_attn, a CUDA device"):
        resolve_backend("flash", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("xformers", cpu, torch.float32)


@pytest.mark.gpu
def test_flash_matches_sdpa_on_cuda():
    if not flash_attn_installed():  # a visible skip: flash-attn is optional (PyPI has no wheels)
        pytest.skip("flash_attn is not installed (or broken) on this GPU machine")
    dev = torch.device("cuda")
    assert resolve_backend("auto", dev, torch.bfloat16) == "flash"
    assert resolve_backend("auto", dev, torch.float32) == "sdpa"
    torch.manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(2, 197, 12, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        flash = attention(q, k, v, causal=causal, backend="flash")
        ref = _reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), causal)
        torch.testing.assert_close(flash.double().cpu(), ref, atol=2e-2, rtol=2e-2)


def test_strided_views_in_flash_layout_need_no_copy():
    # The towers pass q/k/v as (B, N, H, hd) views of the fused qkv output (seq-first): unit
    # last-dim stride, not contiguous. Every backend must give the reference result on them.
    torch.manual_seed(2)
    qkv = torch.randn(11, 2, 3, 4, 8)  # (N, B, 3, H, hd)
    q, k, v = (t.transpose(0, 1) for t in qkv.unbind(2))  # (B, N, H, hd) views
    assert not q.is_contiguous() and q.stride(-1) == 1
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, causal=True, backend=backend)
        torch.testing.assert_close(out.double(), _reference(q, k, v, True), atol=2e-6, rtol=1e-5)


def test_broken_flash_install_is_not_selected(monkeypatch):
    # An installed but ABI-broken flash-attn fails at import of its CUDA extension: resolution
    # must report it and fall back (auto) or refuse (flash), never pick it and fail later.
    import builtins

    from fgclip_mega.models import attention as attn

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("flash_attn"):
            raise OSError("undefined symbol: _ZN3c104cuda9SetDeviceEi")
        return real_import(name, *args, **kwargs)

    attn.flash_attn_status.cache_clear()
    monkeypatch.setattr(builtins, "__import__", broken)
    try:
        ok, detail = attn.flash_attn_status()
        assert not ok and "undefined symbol" in detail
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "sdpa"
        with pytest.raises(RuntimeError, match="undefined symbol"):
            resolve_backend("flash", torch.device("cuda"), torch.bfloat16)
    finally:
        attn.flash_attn_status.cache_clear()


def test_masked_sdpa_on_cuda_may_not_fall_back_to_the_math_kernel():
    """NaFlex padding masks on CUDA: only SDPA's memory-efficient and cuDNN kernels are allowed
    (the math kernel would be a silent O(N^2)-memory fall-back); CPU and unmasked calls keep
    SDPA's own choice. The CUDA case is imitated: the backend flags are host state."""
    from fgclip_mega.models.attention import masked_sdpa_backends

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with masked_sdpa_backends(cuda, masked=True):
        assert not torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()
    for device, masked in ((cuda, False), (cpu, True)):
        with masked_sdpa_backends(device, masked):
            assert torch.backends.cuda.math_sdp_enabled()
