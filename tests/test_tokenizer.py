"""The HF-tokenizers CLIP BPE equals open_clip's reference SimpleTokenizer token for token."""

import unicodedata

import numpy as np
import pytest

from fgclip_mega.data import tokenizer as T

WORDS = (
    "a photo of the red striped circle in top left corner it's they're we've I'm you'll he'd "
    "DON'T Hello WORLD 3.14 1,000,000 (x) [y] {z} e-mail foo_bar #hashtag @user http://x.com/a?b=c "
    "naïve café résumé Straße ÆØÅ İstanbul Ωμέγα Привет мир 日本語のテキスト 中文字符 한국어 "
    "مرحبا עברית हिन्दी ไทย 😀 🐱‍👤 👍🏽 ﬁne ＡＢＣ１２３ “quoted” ‘single’ — – … € £ ¥ ° ± × ÷ "
    "&amp; &lt;b&gt; &quot;x&quot; &#39; cafÃ© Ã¼ber â€™ e\u0301 n\u0303 \u200b \u00ad ok"
).split(" ")
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", " \x0b ", " \x0c "]


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = ["", " ", "\n\t", "a", "A.", "&amp;amp;", "\x00\x01 control \x1b[31m red", "x" * 400]
    while len(out) < n:
        kind = rng.integers(4)
        n_words = int(rng.choice([3, 12, 40, 150, 400])) if kind else int(rng.integers(1, 6))
        words = rng.choice(WORDS, n_words)
        seps = rng.choice(SPACES, n_words)
        text = "".join(w + s for w, s in zip(words, seps, strict=True))
        if kind == 3:  # random code points from many scripts, incl. astral ones
            cps = rng.integers(0x20, 0x2FFFF, int(rng.integers(1, 40)))
            # Code points unassigned in Python's Unicode 14 tables are left out: `regex` (used
            # by the reference) and the Rust regex of `tokenizers` classify some of them with
            # different Unicode versions; every assigned character is covered.
            chars = [chr(c) for c in cps if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
            text = " ".join([text, "".join(chars)])
        out.append(text if rng.random() < 0.8 else f"  {text}  ")
    return out


@pytest.fixture(scope="module")
def reference():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.mark.parametrize("context", [77, 248])
def test_matches_open_clip(reference, context):
    texts = _captions(2500, seed=context)
    ours = T.tokenize(texts, context)
    ref = reference(texts, context_length=context).numpy()
    assert ours.dtype == np.int32 and ours.shape == ref.shape == (len(texts), context)
    bad = [i for i in range(len(texts)) if not np.array_equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} mismatches, first: {texts[bad[0]]!r}"
    # The set covers what it claims: over-long texts (EOT forced into the last slot) and
    # non-ASCII texts (the ftfy path) are both well represented.
    cut = ref[:, -1] == T.EOT_ID
    assert cut.sum() > 100 and (ref[:, -1] == 0).sum() > 100
    assert sum(not t.isascii() for t in texts) > 500


def test_layout_and_constants(reference):
    tokens = T.tokenize(["a red circle", "x " * 300], 77)
    assert tokens[0, 0] == T.SOT_ID and tokens[0, 4] == T.EOT_ID and not tokens[0, 5:].any()
    assert tokens[1, 0] == T.SOT_ID and tokens[1, -1] == T.EOT_ID
    assert reference.vocab_size == T.VOCAB_SIZE
    assert (reference.sot_token_id, reference.eot_token_id) == (T.SOT_ID, T.EOT_ID)


def test_fit_context_equals_direct_tokenization():
    texts = _captions(300, seed=7)
    long = T.tokenize(texts, 248)
    for ctx in (77, 20):
        assert np.array_equal(T.fit_context(long, ctx), T.tokenize(texts, ctx))
    with pytest.raises(ValueError, match="exceeds"):
        T.fit_context(long, 300)


def test_fast_ascii_path_is_exactly_ftfy():
    import ftfy

    rng = np.random.default_rng(1)
    alphabet = np.array([chr(c) for c in range(0x20, 0x7F) if c != 0x26] + ["\t", "\n", "\r"])
    for _ in range(300):
        text = "".join(rng.choice(alphabet, int(rng.integers(0, 80))))
        assert T._FAST_ASCII.fullmatch(text)
        assert " ".join(text.split()).lower() == " ".join(ftfy.fix_text(text).split()).lower()
