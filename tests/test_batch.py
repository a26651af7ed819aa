"""Batch assembly: packed boxes/phrases/hard negatives and trimmed texts, against references."""

import numpy as np
import pytest
import torch

from fgclip_mega.data import tokenizer
from fgclip_mega.data.batch import Batch, batch_from_arrays, pack_regions, trimmed_length

K, S, L = 3, 77, 248


def _padded(counts: list[int], hard: list[list[int]], m: int = 4, seed: int = 0) -> dict:
    """Hand-made SampleSource arrays: random tokens/boxes, zero padding after box_counts."""
    g = np.random.default_rng(seed)
    b = len(counts)
    out = {
        "long_tokens": g.integers(1, 1000, (b, L)).astype(np.int32),
        "short_tokens": g.integers(1, 1000, (b, S)).astype(np.int32),
        "boxes": np.zeros((b, m, 4), np.float32),
        "box_counts": np.array(counts, np.int32),
        "region_tokens": np.zeros((b, m, S), np.int32),
        "hardneg_tokens": np.zeros((b, m, 1 + K, S), np.int32),
        "hardneg_valid": np.zeros((b, m), np.uint8),
        "sample_ids": np.arange(b, dtype=np.int64) * 10,
        "positions": np.arange(b, dtype=np.int64),
        "epoch": 3,
    }
    for i, n in enumerate(counts):
        xy = g.uniform(0, 0.5, (n, 2))
        out["boxes"][i, :n] = np.concatenate([xy, xy + g.uniform(0.1, 0.5, (n, 2))], 1)
        out["region_tokens"][i, :n] = g.integers(1, 1000, (n, S))
        for j in hard[i]:
            out["hardneg_tokens"][i, j] = g.integers(1, 1000, (1 + K, S))
            out["hardneg_valid"][i, j] = 1
    return out


def _old_selection(a: dict):
    """The previous layout's selection in torch: valid = slot < count, hard = flag & valid."""
    t = {k: torch.as_tensor(v) for k, v in a.items() if k != "epoch"}
    m = t["boxes"].shape[1]
    valid = torch.arange(m)[None] < t["box_counts"][:, None].long()
    hard = t["hardneg_valid"].bool() & valid
    return t["boxes"][valid], t["region_tokens"][valid], t["hardneg_tokens"][hard], hard[valid]


@pytest.mark.parametrize(
    "counts, hard",
    [
        ([2, 0, 4, 1], [[0, 1], [], [1, 3], []]),  # ragged, an image without boxes, no-neg boxes
        ([0, 0, 0], [[], [], []]),  # no boxes at all
        ([4, 4], [[0, 1, 2, 3], [0, 1, 2, 3]]),  # full
        ([1], [[0]]),
    ],
)
def test_pack_regions_matches_the_masked_selection(counts, hard):
    a = _padded(counts, hard)
    rois, region, hard_rows, hard_tokens = pack_regions(
        *(torch.as_tensor(a[k]) for k in ("boxes", "box_counts", "region_tokens",
                                          "hardneg_tokens", "hardneg_valid"))
    )  # fmt: skip
    boxes, old_region, old_hard, hard_mask = _old_selection(a)
    r = sum(counts)
    assert rois.shape == (r, 5) and rois.dtype == torch.float32
    assert region.shape == (r, S) and hard_tokens.shape == (sum(map(len, hard)), 1 + K, S)
    # Image index column, written out by hand from the counts.
    expect_index = [i for i, n in enumerate(counts) for _ in range(n)]
    assert rois[:, 0].tolist() == expect_index
    assert torch.equal(rois[:, 1:], boxes)
    assert torch.equal(region, old_region) and torch.equal(hard_tokens, old_hard)
    assert hard_rows.tolist() == hard_mask.nonzero()[:, 0].tolist()
    # Hand check of the hard rows: box j of image i sits at row sum(counts[:i]) + j.
    starts = np.concatenate([[0], np.cumsum(counts)])
    assert hard_rows.tolist() == sorted(int(starts[i]) + j for i, js in enumerate(hard) for j in js)
    for row, (i, j) in zip(hard_rows.tolist(), [(i, j) for i, js in enumerate(hard) for j in js],
                           strict=True):  # fmt: skip
        assert torch.equal(region[row], torch.as_tensor(a["region_tokens"][i, j]))


def test_batch_from_arrays_fields_and_dtypes():
    a = _padded([2, 0, 3], [[1], [], [0, 2]])
    images = torch.zeros(3, 3, 8, 8)
    batch = batch_from_arrays(images, a, ["a", "b", "c"])
    assert batch.box_counts.tolist() == [2, 0, 3] and batch.epoch == 3 and len(batch) == 3
    for name in ("long_tokens", "short_tokens", "region_tokens", "hardneg_tokens", "hard_rows",
                 "box_counts", "sample_ids"):  # fmt: skip
        assert getattr(batch, name).dtype == torch.int64, name
    assert batch.hard_rows.tolist() == [1, 2, 4]
    # Random tokens carry no EOT: nothing may be trimmed.
    assert batch.long_tokens.shape == (3, L) and batch.short_tokens.shape == (3, S)


def _tokens(texts: list[str], ctx: int) -> np.ndarray:
    return tokenizer.tokenize(texts, ctx)


