"""FG-CLIP 2 forward -> objective -> backward on a NaFlex batch of mixed image sizes: every term
finite, gradients reach exactly the parameters each stage trains (stage 1: no dense head, no box
head, no fine-grained temperatures; stage 2: all), and region vectors come from the dense head."""

from __future__ import annotations

import torch

from fgclip_mega.config import ParallelConfig
from fgclip_mega.data.naflex import NaFlexBatch, batch_budget, native_patches, pack_images
from fgclip_mega.presets import fgclip2_tiny


def _batch(cfg, gen) -> NaFlexBatch:
    p = cfg.model.vision.patch_size
    sizes = [(48, 96), (64, 64), (120, 40), (72, 88)]
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    budget = batch_budget([native_patches(h, w, p) for h, w in sizes])
    pixels, valid, grids = pack_images(images, p, budget)
    v = cfg.model.text.vocab_size
    rois = torch.tensor(
        [[0, 0.1, 0.1, 0.5, 0.9], [0, 0.5, 0.0, 1.0, 0.6], [1, 0.2, 0.2, 0.8, 0.8],
         [2, 0.0, 0.3, 1.0, 0.7], [3, 0.6, 0.6, 1.0, 1.0], [3, 0.0, 0.0, 0.3, 0.4]]
    )  # fmt: skip

    def tokens(*shape):
        return torch.randint(0, v, shape, generator=gen)

    valid_negs = torch.ones(3, 10, dtype=torch.bool)
    valid_negs[1, 7:] = False
    return NaFlexBatch(
        pixels=pixels,
        valid=valid,
        grids=[tuple(g) for g in grids.tolist()],
        long_tokens=tokens(4, 196),
        short_tokens=tokens(4, 64),
        region_rois=rois,
        region_tokens=tokens(6, 64),
        hard_rows=torch.tensor([0, 2, 5]),
        hardneg_tokens=tokens(3, 11, 64),
        hardneg_valid=valid_negs,
    )


def test_fgclip2_step_both_stages_train_what_they_should(world):
    from fgclip_mega.models.fgclip2 import FGCLIP2Model
    from fgclip_mega.objective import Objective
    from fgclip_mega.objective.forward_fgclip2 import encode_naflex_batch

    cfg = fgclip2_tiny()
    torch.manual_seed(0)
    model = FGCLIP2Model(cfg.model, ParallelConfig())
    batch = _batch(cfg, torch.Generator().manual_seed(1))
    assert len(set(batch.grids)) == 4 and batch.pixels.shape[1] == 128
    for regional in (False, True):
        model.zero_grad(set_to_none=True)
        objective = Objective(cfg.loss, regional=regional, impl="naive")
        emb = encode_naflex_batch(model, batch, regional)
        out = objective(emb, model.temperatures())
        out.total.backward()
        names = ["long", "short"] + (["region", "tic", "fgt"] if regional else [])
        assert all(torch.isfinite(out.parts[n]) for n in names), out.parts
        stage2_only = ("vision.dense_head.", "boxtext_head.", "logit_scale_finegraind",
                       "logit_scale_hardneg")  # fmt: skip
        for name, p in model.named_parameters():
            got = p.grad is not None and bool(p.grad.abs().sum() > 0)
            # The long tables: a random 196-token caption reads positions past the split.
            expected = regional or not name.startswith(stage2_only)
            if name == "vision.dense_head.probe":
                expected = False  # every patch is its own query there (upstream's too)
            assert got == expected, (regional, name)
        if regional:
            assert emb.region.shape == (6, 64) and emb.hard_text.shape == (3, 11, 64)
            assert int(out.counts["fgt"]) == 3
            assert objective.state["cmr_margin"].item() >= 0
