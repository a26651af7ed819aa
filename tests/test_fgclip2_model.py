"""FGCLIP2Model against transformers' Siglip2Model (NaFlex) loaded with the same weights:
image and text embeddings on images of unseen sizes and aspect ratios at several patch budgets;
the dense feature head and region features against upstream's formulas (an MHA with every
patch as its query, then torchvision's roi_align on each image's own grid); the released
FG-CLIP 2 layout round trip with exact key names; TP=2 equal to TP=1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgclip_mega.config import ModelConfig, ParallelConfig, TextConfig, VisionConfig
from fgclip_mega.data.naflex import pack_images
from tests.distributed import run_distributed

PATCH = 4


def _cfg() -> ModelConfig:
    return ModelConfig(
        family="fgclip2",
        vision=VisionConfig(
            image_size=4 * PATCH,  # a 4 x 4 learnt position table
            patch_size=PATCH,
            width=32,
            layers=2,
            heads=4,
            mlp_width=64,
            layer_norm_eps=1e-6,
            activation="gelu_tanh",
        ),
        text=TextConfig(
            vocab_size=100,
            width=32,
            layers=2,
            heads=4,
            mlp_width=64,
            short_context=64,
            long_context=196,
            long_position_split=20,
            eos_token_id=1,
            layer_norm_eps=1e-6,
            activation="gelu_tanh",
        ),
        projection_dim=32,
        logit_scale_init=2.3026,
        logit_bias_init=-10.0,
    )


def _hf_model(seed: int = 0):
    from transformers import Siglip2Config, Siglip2Model

    cfg = _cfg()
    v, t = cfg.vision, cfg.text
    torch.manual_seed(seed)
    hf = Siglip2Model(
        Siglip2Config(
            text_config=dict(
                vocab_size=t.vocab_size,
                hidden_size=t.width,
                intermediate_size=t.mlp_width,
                num_hidden_layers=t.layers,
                num_attention_heads=t.heads,
                max_position_embeddings=t.short_context,
                hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=t.layer_norm_eps,
            ),
            vision_config=dict(
                hidden_size=v.width,
                intermediate_size=v.mlp_width,
                num_hidden_layers=v.layers,
                num_attention_heads=v.heads,
                num_patches=(v.image_size // v.patch_size) ** 2,
                patch_size=v.patch_size,
                hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=v.layer_norm_eps,
            ),
        )
    ).eval()
    with torch.no_grad():  # HF initialises some tensors to constants: make every one distinct
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        hf.logit_scale.fill_(2.1)
        hf.logit_bias.fill_(-7.5)
    return hf


def _images(seed: int) -> list[torch.Tensor]:
    from skimage import data

    photo = torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((18, 41), (37, 9), (24, 24), (12, 30)):
        y, x = rng.integers(0, 200), rng.integers(0, 200)
        out.append(photo[:, y : y + h * 5 : 5, x : x + w * 5 : 5].contiguous())
    return out


def _build(tp_group=None):
    from fgclip_mega.models.fgclip2 import FGCLIP2Model

    torch.manual_seed(0)
    return FGCLIP2Model(_cfg(), ParallelConfig(tensor_parallel_size=1), tp_group=tp_group)


def _upstream_regions(hf, tokens, valid, grids, rois):
    """upstream get_dense_feature (dense_feature_head = a copy of vision_model.head) + per-image
    torchvision roi_align on the image's own (gh, gw) map, boxes in grid units."""
    from torchvision.ops import roi_align

    head = hf.vision_model.head
    n = tokens.shape[1]
    mask = torch.zeros(valid.shape).masked_fill(~valid, torch.finfo(torch.float32).min)
    mask = mask[:, None, None, :].expand(-1, head.num_heads, n, -1).reshape(-1, n, n)
    x = head.attention(tokens, tokens, tokens, attn_mask=mask)[0]
    x = x + head.mlp(head.layernorm(x))
    out = []
    for r in rois:
        i = int(r[0])
        gh, gw = grids[i]
        fmap = x[i, : gh * gw].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        box = r[1:].clone()
        box[[0, 2]] *= gw
        box[[1, 3]] *= gh
        out.append(roi_align(fmap, [box[None]], (1, 1), 1.0, -1, True)[0, :, 0, 0])
    return torch.stack(out)


