"""OpenAI CLIP BPE tokenizer (vocab 49408) on Hugging Face `tokenizers`, identical to open_clip's.

The vocabulary and merges are the ones open_clip ships (bpe_simple_vocab_16e6.txt.gz); the Rust
BPE does the byte-level merge, and the text cleaning of the reference (ftfy, HTML unescape twice,
whitespace collapse, lower-case) runs in Python first so the outputs match token for token.
Layout of a row: [<start_of_text>, bpe..., <end_of_text>, 0, 0, ...]; over-long texts are cut
so that the last position is always <end_of_text> (open_clip's truncation).
Known divergence: code points unassigned in Unicode 14 may be split differently, because the
reference's `regex` module and the Rust regex of `tokenizers` use different Unicode versions.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re
from collections.abc import Sequence

import numpy as np

SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
# The reference pre-tokenizer regex (open_clip SimpleTokenizer.pat without special tokens).
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Texts that ftfy and html.unescape provably leave unchanged: printable ASCII plus whitespace,
# with no '&' (entities) and no ESC (terminal escapes). Anything else takes the ftfy path.
_FAST_ASCII = re.compile(r"[ -%'-~\t\n\r]*")


def bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("open-clip-torch is required: the CLIP BPE merges ship inside it")
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP reversible byte -> printable unicode map; defines the first 256 vocab entries.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy + double HTML unescape, collapse whitespace, lower."""
    if not _FAST_ASCII.fullmatch(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=1)
def _hf_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    with gzip.open(bpe_path()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    bpe = models.BPE(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=merges,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        fuse_unk=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            # use_regex=False: the CLIP split above is the only word split (no GPT-2 regex).
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


def encode(texts: Sequence[str]) -> list[list[int]]:
    """BPE ids of each cleaned text, without start/end tokens."""
    tok = _hf_tokenizer()
    cleaned = [clean_text(t) for t in texts]
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in fast(cleaned, add_special_tokens=False)]


def tokenize(texts: Sequence[str] | str, context_length: int) -> np.ndarray:
    """Token ids (N, context_length) int32, zero-padded, always ending in EOT when cut."""
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length={context_length}: needs room for start and end tokens")
    out = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, ids in zip(out, encode(texts), strict=True):
        ids = ids[: context_length - 2]
        row[0] = SOT_ID
        row[1 : 1 + len(ids)] = ids
        row[1 + len(ids)] = EOT_ID
    return out


def fit_context(tokens: np.ndarray, context_length: int) -> np.ndarray:
    """Re-cuts (..., L) rows to (..., context_length) exactly as tokenizing at that length would.

    Cutting a longer row and forcing EOT into the last slot equals open_clip's truncation at the
    shorter length. A longer target cannot be recovered (the stored rows may have been cut).
    """
    length = tokens.shape[-1]
    if context_length == length:
        return tokens
    if context_length > length:
        raise ValueError(
            f"context length {context_length} exceeds the {length} tokens stored in the shards; "
            "rebuild the shards with a longer context"
        )
    out = tokens[..., :context_length].copy()
    cut = tokens[..., context_length] != 0  # a token (or EOT) fell off the end
    out[..., -1] = np.where(cut, EOT_ID, out[..., -1])
    return out
