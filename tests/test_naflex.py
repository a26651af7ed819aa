"""NaFlex geometry against transformers' Siglip2ImageProcessor on real photographs (the ones
scikit-image ships) cropped to many aspect ratios, at every allowed patch budget; the batch
budget rule against upstream's collator; bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fgclip_mega.data.naflex import (
    PATCH_BUDGETS,
    NaFlexError,
    batch_budget,
    check_budget,
    native_patches,
    pack_images,
)


def _photos() -> list[np.ndarray]:
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    # Crops of odd sizes and aspect ratios (tall, wide, tiny, square), all real pixels.
    crops = [
        photos[0][:413, :97],
        photos[1][5:300, :451],
        photos[2][:17, :333],
        photos[3][:200, :200],
        photos[0][100:131, 50:529],
    ]
    return photos + crops


@pytest.mark.parametrize("budget", PATCH_BUDGETS)
def test_pack_images_matches_hf_siglip2_processor(budget):
    from transformers import Siglip2ImageProcessor

    processor = Siglip2ImageProcessor()
    photos = _photos()
    tensors = [torch.from_numpy(p.copy()).permute(2, 0, 1).contiguous() for p in photos]
    pixels, valid, grids = pack_images(tensors, 16, budget)
    ref = processor(
        images=[Image.fromarray(p) for p in photos], max_num_patches=budget, return_tensors="pt"
    )
    torch.testing.assert_close(grids, ref["spatial_shapes"].long(), rtol=0, atol=0)
    torch.testing.assert_close(valid, ref["pixel_attention_mask"].bool(), rtol=0, atol=0)
    torch.testing.assert_close(pixels, ref["pixel_values"].float(), rtol=0, atol=1e-6)
    assert (grids.prod(1) <= budget).all()
    assert (valid.sum(1) == grids.prod(1)).all()


def _upstream_budget(values):
    """train_fgclip2.py DataCollatorForSupervisedDataset.determine_max_value."""
    m = max(values)
    if m > 784:
        return 1024
    if m > 576:
        return 784
    if m > 256:
        return 576
    if m > 128:
        return 256
    return 128


def test_batch_budget_is_upstreams_rule_and_respects_the_cap():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 1500, size=rng.integers(1, 9)).tolist()
        assert batch_budget(counts) == _upstream_budget(counts)
    assert batch_budget([900], max_budget=576) == 576
    assert batch_budget([100], max_budget=576) == 128


def test_bad_budget_and_image_smaller_than_a_patch_are_named():
    with pytest.raises(NaFlexError, match="patch budget 300 is not one of"):
        check_budget(300)
    with pytest.raises(NaFlexError, match="patch budget 300"):
        batch_budget([10], max_budget=300)
    with pytest.raises(NaFlexError, match="12x40 px is smaller than one 16x16 patch"):
        native_patches(40, 12, 16)
    tiny = torch.zeros(3, 40, 12, dtype=torch.uint8)
    with pytest.raises(NaFlexError, match="smaller than one 16x16 patch"):
        pack_images([tiny], 16, 256)
    with pytest.raises(NaFlexError, match=r"image 0: expected \(3, H, W\)"):
        pack_images([torch.zeros(4, 32, 32, dtype=torch.uint8)], 16, 256)
