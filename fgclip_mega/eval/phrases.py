"""Token ids back to words, and the attribute structure of the synthetic phrases.

The evaluation decides from the data itself (not from a side channel) which attribute a hard
negative changes: it decodes the positive and the negative phrase to words and looks at the one
word where they differ. The synthetic generator writes region phrases as
'a <size> <colour> <texture> <shape>' (fgclip_mega/data/synthetic.py); anything else (real
FineHARD phrases) is 'unknown'.
"""

from __future__ import annotations

import itertools
import re

import torch

from fgclip_mega.data import synthetic
from fgclip_mega.data.text_codec import clip_decode
from fgclip_mega.data.tokenizer import tokenize

UNKNOWN = "unknown"
# Attribute name -> its values, in the order of the phrase template.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": tuple(synthetic.SIZES),
    "colour": tuple(synthetic.COLOURS),
    "texture": tuple(synthetic.TEXTURES),
    "shape": tuple(synthetic.SHAPES),
}
_WORD_TO_ATTRIBUTE = {v: name for name, values in ATTRIBUTES.items() for v in values}
_LONG_HEAD = re.compile(r"^a (.+?) background with (\w+) objects? ?\.")  # decoded: "objects ."


# The CLIP BPE decoder (FG-CLIP v1 rows); FG-CLIP 2 rows: data/text_codec.py's Siglip2Codec.
decode = clip_decode


def words(ids: list[int] | torch.Tensor) -> list[str]:
    return decode(ids).split()


def phrase_attributes(text: str) -> dict[str, str] | None:
    """'a small red plain circle' -> {size, colour, texture, shape}; None if not that form."""
    w = text.split()
    if len(w) != 5 or w[0] != "a":
        return None
    out = dict(zip(ATTRIBUTES, w[1:], strict=True))
    if any(out[name] not in values for name, values in ATTRIBUTES.items()):
        return None
    return out


def _single_edit(positive: str, negative: str) -> tuple[str, str, str] | None:
    """(attribute, positive value, negative value) when the phrases differ in exactly one
    word and both words are values of the same attribute, else None."""
    a, b = positive.split(), negative.split()
    if len(a) != len(b):
        return None
    diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    if len(diff) != 1:
        return None
    x, y = diff[0]
    kind = _WORD_TO_ATTRIBUTE.get(x)
    return (kind, x, y) if kind is not None and _WORD_TO_ATTRIBUTE.get(y) == kind else None


def changed_attribute(positive: str, negative: str) -> str:
    """Which attribute the negative phrase changes: the attribute whose value is the only
    differing word (both words values of that attribute), else 'unknown'."""
    edit = _single_edit(positive, negative)
    return UNKNOWN if edit is None else edit[0]


def changed_value(positive: str, negative: str) -> str:
    """The edit as 'texture: striped -> checkered' (positive value -> negative value), else
    'unknown': which values of an attribute a model confuses, not only which attribute."""
    edit = _single_edit(positive, negative)
    return UNKNOWN if edit is None else f"{edit[0]}: {edit[1]} -> {edit[2]}"


def attribute_of_change(change: str) -> str:
    """'texture: striped -> checkered' -> 'texture'; 'unknown' stays."""
    return change.split(":", 1)[0]


def negative_changes(hard_tokens: torch.Tensor, decode=decode) -> list[list[str]]:
    """(H, 1+K, L) hard-negative token rows -> per box, the edit (`changed_value`) each of its K
    negatives makes; `decode` reads one row (default the CLIP BPE; FG-CLIP 2 sets pass their
    codec's, data/text_codec.py)."""
    out = []
    for row in hard_tokens:
        pos = decode(row[0])
        out.append([changed_value(pos, decode(neg)) for neg in row[1:]])
    return out


def attributes_of_changes(changes: list[list[str]]) -> list[list[str]]:
    """`negative_changes`' per-box edits -> the attribute each edit changes (same layout)."""
    return [[attribute_of_change(c) for c in row] for row in changes]


def box_class_prompts() -> list[str]:
    """Every attribute combination as a phrase: the class set of synthetic box classification."""
    return [f"a {s} {c} {t} {h}" for s, c, t, h in itertools.product(*ATTRIBUTES.values())]


def scene_label(long_caption: str) -> tuple[str, str] | None:
    """(background, object-count word) from a synthetic long caption's first sentence."""
    m = _LONG_HEAD.match(long_caption)
    if m is None or m.group(1) not in synthetic.BACKGROUNDS:
        return None
    return m.group(1), m.group(2)


def scene_class_prompts(counts: list[str]) -> list[tuple[str, str, str]]:
    """(background, count, prompt) for zero-shot image classification, written like the first
    sentence of the synthetic long captions."""
    return [
        (bg, n, f"a {bg} background with {n} objects.")
        for bg in synthetic.BACKGROUNDS
        for n in counts
    ]


def tokenize_prompts(prompts: list[str], context: int) -> torch.Tensor:
    return torch.from_numpy(tokenize(prompts, context)).to(torch.int64)
