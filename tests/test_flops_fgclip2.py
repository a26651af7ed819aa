"""The FG-CLIP 2 FLOP model (profiling/flops_fgclip2.py) against torch's FlopCounterMode on real
forward/backward passes of a tiny FGCLIP2Model and its objective, stage 1 and stage 2, on a
NaFlex batch of four aspect ratios (tests/test_fgclip2_step.py's, patch budget 128).

The towers run the "math" attention backend and every SDPA call (the MAP heads go through
nn.MultiheadAttention, which calls SDPA itself) is held to SDPBackend.MATH, which decomposes into
counted matmuls: FlopCounterMode has no formula for SDPA's CPU kernels and would count 0.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fgclip_mega.presets import fgclip2_so400m_naflex, fgclip2_tiny
from fgclip_mega.profiling.flops import training_flops
from tests.test_fgclip2_step import _batch
from tests.test_flops import _counter, _rel


def _cfg(impl: str = "naive", **parallel):
    cfg = fgclip2_tiny()
    cfg.loss.implementation = impl
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def _model(cfg):
    from fgclip_mega.models.fgclip2 import FGCLIP2Model

    torch.manual_seed(0)
    return FGCLIP2Model(cfg.model, cfg.parallel, attention_backend="math")


def counted(net, batch, cfg, regional: bool, backward: bool) -> int:
    from fgclip_mega.objective import Objective
    from fgclip_mega.objective.forward_fgclip2 import encode_naflex_batch

    impl = cfg.loss.implementation
    objective = Objective(cfg.loss, regional=regional, impl=impl)
    net.zero_grad(set_to_none=True)
    counter = _counter()
    with sdpa_kernel([SDPBackend.MATH]), counter:
        out = objective(encode_naflex_batch(net, batch, regional), net.temperatures())
        if backward:
            out.total.backward()
    return counter.get_total_flops()


def analytic(cfg, batch, regional: bool, backward: bool):
    return training_flops(
        cfg,
        batch_size=len(batch),
        stage="regional" if regional else "global",
        patches=batch.pixels.shape[1],
        boxes=batch.region_rois.shape[0],
        hard_boxes=batch.hard_rows.shape[0],
        backward=backward,
    )


@pytest.mark.parametrize("regional", [False, True], ids=["stage1", "stage2"])
def test_tiny_fgclip2_flops_match_counter(world, regional):
    cfg = _cfg("naive")  # the naive losses execute exactly the model's math
    batch = _batch(cfg, torch.Generator().manual_seed(1))
    assert batch.pixels.shape[1] == 128 and len(set(batch.grids)) == 4
    net = _model(cfg)
    for backward in (False, True):
        rep = analytic(cfg, batch, regional, backward)
        measured = counted(net, batch, cfg, regional, backward)
        assert rep.total.extra == 0
        assert measured == rep.total.model, (backward, measured, rep.total)
    assert ("dense" in rep.parts) == regional and ("loss_fgt" in rep.parts) == regional
    # Backward is about twice the forward (the patch Linear's weight gradient only).
    assert 1.9 < rep.total.backward / rep.total.forward <= 2.0


@pytest.mark.parametrize("granularity,every", [("block", 1), ("mlp", 1), ("block", 2)])
def test_checkpointing_and_chunked_losses_add_hardware_flops(world, granularity, every):
    cfg = _cfg(
        "chunked",
        activation_checkpointing=True,
        checkpoint_granularity=granularity,
        checkpoint_every=every,
    )
    batch = _batch(cfg, torch.Generator().manual_seed(2))
    net = _model(cfg)
    # Stage 2 only (it runs every tower and head of stage 1 too): half the counted passes.
    rep = analytic(cfg, batch, True, True)
    measured = counted(net, batch, cfg, True, True)
    assert _rel(measured, rep.total.hardware) < 1e-6, (measured, rep.total)
    assert rep.total.hardware > rep.total.model
    fwd = analytic(cfg, batch, True, False)
    assert fwd.total.extra == 0
    assert counted(net, batch, cfg, True, False) == fwd.total.forward


def test_budget_texts_and_bad_arguments():
    cfg = fgclip2_so400m_naflex()
    cfg.data.micro_batch_size = 8
    full = training_flops(cfg, stage="regional")  # default: data.max_patch_budget = 1024
    assert full.total.model == training_flops(cfg, stage="regional", patches=1024).total.model
    small = training_flops(cfg, stage="regional", patches=256)
    assert small.parts["image"].model < full.parts["image"].model / 3.9  # attention is N^2
    assert small.parts["long_text"] == full.parts["long_text"]
    # The MAP heads and text heads are replicated over TP: executed twice at TP=2.
    cfg.parallel.tensor_parallel_size = 2
    tp2 = training_flops(cfg, stage="regional")
    assert tp2.parts["dense"].extra == tp2.parts["dense"].hardware / 2
    assert tp2.total.model == full.total.model
    for kwargs, name in (
        ({"short_len": 32}, "short_len"),
        ({"long_len": 248}, "long_len"),
        ({"patches": 0}, "patches"),
        ({"boxes": 8 * 4 + 1}, "boxes"),
    ):
        with pytest.raises(ValueError, match=name):
            training_flops(cfg, **kwargs)
    v1 = fgclip2_tiny()
    v1.model.family = "fgclip"
    with pytest.raises(ValueError, match="patches"):
        training_flops(v1, batch_size=2, patches=128)


def test_trainer_throughput_uses_the_batch_budget(world):
    """train/metrics.Throughput reads the NaFlex batch's own budget, not the worst case."""
    from fgclip_mega.train.metrics import Throughput

    cfg = _cfg()
    batch = _batch(cfg, torch.Generator().manual_seed(1))
    tp = Throughput.__new__(Throughput)  # skips the CPU peak measurement
    tp.cfg, tp.dp_size, tp.world_size, tp.peak = cfg, 1, 1, 1.0
    got = tp.of(batch)["model_flops_per_sample"]
    want = analytic(cfg, batch, cfg.train.stage == "regional", True).model_per_sample
    assert got == want
    assert cfg.data.max_patch_budget == 256 != batch.pixels.shape[1]