def test_trimmed_length_rules():
    short = torch.as_tensor(_tokens(["a cat", "a red striped circle on the left side"], S))
    n_last = int((short == tokenizer.EOT_ID).nonzero()[:, 1].max()) + 1
    assert trimmed_length([short], S) == -(-n_last // 8) * 8
    # The common length covers every array; empty arrays do not count.
    longer = torch.as_tensor(_tokens(["word " * 30], S))
    assert trimmed_length([short, longer[:0]], S) == trimmed_length([short], S)
    assert trimmed_length([short, longer], S) == 32
    # Capped at the context; a row cut at the context (EOT in the last slot) keeps it all.
    assert trimmed_length([torch.as_tensor(_tokens(["word " * 100], S))], S) == S
    # A row without EOT keeps the full length.
    assert trimmed_length([torch.ones(2, S, dtype=torch.int64)], S) == S


def _real_arrays() -> dict:
    """Padded arrays holding real tokenized texts of very different lengths."""
    a = _padded([2, 1, 0], [[0, 1], [], []])
    a["long_tokens"] = _tokens(["a long caption. " * 8, "short", "medium length caption here"], L)
    a["short_tokens"] = _tokens(["a photo of a cat", "a photo of x", "a photo of two dogs"], S)
    phrases = _tokens(["a small red dotted star", "a blue circle", "a large green square"], S)
    a["region_tokens"][0, :2], a["region_tokens"][1, :1] = phrases[:2], phrases[2:]
    for j in range(2):
        a["hardneg_tokens"][0, j] = _tokens([f"phrase {j} number {n}" for n in range(1 + K)], S)
    return a


def test_trimmed_batch_keeps_every_token():
    a = _real_arrays()
    batch = batch_from_arrays(torch.zeros(3, 3, 8, 8), a, ["a", "b", "c"])
    ls = batch.short_tokens.shape[1]
    assert ls % 8 == 0 and ls < S and batch.long_tokens.shape[1] % 8 == 0
    assert batch.long_tokens.shape[1] < L
    assert batch.region_tokens.shape[1] == batch.hardneg_tokens.shape[2] == ls
    full = batch_from_arrays(torch.zeros(3, 3, 8, 8), a, ["a", "b", "c"], S, L)
    # Only zeros were cut (compare against the untrimmed padded arrays).
    assert torch.equal(
        batch.long_tokens, torch.as_tensor(a["long_tokens"][:, : batch.long_tokens.shape[1]]).long()
    )
    assert not torch.as_tensor(a["long_tokens"])[:, batch.long_tokens.shape[1] :].any()
    assert not torch.as_tensor(a["short_tokens"])[:, ls:].any()
    assert not torch.as_tensor(a["region_tokens"])[..., ls:].any()
    assert not torch.as_tensor(a["hardneg_tokens"])[..., ls:].any()
    assert torch.equal(full.short_tokens, batch.short_tokens)


@pytest.fixture(scope="module")
def tiny_model():
    import torch.distributed as dist

    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.parallel import destroy_parallel, init_parallel
    from fgclip_mega.presets import PRESETS

    started_here = not dist.is_initialized()
    init_parallel(ParallelConfig(), seed=0)
    torch.manual_seed(3)
    model = FGCLIPModel(PRESETS["tiny"]().model, ParallelConfig()).float().eval()
    yield model
    if started_here:
        destroy_parallel()


def test_trimmed_tokens_encode_like_full_length(tiny_model):
    # The text tower is causal and pools at the first EOT: trimming must not change outputs.
    a = _real_arrays()
    cut = batch_from_arrays(torch.zeros(3, 3, 8, 8), a, ["a", "b", "c"])
    full_long = torch.as_tensor(a["long_tokens"]).long()
    full_short = torch.as_tensor(a["short_tokens"]).long()
    _, region_full, _, hard_full = pack_regions(
        *(torch.as_tensor(a[k]) for k in ("boxes", "box_counts", "region_tokens",
                                          "hardneg_tokens", "hardneg_valid"))
    )  # fmt: skip
    texts_full = torch.cat([full_short, region_full.long(), hard_full.long().flatten(0, 1)])
    texts_cut = torch.cat([cut.short_tokens, cut.region_tokens, cut.hardneg_tokens.flatten(0, 1)])
    assert texts_cut.shape[1] < texts_full.shape[1]
    with torch.no_grad():
        short_ref = tiny_model.encode_text(texts_full)
        short_got = tiny_model.encode_text(texts_cut)
        long_ref = tiny_model.encode_text(full_long, long=True)
        long_got = tiny_model.encode_text(cut.long_tokens, long=True)
    torch.testing.assert_close(short_got, short_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(long_got, long_ref, rtol=1e-5, atol=1e-6)


def test_to_keeps_sample_ids_on_cpu_and_values():
    a = _padded([1, 2], [[0], [1]])
    batch = batch_from_arrays(torch.randn(2, 3, 4, 4), a, ["a", "b"])
    moved = batch.to("meta")
    assert moved.sample_ids.device.type == "cpu" and moved.images.device.type == "meta"
    assert moved.hard_rows.device.type == "meta" and moved.keys == ["a", "b"]
    assert isinstance(batch.to("cpu"), Batch)


@pytest.mark.gpu
def test_to_cuda_pins_and_copies_exactly():
    a = _padded([3, 0, 2], [[0, 2], [], [1]])
    batch = batch_from_arrays(torch.randn(3, 3, 8, 8), a, ["a", "b", "c"])
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    assert moved.sample_ids.device.type == "cpu"
    for name in ("images", "long_tokens", "region_rois", "hardneg_tokens", "hard_rows"):
        got = getattr(moved, name)
        assert got.is_cuda and torch.equal(got.cpu(), getattr(batch, name)), name
