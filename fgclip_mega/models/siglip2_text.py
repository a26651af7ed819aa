"""SigLIP 2 text tower (as HF Siglip2TextModel) with FG-CLIP 2's long-caption position tables.

The same parameters as the FG-CLIP text tower (token table over TP, 64-row short table, `_ori` /
`_res` long tables initialised as v1's keep-20 stretch: upstream `resize_postion_embeding`), but
SigLIP pads every text to its full length and pools the LAST position's final-norm state with no
attention mask and no causal mask (the model was trained attending to its padding), so texts are
never cut here. The text head is applied by the model (three copies).
"""

from __future__ import annotations

import torch

from fgclip_mega.models.text import TextTower, _check_token_ids


class Siglip2TextTower(TextTower):
    causal = False

    def positions(self, n: int, long: bool) -> torch.Tensor:
        limit = self.cfg.long_context if long else self.cfg.short_context
        if n != limit:
            kind = "long" if long else "short"
            raise ValueError(
                f"{kind} texts must be padded to {limit} tokens (SigLIP pools the last "
                f"position), got {n}"
            )
        return super().positions(n, long)

    def forward(self, tokens: torch.Tensor, long: bool = False) -> torch.Tensor:
        """tokens (B, L) padded to the full length -> final-norm state of the last position."""
        _check_token_ids(tokens, self.cfg.vocab_size)
        x = self.token_embedding(tokens) + self.positions(tokens.shape[1], long)  # (B, L, D)
        x = self.transformer(x.transpose(0, 1))  # (L, B, D)
        return self.final_norm(x[-1])
