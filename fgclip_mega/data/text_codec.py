"""Text codecs: one per model family (family.py picks it), the only place the evaluation suite
(fgclip_mega/eval) learns how texts become tokens and tokens become texts again.

    tokenize(prompts, kind) -> (N, L) int64 prompt tokens the way the family's loader writes them
    decode(row)             -> the lower-case text of one token row (to read attributes back)
    encode(model, tokens, kind) -> (N, D) embeddings from the text head of that kind

`kind` is short | long | box: captions take short/long, region phrases, hard negatives and the
box-classification prompts take "box" (FG-CLIP 2's boxtext_head; FG-CLIP v1 has no box head and
embeds them like short captions, as its trainer does).

FG-CLIP v1 (`ClipCodec`): the CLIP BPE of fgclip_mega/data/tokenizer.py; the text tower is
causal and pools at EOT, so prompts are cut after their last EOT. FG-CLIP 2 (`Siglip2Codec`):
the SigLIP 2 tokenizer the loader used (data/siglip2_tokenizer.py): rows padded to the full
length (64 short/box, 196 long; the tower pools at the last position, so no trimming), pad and
eos are special tokens that decoding skips.
"""

from __future__ import annotations

import functools

import torch

from fgclip_mega.data.tokenizer import EOT_ID, SOT_ID, _bytes_to_unicode, _hf_tokenizer, tokenize

KINDS = ("short", "long", "box")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"text kind {kind!r} is not one of {KINDS}")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


@functools.lru_cache(maxsize=65536)
def _piece(token_id: int) -> str:
    return _hf_tokenizer().id_to_token(token_id) or ""


def clip_decode(ids: list[int] | torch.Tensor) -> str:
    """CLIP BPE token ids (one row) -> lower-case text; stops at the first EOT, skips SOT and
    padding."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    pieces = []
    for i in ids:
        if i == EOT_ID:
            break
        if i in (SOT_ID, 0):
            continue
        pieces.append(_piece(int(i)))
    decoder = _byte_decoder()
    # "</w>" ends a word; the rest are byte-level characters of the word.
    words = "".join(pieces).split("</w>")
    raw = [bytes(decoder.get(c, ord("?")) for c in w).decode("utf-8", "replace") for w in words]
    return " ".join(w for w in raw if w)


class ClipCodec:
    """FG-CLIP v1: CLIP BPE, EOT pooling, `encode_text(tokens, long=...)`."""

    def __init__(self, text_cfg):
        self.short_context = text_cfg.short_context
        self.long_context = text_cfg.long_context

    def tokenize(self, prompts: list[str], kind: str) -> torch.Tensor:
        _check_kind(kind)
        context = self.long_context if kind == "long" else self.short_context
        tokens = torch.from_numpy(tokenize(prompts, context)).to(torch.int64)  # (N, context)
        # The tower is causal and pools at EOT: nothing after the last EOT is read.
        last = int((tokens == EOT_ID).nonzero()[:, 1].max()) + 1
        return tokens[:, :last]

    def decode(self, row: torch.Tensor | list[int]) -> str:
        return clip_decode(row)

    def encode(self, model, tokens: torch.Tensor, kind: str) -> torch.Tensor:
        _check_kind(kind)
        return model.encode_text(tokens, long=kind == "long")


class Siglip2Codec:
    """FG-CLIP 2: the loader's SigLIP 2 tokenizer, full-length rows, `encode_text(tokens, kind)`."""

    def __init__(self, tokenizer):
        """`tokenizer`: a `Siglip2Tokenizer` (the eval loader's) or a path to its tokenizer.json."""
        from fgclip_mega.data.siglip2_tokenizer import Siglip2Tokenizer

        if tokenizer is None:
            raise ValueError(
                "FG-CLIP 2 evaluation needs the SigLIP 2 tokenizer its loader used (data.tokenizer)"
            )
        self.tok = (
            tokenizer if isinstance(tokenizer, Siglip2Tokenizer) else Siglip2Tokenizer(tokenizer)
        )

    def tokenize(self, prompts: list[str], kind: str) -> torch.Tensor:
        _check_kind(kind)
        # The loader's own calls: short captions get "a photo of ", phrases none, long 196.
        rows = {"short": self.tok.short, "long": self.tok.long, "box": self.tok.phrases}[kind](
            prompts
        )
        return torch.from_numpy(rows).to(torch.int64)

    def decode(self, row: torch.Tensor | list[int]) -> str:
        ids = row.tolist() if isinstance(row, torch.Tensor) else list(row)
        # Pad, eos (and bos where a tokenizer adds it) are special tokens: skipped.
        text = self.tok.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        return " ".join(text.lower().split())

    def encode(self, model, tokens: torch.Tensor, kind: str) -> torch.Tensor:
        _check_kind(kind)
        return model.encode_text(tokens, kind)


__all__ = ["KINDS", "ClipCodec", "Siglip2Codec", "clip_decode"]
