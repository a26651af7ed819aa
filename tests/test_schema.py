"""One sample schema drives the shard writer, the reader outputs and DALI; data_prep stays thin."""

import ast
from pathlib import Path

import numpy as np
import pytest

from fgclip_mega.data import schema
from fgclip_mega.data.ingest import Sample
from fgclip_mega.data.shards import ShardReader, write_shard
from fgclip_mega.data.source import OUTPUTS, SampleSource, SourceSpec

ROOT = Path(__file__).resolve().parents[1]


def _sample(key: str, n_boxes: int, k: int = 2) -> Sample:
    from tests.builders import jpeg_bytes as _jpeg

    s = Sample(key=key, caption=f"caption of {key}", short_caption="short", image=_jpeg(),
               width=32, height=24)  # fmt: skip
    for j in range(n_boxes):
        s.short_exprs.append(f"box {j}")
        s.long_exprs.append(f"long box {j}")
        s.neg_flags.append(j % 2)
        s.negs.append([f"neg {j} {i}" for i in range(k)] if j % 2 else [])
    s.boxes = np.tile(np.array([[0.1, 0.2, 0.5, 0.6]], np.float32), (n_boxes, 1))
    return s


def test_shard_arrays_and_source_outputs_follow_the_schema(tmp_path):
    path = tmp_path / "s.zarr"
    write_shard(path, [_sample("a", 3), _sample("b", 0), _sample("c", 1)], num_negatives=2)
    reader = ShardReader(path)
    assert sorted(reader.group.array_keys()) == sorted(f.name for f in schema.SHARD)
    for f in schema.SHARD:
        arr = reader.group[f.name]
        if f.dtype != "str":
            assert arr.dtype == np.dtype(f.dtype), f.name
    spec = SourceSpec(paths=(str(path),), sizes=(3,), seed=0, dp_rank=0, dp_size=1,
                      batch_size=2, start=0, max_boxes=2, num_negatives=2,
                      short_context=16, long_context=32)  # fmt: skip
    out = SampleSource(spec).batch(0)
    assert OUTPUTS == tuple(f.name for f in schema.OUTPUTS)
    dims = {"LONG": 32, "SHORT": 16, "M": 2, "K": 2}
    for f in schema.OUTPUTS[1:]:
        assert out[f.name].dtype == np.dtype(f.dtype), f.name
        assert out[f.name].shape == (2, *schema.resolve(f.shape, dims)), f.name
    # The DALI callable returns exactly the schema outputs, in order.
    assert len(SampleSource(spec)(0)) == len(schema.OUTPUTS)


def test_writer_rejects_arrays_that_break_the_schema():
    good = {f.name: np.zeros(0) for f in schema.SHARD}
    with pytest.raises(ValueError, match="shard array 'image_bytes'"):
        schema.check_shard_arrays(good, 0, 0, 2)
    with pytest.raises(ValueError, match=r"missing \['boxes'\]"):
        schema.check_shard_arrays({k: v for k, v in good.items() if k != "boxes"}, 0, 0, 2)


def test_batch_assembly_names_a_missing_output():
    import torch

    from fgclip_mega.data.batch import batch_from_arrays

    with pytest.raises(KeyError, match="hardneg_valid"):
        batch_from_arrays(torch.zeros(1, 3, 4, 4), {"long_tokens": np.zeros((1, 8))}, ["a"])


def test_data_prep_imports_only_the_tokenizer_and_the_shard_format():
    allowed = {"fgclip_mega.data.shards", "fgclip_mega.data.tokenizer"}
    for path in sorted((ROOT / "data_prep").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.startswith("fgclip_mega"):
                    assert module in allowed, f"{path.name} imports {module}"
