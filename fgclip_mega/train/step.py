"""One FG-CLIP forward: a batch of images and texts to the embeddings the losses take.

All 77-token texts of a step (short captions, region phrases, hard-negative phrases) share the
text tower's short path and `text_projection`, so they go through it in one call; long captions
take the 248-position path and `text_filip_projection`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fgclip_mega.data import Batch
from fgclip_mega.models import FGCLIPModel


@dataclass
class StepEmbeddings:
    image: torch.Tensor
    """(B, P) image embeddings."""
    long_text: torch.Tensor
    """(B, P) long-caption embeddings."""
    short_text: torch.Tensor
    """(B, P) short-caption embeddings."""
    region: torch.Tensor | None = None
    """(R, P) RoIAlign region embeddings of the valid boxes, image by image (stage 2)."""
    region_text: torch.Tensor | None = None
    """(R, P) embeddings of each valid box's phrase (stage 2)."""
    hard_region: torch.Tensor | None = None
    """(H, P) region embeddings of the boxes that have hard negatives (stage 2)."""
    hard_text: torch.Tensor | None = None
    """(H, 1 + K, P) their positive phrase (index 0) and K negative phrases (stage 2)."""

    def float(self) -> StepEmbeddings:
        """A copy with every embedding in fp32 (for losses computed in fp32)."""
        return StepEmbeddings(
            **{
                f.name: None if (t := getattr(self, f.name)) is None else t.float()
                for f in fields(self)
            }
        )


def forward_embeddings(model: FGCLIPModel, batch: Batch, regional: bool) -> StepEmbeddings:
    b = batch.images.shape[0]
    if not regional:
        image = model.encode_image(batch.images)
        long_text = model.encode_text(batch.long_tokens, long=True)
        short_text = model.encode_text(batch.short_tokens)
        return StepEmbeddings(image, long_text, short_text)

    image, dense = model.encode_image(batch.images, with_dense=True)  # (B, P), (B, P, g, g)
    long_text = model.encode_text(batch.long_tokens, long=True)
    valid = batch.box_mask()  # (B, M)
    hard = batch.hardneg_valid & valid  # (B, M)
    region_tokens = batch.region_tokens[valid]  # (R, L)
    hard_tokens = batch.hardneg_tokens[hard]  # (H, 1+K, L)
    h, k1, length = hard_tokens.shape
    texts = torch.cat([batch.short_tokens, region_tokens, hard_tokens.reshape(h * k1, length)])
    text_emb = model.encode_text(texts)  # (B + R + H*(1+K), P)
    short_text, region_text, hard_text = text_emb.split([b, region_tokens.shape[0], h * k1])
    region = model.region_embeddings(dense, batch.boxes, batch.box_counts)  # (R, P)
    # Hard boxes are a subset of the valid ones: pick their rows of `region` in the same order.
    hard_region = region[hard[valid]]
    return StepEmbeddings(
        image=image,
        long_text=long_text,
        short_text=short_text,
        region=region,
        region_text=region_text,
        hard_region=hard_region,
        hard_text=hard_text.reshape(h, k1, -1),
    )
