"""One FG-CLIP forward: a micro-batch of images and texts to its `Embeddings`.

All short-context texts of a step (short captions, region phrases, hard-negative phrases) share
the text tower's short path and `text_projection`, so they go through it in one call; long
captions take the 248-position path and `text_filip_projection`. The loader has packed the boxes
on the host (flat rois, hard-negative rows) and cut every text batch after its last end-of-text
token, so nothing here reads device values back to the host.
"""

from __future__ import annotations

import torch

from fgclip_mega.data import Batch
from fgclip_mega.models import FGCLIPModel
from fgclip_mega.objective.embeddings import Embeddings


def encode_batch(model: FGCLIPModel, batch: Batch, regional: bool) -> Embeddings:
    if not regional:
        image = model.encode_image(batch.images)
        long_text = model.encode_text(batch.long_tokens, long=True)
        short_text = model.encode_text(batch.short_tokens)
        return Embeddings(image, long_text, short_text)

    image, dense = model.encode_image(batch.images, with_dense=True)  # (B, P), (B, P, g, g)
    long_text = model.encode_text(batch.long_tokens, long=True)
    b, r = batch.short_tokens.shape[0], batch.region_tokens.shape[0]
    h, k1, length = batch.hardneg_tokens.shape
    texts = torch.cat(
        [batch.short_tokens, batch.region_tokens, batch.hardneg_tokens.reshape(h * k1, length)]
    )
    text_emb = model.encode_text(texts)  # (B + R + H*(1+K), P)
    short_text, region_text, hard_text = text_emb.split([b, r, h * k1])
    region = model.region_embeddings(dense, batch.region_rois)  # (R, P)
    return Embeddings(
        image=image,
        long_text=long_text,
        short_text=short_text,
        region=region,
        region_text=region_text,
        hard_region=region.index_select(0, batch.hard_rows),  # (H, P)
        hard_text=hard_text.reshape(h, k1, -1),
    )
