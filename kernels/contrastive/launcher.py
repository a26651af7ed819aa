"""Launchers of the Triton contrastive kernels: the `fwd` / `bwd` primitives of chunked.py.

Forward: `_fwd_split_kernel` over a (row blocks, column splits) grid. On a GPU the columns are
split until the grid holds about two programs per SM (a rank's 256 local rows against 32K gathered
columns are 4 row blocks: without splits 4 programs would walk all columns); the (R, splits)
partial statistics are merged with logsumexp (softmax) or a sum (sigmoid).
Backward: the logits are walked in slabs of at most SLAB_ELEMS entries (all local rows, as many
columns as fit); per slab `_grad_tile_kernel` writes G = dLoss/dx once and cuBLAS takes
dX += G @ Y and dY += G.T @ X (fp32 accumulation: out_dtype=float32 for bf16 / fp16 slabs).
Memory: O(SLAB_ELEMS + (R + C) * D) beside the inputs, never R x C for large shapes.

Precision: bf16 (or fp16) features go into the kernels as they are: the tile products run on the
tensor cores' native bf16 dot with fp32 accumulation, the logits, statistics, G (before its one
rounding to the input dtype for cuBLAS) and the scale/bias partials are fp32, and dX / dY are
accumulated in fp32. fp32 features use 3xTF32 dots (~fp32 accuracy, 1.1-1.8x the registers).

Tiles are autotuned on a GPU (`triton.autotune`, key: feature width, dtype, kernel flags) over
GPU_TILES, chosen so that no binary spills registers on sm_90 at the aligned training shapes
(checked ahead of time: kernels/contrastive/aot.py, run/aot_loss_kernels.py). FGCLIP_LOSS_TILE=
"M,N,warps,stages" pins both kernels to that one tile (no autotuning: one binary per kernel
variant, what run/gpu_check.py uses to bound its JIT time). Under the interpreter
(TRITON_INTERPRET=1, the CPU test path) the configuration list has one entry of few large tiles,
because the interpreter's cost grows with the number of program instances, and the autotuner
(which never benchmarks a single config) gets a CPU timer in case a test adds more.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import triton

from kernels.contrastive.triton_kernels import _fwd_split_kernel, _grad_tile_kernel

SLAB_ELEMS = 1 << 22
"""Logits per backward slab: 16 MB of fp32 G (8 MB bf16), e.g. 256 rows x 16K columns."""
SLAB_MAX_ROWS = 2048
"""Rows per slab at most: one slab row-range for typical local batches."""

# GPU tile candidates per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K is set per
# dtype. Measured for sm_90 with ptxas (run/aot_loss_kernels.py, results in run/results/): with 4
# warps the 64x128 / 128x64 tiles reach 255 registers and spill in fp32, and 128x128 (8 warps)
# spills in the backward's softmax row+column variant in bf16 and fp32; with 8 warps the
# rectangular tiles use <= 212 registers. 128x128 stays for the forward (<= 254, no spill).
GPU_TILES = {
    "fwd": ((64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
    "grad": ((64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)),
}
# Interpreter: one config, big tiles. Tests may replace it to exercise autotuning.
INTERPRETER_TILES = ((64, 64, 1, 1),)
TILE_ENV = "FGCLIP_LOSS_TILE"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _cpu_bench(kernel_call, quantiles):
    # The autotuner's timer under the interpreter, where triton's do_bench needs a GPU.
    t0 = time.perf_counter()
    kernel_call()
    ms = 1e3 * (time.perf_counter() - t0)
    return [ms] * len(quantiles)


@functools.cache
def _tuned(kernel_name: str, tiles: tuple):
    kernel = {"fwd": _fwd_split_kernel, "grad": _grad_tile_kernel}[kernel_name]
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
        for m, n, w, st in tiles
    ]
    flags = ["SOFTMAX", "HAS_TARGET"] + (["HAS_ROW", "HAS_COL"] if kernel_name == "grad" else [])
    return triton.autotune(
        configs,
        # Tuned at the first call per feature width, dtype and flags (in training: the training
        # shape). Not keyed by R / C: every slab edge and benchmark shape would re-tune.
        key=["D", *flags],
        # Every config writes all of G but only its own column blocks of PART.
        reset_to_zero=["PART"] if kernel_name == "grad" else None,
        do_bench=_cpu_bench if interpreting() else None,
    )(kernel)


def pinned_tile() -> tuple[int, int, int, int] | None:
    """The tile FGCLIP_LOSS_TILE="M,N,warps,stages" pins, or None."""
    value = os.environ.get(TILE_ENV, "").strip()
    if not value:
        return None
    try:
        tile = tuple(int(v) for v in value.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 4 or min(tile) < 1 or any(v & (v - 1) for v in tile[:3]):
        raise ValueError(
            f"{TILE_ENV}={value!r}: want 'BLOCK_M,BLOCK_N,num_warps,num_stages' with powers of two "
            f"for the first three, e.g. '64,64,4,3'"
        )
    return tile


def tiles(kernel_name: str) -> tuple[tuple[int, int, int, int], ...]:
    """The tile configurations the autotuner chooses from for this kernel."""
    if interpreting():
        return INTERPRETER_TILES
    pinned = pinned_tile()
    return (pinned,) if pinned else GPU_TILES[kernel_name]


def _launch(kernel_name: str, grid, *args, **kwargs):
    _tuned(kernel_name, tiles(kernel_name))[grid](*args, **kwargs)


def gpu_constants(D: int, dtype: torch.dtype) -> dict:
    """Launch constants that are not tuned, on a GPU (kernels.contrastive.aot compiles these)."""
    # fp32 inputs: 3xTF32 keeps ~fp32 accuracy on tensor cores; bf16 uses the native dot
    # (bf16 x bf16 products are exact in the fp32 accumulator; PRECISION is unused for it).
    if dtype == torch.float32:
        return dict(BLOCK_K=_pow2(D, 16, 32), UPCAST=False, PRECISION="tf32x3")
    return dict(BLOCK_K=_pow2(D, 16, 64), UPCAST=False, PRECISION="tf32")


def _fixed(D: int, dtype: torch.dtype) -> dict:
    """Launch constants that are not tuned."""
    if interpreting():
        # bf16 tl.dot is wrong in the interpreter (triton issue 11584): operands are upcast to
        # fp32 before the dot, which then gives what the GPU's bf16 dot does (exact products,
        # fp32 sums) up to summation order.
        return dict(BLOCK_K=_pow2(D, 16, 256), UPCAST=True, PRECISION="ieee")
    return gpu_constants(D, dtype)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(R: int, C: int, device: torch.device) -> tuple[int, int]:
    """(number of column splits, columns per split, a multiple of 128)."""
    if interpreting() or device.type != "cuda":
        # Several splits even in small tests, so the merge is exercised; tiles stay 64 x 64.
        per = 128
    else:
        row_blocks = triton.cdiv(R, 64)
        want = triton.cdiv(2 * _num_sms(device.index or 0), row_blocks)
        n = max(1, min(want, triton.cdiv(C, 256)))
        per = max(128, C // n // 128 * 128)  # rounded down: at least n splits
    return triton.cdiv(C, per), per


def _prep(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dtype != b.dtype:
        raise TypeError(f"a is {a.dtype} but b is {b.dtype}")
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"Triton contrastive kernels take fp32/bf16/fp16, got {a.dtype}")
    return a.contiguous(), b.contiguous()


def _rows_stat(x, y, scale, bias, softmax: bool, offset: int | None) -> torch.Tensor:
    R, D = x.shape
    C = y.shape[0]
    if R == 0:
        return torch.empty(0, dtype=torch.float32, device=x.device)
    n_split, per = _splits(R, C, x.device)
    part = torch.empty(R, n_split, dtype=torch.float32, device=x.device)  # (R, splits)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), n_split)
    _launch(
        "fwd", grid,
        x, y, part, scale, bias, R, C, D, x.stride(0), y.stride(0), offset or 0, per, n_split,
        HAS_TARGET=offset is not None, SOFTMAX=softmax, **_fixed(D, x.dtype),
    )  # fmt: skip
    if n_split == 1:
        return part[:, 0]
    return torch.logsumexp(part, 1) if softmax else part.sum(1)


def fwd(a, b, scale, bias, kind, rows=True, cols=False, chunk=None, offset=None):
    """Same contract as chunked.fwd; `chunk` is ignored (tiles are the kernel's blocks)."""
    a, b = _prep(a, b)
    softmax = kind == "softmax"
    scale, bias = scale.detach().float().contiguous(), bias.detach().float().contiguous()
    if b.shape[0] == 0:  # no columns: empty sums
        init = float("-inf") if softmax else 0.0
        row = torch.full((a.shape[0],), init, device=a.device) if rows else None
        return row, (torch.empty(0, device=a.device) if cols else None)
    row = _rows_stat(a, b, scale, bias, softmax, offset) if rows else None
    # Columns: rows of b against a, where column j's positive is row j - offset.
    neg = None if offset is None else -offset
    col = _rows_stat(b, a, scale, bias, softmax, neg) if cols else None
    return row, col


def slab_shape(R: int, C: int, elems: int | None = None) -> tuple[int, int]:
    """(rows, columns) of one backward slab: all rows up to SLAB_MAX_ROWS, then columns."""
    elems = SLAB_ELEMS if elems is None else elems
    rs = max(1, min(R, SLAB_MAX_ROWS, max(64, elems // 256)))
    cs = max(1, min(C, max(64, elems // rs)))
    return rs, cs


def _mm_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y with an fp32 result: fp32 accumulation of the (exact) bf16 / fp16 products."""
    if x.dtype == torch.float32 or x.device.type != "cuda":
        # The CPU has no mm with an fp32 result for bf16 operands: the upcast gives the same
        # exact products and fp32 sums (the interpreter test path).
        return torch.mm(x.float(), y.float())
    return torch.mm(x, y, out_dtype=torch.float32)


def bwd(a, b, scale, bias, kind, row_stat, g_row, col_stat, g_col, chunk=None, offset=None):
    """Same contract as chunked.bwd; `chunk` is ignored (slabs hold at most SLAB_ELEMS logits)."""
    a, b = _prep(a, b)
    R, D = a.shape
    C = b.shape[0]
    softmax = kind == "softmax"
    scale, bias = scale.detach().float().contiguous(), bias.detach().float().contiguous()
    da = torch.zeros(R, D, dtype=torch.float32, device=a.device)  # (R, D) / scale
    db = torch.zeros(C, D, dtype=torch.float32, device=a.device)  # (C, D) / scale
    # Scalar gradients accumulate in fp64: they sum R*C terms.
    ds = torch.zeros((), dtype=torch.float64, device=a.device)
    dt = torch.zeros((), dtype=torch.float64, device=a.device)
    if (g_row is None and g_col is None) or R == 0 or C == 0:
        return da, db, ds.float(), dt.float()
    g_row = None if g_row is None else g_row.float().contiguous()
    g_col = None if g_col is None else g_col.float().contiguous()
    row_stat = None if row_stat is None else row_stat.float().contiguous()
    col_stat = None if col_stat is None else col_stat.float().contiguous()
    fixed = _fixed(D, a.dtype)
    # G in the operands' dtype so the cuBLAS products run on tensor cores; the interpreter
    # stores the same rounded G (its dot upcast does not change what G holds).
    rs, cs = slab_shape(R, C)
    G = torch.empty(rs, cs, dtype=a.dtype, device=a.device)  # the slab, reused
    min_block_n = min(n for _, n, _, _ in tiles("grad"))
    dummy = da  # never read when the matching HAS_* flag is off
    for i0 in range(0, R, rs):
        ni = min(rs, R - i0)
        for j0 in range(0, C, cs):
            nj = min(cs, C - j0)
            g = G[:ni, :nj]  # (ni, nj), row stride cs
            part = torch.zeros(triton.cdiv(nj, min_block_n), ni, 2, device=a.device)
            grid = lambda meta, ni=ni, nj=nj: (
                triton.cdiv(ni, meta["BLOCK_M"]),
                triton.cdiv(nj, meta["BLOCK_N"]),
            )
            local = None if offset is None else offset + i0 - j0  # positives in slab coordinates
            _launch(
                "grad", grid,
                a[i0:], b[j0:], g, part, scale, bias,
                dummy if g_row is None else row_stat[i0:], dummy if g_row is None else g_row[i0:],
                dummy if g_col is None else col_stat[j0:], dummy if g_col is None else g_col[j0:],
                ni, nj, D, a.stride(0), b.stride(0), g.stride(0), local or 0,
                HAS_TARGET=local is not None, SOFTMAX=softmax,
                HAS_ROW=g_row is not None, HAS_COL=g_col is not None, **fixed,
            )  # fmt: skip
            sums = part.sum((0, 1), dtype=torch.float64)  # (2,)
            ds += sums[0]
            dt += sums[1]
            da[i0 : i0 + ni] += _mm_f32(g, b[j0 : j0 + nj])
            db[j0 : j0 + nj] += _mm_f32(g.T, a[i0 : i0 + ni])
    return da.mul_(scale), db.mul_(scale), ds.float(), dt.float()
