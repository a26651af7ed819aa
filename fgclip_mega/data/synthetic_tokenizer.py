"""A SigLIP-2-style tokenizer.json for the synthetic scenes, trained locally (nothing downloads).

FG-CLIP 2 reads its text through `Siglip2Tokenizer` from a local tokenizer.json (the Gemma
SentencePiece vocabulary of the releases, 256k pieces). A synthetic run needs neither that file
nor its size: this builds a small byte-pair-encoding tokenizer of the same kind (Metaspace "▁"
word pieces, punctuation split off, <pad>=0, <eos>=1, <bos>=2, <unk>=3, <eos> appended to
every text, lowercase) trained on every text the generator can write: all short/long
expressions (so every hard negative too), every caption sentence at every position, the
caption and short-caption frames and the "a photo of " prefix. Training runs until no pair is
left to merge, so every word of that vocabulary is one token and an expression and its
negative (one word changed) always tokenize differently. The training corpus is built in a
fixed order; builds in separate processes gave the same bytes (tokenizers 0.23.3; a test
builds it in a second process and compares).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from fgclip_mega.data.siglip2_tokenizer import SHORT_PREFIX
from fgclip_mega.data.synthetic import (
    _COUNT_WORDS,
    _SENTENCES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    SceneObject,
)

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
"""Ids 0..3, in this order (SigLIP 2 / Gemma's order)."""
MAX_VOCAB = 1024
"""The fgclip2_tiny preset's text vocabulary: the trained one must not exceed it."""
POSITIONS = tuple(
    f"{row} {col}".strip() if row else col
    for row, col in [("", "left"), ("", "center"), ("", "right")]
    + [(r, c) for r in ("top", "bottom") for c in ("left", "", "right")]
)
"""Every word `synthetic._position_word` returns."""


def synthetic_texts() -> list[str]:
    """Every phrase, sentence and caption frame the generator writes, in a fixed order."""
    texts: list[str] = []
    objects = [
        SceneObject(shape, colour, size, texture, (0.0, 0.0, 0.0, 0.0), pos)
        for size, colour, texture, shape, pos in itertools.product(
            SIZES, COLOURS, TEXTURES, SHAPES, POSITIONS
        )
    ]
    for obj in objects:
        if obj.position == POSITIONS[0]:
            texts.append(obj.short_expr)
        texts.append(obj.long_expr)
        texts.extend(s.format(**obj.__dict__) for s in _SENTENCES)
    for bg, count in itertools.product(BACKGROUNDS, _COUNT_WORDS):
        texts.append(f"A {bg} background with {count} objects.")
    for colour, shape, bg in itertools.product(COLOURS, SHAPES, BACKGROUNDS):
        texts.append(f"{SHORT_PREFIX}a {colour} {shape}, a {colour} {shape} and a {colour} {shape}")
        texts.append(f"{SHORT_PREFIX}a {colour} {shape} on a {bg} background")
    return texts


def build_tokenizer():
    """The trained `tokenizers.Tokenizer` (lowercasing, Metaspace BPE, <eos> appended)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Punctuation split off: "objects." and "objects" are the same word token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    texts = [t.lower() for t in synthetic_texts()]
    trainer = BpeTrainer(
        vocab_size=MAX_VOCAB, special_tokens=list(SPECIALS), min_frequency=1, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos = SPECIALS.index("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", eos)]
    )
    for i, name in enumerate(SPECIALS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name!r} got id {tok.token_to_id(name)}, not {i}")
    if tok.get_vocab_size() > MAX_VOCAB:
        raise RuntimeError(f"synthetic vocabulary of {tok.get_vocab_size()} > {MAX_VOCAB}")
    return tok


def write_tokenizer(directory: str | Path) -> Path:
    """Writes directory/tokenizer.json (+ tokenizer_config.json naming <pad>, right padding);
    returns the tokenizer.json path. Same bytes on every call."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    text = build_tokenizer().to_str(pretty=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    config = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
              "unk_token": "<unk>", "padding_side": "right", "do_lower_case": True}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
