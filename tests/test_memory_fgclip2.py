"""The memory model's FG-CLIP 2 parts (profiling/memory_fgclip2.py) against what torch keeps.

As tests/test_memory.py for v1: the bytes autograd keeps between a real FGCLIP2Model forward
(`encode_naflex_batch` on a NaFlex batch of four aspect ratios at patch budget 128) and its
backward, collected with saved_tensors_hooks (parameters left out, each storage once), against
`activation_bytes` at that batch's budget, boxes and region canvas; fp32 and bf16 weights,
checkpointing off / block / mlp / every other block, SDPA and math, both stages. TP=2 with and
without sequence parallelism runs in test_memory.py's spawned group. Also the parameter count of
the built model, the objective's kept tensors under loss.recipe=fgclip2, and the batch plans of
the two GPU presets.
"""

from __future__ import annotations

import pytest
import torch

from fgclip_mega.config import ParallelConfig
from fgclip_mega.presets import fgclip2_base_naflex, fgclip2_so400m_naflex, fgclip2_tiny
from fgclip_mega.profiling import memory
from tests.test_fgclip2_step import _batch
from tests.test_memory import LOSS_TOLERANCE, TOLERANCE, saved_bytes


def small(dtype: str = "fp32", ckpt: str = "none", every: int = 1, tp: int = 1, sp=False):
    cfg = fgclip2_tiny()
    cfg.model.vision.layers = 3
    cfg.model.text.layers = 2
    cfg.precision.params_dtype = cfg.precision.compute_dtype = dtype
    cfg.parallel = ParallelConfig(
        tensor_parallel_size=tp,
        sequence_parallel=sp,
        activation_checkpointing=ckpt != "none",
        checkpoint_granularity="block" if ckpt == "none" else ckpt,
        checkpoint_every=every,
    )
    return cfg


def model(cfg, attention: str = "sdpa"):
    from fgclip_mega.models.fgclip2 import FGCLIP2Model
    from fgclip_mega.runtime import TORCH_DTYPES

    dtype = TORCH_DTYPES[cfg.precision.params_dtype]
    torch.manual_seed(0)
    return FGCLIP2Model(cfg.model, cfg.parallel, params_dtype=dtype, compute_dtype=dtype,
                        attention_backend=attention)  # fmt: skip


def batch(cfg):
    return _batch(cfg, torch.Generator().manual_seed(1))


def measure(net, b, regional: bool) -> int:
    from fgclip_mega.objective.forward_fgclip2 import encode_naflex_batch

    dtype = next(net.vision.transformer.parameters()).dtype
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with autocast:
            return encode_naflex_batch(net, b, regional)

    return saved_bytes(forward, list(net.parameters()))[1]


def estimate(cfg, b, regional: bool, attention: str = "sdpa", device: str = "cpu") -> float:
    parts = memory.activation_bytes(
        cfg,
        len(b),
        stage="regional" if regional else "global",
        patches=b.pixels.shape[1],
        boxes=b.region_rois.shape[0],
        hard_boxes=b.hard_rows.shape[0],
        attention=attention,
        canvas=max(h for h, _ in b.grids) * max(w for _, w in b.grids),
        device=device,
    )
    return sum(parts.values())


CASES = [
    ("fp32", "none", 1, "sdpa"),
    ("fp32", "block", 1, "sdpa"),
    ("fp32", "block", 2, "sdpa"),
    ("fp32", "mlp", 2, "sdpa"),
    ("bf16", "none", 1, "sdpa"),
    ("fp32", "none", 1, "math"),
    ("bf16", "block", 1, "math"),
]


@pytest.mark.parametrize("regional", [False, True], ids=["global", "regional"])
@pytest.mark.parametrize(("dtype", "ckpt", "every", "attention"), CASES)
def test_activation_estimate_matches_saved_tensors(world, dtype, ckpt, every, attention, regional):
    cfg = small(dtype, ckpt, every)
    b = batch(cfg)
    assert b.pixels.shape[1] == 128 and len(set(b.grids)) == 4
    measured = measure(model(cfg, attention), b, regional)
    estimated = estimate(cfg, b, regional, attention)
    if dtype == "fp32":
        assert estimated == measured  # to the byte
    assert abs(estimated - measured) / measured < TOLERANCE, (estimated, measured)


