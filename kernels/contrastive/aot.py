"""Ahead-of-time compilation of the Triton contrastive kernels for a GPU target, without a GPU.

`compile_tile` builds one binary (`triton.compile(ASTSource(...), target=GPUTarget(...))`, which
needs no driver: triton ships ptxas) with the launch constants the launcher would pass for that
dtype and feature width, and returns what ptxas reports: registers per thread, spilled bytes and
shared memory per block. Integer arguments and pointers carry the 16-divisibility hint that the
JIT gives them at the aligned training shapes (R, C, D, strides and offsets all multiples of 16),
the specialisation that training actually compiles. Used by tests/test_contrastive_kernels.py
(a few binaries) and run/aot_loss_kernels.py (the full table).

Must run with TRITON_INTERPRET unset: under the interpreter `triton.jit` makes no compilable
function.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import time
from dataclasses import asdict, dataclass

import torch

FWD_FLAGS = ("HAS_TARGET", "SOFTMAX")
GRAD_FLAGS = ("HAS_TARGET", "SOFTMAX", "HAS_ROW", "HAS_COL")
H100_REGS = 255
H100_SMEM = 227 * 1024

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class TileReport:
    kernel: str
    dtype: str
    D: int
    tile: tuple[int, int, int, int]
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    flags: tuple[tuple[str, bool], ...]
    block_k: int
    precision: str
    n_regs: int
    n_spills: int
    shared: int
    seconds: float

    def as_json(self) -> dict:
        out = asdict(self)
        out["flags"] = dict(self.flags)
        return out


def flag_sets(kernel: str) -> list[dict[str, bool]]:
    """Every combination of the kernel's flags that the launcher can pass."""
    names = FWD_FLAGS if kernel == "fwd" else GRAD_FLAGS
    out = []
    for values in itertools.product((False, True), repeat=len(names)):
        flags = dict(zip(names, values, strict=True))
        if kernel == "grad" and not (flags["HAS_ROW"] or flags["HAS_COL"]):
            continue  # the launcher returns before launching
        out.append(flags)
    return out


def _signature(kernel: str, dtype: torch.dtype) -> tuple[object, dict[str, str], list[str]]:
    from kernels.contrastive import triton_kernels as tk

    t = _TYPES[dtype]
    if kernel == "fwd":
        fn = tk._fwd_split_kernel
        ptrs = {"X": t, "Y": t, "OUT": "fp32", "SCALE": "fp32", "BIAS": "fp32"}
        ints = ["R", "C", "D", "stride_x", "stride_y", "OFFSET", "COLS_PER_SPLIT", "N_SPLIT"]
        # N_SPLIT is any count (not a multiple of 16 in general): no divisibility hint.
        aligned = [n for n in ints if n != "N_SPLIT"]
    else:
        fn = tk._grad_tile_kernel
        ptrs = {"X": t, "Y": t, "G": t, "PART": "fp32", "SCALE": "fp32", "BIAS": "fp32"}
        ptrs.update({"STAT_R": "fp32", "G_R": "fp32", "STAT_C": "fp32", "G_C": "fp32"})
        ints = ["R", "C", "D", "stride_x", "stride_y", "stride_g", "OFFSET"]
        aligned = ints
    sig = {name: f"*{ty}" for name, ty in ptrs.items()}
    sig.update({name: "i32" for name in ints})
    for name in fn.arg_names:
        sig.setdefault(name, "constexpr")
    # 16-byte aligned pointers and 16-divisible ints (SCALE/BIAS are 0-dim: no hint).
    hinted = [n for n in ptrs if n not in ("SCALE", "BIAS")] + aligned
    return fn, sig, hinted


def launch_constants(D: int, dtype: torch.dtype) -> dict:
    """The launcher's non-tuned constants on a GPU (its `_fixed`, outside the interpreter)."""
    from kernels.contrastive import launcher

    return launcher.gpu_constants(D, dtype)


def parse_ptxas_log(log: str, name: str) -> tuple[int, int]:
    """(registers per thread, spilled bytes: stores + loads) of kernel `name` in a ptxas -v log."""
    start = log.find(f"Compiling entry function '{name}'")
    part = log[start:] if start >= 0 else log
    regs = re.search(r"Used (\d+) registers", part)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", part)
    if regs is None or spill is None:
        raise RuntimeError(f"no register/spill report for {name} in the ptxas log:\n{log[-2000:]}")
    return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2))


def compile_tile(
    kernel: str,
    dtype: torch.dtype,
    D: int,
    tile: tuple[int, int, int, int],
    flags: dict[str, bool],
    arch: int = 90,
) -> TileReport:
    """Compile one binary for sm_`arch` and return its register / spill / smem report."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    fn, sig, hinted = _signature(kernel, dtype)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("kernels.contrastive.aot needs TRITON_INTERPRET unset")
    m, n, warps, stages = tile
    fixed = launch_constants(D, dtype)
    constexprs = {**flags, "BLOCK_M": m, "BLOCK_N": n, **fixed}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in hinted}
    src = ASTSource(fn, sig, constexprs, attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    # ptxas's own report (-v, as triton calls it) is the only source of registers and spills
    # without a driver (triton reads them when it loads a binary); compiled afresh, never from
    # the cache, so ptxas runs every time.
    with (
        knobs.compilation.scope(),
        knobs.nvidia.scope(),
        contextlib.redirect_stdout(log),
    ):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        binary = triton_compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
    seconds = time.perf_counter() - t0
    regs, spills = parse_ptxas_log(log.getvalue(), binary.metadata.name)
    return TileReport(
        kernel=kernel,
        dtype=_TYPES[dtype],
        D=D,
        tile=tuple(tile),
        flags=tuple(sorted(flags.items())),
        block_k=fixed["BLOCK_K"],
        precision=fixed["PRECISION"],
        n_regs=regs,
        n_spills=spills,
        shared=int(binary.metadata.shared),
        seconds=round(seconds, 2),
    )
