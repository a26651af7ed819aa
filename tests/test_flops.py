"""The analytic FLOP model against torch's FlopCounterMode on real forward/backward passes of the
model and the objective; the GPU peak table, the CPU peak measurement and the MFU helper.

FlopCounterMode counts what executes (hardware FLOPs). Attention runs on the "math" backend
here: FlopCounterMode has no formula for SDPA's CPU kernel and would count its attention as 0.
It has none for the in-place `addmm_` either (the chunked loss backward uses it), so that is
registered with addmm's formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fgclip_mega.config import Config, ParallelConfig
from fgclip_mega.presets import PRESETS
from fgclip_mega.profiling import peak
from fgclip_mega.profiling.flops import Flops, training_flops
from tests.distributed import run_distributed

EOT = 49407
LOSS_PARTS = ("loss_global", "loss_region", "loss_hard")


def _addmm_inplace_flops(self_shape, mat1_shape, mat2_shape, *args, **kwargs) -> int:
    m, k = mat1_shape
    return 2 * m * k * mat2_shape[1]


def _counter() -> FlopCounterMode:
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops}
    )


def _impl(cfg: Config) -> str:
    return "chunked" if cfg.loss.implementation == "auto" else cfg.loss.implementation


def _rel(measured: float, analytic: float) -> float:
    return abs(measured - analytic) / max(measured, 1.0)


def _tokens(g: torch.Generator, shape: tuple[int, ...], context: int, last_eot: int):
    """(..., context) random tokens, EOT at a random place < last_eot (some rows exactly at it),
    zero padding after: the loader trims the batch to its last EOT rounded up to 8."""
    x = torch.randint(1, EOT - 1, (*shape, context), generator=g)
    rows = x.view(-1, context)
    ends = torch.randint(1, last_eot, (rows.shape[0],), generator=g)
    ends[0] = last_eot - 1
    for i, e in enumerate(ends.tolist()):
        rows[i, e] = EOT
        rows[i, e + 1 :] = 0
    return x


def make_batch(cfg: Config, counts: list[int], long_eot: int, short_eot: int, seed: int = 0):
    """A packed Batch (through the loader's own batch_from_arrays) with valid boxes `counts`
    per image, one valid box without hard negatives, texts ending before the given positions."""
    from fgclip_mega.data.batch import batch_from_arrays

    g = torch.Generator().manual_seed(seed)
    b, m, k = len(counts), cfg.data.max_boxes, cfg.data.num_hard_negatives
    t, s = cfg.model.text, cfg.model.vision.image_size
    lo = torch.rand(b, m, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.1 + 0.4 * torch.rand(b, m, 2, generator=g)], -1)
    box_counts = torch.tensor(counts)
    valid = torch.arange(m)[None] < box_counts[:, None]
    hard_valid = valid.clone()
    hard_valid[0, 0] = False
    arrays = {
        "long_tokens": _tokens(g, (b,), t.long_context, long_eot),
        "short_tokens": _tokens(g, (b,), t.short_context, short_eot),
        "boxes": boxes * valid[..., None],
        "box_counts": box_counts,
        "region_tokens": _tokens(g, (b, m), t.short_context, short_eot),
        "hardneg_tokens": _tokens(g, (b, m, 1 + k), t.short_context, short_eot),
        "hardneg_valid": hard_valid,
        "sample_ids": torch.arange(b),
        "positions": torch.arange(b),
        "epoch": 0,
    }
    images = torch.randn(b, 3, s, s, generator=g)
    return batch_from_arrays(images, arrays, [str(i) for i in range(b)])


def build(cfg: Config):
    from fgclip_mega.models import FGCLIPModel

    torch.manual_seed(0)
    return FGCLIPModel(cfg.model, cfg.parallel, attention_backend="math")


def counted(model, batch, cfg: Config, regional: bool, backward: bool) -> int:
    from fgclip_mega.objective import Objective, encode_batch

    objective = Objective(cfg.loss, regional=regional, impl=_impl(cfg))
    model.zero_grad(set_to_none=True)
    counter = _counter()
    with counter:
        out = objective(encode_batch(model, batch, regional), model.temperatures())
        if backward:
            out.total.backward()
    return counter.get_total_flops()


def analytic(cfg: Config, batch, regional: bool, backward: bool):
    return training_flops(
        cfg,
        batch_size=batch.images.shape[0],
        stage="regional" if regional else "global",
        long_len=batch.long_tokens.shape[1],
        short_len=batch.short_tokens.shape[1],
        boxes=batch.region_rois.shape[0],
        hard_boxes=batch.hard_rows.shape[0],
        backward=backward,
    )


def tiny(impl: str = "naive", **parallel) -> Config:
    cfg = PRESETS["tiny"]()
    cfg.loss.implementation = impl
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


# ----------------------------------------------------------------------------- model vs counter


@pytest.mark.parametrize("regional", [False, True], ids=["global", "regional"])
def test_tiny_model_flops_match_counter(world, regional):
    cfg = tiny("naive")  # the naive loss executes exactly the model's math: hardware == model
    batch = make_batch(cfg, [4, 3, 4, 2], long_eot=37, short_eot=21)
    # The loader trimmed the texts, so the formula is checked at lengths below the contexts.
    assert batch.long_tokens.shape[1] == 40 and batch.short_tokens.shape[1] == 24
    model = build(cfg)
    for backward in (False, True):
        rep = analytic(cfg, batch, regional, backward)
        measured = counted(model, batch, cfg, regional, backward)
        assert rep.total.extra == 0
        assert _rel(measured, rep.total.model) < 1e-2, (backward, measured, rep.total)
    # Backward is about twice the forward (the patch conv's weight gradient only).
    assert 1.9 < rep.total.backward / rep.total.forward <= 2.0


@pytest.mark.parametrize("granularity,every", [("block", 1), ("mlp", 1), ("block", 2), ("mlp", 2)])
def test_checkpointing_adds_recompute_to_hardware_flops(world, granularity, every):
    cfg = tiny(
        "chunked",
        activation_checkpointing=True,
        checkpoint_granularity=granularity,
        checkpoint_every=every,
    )
    batch = make_batch(cfg, [2, 4, 1], long_eot=60, short_eot=30)
    model = build(cfg)
    rep = analytic(cfg, batch, True, True)
    measured = counted(model, batch, cfg, True, True)
    assert _rel(measured, rep.total.hardware) < 1e-2, (measured, rep.total)
    assert rep.total.hardware > rep.total.model
    # Forward only: nothing is recomputed and the chunked loss matches its model FLOPs.
    fwd = analytic(cfg, batch, True, False)
    assert fwd.total.extra == 0
    assert _rel(counted(model, batch, cfg, True, False), fwd.total.forward) < 1e-2


@pytest.mark.parametrize("regional", [False, True], ids=["global", "regional"])
def test_vit_b16_layers_reduced_matches_counter(world, regional):
    cfg = PRESETS["fgclip_vit_b16"]()
    cfg.model.vision.layers = 2
    cfg.model.text.layers = 2
    cfg.loss.implementation = "chunked"
    batch = make_batch(cfg, [3, 1], long_eot=248, short_eot=16)  # long texts untrimmed
    assert batch.long_tokens.shape[1] == 248
    model = build(cfg)
    for backward in (False, True):
        rep = analytic(cfg, batch, regional, backward)
        measured = counted(model, batch, cfg, regional, backward)
        assert _rel(measured, rep.total.hardware) < 1e-2, (backward, measured, rep.total)


# ----------------------------------------------------------------------------- losses alone


def _loss_embeddings(cfg: Config, b: int, r: int, h: int, seed: int):
    from fgclip_mega.objective import Embeddings

    g = torch.Generator().manual_seed(seed)
    p, k1 = cfg.model.projection_dim, 1 + cfg.data.num_hard_negatives

    def x(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    return Embeddings(x(b, p), x(b, p), x(b, p), x(r, p), x(r, p), x(h, p), x(h, k1, p))


def _loss_counts(cfg: Config, b: int, r: int, h: int, dp_group, seed: int) -> dict:
    """FlopCounterMode of the objective alone (the loss FLOPs are far below 1% of a step, so the
    whole-step checks cannot see them), forward and forward+backward."""
    from fgclip_mega.objective import Objective

    temps = {n: torch.tensor(2.0, requires_grad=True) for n in
             ("logit_scale", "logit_scale_finegraind", "logit_scale_hardneg")}  # fmt: skip
    objective = Objective(cfg.loss, regional=True, impl=_impl(cfg), dp_group=dp_group)
    out = {}
    for backward in (False, True):
        counter = _counter()
        with counter:
            total = objective(_loss_embeddings(cfg, b, r, h, seed), temps).total
            if backward:
                total.backward()
        out[backward] = counter.get_total_flops()
    return out


def _loss_model(cfg: Config, b: int, r: int, h: int, dp: int, backward: bool) -> Flops:
    rep = training_flops(
        cfg, batch_size=b, dp_size=dp, stage="regional", boxes=r, hard_boxes=h, backward=backward
    )
    return sum((rep.parts[n] for n in LOSS_PARTS), Flops())


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_loss_flops_match_counter_single_process(impl):
    cfg = tiny(impl)
    cfg.loss.chunk_size = 8  # several tiles
    b, r, h = 12, 30, 17
    counts = _loss_counts(cfg, b, r, h, None, seed=0)
    for backward in (False, True):
        f = _loss_model(cfg, b, r, h, 1, backward)
        assert counts[backward] == pytest.approx(f.hardware, rel=1e-2), (impl, backward, f)
    assert (f.extra > 0) == (impl == "chunked")  # tiles recomputed in backward


def _dp2_loss_counts(impl: str) -> tuple[dict, dict]:
    from fgclip_mega.parallel import init_parallel
    from tests.test_flops_fgclip2 import loss_counts

    state = init_parallel(ParallelConfig(), seed=0)
    assert state.dp_size == 2
    cfg = tiny(impl)
    v1 = _loss_counts(cfg, 6, 9 + state.dp_rank, 5, state.dp_group, seed=state.dp_rank)
    # FG-CLIP 2's objective (sigmoid global terms over DP, TIC, FGT) in the same processes
    return v1, loss_counts(6, 9 + state.dp_rank, 5, state.dp_group, seed=state.dp_rank)


@pytest.mark.slow  # two spawned processes: 26-55 s on the shared 2-core machine
def test_loss_flops_match_counter_data_parallel():
    from tests.test_flops_fgclip2 import loss_model

    for rank, (counts, fg2) in enumerate(run_distributed(_dp2_loss_counts, 2, "chunked")):
        cfg = tiny("chunked")
        for backward in (False, True):
            f = _loss_model(cfg, 6, 9 + rank, 5, 2, backward)
            # Softmax over DP computes this rank's rows of S and of S^T: twice the model's b x B.
            assert counts[backward] == pytest.approx(f.hardware, rel=1e-2), (rank, backward, f)
            g = loss_model(6, 9 + rank, 5, 2, backward)  # sigmoid: this rank's b x B once
            assert fg2[backward] == pytest.approx(g.hardware, rel=1e-6), (rank, backward, g)
        assert f.hardware > f.model


# ----------------------------------------------------------------------------- arguments


def test_defaults_scale_and_bad_arguments_name_the_culprit():
    cfg = PRESETS["fgclip_vit_b16"]()
    cfg.data.micro_batch_size = 8  # the preset's is auto (0): sized from memory by the trainer
    full = training_flops(cfg, stage="global")
    assert full.batch_size == cfg.data.micro_batch_size
    assert training_flops(cfg, stage="global", short_len=40).total.model < full.total.model
    reg = training_flops(cfg, stage="regional")
    assert set(reg.parts) > set(full.parts)
    assert reg.step_model_flops == reg.total.model
    assert training_flops(cfg, dp_size=4).step_model_flops > 4 * full.total.model
    # Image encoder forward of ViT-B/16 at 224 px: the published ~17.6 GMACs (x2 FLOPs).
    image_fwd = training_flops(cfg, batch_size=1, backward=False).parts["image"].forward
    assert 2 * 17.4e9 < image_fwd < 2 * 17.7e9
    for kwargs, name in (
        ({"short_len": 78}, "short_len"),
        ({"long_len": 0}, "long_len"),
        ({"boxes": cfg.data.micro_batch_size * cfg.data.max_boxes + 1}, "boxes"),
        ({"boxes": 3, "hard_boxes": 4}, "hard_boxes"),
        ({"batch_size": 0}, "batch_size"),
        ({"dp_size": 0}, "dp_size"),
        ({"stage": "third"}, "stage"),
    ):
        with pytest.raises(ValueError, match=name):
            training_flops(cfg, **kwargs)


# ----------------------------------------------------------------------------- peak and MFU


@pytest.mark.parametrize(
    "name,dtype,expected",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 156e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.5e12),
    ],
)
def test_gpu_peak_from_device_name(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak.device_peak_flops("cuda", dtype) == expected


def test_unknown_gpu_and_dtype_are_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4"):
        peak.device_peak_flops("cuda")
    with pytest.raises(ValueError, match="int8"):
        peak.gpu_peak_flops("NVIDIA H200", "int8")


def test_cpu_peak_is_measured_once_positive_and_finite():
    first = peak.device_peak_flops("cpu", torch.float32)
    assert math.isfinite(first) and first > 1e8
    assert peak.device_peak_flops("cpu") == first  # cached per process
    assert peak.measured_cpu_peak_flops.cache_info().hits >= 1


def test_mfu():
    assert peak.mfu(4e15, 2.0, 4, 1e15) == pytest.approx(0.5)
    for args in ((1e12, 0.0, 1, 1e12), (1e12, 1.0, 0, 1e12), (1e12, 1.0, 1, math.nan)):
        with pytest.raises(ValueError):
            peak.mfu(*args)