def loss_counts(b: int, r: int, h: int, dp_group, seed: int) -> dict[bool, int]:
    """FlopCounterMode of the FG-CLIP 2 objective alone (sigmoid global terms, region InfoNCE,
    TIC, FGT; chunked), forward and forward+backward; run by test_flops.py's DP=2 group."""
    from fgclip_mega.objective import Embeddings, Objective

    cfg = _cfg("chunked")
    d, k1 = cfg.model.vision.width, 1 + cfg.data.num_hard_negatives
    objective = Objective(cfg.loss, regional=True, impl="chunked", dp_group=dp_group)
    temps = {n: torch.tensor(2.0, requires_grad=True) for n in objective.temperature_names()}
    out = {}
    for backward in (False, True):
        g = torch.Generator().manual_seed(seed)
        shapes = [(b, d)] * 3 + [(r, d)] * 2 + [(h, d), (h, k1, d)]
        emb = Embeddings(*(torch.randn(*s, generator=g).requires_grad_() for s in shapes))
        counter = _counter()
        with counter:
            total = objective(emb, temps).total
            if backward:
                total.backward()
        out[backward] = counter.get_total_flops()
    return out


def loss_model(b: int, r: int, h: int, dp: int, backward: bool):
    from fgclip_mega.profiling.flops import Flops

    rep = training_flops(_cfg("chunked"), batch_size=b, dp_size=dp, stage="regional", boxes=r,
                         hard_boxes=h, backward=backward)  # fmt: skip
    names = ("loss_global", "loss_region", "loss_tic", "loss_fgt")
    return sum((rep.parts[n] for n in names), Flops())


def test_loss_flops_match_counter_single_process():
    b, r, h = 6, 20, 17  # r <= b * max_boxes
    counts = loss_counts(b, r, h, None, seed=0)
    for backward in (False, True):
        f = loss_model(b, r, h, 1, backward)
        assert counts[backward] == pytest.approx(f.hardware, rel=1e-6), (backward, f)