def test_budget_scales_the_estimate(world):
    """The same images packed at budget 256 (grids grow to fill it) keep more than at 128, as
    the estimate says; without `patches` the estimate sizes data.max_patch_budget."""
    from dataclasses import replace

    from fgclip_mega.data.naflex import pack_images

    cfg = small()
    net = model(cfg)
    b128 = batch(cfg)
    images = [torch.randint(0, 256, (3, 8 * h, 8 * w), dtype=torch.uint8) for h, w in
              b128.grids]  # fmt: skip
    pixels, valid, grids = pack_images(images, cfg.model.vision.patch_size, 256)
    b256 = replace(b128, pixels=pixels, valid=valid, grids=[tuple(g) for g in grids.tolist()])
    for b in (b128, b256):
        assert estimate(cfg, b, True) == measure(net, b, True)
    assert estimate(cfg, b256, True) > estimate(cfg, b128, True)
    assert cfg.data.max_patch_budget == 256
    kwargs = dict(stage="regional", boxes=6, hard_boxes=3, canvas=256)
    default = memory.activation_bytes(cfg, 4, **kwargs)
    at_128 = memory.activation_bytes(cfg, 4, patches=128, **kwargs)
    assert default["image_blocks"] == 2 * at_128["image_blocks"]  # linear in N under SDPA
    assert default == memory.activation_bytes(cfg, 4, patches=256, **kwargs)


