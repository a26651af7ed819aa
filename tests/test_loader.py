"""Loaders: DP coverage, exact resume, reshuffle, and DALI output against independent references.

Image tolerance, in uint8 levels (|a - b| * 255 * std after CLIP normalisation), against PIL
decoding the original file and resizing it the same way:
  - antialias (default): vs PIL's BILINEAR resize, max <= 1 level, mean < 0.05;
  - no antialias: vs PIL affine bilinear sampling (which truncates where torch rounds) max <= 2,
    mean < 0.8; and max <= 1 against exact float64 bilinear interpolation.
The CPU path decodes bit-exactly (DALI and PIL both use libjpeg-turbo); the differences are
rounding in the resize. The GPU path (nvJPEG + DALI's GPU resize) is checked against the CPU
path with a looser bound: nvJPEG's IDCT differs, and DALI clamps the antialias filter at the
image border differently (measured on the CPU: up to 12 levels on the 1-px border, <= 4 inside).
"""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fgclip_mega.config import DataConfig
from fgclip_mega.data import tokenizer
from fgclip_mega.data.batch import CLIP_STD
from fgclip_mega.data.build import build_shards
from fgclip_mega.data.loader import DaliLoader, build_loader
from fgclip_mega.data.order import StreamOrder
from fgclip_mega.data.pil_loader import PilLoader, pil_resized
from fgclip_mega.data.shards import SHORT_PREFIX, open_shard_set
from fgclip_mega.data.transforms import normalise
from tests.builders import read_jsonl, write_raw

N, SIZE = 115, 48  # 115 = 5 shards of 23: divisible neither by the DP sizes nor by B
TENSORS = ("images", "long_tokens", "short_tokens", "box_counts", "region_rois", "region_tokens",
           "hard_rows", "hardneg_tokens", "sample_ids")  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    jsonl = write_raw(root / "raw", N, seed=5)
    build_shards(str(jsonl), str(root / "raw/images"), str(root / "shards"), shard_size=23,
                 workers=1, progress=False)  # fmt: skip
    records = {r["f_path"]: r for r in read_jsonl(jsonl)}
    return open_shard_set(root / "shards"), records, root / "raw/images"


