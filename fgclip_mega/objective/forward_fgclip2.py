"""One FG-CLIP 2 forward: a NaFlex micro-batch to its `Embeddings` (the objective's input).

Short captions take the text tower's short path and `text_head`; region phrases and hard
negatives the short path and `boxtext_head` (one call for both, as upstream's "box" walk);
long captions the 196-position path and `longtext_head`. Region vectors are RoIAlign on the
dense feature head's output over each image's own patch grid. Nothing reads device values.
"""

from __future__ import annotations

import torch

from fgclip_mega.data.naflex import NaFlexBatch
from fgclip_mega.models.fgclip2 import FGCLIP2Model
from fgclip_mega.objective.embeddings import Embeddings


def encode_naflex_batch(model: FGCLIP2Model, batch: NaFlexBatch, regional: bool) -> Embeddings:
    long_text = model.encode_text(batch.long_tokens, "long")
    short_text = model.encode_text(batch.short_tokens, "short")
    if not regional:
        image = model.encode_image(batch.pixels, batch.valid, batch.grids)
        return Embeddings(image, long_text, short_text)
    image, dense = model.encode_image(batch.pixels, batch.valid, batch.grids, with_dense=True)
    r = batch.region_tokens.shape[0]
    h, k1, length = batch.hardneg_tokens.shape
    phrases = torch.cat([batch.region_tokens, batch.hardneg_tokens.reshape(h * k1, length)])
    region_text, hard_text = model.encode_text(phrases, "box").split([r, h * k1])
    region = model.region_embeddings(dense, batch.region_rois)  # (R, D)
    return Embeddings(
        image=image,
        long_text=long_text,
        short_text=short_text,
        region=region,
        region_text=region_text,
        hard_region=region.index_select(0, batch.hard_rows),  # (H, D)
        hard_text=hard_text.reshape(h, k1, -1),
        hard_valid=batch.hardneg_valid,
    )
