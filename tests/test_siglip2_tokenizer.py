"""FG-CLIP 2 tokenization against transformers' fast tokenizer loaded from the same local
tokenizer.json and called as upstream's trainer calls it (lowercased text, "a photo of " before
English short captions, padding="max_length", truncation=True); bad paths named."""

from __future__ import annotations

import json

import pytest

from fgclip_mega.data.siglip2_tokenizer import Siglip2Tokenizer, TokenizerError

CORPUS = [
    "a photo of a red striped circle on the left",
    "the blue checkered square is next to a small green triangle",
    "ein großes gelbes sechseck",
    "two cats sleeping on a sofa in the afternoon sun",
] * 20


def _write_tokenizer(folder, padding_side=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tok.token_to_id("<eos>"))]
    )
    tok.save(str(folder / "tokenizer.json"))
    if padding_side:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"padding_side": padding_side, "pad_token": "<pad>"})
        )
    return folder


TEXTS = [
    "A Photo of a RED Striped Circle",
    "two cats sleeping on a sofa in the afternoon sun " * 12,  # longer than 64 tokens
    "",
    "ein großes GELBES sechseck",
]


@pytest.mark.parametrize("side", [None, "left"])
def test_rows_equal_transformers_called_like_upstream(tmp_path, side):
    from transformers import PreTrainedTokenizerFast

    folder = _write_tokenizer(tmp_path, side)
    ours = Siglip2Tokenizer(folder)
    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        pad_token="<pad>",
        padding_side=side or "right",
    )

    def upstream(texts, length):
        return ref(
            [t.lower() for t in texts], max_length=length, padding="max_length", truncation=True
        ).input_ids

    assert ours(TEXTS, 64).tolist() == upstream(TEXTS, 64)
    assert ours.long(TEXTS).tolist() == upstream(TEXTS, 196)
    assert ours.long(TEXTS).shape == (4, 196)
    assert ours.phrases(TEXTS).tolist() == upstream(TEXTS, 64)
    english = [True, True, False, False]
    prefixed = [("a photo of " + t) if en else t for t, en in zip(TEXTS, english, strict=True)]
    assert ours.short(TEXTS, english).tolist() == upstream(prefixed, 64)
    # Upper and lower case give the same ids (upstream forgets .lower() for one phrase kind).
    assert ours(["RED Circle"], 64).tolist() == ours(["red circle"], 64).tolist()
    pad_column = 0 if side == "left" else -1
    assert ours(["red"], 64)[0, pad_column] == ours.pad_id


def test_bad_tokenizer_paths_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file or directory"):
        Siglip2Tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Siglip2Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01")
    with pytest.raises(TokenizerError, match="SentencePiece model alone is not read"):
        Siglip2Tokenizer(tmp_path)
    bogus = tmp_path / "vocab.json"
    bogus.write_text(json.dumps({"a": 1}))
    with pytest.raises(TokenizerError, match="not a HF tokenizer.json"):
        Siglip2Tokenizer(bogus)
    clip_bpe = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    clip_bpe.write_bytes(b"x")
    with pytest.raises(TokenizerError, match="expected a tokenizer.json"):
        Siglip2Tokenizer(clip_bpe)
    folder = tmp_path / "nopad"
    folder.mkdir()
    _write_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    with pytest.raises(TokenizerError, match="has no pad token '\\[PAD\\]'"):
        Siglip2Tokenizer(folder)
