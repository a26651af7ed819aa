"""RoIAlign on bad input (issue 9): one shared checker gives the compiled op and the reference
the same clear error; non-finite rois and huge sample counts never touch memory they should not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from kernels.roi_align import (
    pool_boxes,
    roi_align,
    roi_align_reference,
)
from tests.builders import make_rois

ROOT = Path(__file__).resolve().parents[1]
tv_roi_align = torchvision.ops.roi_align


pytestmark = pytest.mark.usefixtures("built_library")


X = torch.randn(2, 3, 6, 5)
R = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0], [1, 1.0, 0.0, 3.0, 2.0]])
NAN, INF = float("nan"), float("inf")
BAD_ARGS = [
    ("rois_k6", X, torch.zeros(2, 6), {}, ValueError, r"rois must be \(K, 5\)"),
    ("rois_1d", X, torch.zeros(5), {}, ValueError, r"rois must be \(K, 5\)"),
    ("rois_complex", X, R.to(torch.complex64), {}, ValueError, "real floating tensor"),
    ("rois_int", X, R.long(), {}, ValueError, "real floating tensor, got torch.int64"),
    ("rois_bool", X, R.bool(), {}, ValueError, "real floating tensor, got torch.bool"),
    ("rois_list_of_lists", X, [[0, 1, 1, 2, 2]], {}, ValueError, "boxes.0. must be an"),
    ("input_complex", X.to(torch.complex64), R, {}, ValueError, "input must be fp16"),
    ("input_int", X.long(), R, {}, ValueError, "input must be fp16"),
    ("input_bool", X > 0, R, {}, ValueError, "input must be fp16"),
    ("input_3d", X[0], R, {}, ValueError, r"input must be \(N, C, H, W\)"),
    ("devices", X, R.to("meta"), {}, ValueError, "rois are on meta but input is on cpu"),
    ("out_zero", X, R, {"output_size": 0}, ValueError, "output_size must be in"),
    ("out_negative", X, R, {"output_size": (2, -1)}, ValueError, "output_size must be in"),
    ("out_huge", X, R, {"output_size": 2**31}, ValueError, "output_size must be in"),
    ("out_float", X, R, {"output_size": 2.5}, TypeError, "output_size must be an int"),
    ("out_bool", X, R, {"output_size": True}, TypeError, "output_size must be an int"),
    ("out_triple", X, R, {"output_size": (1, 2, 3)}, TypeError, "output_size must be an int"),
    ("scale_nan", X, R, {"spatial_scale": NAN}, ValueError, "spatial_scale must be finite"),
    ("scale_inf", X, R, {"spatial_scale": INF}, ValueError, "spatial_scale must be finite"),
    ("scale_zero", X, R, {"spatial_scale": 0.0}, ValueError, "spatial_scale must be finite"),
    ("scale_str", X, R, {"spatial_scale": "1"}, TypeError, "spatial_scale must be a number"),
    ("ratio_float", X, R, {"sampling_ratio": 2.0}, TypeError, "sampling_ratio must be an int"),
    ("ratio_huge", X, R, {"sampling_ratio": 2**31}, ValueError, "sampling_ratio must fit"),
    ("aligned_str", X, R, {"aligned": "yes"}, TypeError, "aligned must be a bool"),
    ("roi_nan", X, torch.tensor([[0.0, 1, 1, 5, NAN]]), {}, ValueError, "row 0 is not finite"),
    ("roi_inf", X, R.index_put((torch.tensor(1), torch.tensor(1)), torch.tensor(-INF)), {},
     ValueError, "rois row 1 is not finite"),
    ("batch_nan", X, torch.tensor([[NAN, 1, 1, 2, 2]]), {}, ValueError, "row 0 is not finite"),
    ("batch_high", X, torch.tensor([[0, 1, 1, 2, 2.0], [2, 1, 1, 2, 2]]), {}, ValueError,
     r"rois row 1 has batch index 2.0 outside \[0, 2\)"),
    ("batch_low", X, torch.tensor([[-1.0, 1, 1, 2, 2]]), {}, ValueError, "batch index -1.0"),
    ("empty_batch", X[:0], R, {}, ValueError, r"batch index 0.0 outside \[0, 0\)"),
    ("adaptive_huge", X, torch.tensor([[0, 0, 0, 1e12, 2.0]]), {}, ValueError,
     "rois row 0 spans 1e.12 pixels along x: adaptive sampling"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_same_error_on_both_paths(case):
    _, x, rois, kwargs, exc, match = case
    args = dict(output_size=2, spatial_scale=1.0, sampling_ratio=-1, aligned=True) | kwargs
    errors = []
    for fn in (roi_align, roi_align_reference):
        with pytest.raises(exc, match=match) as info:
            fn(x, rois, **args)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


CRASH_SCRIPT = """
import json, torch
from kernels.roi_align import load_library
assert load_library().cpu
op, nan, inf = torch.ops.fgclip, float("nan"), float("inf")
x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
cases = {
    "coord_nan": ([[0.0, 1, 1, 5, nan]], 1.0), "coord_inf": ([[0.0, -inf, 1, 5, 5]], 1.0),
    "coord_both_inf": ([[1.0, inf, inf, inf, inf]], 1.0), "batch_nan": ([[nan, 1, 1, 5, 5]], 1.0),
    "batch_huge": ([[1e30, 1, 1, 5, 5]], 1.0), "adaptive_huge": ([[0.0, 0, 0, 1e12, 3]], 1.0),
    "scale_nan": ([[0.0, 1, 1, 5, 5]], nan), "ok": ([[0.0, 1, 1, 5, 5]], 1.0),
}
out = {}
for name, (rois, scale) in cases.items():
    for sr in (2, -1):
        r = torch.tensor(rois, dtype=torch.float64)
        try:
            y = op.roi_align(x, r, scale, 2, 2, sr, True)
            out[f"{name}/{sr}/fwd"] = "ok" if torch.isfinite(y).all() else "nonfinite"
        except RuntimeError as e:
            out[f"{name}/{sr}/fwd"] = str(e).splitlines()[0]
        # Called directly, the backward skips invalid boxes (zero gradient) instead of raising.
        try:
            g = op.roi_align_backward(torch.ones(1, 3, 2, 2, dtype=torch.float64), r, scale, 2,
                                      2, 2, 3, 7, 7, sr, True, True, False)
            out[f"{name}/{sr}/bwd"] = "ok" if torch.isfinite(g).all() else "nonfinite"
        except RuntimeError as e:
            out[f"{name}/{sr}/bwd"] = str(e).splitlines()[0]
