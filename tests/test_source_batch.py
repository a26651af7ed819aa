"""The vectorised `SampleSource.batch` and numpy `trimmed_length` against their per-sample and
torch versions (kept in run/bench_data_host.py as the benchmark's baseline): bitwise equal
outputs over epochs, DP ranks, a DP-size transition, re-cut contexts, clipped box counts and
every region_text mode."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fgclip_mega.data.batch import trimmed_length
from fgclip_mega.data.build import build_shards
from fgclip_mega.data.order import transition_after
from fgclip_mega.data.shards import open_shard_set
from fgclip_mega.data.source import SampleSource, SourceSpec
from fgclip_mega.data.tokenizer import EOT_ID
from tests.builders import write_raw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "run"))
from bench_data_host import per_sample_batch, torch_trimmed_length  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("source_batch")
    jsonl = write_raw(root / "raw", 61, seed=4, width=48, height=40)
    build_shards(str(jsonl), str(root / "raw/images"), str(root / "shards"), shard_size=13,
                 workers=1, progress=False)  # fmt: skip
    return open_shard_set(root / "shards")


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name == "jpeg":
            assert len(a[name]) == len(b[name])
            assert all(np.array_equal(x, y) for x, y in zip(a[name], b[name], strict=True))
        else:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_vectorised_batch_equals_the_per_sample_reference(shards):
    base = SourceSpec(tuple(shards.paths), tuple(int(s) for s in shards.sizes), seed=7,
                      dp_rank=0, dp_size=1, batch_size=5, start=0, block_size=4,
                      window_blocks=2, max_boxes=4)  # fmt: skip
    specs = [
        base,
        replace(base, batch_size=16, max_boxes=2, region_text="long", read_ahead=0),
        replace(
            base,
            dp_rank=1,
            dp_size=3,
            batch_size=7,
            short_context=20,
            long_context=40,
            region_text="short",
            start=3,
        ),  # fmt: skip
        replace(base, dp_rank=1, dp_size=2, num_negatives=3, window_blocks=1),
    ]
    # A resume at another DP size: the transition epoch, then normal epochs.
    tr = transition_after(shards.sizes, 7, 2, 9, 4, 2)
    specs.append(replace(base, dp_rank=2, dp_size=3, transition=tr))
    for spec in specs:
        fast, ref = SampleSource(spec), SampleSource(spec)
        steps = 3 * sum(shards.sizes) // (spec.batch_size * spec.dp_size) + 2  # > 2 epochs
        for step in range(steps):
            _equal(fast.batch(step), per_sample_batch(ref, step))


def test_numpy_trimmed_length_equals_the_torch_one():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n, length = int(rng.integers(0, 6)), int(rng.choice([7, 20, 77]))
        rows = np.zeros((n, 3, length), np.int32)
        for r in np.ndindex(n, 3):
            k = int(rng.integers(1, length))
            rows[r][:k] = rng.integers(1, 49000, k)
            if trial % 7 or rng.random() < 0.8:  # now and then a row without EOT
                rows[r][k - 1] = EOT_ID
                if rng.random() < 0.3:  # an EOT inside a row as well
                    rows[r][int(rng.integers(0, k))] = EOT_ID
        t = torch.from_numpy(rows)
        for ctx in (length, length - 1):
            args = ([t, t[:, 0]], ctx)
            assert trimmed_length(*args) == torch_trimmed_length(*args), (trial, ctx)


def test_host_budget_benchmark_runs_and_reports_cores_per_gpu(tmp_path):
    from bench_data_host import main

    lines = main(["--work", str(tmp_path), "--out", str(tmp_path / "b.jsonl"),
                  "--num-images", "24", "--batch-size", "4", "--dp", "2", "--batches", "3",
                  "--decode-batches", "1", "--warmup", "1", "--repeats", "1",
                  "--variants", "host_gpu_decode_per_sample,host_gpu_decode,pil_224"])  # fmt: skip
    rates = {x["name"]: x for x in lines if "samples_per_s_per_core" in x}
    assert set(rates) == {"host_gpu_decode_per_sample", "host_gpu_decode", "pil_224"}
    assert all(x["samples_per_s_per_core"] > 0 for x in rates.values())
    cores = {x["preset"]: x for x in lines if x["name"] == "cores_per_gpu"}
    assert set(cores) == {"fgclip_vit_b16", "fgclip_vit_l14_336"}
    b16 = cores["fgclip_vit_b16"]
    assert set(b16["cores_per_gpu"]) == {"host_gpu_decode_per_sample", "host_gpu_decode",
                                         "pil_224"}  # fmt: skip
    assert b16["text_lengths"][0] == 248  # the long captions fill the context
    # cores = the GPU's samples/s at the stated MFU over one core's samples/s
    want = b16["samples_per_s_per_gpu"] / rates["pil_224"]["samples_per_s_per_core"]
    assert b16["cores_per_gpu"]["pil_224"] == pytest.approx(want, abs=0.01)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == len(lines)
