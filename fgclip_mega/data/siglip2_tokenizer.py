"""SigLIP 2 / FG-CLIP 2 text tokenization (Gemma SentencePiece vocabulary) from local files.

FG-CLIP 2's trainer (upstream `train_fgclip2.py`) calls its HF tokenizer as
`tokenizer([text.lower()], max_length=L, padding="max_length", truncation=True)`: every text is
lowercased (upstream forgets it for the positive phrase of a hard-negative group while lowering
its negatives, which lets case tell them apart: here every text is lowercased), English short
captions get the prefix "a photo of " (Chinese ones none), short texts are 64 tokens and long
captions 196. The vocabulary is read from a local `tokenizer.json` (the HF fast-tokenizer file
that SigLIP 2 / FG-CLIP 2 releases ship beside their `tokenizer.model`); nothing downloads. The
padding side and pad token are the ones the release's tokenizer_config.json names (right and
"<pad>" when it names none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHORT_CONTEXT = 64
LONG_CONTEXT = 196
SHORT_PREFIX = "a photo of "


class TokenizerError(ValueError):
    """A tokenizer path that is missing or not a tokenizer; the message names it."""


def _find(path: Path) -> Path:
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    return path


class Siglip2Tokenizer:
    """Token rows (N, L) int32 padded to L, as the released tokenizer gives them. Short
    captions and phrases are padded to `short_context`, long captions to `long_context`: the
    text tower's model.text.short_context / long_context (upstream's 64 / 196 by default)."""

    def __init__(
        self,
        path: str | Path,
        short_context: int = SHORT_CONTEXT,
        long_context: int = LONG_CONTEXT,
    ):
        from tokenizers import Tokenizer

        self.short_context, self.long_context = short_context, long_context

        file = _find(Path(path))
        self.path = file
        if file.suffix == ".json":
            try:
                self.backend = Tokenizer.from_file(str(file))
            except Exception as e:  # noqa: BLE001 - a JSON file that is not a tokenizer
                raise TokenizerError(
                    f"{file}: not a HF tokenizer.json ({type(e).__name__}: {e})"
                ) from e
        elif file.suffix == ".model":
            # transformers 5.23's GemmaTokenizerFast(vocab_file=...) conversion is broken: on a
            # small trained BPE model it gave one <unk> for "a red circle", which sentencepiece
            # itself encodes as six pieces. So no conversion is attempted here.
            raise TokenizerError(
                f"{file}: a SentencePiece model alone is not read; use the tokenizer.json that "
                "SigLIP 2 / FG-CLIP 2 releases ship beside it (the same vocabulary)"
            )
        else:
            raise TokenizerError(
                f"{file}: expected a tokenizer.json or a SentencePiece tokenizer.model"
            )
        config = file.parent / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.is_file() else {}
        self.padding_side = settings.get("padding_side", "right")
        pad = settings.get("pad_token", "<pad>")
        pad = pad.get("content", "<pad>") if isinstance(pad, dict) else pad
        pad_id = self.backend.token_to_id(pad)
        if pad_id is None:
            raise TokenizerError(f"{file}: has no pad token {pad!r}")
        self.pad_id = pad_id
        self.vocab_size = self.backend.get_vocab_size()

    def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        """Lowercased texts -> (N, context_length) int32, truncated and padded."""
        tok = self.backend
        tok.enable_truncation(max_length=context_length)
        tok.enable_padding(direction=self.padding_side, pad_id=self.pad_id, length=context_length)
        rows = tok.encode_batch([t.lower() for t in texts])
        return np.asarray([r.ids for r in rows], dtype=np.int32).reshape(len(texts), -1)

    def short(self, texts: Sequence[str], english: Sequence[bool] | bool = True) -> np.ndarray:
        """Short captions: English ones prefixed "a photo of " as upstream does."""
        flags = [english] * len(texts) if isinstance(english, bool) else list(english)
        return self(
            [SHORT_PREFIX + t if en else t for t, en in zip(texts, flags, strict=True)],
            self.short_context,
        )

    def phrases(self, texts: Sequence[str]) -> np.ndarray:
        """Region phrases and hard negatives: no prefix, short length."""
        return self(texts, self.short_context)

    def long(self, texts: Sequence[str]) -> np.ndarray:
        return self(texts, self.long_context)
