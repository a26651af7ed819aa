"""FGCLIPModel at TP=1 in this process against transformers' CLIPModel and hand computations
(the reference builders live in tests/builders.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fgclip_mega.config import ModelConfig, ParallelConfig
from fgclip_mega.presets import PRESETS
from tests.builders import (
    EOS,
    b16_config,
    build_model,
    dense_by_hand,
    fgclip_layout,
    grad_errors,
    hf_outputs,
    long_reference,
    max_err,
    our_outputs,
    perturbed_clip,
    probe_loss,
    sample_inputs,
    small_config,
)


def _parity(cfg: ModelConfig, n_images: int, n_texts: int, check_grads: bool) -> None:
    hf = perturbed_clip(cfg)
    model = build_model(cfg, ParallelConfig(), hf)
    images, tokens = sample_inputs(cfg, n_images, n_texts, cfg.text.short_context)
    px_ref, px = images.clone().requires_grad_(), images.clone().requires_grad_()
    ref, ours = hf_outputs(hf, px_ref, tokens), our_outputs(model, px, tokens)
    for key in ("image", "text", "logits"):
        assert ours[key].shape == ref[key].shape
        assert max_err(ours[key], ref[key]) < 1e-5, (key, max_err(ours[key], ref[key]))
    if not check_grads:
        return
    probe_loss(ref).backward()
    probe_loss(ours).backward()
    assert max_err(px.grad, px_ref.grad) < 1e-5 * max(1.0, px_ref.grad.abs().max().item())
    errs = grad_errors(model, hf)
    assert max(errs.values()) < 1e-5, sorted(errs.items(), key=lambda kv: -kv[1])[:5]


# ----------------------------------------------------------------------------- tests


def test_parity_with_transformers_small(world):
    _parity(small_config(), n_images=3, n_texts=4, check_grads=True)


@pytest.mark.slow
def test_parity_with_transformers_vit_b16(world):
    _parity(b16_config(), n_images=2, n_texts=2, check_grads=True)


def test_long_text_matches_transformers_with_the_split_table(world):
    cfg = small_config()
    hf = perturbed_clip(cfg)
    sd = fgclip_layout(hf, cfg)
    model, ref = build_model(cfg, ParallelConfig(), sd), long_reference(hf, sd, cfg)
    _, tokens = sample_inputs(cfg, 1, 4, cfg.text.long_context, seed=7)
    with torch.no_grad():
        ours, want = (
            model.encode_text(tokens, long=True),
            ref.get_text_features(tokens).pooler_output,
        )
    assert max_err(ours, want) < 1e-5


@torch.no_grad()
def test_long_positions_read_ori_below_split_and_res_above(world):
    cfg = small_config()
    hf = perturbed_clip(cfg)
    model = build_model(cfg, ParallelConfig(), fgclip_layout(hf, cfg))
    _, short = sample_inputs(cfg, 1, 2, cfg.text.short_context, seed=8)
    long = torch.randint(1, EOS - 1, (2, cfg.text.long_context))
    long[:, -1] = EOS  # pooled at the last position: every position can influence it
    base_long, base_short = model.encode_text(long, long=True), model.encode_text(short)
    text = model.text
    split = cfg.text.long_position_split
    changed = {}
    for table in ("position_embedding_ori", "position_embedding_res"):
        for row in (split - 1, split):
            weight = getattr(text, table)
            saved = weight[row].clone()
            # Not a constant shift: LayerNorm would remove that.
            weight[row] += torch.linspace(-1.0, 1.0, weight.shape[1])
            changed[table, row] = (
                max_err(model.encode_text(long, long=True), base_long) > 1e-4,
                max_err(model.encode_text(short), base_short) > 0,
            )
            weight[row] = saved
    assert changed == {
        ("position_embedding_ori", split - 1): (True, False),
        ("position_embedding_ori", split): (False, False),
        ("position_embedding_res", split - 1): (False, False),
        ("position_embedding_res", split): (True, False),
    }
    # The long path projects with text_filip_projection, the short one with text_projection.
    model.text_filip_projection.weight += 0.1
    assert max_err(model.encode_text(long, long=True), base_long) > 1e-4
    assert max_err(model.encode_text(short), base_short) == 0


@torch.no_grad()
def test_long_caption_differs_from_its_77_token_truncation(world):
    cfg = small_config()
    model = build_model(cfg, ParallelConfig(), fgclip_layout(perturbed_clip(cfg), cfg))
    long = torch.randint(1, EOS - 1, (2, cfg.text.long_context))
    long[:, 200] = EOS
    cut = long[:, : cfg.text.short_context].clone()
    cut[:, -1] = EOS  # as the tokenizer truncates: the caption ends with EOS at 76
    full, short = model.encode_text(long, long=True), model.encode_text(cut, long=True)
    assert max_err(full, short) > 1e-3
    # Tokens after the first EOS do not matter (causal attention, pooling at the first EOS).
    noisy = long.clone()
    noisy[:, 201:] = torch.randint(1, EOS - 1, (2, cfg.text.long_context - 201))
    assert max_err(model.encode_text(noisy, long=True), full) < 1e-6


def test_stretched_position_tables_follow_the_formula(world):
    from fgclip_mega.models import stretch_positions

    old = torch.randn(77, 8, dtype=torch.float64)
    want = torch.empty(248, 8, dtype=torch.float64)
    want[:20] = old[:20]
    for i in range(56):  # i = 55 writes rows 240..243 from old[75] and old[76]
        for k in range(4):
            want[20 + 4 * i + k] = (1 - k / 4) * old[20 + i] + (k / 4) * old[21 + i]
    for k in range(4):
        want[244 + k] = old[76] + k * (old[76] - old[75]) / 4
    torch.testing.assert_close(stretch_positions(old, 20, 248), want, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="not a multiple"):
        stretch_positions(old, 20, 250)

    # A fresh model and a plain-CLIP import both start from the stretched 77-row table.
    cfg = small_config()
    model = build_model(cfg, ParallelConfig())
    fresh = stretch_positions(model.text.position_embedding.detach(), 20, 248)
    assert torch.equal(model.text.position_embedding_ori, fresh)
    assert torch.equal(model.text.position_embedding_res, fresh)
    hf = perturbed_clip(cfg)
    model = build_model(cfg, ParallelConfig(), hf)
    imported = stretch_positions(hf.text_model.embeddings.position_embedding.weight, 20, 248)
    assert torch.equal(model.text.position_embedding_ori, imported)
    assert torch.equal(model.text.position_embedding_res, imported)
    assert torch.equal(model.text_filip_projection.weight, hf.text_projection.weight)
    assert model.logit_scale_hardneg.item() == model.logit_scale.item() == pytest.approx(2.3)


@torch.no_grad()
def test_dense_features_and_region_pooling_match_value_path_by_hand(world):
    cfg = small_config()
    hf = perturbed_clip(cfg)
    model = build_model(cfg, ParallelConfig(), hf)
    images, _ = sample_inputs(cfg, 2, 1, 8)
    emb, dense = model.encode_image(images, with_dense=True)
    want = dense_by_hand(hf, images)
    g = cfg.vision.grid_size
    assert dense.shape == (2, cfg.projection_dim, g, g)
    assert max_err(dense, want) < 1e-5
    assert max_err(emb, model.encode_image(images)) == 0
    assert max_err(model.dense_features(images), dense) == 0

    # One 1x1-cell box per cell (i, j): pooled == that cell; image 1 has two boxes, image 0 one.
    cells = [(0, 1, 2), (1, 3, 0), (1, 2, 3)]  # (image, row i, col j)
    rois = torch.tensor([[b, j / g, i / g, (j + 1) / g, (i + 1) / g] for b, i, j in cells])
    pooled = model.region_embeddings(dense, rois)
    assert pooled.shape == (3, cfg.projection_dim)
    for r, (b, i, j) in enumerate(cells):
        assert max_err(pooled[r], want[b, :, i, j]) < 1e-5
    # A box over a 2x2 block of cells averages them (bilinear samples at the cell centres).
    block = torch.tensor([[0.0, 0.0, 0.0, 2 / g, 2 / g]])
    pooled = model.region_embeddings(dense, block)
    assert pooled.shape == (1, cfg.projection_dim)
    assert max_err(pooled[0], want[0, :, :2, :2].mean(dim=(1, 2))) < 1e-5
    with pytest.raises(ValueError, match="rois"):
        model.region_embeddings(dense, block[:, 1:])


def test_region_embeddings_backpropagate_to_the_image_tower(world):
    cfg = small_config()
    model = build_model(cfg, ParallelConfig())
    images, _ = sample_inputs(cfg, 1, 1, 8)
    _, dense = model.encode_image(images, with_dense=True)
    rois = torch.tensor([[0.0, 0.1, 0.2, 0.7, 0.9]])
    model.region_embeddings(dense, rois).sum().backward()
    last = model.vision.transformer.blocks[-1]
    assert last.mlp.fc1.weight.grad.abs().sum() > 0
    assert model.vision.patch_embed.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_identical_outputs_and_grads(world):
    cfg = small_config()
    hf = perturbed_clip(cfg)
    images, tokens = sample_inputs(cfg, 2, 3, cfg.text.short_context)
    runs = []
    for ckpt in (False, True):
        model = build_model(cfg, ParallelConfig(activation_checkpointing=ckpt), hf)
        out = our_outputs(model, images, tokens)
        _, out["dense"] = model.encode_image(images, with_dense=True)
        probe_loss(out).backward()
        runs.append(
            (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (out0, g0), (out1, g1) = runs
    assert g0.keys() == g1.keys() and len(g0) > 40
    for key in out0:
        assert max_err(out0[key], out1[key]) == 0, key
    for name in g0:
        # Recompute changes only the order in which grad contributions are summed.
        assert max_err(g0[name], g1[name]) < 1e-6 * max(1.0, g0[name].abs().max().item()), name


def test_parameter_counts_match_transformers_for_every_preset():
    from transformers import CLIPModel

    from fgclip_mega.checkpoint import clip_config
    from fgclip_mega.models import count_parameters

    for name, make in PRESETS.items():
        cfg = make().model
        if cfg.family != "fgclip":  # FG-CLIP 2: SigLIP 2 towers (tests/test_fgclip2_model.py)
            continue
        with torch.device("meta"):
            hf = CLIPModel(clip_config(cfg))
        counts = count_parameters(cfg)
        assert counts["clip"] == sum(p.numel() for p in hf.parameters()), name
        t = cfg.text
        extras = 2 * t.long_context * t.width + t.width * cfg.projection_dim + 2
        assert counts["total"] == counts["clip"] + extras, name


def test_parameter_count_matches_the_built_model_and_weight_decay_policy(world):
    from fgclip_mega.models import count_parameters
    from fgclip_mega.parallel.wrap import skips_weight_decay

    cfg = PRESETS["tiny"]().model
    model = build_model(cfg, ParallelConfig())
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == count_parameters(cfg)["total"]
    decay = {id(p) for p in params if not skips_weight_decay(p)}
    assert id(model.vision.transformer.blocks[0].attn.qkv.weight) in decay
    for p in (
        model.logit_scale,
        model.text.token_embedding.weight,
        model.vision.pre_norm.weight,
        model.vision.transformer.blocks[0].mlp.fc2.bias,
        model.text.position_embedding,
    ):
        assert id(p) not in decay


def test_stage2_scales_start_from_the_global_one(world):
    model = build_model(small_config(), ParallelConfig())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    model.init_stage2_scales()
    assert model.logit_scale_finegraind.item() == pytest.approx(math.log(100))
    assert model.logit_scale_hardneg.item() == pytest.approx(math.log(100))
    model.init_stage2_scales(1.5)
    assert model.logit_scale_hardneg.item() == 1.5 and model.logit_scale.requires_grad


def test_bad_inputs_are_named(world):
    cfg = small_config()
    model = build_model(cfg, ParallelConfig())
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\)"):
        model.encode_image(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="short text has 78 tokens"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        build_model(cfg, ParallelConfig(tensor_parallel_size=2))


def test_build_logs_the_attention_backend(world, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fgclip_mega.models.fgclip"):
        model = build_model(small_config(), ParallelConfig())
    # fp32 compute: SDPA even on CUDA (flash-attn takes fp16/bf16 only).
    assert model.attention_backend == "sdpa"
    assert "attention backend: sdpa (cpu, compute torch.float32)" in caplog.text


@pytest.mark.gpu
def test_flash_attention_model_matches_sdpa_on_cuda(world):
    from fgclip_mega.checkpoint import import_hf_state_dict
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.models.attention import flash_attn_installed

    if not flash_attn_installed():  # a visible skip: flash-attn is optional (PyPI has no wheels)
        pytest.skip("flash_attn is not installed (or broken) on this GPU machine")

    cfg = small_config()
    hf = perturbed_clip(cfg)
    images, tokens = sample_inputs(cfg, 2, 3, cfg.text.short_context)
    images, tokens = images.cuda(), tokens.cuda()
    outs = {}
    for backend in ("flash", "sdpa"):
        model = FGCLIPModel(
            dataclasses.replace(cfg, attention_backend=backend),
            ParallelConfig(),
            compute_dtype=torch.bfloat16,
            device="cuda",
        )
        import_hf_state_dict(model, hf)
        assert model.attention_backend == backend
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs[backend] = our_outputs(model, images, tokens)
    for key in ("image", "text"):
        a, b = outs["flash"][key].float(), outs["sdpa"][key].float()
        assert max_err(a, b) < 3e-2 * b.abs().max().item(), key


@pytest.mark.parametrize("overlap", [False, True])
def test_token_table_gradient_goes_straight_into_main_grad(world, tmp_path, overlap):
    # The token lookup's backward index-adds into megatron's main_grad (no dense (V, D) gradient)
    # and hands autograd one dummy per backward, however many text streams used the table.
    # Checked against F.embedding's own gradient on a copy without DDP, over two steps, with
    # the DDP hook's gradient-ready bookkeeping on (overlap_grad_reduce, the GPU default).
    import torch.nn.functional as F
    from megatron.core.distributed import finalize_model_grads

    from tests.builders import build_run, tiny_run_config

    cfg = tiny_run_config(tmp_path, "global")
    cfg.parallel = dataclasses.replace(cfg.parallel, overlap_grad_reduce=overlap)
    run = build_run(world, cfg.validate())
    model, ddp = run.model, run.ddp
    ref = build_model(cfg.model, ParallelConfig())
    ref.load_state_dict(model.state_dict())
    ref.text.token_embedding.forward = lambda ids: F.embedding(ids, ref.text.token_embedding.weight)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        short = torch.randint(0, 1000, (3, 9), generator=gen)
        long = torch.randint(0, 1000, (3, 21), generator=gen)
        short[:, 1] = long[:, 2]  # the same token in both streams: the rows sum
        short[:, -1] = long[:, -1] = EOS
        w = torch.randn(2, cfg.model.projection_dim, generator=gen)
        images = torch.randn(2, 3, 64, 64, generator=gen)

        def loss(m, short=short, long=long, w=w, images=images):
            # Every parameter takes part: megatron's overlapped reduce expects each one's hook.
            text = m.encode_text(short), m.encode_text(long, long=True)
            scales = sum(t.sum() for t in m.temperatures().values())
            return (
                (text[0] * w[0]).sum()
                + (text[1] * w[1]).sum()
                + m.encode_image(images).sum()
                + scales
            )

        ddp.zero_grad_buffer()
        loss(model).backward()
        finalize_model_grads([ddp])
        ref.zero_grad(set_to_none=True)
        loss(ref).backward()
        table = model.text.token_embedding.weight
        assert table.grad is None  # the dummy was dropped by the DDP hook
        expected = ref.text.token_embedding.weight.grad
        assert expected.abs().sum() > 0
        assert max_err(table.main_grad, expected) < 1e-6 * expected.abs().max()  # sum order
        others = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            if p.main_grad.abs().sum() > 0:
                g = others[name].grad
                assert max_err(p.main_grad, g) < 1e-5 * max(1.0, g.abs().max()), name
