"""The embeddings of one micro-batch: what the objective and the evaluation both consume."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Embeddings:
    image: torch.Tensor
    """(b, P) image embeddings of this rank (projected, not normalised)."""
    long_text: torch.Tensor
    """(b, P) long-caption embeddings."""
    short_text: torch.Tensor
    """(b, P) short-caption embeddings."""
    region: torch.Tensor | None = None
    """(R, P) RoIAlign region embeddings of the valid boxes, image by image (stage 2)."""
    region_text: torch.Tensor | None = None
    """(R, P) embeddings of each valid box's phrase (stage 2)."""
    hard_region: torch.Tensor | None = None
    """(H, P) region embeddings of the boxes that have hard negatives (stage 2)."""
    hard_text: torch.Tensor | None = None
    """(H, 1 + K, P) their positive phrase (index 0) and K attribute-swapped negatives."""
    hard_valid: torch.Tensor | None = None
    """(H, K) bool: which negatives are real (None = all K); a box with none is left out."""

    def float(self) -> Embeddings:
        """A copy with every floating-point embedding in fp32 (the losses run in fp32)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t.float() if t is not None and t.is_floating_point() else t
        return Embeddings(**out)