def _compare_with_hf(model, hf) -> None:
    from fgclip_mega.checkpoint.hf_fgclip2 import import_fgclip2_state_dict

    derived = import_fgclip2_state_dict(model, hf.state_dict())["derived"]
    assert "dense_feature_head.probe" in derived and "longtext_head.weight" in derived
    model.eval()
    for budget, seed in ((40, 1), (24, 2), (64, 3)):
        images = _images(seed)
        pixels, valid, grids = pack_images(images, PATCH, budget)
        with torch.no_grad():
            ref = hf.get_image_features(
                pixel_values=pixels,
                pixel_attention_mask=valid.long(),
                spatial_shapes=grids,
            )
            ref = getattr(ref, "pooler_output", ref)
            ours, dense = model.encode_image(pixels, valid, grids.tolist(), with_dense=True)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
            tokens = hf.vision_model(
                pixel_values=pixels, pixel_attention_mask=valid.long(), spatial_shapes=grids
            ).last_hidden_state
            rois = torch.tensor(
                [[0, 0.1, 0.2, 0.7, 0.9], [1, 0.0, 0.0, 1.0, 1.0], [3, 0.55, 0.3, 0.95, 0.6],
                 [2, 0.0, 0.5, 0.3, 1.0], [1, 0.4, 0.05, 0.6, 0.45],
                 # boxes to the far edges with fractional samples past the last row/column
                 [0, 0.33, 0.41, 1.0, 1.0], [1, 0.07, 0.61, 1.0, 1.0], [3, 0.13, 0.29, 1.0, 1.0],
                 [2, 0.71, 0.17, 1.0, 0.93]]
            )  # fmt: skip
            regions = model.region_embeddings(dense, rois)
            expected = _upstream_regions(hf, tokens, valid, grids.tolist(), rois)
            torch.testing.assert_close(regions, expected, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 100, (5, 64), generator=gen)
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=tokens)
        ref = getattr(ref, "pooler_output", ref)
        torch.testing.assert_close(model.encode_text(tokens, "short"), ref, rtol=1e-5, atol=1e-5)
        # Derived heads are copies of the short one: box and short agree after import.
        torch.testing.assert_close(model.encode_text(tokens, "box"), ref, rtol=1e-5, atol=1e-5)


def test_fgclip2_matches_hf_siglip2_naflex_at_tp1(world):
    _compare_with_hf(_build(), _hf_model())