def _cfg(shards, **kw) -> DataConfig:
    base = dict(shards=shards.root, micro_batch_size=4, read_block_size=8,
                shuffle_window_blocks=2, py_num_workers=0, num_threads=2)  # fmt: skip
    return DataConfig(**{**base, **kw})


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu() - b.cpu()).abs() * 255 * torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_order_covers_each_epoch_once_for_any_dp():
    for sizes, dp in [([5, 7, 3], 2), ([10], 3), ([100, 37, 64, 5], 4), ([1000, 999], 7)]:
        total = sum(sizes)
        orders = [StreamOrder(np.array(sizes), 3, r, dp, 4, 2) for r in range(dp)]
        for e in range(4):
            ids = np.concatenate([o.plan(e).ids for o in orders])
            assert np.array_equal(np.sort(ids), np.arange(total))
            lengths = [o.epoch_length(e) for o in orders]
            assert max(lengths) - min(lengths) <= 1
        for o in orders:  # stream position <-> (epoch, offset) round trip
            assert [o.epoch_start(e + 1) - o.epoch_start(e) for e in range(4)] == [
                o.epoch_length(e) for e in range(4)
            ]
            for pos in range(0, 4 * total // dp, 7):
                e, off = o.locate(pos)
                assert o.epoch_start(e) + off == pos and 0 <= off < o.epoch_length(e)
        # After dp epochs every rank has read exactly the same number of samples.
        assert len({o.epoch_start(dp) for o in orders}) == 1
    with pytest.raises(ValueError, match="cannot feed"):
        StreamOrder(np.array([2]), 0, 0, 3)


def test_dp_ranks_see_every_sample_once_per_epoch(data):
    shards, records, _ = data
    dp, seen = 3, []
    for rank in range(dp):
        with DaliLoader(_cfg(shards, py_num_workers=1), SIZE, dp_rank=rank, dp_size=dp) as loader:
            need = loader.order.epoch_length(0)
            keys = []
            while len(keys) < need:
                batch = next(loader)
                assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.epoch == 0
                keys += batch.keys
            seen += keys[:need]
    assert len(seen) == N and sorted(seen) == sorted(records)


def _take(loader, steps: int) -> list:
    return [next(loader) for _ in range(steps)]


def _assert_batches_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and x.epoch == y.epoch
        for name in TENSORS:
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_resume_continues_the_exact_stream(data):
    shards, _, _ = data
    cfg = _cfg(shards, py_num_workers=1)
    loader = DaliLoader(cfg, SIZE, dp_rank=1, dp_size=2)
    _take(loader, 5)
    state = loader.state_dict()
    assert state["position"] == 20 and state["epoch"] == 0 and state["dp_size"] == 2
    # 20 more steps cross the end of the rank's first epoch (57 or 58 samples).
    expected = _take(loader, 20)
    assert expected[-1].epoch == 1

    # A fresh loader (other worker count) and the same loader rewound both replay it exactly.
    other = DaliLoader(dataclasses.replace(cfg, py_num_workers=0), SIZE, dp_rank=1, dp_size=2)
    other.load_state_dict(state)
    _assert_batches_equal(_take(other, 20), expected)
    loader.load_state_dict(state)
    _assert_batches_equal(_take(loader, 20), expected)
    # The PIL reference loader follows the same stream from the same state.
    pil = PilLoader(cfg, SIZE, dp_rank=1, dp_size=2)
    pil.load_state_dict(state)
    assert [b.keys for b in _take(pil, 20)] == [b.keys for b in expected]
    # Every rank's state is the same after the same steps: rank 0's checkpoint resumes all.
    rank0 = PilLoader(cfg, SIZE, dp_rank=0, dp_size=2)
    _take(rank0, 5)
    assert rank0.state_dict() == state
    for x in (loader, other, pil, rank0):
        x.close()

    with pytest.raises(ValueError, match="seed"):
        DaliLoader(dataclasses.replace(cfg, seed=7), SIZE, 1, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_size=0"):
        DaliLoader(cfg, SIZE, 0, 3).load_state_dict({**state, "dp_size": 0})
    with pytest.raises(ValueError, match="transition"):
        DaliLoader(cfg, SIZE, 0, 3).load_state_dict({**state, "transition": {"epoch": 0}})


def _keys_until_epoch_ends(loader, epoch: int) -> tuple[list[str], list]:
    """Keys this rank reads in `epoch` (from its position on), and the batches taken."""
    need = loader.order.epoch_start(epoch + 1) - loader.position
    keys, batches = [], []
    while len(keys) < need:
        batches.append(next(loader))
        keys += batches[-1].keys
    return keys[:need], batches


def test_a_dp_size_change_reads_the_rest_of_the_epoch_exactly_once(data):
    shards, records, _ = data
    cfg = _cfg(shards, py_num_workers=1)
    # DP=2 ranks take 5 micro-batches each (40 of the 115 samples), then the run resumes at
    # DP=3 (then back at DP=2 from the DP=3 state, mid-transition).
    old = [PilLoader(cfg, SIZE, dp_rank=r, dp_size=2) for r in range(2)]
    before = [k for loader in old for b in _take(loader, 5) for k in b.keys]
    state = old[0].state_dict()
    assert state["global_samples"] == 40 and state["transition"] is None
    new = [DaliLoader(cfg, SIZE, dp_rank=0, dp_size=3)]
    new += [PilLoader(cfg, SIZE, dp_rank=r, dp_size=3) for r in (1, 2)]
    for loader in new:
        loader.load_state_dict(state)
        assert loader.position == 0 and loader.epoch == 0
    # DP=3 ranks take 2 batches each (24 more), save, and the last 51 go to DP=2 again.
    middle = [k for loader in new for b in _take(loader, 2) for k in b.keys]
    state3 = new[2].state_dict()
    assert state3["global_samples"] == 64 and state3["transition"]["legs"][0][0] == 2
    # The same layout continues exactly from the saved transition state.
    again = PilLoader(cfg, SIZE, dp_rank=2, dp_size=3)
    again.load_state_dict(state3)
    assert [b.keys for b in _take(again, 3)] == [b.keys for b in _take(new[2], 3)]
    last = [DaliLoader(cfg, SIZE, dp_rank=r, dp_size=2) for r in range(2)]
    rest, tails = [], []
    for loader in last:
        loader.load_state_dict(state3)
        keys, batches = _keys_until_epoch_ends(loader, 0)
        rest += keys
        tails.append(batches[-1])
    seen = before + middle + rest
    assert len(seen) == N and sorted(seen) == sorted(records)  # each sample exactly once
    # The batch that crosses the end of the transition epoch continues with normal epoch 1.
    for loader, tail in zip(last, tails, strict=True):
        assert loader.epoch == 1 and loader.order.first_epoch == 0
        n1 = loader.position - loader.order.epoch_start(1)
        assert 0 < n1 and tail.keys[-n1:] == loader.keys_of(loader.order.plan(1).ids[:n1])
    for loader in (*old, *new, again, *last):
        loader.close()


def test_epochs_reshuffle(data):
    shards, records, _ = data
    with DaliLoader(_cfg(shards, micro_batch_size=5, py_num_workers=1), SIZE) as loader:
        epochs = [[k for b in _take(loader, N // 5) for k in b.keys] for _ in range(3)]
    for keys in epochs:
        assert sorted(keys) == sorted(records)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def _reference_arrays(rec: dict, m: int = 4) -> dict:
    """Tokens/boxes a sample must carry, from its raw JSON record and the tokenizer alone."""
    boxes = rec["bbox_info"][:m]
    short = tokenizer.tokenize([b["short_expr"] for b in boxes], 77)
    long = tokenizer.tokenize([b["long_expr"] for b in boxes], 77)
    hard = [j for j, b in enumerate(boxes) if b["flag_short_neg"]]
    negs = np.zeros((len(hard), 11, 77), np.int32)
    for row, j in enumerate(hard):
        negs[row, 0] = short[j]
        negs[row, 1:] = tokenizer.tokenize(list(boxes[j]["short_expr_negs"].values()), 77)
    return {
        "long_tokens": tokenizer.tokenize([rec["caption"]], 248)[0],
        "short_tokens": tokenizer.tokenize([SHORT_PREFIX + rec["short_caption"]], 77)[0],
        "boxes": np.array([b["bbox"][:4] for b in boxes], np.float32).reshape(-1, 4),
        "hard": hard, "hardneg_tokens": negs, "region_choices": (short, long),
    }  # fmt: skip


def _padded_to(tokens: torch.Tensor, context: int) -> np.ndarray:
    """A trimmed token row back at full context (the cut part must have been zeros)."""
    out = np.zeros(tokens.shape[:-1] + (context,), np.int32)
    out[..., : tokens.shape[-1]] = tokens.numpy()
    return out


@pytest.mark.parametrize("antialias", ["off", "on"])
def test_dali_batches_match_independent_references(data, antialias):
    shards, records, image_root = data
    cfg = _cfg(shards, resize_antialias=antialias, micro_batch_size=8)
    with DaliLoader(cfg, SIZE, dp_rank=0, dp_size=1) as loader:
        batches = _take(loader, 4)
    long_used = 0
    for batch in batches:
        files = [(image_root / k).read_bytes() for k in batch.keys]
        ref_imgs = np.stack([pil_resized(f, SIZE, antialias == "on") for f in files])
        decoded = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]
        ref = normalise(torch.from_numpy(ref_imgs).permute(0, 3, 1, 2))
        levels = _levels(batch.images, ref)
        if antialias == "on":
            assert levels.max() <= 1.01 and levels.mean() < 0.05
        else:  # PIL's affine sampling truncates: about half the values are one level lower
            assert levels.max() <= 2.01 and levels.mean() < 0.8
            exact = torch.nn.functional.interpolate(  # float64 bilinear, no rounding at all
                torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).double(),
                size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False,
            )  # fmt: skip
            assert _levels(batch.images, normalise(exact)).max() <= 1.01
        # Packed layout: the boxes of image i are the rows whose first column is i, in order.
        rows_of = [np.nonzero(batch.region_rois[:, 0].numpy() == i)[0] for i in range(len(batch))]
        assert np.array_equal(np.concatenate(rows_of), np.arange(len(batch.region_rois)))
        hard_seen = []
        for i, key in enumerate(batch.keys):
            ref = _reference_arrays(records[key])
            np.testing.assert_array_equal(_padded_to(batch.long_tokens[i], 248), ref["long_tokens"])
            np.testing.assert_array_equal(
                _padded_to(batch.short_tokens[i], 77), ref["short_tokens"]
            )
            rows = rows_of[i]
            assert batch.box_counts[i] == len(rows) == len(ref["boxes"])
            np.testing.assert_array_equal(batch.region_rois[rows, 1:].numpy(), ref["boxes"])
            hard_seen += [int(rows[j]) for j in ref["hard"]]
            short, long = ref["region_choices"]
            for j, row in enumerate(rows):  # region phrase: the seeded per-epoch short/long choice
                got = _padded_to(batch.region_tokens[row], 77)
                assert np.array_equal(got, short[j]) or np.array_equal(got, long[j])
                long_used += np.array_equal(got, long[j])
            mine = [h for h, r in enumerate(batch.hard_rows.tolist()) if r in set(rows.tolist())]
            np.testing.assert_array_equal(
                _padded_to(batch.hardneg_tokens[mine], 77), ref["hardneg_tokens"]
            )
        assert batch.hard_rows.tolist() == hard_seen
    assert 0 < long_used < sum(int(b.box_counts.sum()) for b in batches)


def test_embedded_synthetic_set_is_built_once(tmp_path):
    cfg = DataConfig(shards="", synthetic_dir=str(tmp_path / "syn"), synthetic_num_samples=40,
                     micro_batch_size=4, py_num_workers=0)  # fmt: skip
    with build_loader(cfg, 32, kind="dali") as loader:
        batch = next(loader)
    assert batch.images.shape == (4, 3, 32, 32) and batch.long_tokens.shape[0] == 4
    assert batch.long_tokens.shape[1] % 8 == 0 and batch.long_tokens.shape[1] <= 248
    index = tmp_path / "syn/shards/index.json"
    stamp = index.stat().st_mtime_ns
    with build_loader(cfg, 32, kind="pil") as loader:
        assert next(loader).keys == batch.keys
    assert index.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_spawned_reader_process_gives_the_same_stream(data):
    shards, _, _ = data
    cfg = _cfg(shards, py_num_workers=1)
    with DaliLoader(cfg, SIZE) as forked:
        expected = _take(forked, 3)
    spawn_cfg = dataclasses.replace(cfg, py_start_method="spawn")
    with DaliLoader(spawn_cfg, SIZE) as spawned:
        _assert_batches_equal(_take(spawned, 3), expected)


@pytest.mark.gpu
def test_mixed_gpu_decode_matches_cpu(data):
    shards, _, _ = data
    cfg = _cfg(shards, micro_batch_size=8)
    with DaliLoader(cfg, SIZE, device="cpu") as cpu:
        expected = _take(cpu, 3)
    gpu_cfg = dataclasses.replace(cfg, decode_device="mixed")
    with DaliLoader(gpu_cfg, SIZE, device="cuda") as gpu:
        assert gpu.decode_device == "mixed"
        got = _take(gpu, 3)
    for x, y in zip(got, expected, strict=True):
        assert x.images.is_cuda and x.long_tokens.is_cuda and x.keys == y.keys
        assert torch.equal(x.hardneg_tokens.cpu(), y.hardneg_tokens)
        assert x.sample_ids.device.type == "cpu" and torch.equal(x.region_rois.cpu(), y.region_rois)
        levels = _levels(x.images, y.images)
        assert levels.mean() <= 1.0 and levels[..., 1:-1, 1:-1].max() <= 8
        assert levels.max() <= 24


def test_reader_module_stays_free_of_torch_and_dali():
    # DALI's spawned reader processes import the source module; torch would cost seconds each.
    import subprocess
    import sys

    code = (
        "import sys, fgclip_mega.data.source\n"
        "print('torch' in sys.modules, 'nvidia' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_loader_auto_falls_back_to_pil_without_dali(monkeypatch, caplog):
    # The lent GPU machine has no DALI: data.loader=auto takes the PIL reference loader, loudly.
    import importlib.util
    import logging

    from fgclip_mega.data import loader as loader_mod

    assert loader_mod.resolve_loader_kind("auto") == "dali"  # installed here
    assert loader_mod.resolve_loader_kind("pil") == "pil"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loader_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("nvidia.dali") else real(name, *a),
    )
    with caplog.at_level(logging.WARNING, logger="fgclip_mega.data.loader"):
        assert loader_mod.resolve_loader_kind("auto") == "pil"
    assert "nvidia-dali is not installed" in caplog.text


@pytest.mark.parametrize("kind", ["dali", "pil"])
@pytest.mark.parametrize("damage", ["truncated", "not_a_jpeg"])
def test_corrupt_jpeg_is_one_error_naming_the_sample(tmp_path, kind, damage):
    # Shards are checked when built (a full PIL decode), so a JPEG that does not decode here
    # is storage damage or a shard written by another tool: the error names its shard, row
    # and key (not a neighbour's), and a DALI loader drops its failed pipeline.
    from fgclip_mega.data.stream import ImageDecodeError
    from tests.builders import jpeg_bytes
    from tests.test_naflex_dali import _write
    from tests.test_naflex_loader import K

    good = jpeg_bytes("red", (40, 40))
    bad = good[: len(good) // 3] if damage == "truncated" else b"GIF89a.."
    _write(tmp_path, {"a.jpg": good, "b.jpg": good, "broken.jpg": bad, "d.jpg": good})
    cfg = _cfg(open_shard_set(tmp_path), num_hard_negatives=K, max_boxes=2)
    loader = build_loader(cfg, SIZE, kind=kind)
    with pytest.raises(ImageDecodeError) as err:
        next(loader)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'shard-000000.zarr'} row 2 (broken.jpg): the JPEG does")
    assert "\n" not in msg and kind.upper() in msg.upper()
    if kind == "dali":  # DALI's error gives no reason: PIL's verdict is added
        assert loader._pipe is None
        assert ": DALI cpu: " in msg and "; PIL: " in msg
    loader.close()