print(json.dumps(out))
"""


def test_compiled_op_is_safe_on_nonfinite_rois():
    # Segfaulted (exit 139) before the kernels guarded non-finite rois: run in a subprocess.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, msg in out.items():
        name, sr, pass_ = key.split("/")
        if name == "scale_nan":
            assert "spatial_scale must be finite" in msg, (key, msg)
        elif pass_ == "bwd" or name == "ok" or (name == "adaptive_huge" and sr == "2"):
            assert msg == "ok", (key, msg)
        elif name in ("batch_huge",):
            assert "rois row 0 has a batch index outside [0, 2)" in msg, (key, msg)
        else:
            assert "rois row 0 is not finite or too large" in msg, (key, msg)


@pytest.mark.parametrize("sampling_ratio,x2", [(46341, 5.0), (-1, 1e5)])
def test_more_than_2_31_samples_per_bin(sampling_ratio, x2):
    # 46341^2 and 1e5^2 samples per bin overflow an int32 count: the normaliser must use 64 bits.
    # (torchvision overflows here too, so the float64 reference is the oracle.)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    rois = torch.tensor(
        [[0, 0.25, 0.5, x2, x2 + 0.5], [0, 1.0, 1.0, 4.0, 3.0]], dtype=torch.float64
    )
    got = roi_align(x, rois, 1, 1.0, sampling_ratio, True)
    expect = roi_align_reference(x, rois, 1, 1.0, sampling_ratio, True)
    assert expect.abs().min() > 0
    torch.testing.assert_close(got, expect, atol=0, rtol=1e-9)


def test_attacker_inputs_that_are_defined():
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(3, 4, 9, 8, generator=gen, requires_grad=True)
    rois = make_rois(gen, 3, 9, 8, 20)
    for fn in (roi_align, roi_align_reference):
        # Empty feature maps pool to zeros (torchvision segfaults here) and get a zero gradient.
        for shape in ((3, 4, 0, 8), (3, 4, 9, 0), (3, 0, 9, 8)):
            e = torch.zeros(shape, requires_grad=True)
            y = fn(e, rois, 2, 1.0, 2, True)
            assert y.shape == (20, shape[1], 2, 2) and not y.any()
            if y.numel():
                assert torch.autograd.grad(y.sum(), e)[0].shape == shape
        # Any negative sampling ratio is adaptive, as in torchvision.
        torch.testing.assert_close(
            fn(x, rois, 3, 0.5, -7, True),
            tv_roi_align(x, rois, 3, 0.5, -7, True),
            atol=1e-5,
            rtol=0,
        )
        # Non-contiguous input and rois; fp64 rois with fp32 features (cast like the kernels).
        xs = torch.randn(3, 8, 9, 16, generator=gen)[:, ::2, :, ::2]
        rs = torch.cat([rois, torch.zeros(20, 3)], 1)[:, :5]
        assert not xs.is_contiguous() and not rs.is_contiguous()
        torch.testing.assert_close(
            fn(xs, rs, 2, 1.0, 2, False), tv_roi_align(xs, rs, 2, 1.0, 2, False), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            fn(x, rois.double(), 2, 1.0, -1, True), tv_roi_align(x, rois, 2, 1.0, -1, True),
            atol=1e-5, rtol=0,
        )  # fmt: skip


def test_pool_boxes_rejects_bad_boxes_and_counts():
    fmap = torch.randn(2, 4, 5, 5)
    boxes = torch.rand(2, 3, 4)
    cases = [
        (boxes, torch.tensor([4, 1]), r"counts\[0\] = 4 is outside \[0, 3\]"),
        (boxes, torch.tensor([1, -1]), r"counts\[1\] = -1 is outside \[0, 3\]"),
        (boxes, torch.tensor([1, 1, 1]), r"counts must be \(B,\) = \(2,\)"),
        (boxes, torch.tensor([1.0, 1.0]), "counts must be integers"),
        (boxes.long(), None, "boxes must be a real floating tensor"),
        ([boxes[0], torch.rand(2, 5)], None, r"boxes\[1\] must be an \(M_1, 4\) xyxy tensor"),
        ([boxes[0], boxes[1]], [3, 4], r"counts\[1\] = 4 is outside \[0, 3\]"),
        (boxes[..., :3], None, r"padded boxes must be \(B, M, 4\)"),
    ]
    for bx, cnt, match in cases:
        with pytest.raises(ValueError, match=match):
            pool_boxes(fmap, bx, cnt)