def test_fgclip2_long_text_reads_the_stretched_tables_and_errors_are_named(world):
    from fgclip_mega.checkpoint.hf_fgclip2 import import_fgclip2_state_dict
    from fgclip_mega.models.text import stretch_positions

    model, hf = _build(), _hf_model()
    import_fgclip2_state_dict(model, hf.state_dict())
    stretched = stretch_positions(hf.text_model.embeddings.position_embedding.weight, 20, 196)
    torch.testing.assert_close(model.text.position_embedding_ori.detach(), stretched)
    tokens = torch.randint(0, 100, (2, 196))
    with torch.no_grad():
        # HF with the long table in place of its own: the same transformer over 196 positions.
        emb = hf.text_model.embeddings.token_embedding(tokens) + stretched
        hidden = hf.text_model.encoder(inputs_embeds=emb, attention_mask=None).last_hidden_state
        ref = hf.text_model.head(hf.text_model.final_layer_norm(hidden)[:, -1])
        torch.testing.assert_close(model.encode_text(tokens, "long"), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padded to 64 tokens"):
        model.encode_text(tokens[:, :10])
    with pytest.raises(ValueError, match="text kind 'caption'"):
        model.encode_text(tokens, "caption")


def test_fgclip2_released_layout_round_trips_with_exact_keys(world):
    from fgclip_mega.checkpoint.errors import CheckpointError
    from fgclip_mega.checkpoint.hf_fgclip2 import (
        export_fgclip2_state_dict,
        import_fgclip2_state_dict,
    )

    model, hf = _build(), _hf_model()
    import_fgclip2_state_dict(model, hf.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # extras now differ from their sources
    released = export_fgclip2_state_dict(model, "fgclip2")
    hf_keys = {k for k in hf.state_dict() if not k.endswith("position_ids")}
    extras = set(released) - hf_keys
    assert hf_keys <= set(released)
    assert extras == {
        "text_model.embeddings.position_embedding_ori.weight",
        "text_model.embeddings.position_embedding_res.weight",
        "longtext_head.weight", "longtext_head.bias", "boxtext_head.weight", "boxtext_head.bias",
        "logit_scale_finegraind", "logit_scale_hardneg",
        *(f"dense_feature_head.{k}" for k in (
            "probe", "attention.in_proj_weight", "attention.in_proj_bias",
            "attention.out_proj.weight", "attention.out_proj.bias", "layernorm.weight",
            "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        )),
    }  # fmt: skip
    assert released["logit_scale"].shape == (1,) and released["logit_scale_hardneg"].shape == ()
    again = _build()
    assert import_fgclip2_state_dict(again, released)["derived"] == []
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    siglip2 = export_fgclip2_state_dict(model, "siglip2")
    assert set(siglip2) == hf_keys
    hf.load_state_dict(siglip2, strict=False)  # transformers' own loader takes it
    broken = dict(released)
    del broken["boxtext_head.bias"]
    with pytest.raises(CheckpointError, match="FG-CLIP 2 checkpoint is incomplete"):
        import_fgclip2_state_dict(_build(), broken)
    bad = dict(released)
    bad["vision_model.head.probe"] = torch.zeros(1, 1, 16)
    with pytest.raises(CheckpointError, match="vision_model.head.probe"):
        import_fgclip2_state_dict(_build(), bad)


def _tp2_body() -> dict:
    from fgclip_mega.checkpoint.hf_fgclip2 import import_fgclip2_state_dict
    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.models.fgclip2 import FGCLIP2Model
    from fgclip_mega.parallel import init_parallel

    state = init_parallel(ParallelConfig(tensor_parallel_size=2, sequence_parallel=True), seed=0)
    hf = _hf_model()
    model = FGCLIP2Model(
        _cfg(),
        ParallelConfig(tensor_parallel_size=2, sequence_parallel=True),
        tp_group=state.tp_group,
    )
    import_fgclip2_state_dict(model, hf.state_dict())
    model.eval()
    pixels, valid, grids = pack_images(_images(5), PATCH, 40)
    rois = torch.tensor([[0, 0.1, 0.2, 0.7, 0.9], [3, 0.5, 0.3, 0.9, 0.6]])
    tokens = torch.randint(0, 100, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image, dense = model.encode_image(pixels, valid, grids.tolist(), with_dense=True)
        ref_image = hf.get_image_features(
            pixel_values=pixels, pixel_attention_mask=valid.long(), spatial_shapes=grids
        )
        ref_text = hf.get_text_features(input_ids=tokens)
        hidden = hf.vision_model(
            pixel_values=pixels, pixel_attention_mask=valid.long(), spatial_shapes=grids
        ).last_hidden_state
        return {
            "image": image,
            "regions": model.region_embeddings(dense, rois),
            "text": model.encode_text(tokens),
            "ref_image": getattr(ref_image, "pooler_output", ref_image),
            "ref_text": getattr(ref_text, "pooler_output", ref_text),
            "ref_regions": _upstream_regions(hf, hidden, valid, grids.tolist(), rois),
        }


@pytest.mark.slow
def test_fgclip2_tp2_sequence_parallel_matches_hf():
    results = run_distributed(_tp2_body, 2)
    for r in results:
        torch.testing.assert_close(r["image"], r["ref_image"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["text"], r["ref_text"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["regions"], r["ref_regions"], rtol=1e-5, atol=1e-5)