@pytest.mark.parametrize("ckpt", ["none", "mlp", "block"])
def test_cuda_attention_output_layout_imitated(world, monkeypatch, ckpt):
    """device="cuda" counts the copy CUDA's masked SDPA (memory-efficient kernel: output
    allocated (B, N, H, hd) contiguous) forces before the next Linear. Imitated on CPU by an SDPA
    that returns its masked output in that layout; unmasked calls (the text towers: flash, whose
    output follows q) are left alone."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def cuda_layout(q, k, v, attn_mask=None, *args, **kwargs):
        out = sdpa(q, k, v, attn_mask, *args, **kwargs)  # (B, H, N, hd)
        return out if attn_mask is None else out.transpose(1, 2).contiguous().transpose(1, 2)

    cfg = small("fp32", ckpt)
    net, b = model(cfg), batch(cfg)
    cpu = {r: measure(net, b, r) for r in (False, True)}
    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout)
    for regional in (False, True):
        measured = measure(net, b, regional)
        assert measured == estimate(cfg, b, regional, device="cuda")
        assert cpu[regional] == estimate(cfg, b, regional)
        # block checkpointing keeps no attention output; the dense head always runs
        assert (measured > cpu[regional]) == (ckpt != "block" or regional)


def test_parameter_count_matches_the_built_model(world):
    cfg = small()
    net = model(cfg)
    n, temps = memory.local_parameters(cfg)
    assert n == sum(p.numel() for p in net.parameters())
    assert temps == len(net.temperatures()) == 4


def test_texts_run_at_full_length_only():
    cfg = fgclip2_tiny()
    with pytest.raises(ValueError, match="short_len=32"):
        memory.activation_bytes(cfg, 2, stage="global", short_len=32)
    with pytest.raises(ValueError, match="long_len=100"):
        memory.memory_estimate(cfg, micro_batch_size=2, long_len=100)


@pytest.mark.parametrize("stage", ["global", "regional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_estimate_matches_saved_tensors(stage, dtype):
    """What the FG-CLIP 2 objective (sigmoid global terms, region InfoNCE, TIC, FGT) keeps for
    backward on one rank vs `loss_bytes`."""
    from fgclip_mega.objective import Embeddings, Objective

    cfg = fgclip2_tiny()
    if dtype == torch.bfloat16:
        cfg.precision.params_dtype = cfg.precision.compute_dtype = "bf16"
        cfg.precision.loss_in_fp32 = False  # bf16 embeddings into the losses
    d, b = cfg.model.vision.width, 16
    r, k1 = b * cfg.data.max_boxes, 1 + cfg.data.num_hard_negatives
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    emb = Embeddings(leaf(b, d), leaf(b, d), leaf(b, d))
    if stage == "regional":
        emb.region, emb.region_text = leaf(r, d), leaf(r, d)
        emb.hard_region, emb.hard_text = leaf(r, d), leaf(r, k1, d)
    objective = Objective(cfg.loss, regional=stage == "regional", impl="chunked")
    assert [t.name for t in objective.terms][2:] == (["region", "tic", "fgt"] if
                                                     stage == "regional" else [])  # fmt: skip
    temps = {n: torch.tensor(2.3, requires_grad=True) for n in objective.temperature_names()}
    temps["logit_bias"] = torch.tensor(-10.0, requires_grad=True)
    out, measured = saved_bytes(lambda: objective(emb, temps), list(temps.values()))
    kept, _ = memory.loss_bytes(cfg, b, 1, stage, "chunked")
    assert abs(kept - measured) / measured < LOSS_TOLERANCE, (kept, measured)
    out.total.backward()


@pytest.mark.parametrize("make", [fgclip2_base_naflex, fgclip2_so400m_naflex])
def test_gpu_presets_plan_their_global_batch_on_64_gpus(make):
    """The presets' global batch (FG-CLIP 2's 4096) fits 64 x 80 GB in both stages with an
    auto micro-batch, and the next larger micro-batch would not fit or does not exist."""
    from fgclip_mega.train.batching import plan_batch

    cfg = make()
    assert cfg.train.global_batch_size == 4096 and cfg.data.micro_batch_size == 0
    for stage in ("global", "regional"):
        plan = plan_batch(cfg, 64, 80e9, stage=stage)
        assert plan.fits and plan.global_batch_size == 4096
        if plan.micro_batch_size < 64:
            bigger = memory.memory_estimate(cfg, micro_batch_size=2 * plan.micro_batch_size,
                                            accumulation=plan.accumulation // 2, dp_size=64,
                                            stage=stage)  # fmt: skip
            assert bigger.total > 80e9


def test_env_prints_the_fgclip2_plan_and_its_patch_budget(capsys):
    from fgclip_mega import env

    plans = env.memory_plans("fgclip2_base_naflex", 64, 80.0)
    assert plans["patch_budget"] == 1024
    stage1, stage2 = plans["global"]["preset"], plans["regional"]["preset"]
    assert (stage1["micro_batch_size"], stage1["accumulation"]) == (64, 1)
    assert (stage2["micro_batch_size"], stage2["accumulation"]) == (32, 2)
    assert "box_text" in stage2["micro_batch_activations_gib"]
    env._print_memory("fgclip2_base_naflex", plans)
    out = capsys.readouterr().out
    assert "data.max_patch_budget=1024 patches: the worst case" in out
    assert "global batch 4096 = micro-batch 64 x DP 64 x accumulation 1" in out


def test_resolve_batch_sizes_fgclip2_from_its_estimate():
    """data.micro_batch_size=0 on a FG-CLIP 2 config: the largest divisor of the rank's share
    whose estimate fits train.device_memory_gb (at data.max_patch_budget)."""
    from fgclip_mega.train.batching import resolve_batch

    cfg = fgclip2_tiny()
    cfg.train.global_batch_size, cfg.data.micro_batch_size = 64, 0
    cfg.train.stage = "regional"
    fits_8 = memory.memory_estimate(cfg, micro_batch_size=8, accumulation=4, dp_size=2).total
    fits_16 = memory.memory_estimate(cfg, micro_batch_size=16, accumulation=2, dp_size=2).total
    assert fits_8 < fits_16
    cfg.train.device_memory_gb = (fits_8 + fits_16) / 2 / 1e9
    resolved, plan = resolve_batch(cfg, 2)
    assert (resolved.data.micro_batch_size, plan.accumulation) == (8, 4)
    # The budget the plan sizes is data.max_patch_budget's.
    cfg.data.max_patch_budget = 128
    assert resolve_batch(cfg, 2)[1].estimate.total < plan.estimate.total
