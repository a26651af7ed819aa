"""Shards on an object store: a real S3-compatible server (moto) on 127.0.0.1, behind a proxy that
injects dropped connections, 503s, stalled and truncated responses deterministically.

The reference is always the same shards read from the local filesystem: blocks, batches,
training losses and parameters (DP=2) and evaluation metrics must be bitwise identical; under
faults nothing is lost or read twice (the same sample ids, step by step); past the retry budget
the run stops with an error that names the object. Credentials come from the standard AWS
variables only, and the secret appears in no error, log or output file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fgclip_mega.config import DataConfig
from fgclip_mega.data import storage
from fgclip_mega.data.build import build_shards
from fgclip_mega.data.shards import ShardReader, open_shard_set
from fgclip_mega.presets import load_config
from tests.builders import write_raw
from tests.distributed import run_distributed

SECRET = "fgclip-test-SECRET-7f3a9c"  # the secret key: must never appear in any output
KEY_ID = "fgclip-test-key-id"
N, SHARD, EVAL_N = 48, 12, 16
FAULTY = "/faulty/"
BROKEN_OBJECT = "/long_tokens/c/"  # every long-token chunk of bucket 'broken' always fails
FAST = storage.RetryPolicy(attempts=6, backoff_s=0.01, max_backoff_s=0.05, timeout_s=1.0)


def _plans():
    from tests.s3_server import FaultPlan

    return {
        FAULTY: FaultPlan(every=2, fails_per_request=2, max_slow=3, salt="a"),
        "/broken/": FaultPlan(every=1 << 30, always_fail=(BROKEN_OBJECT,)),
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto + fault proxy; local shards (train and eval) and copies in buckets clean, faulty and
    broken; the AWS variables set for this process and the processes it spawns."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from tests.s3_server import FaultProxy, S3Server

    root = tmp_path_factory.mktemp("s3")
    server = S3Server()
    proxy = FaultProxy(server.port, _plans())
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for split, n, seed in (("train", N, 3), ("eval", EVAL_N, 9)):
            raw = write_raw(root / f"raw_{split}", n, seed=seed, width=96, height=72)
            build_shards(str(raw), str(root / f"raw_{split}/images"), str(root / split),
                         shard_size=SHARD, workers=1, progress=False)  # fmt: skip
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=server.url)  # straight to moto: no faults
        for bucket in ("clean", "faulty", "broken"):
            fs.mkdir(bucket)
            for split in ("train", "eval"):
                fs.put(str(root / split), f"{bucket}/{split}", recursive=True)
        yield {"root": root, "proxy": proxy, "server": server}
    finally:
        proxy.stop()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _blocks_equal(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f.name


# ----------------------------------------------------------------------------- in-process


@pytest.mark.slow
def test_blocks_through_every_fault_kind_equal_the_local_read(s3):
    from tests.s3_server import KINDS, FaultPlan

    proxy = s3["proxy"]
    local = ShardReader(s3["root"] / "train/shard-000001.zarr")
    want = local.read_block(0, SHARD)
    try:
        for kind in KINDS:  # every request fails twice with this kind, then gets through
            proxy.reset({FAULTY: FaultPlan(every=1, fails_per_request=2, kinds=(kind,),
                                           max_slow=4)})  # fmt: skip
            remote = ShardReader("s3://faulty/train/shard-000001.zarr", FAST)
            _blocks_equal(remote.read_block(0, SHARD), want)
            assert remote.keys() == local.keys()
            assert proxy.stats.faults[kind] > 0, kind
    finally:
        proxy.reset(_plans())


def test_retry_budget_exhausted_names_the_object_and_never_the_secret(s3):
    with pytest.raises(storage.StorageError) as info:
        ShardReader("s3://broken/train/shard-000000.zarr", FAST).read_block(0, 4)
    msg = str(info.value)
    assert "s3://broken/train/shard-000000.zarr/long_tokens/c/0" in msg, msg
    assert "after 6 attempt(s)" in msg and "transient" in msg, msg
    assert SECRET not in msg and SECRET not in repr(info.value)
    # A missing index is a clear FileNotFoundError, not a retry loop.
    with pytest.raises(FileNotFoundError, match="no shard index at s3://clean/nothing"):
        open_shard_set("s3://clean/nothing/index.json", FAST)
    # Credentials written into a URL are redacted from messages.
    assert storage.redact(f"s3://{KEY_ID}:{SECRET}@bucket/x") == "s3://bucket/x"


def test_shard_set_paths_and_fingerprint_match_the_local_set(s3):
    local = open_shard_set(s3["root"] / "train")
    for url in ("s3://clean/train/index.json", "s3://clean/train/"):
        remote = open_shard_set(url, FAST)
        assert remote.root == "s3://clean/train"
        assert remote.paths == [f"s3://clean/train/{Path(p).name}" for p in local.paths]
        assert np.array_equal(remote.sizes, local.sizes)
        # The fingerprint guards the exact resume: a run may move between local and S3.
        assert remote.fingerprint == local.fingerprint


def _loader(shards: str, **kw):
    from fgclip_mega.data.pil_loader import PilLoader

    cfg = DataConfig(shards=shards, micro_batch_size=4, read_block_size=4,
                     shuffle_window_blocks=2, num_threads=1, storage_attempts=6,
                     storage_timeout_s=1.0, **kw)  # fmt: skip
    return PilLoader(cfg, 32, dp_rank=0, dp_size=1)


def _same_batch(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if hasattr(x, "dtype"):
            assert x.dtype == y.dtype and bool((x == y).all()), f.name
        else:
            assert x == y, f.name


@pytest.mark.slow
def test_loader_under_faults_and_read_ahead_gives_the_local_batches(s3):
    """13 batches (more than an epoch of 48) from S3 through faults, read ahead, equal the local
    batches; a resume from a local loader's state continues exactly."""
    proxy = s3["proxy"]
    proxy.reset(_plans())
    steps = 13
    with _loader(str(s3["root"] / "train")) as ref_loader:
        ref = [next(ref_loader) for _ in range(steps)]
    with _loader("s3://faulty/train/index.json") as loader:
        got = [next(loader) for _ in range(steps)]
    for a, b in zip(got, ref, strict=True):
        _same_batch(a, b)
    faults = proxy.stats.faults
    assert sum(faults.values()) >= 10 and len(faults) == 4, faults  # every kind happened
    # Exact resume across storage: the local loader's state, loaded by an S3 loader.
    with _loader(str(s3["root"] / "train")) as local:
        for _ in range(5):
            next(local)
        state = local.state_dict()
    with _loader("s3://clean/train/index.json") as remote:
        remote.load_state_dict(state)
        for want in ref[5:9]:
            _same_batch(next(remote), want)


def test_read_ahead_fetches_the_next_window_before_it_is_needed(s3):
    from fgclip_mega.data.source import SampleSource, SourceSpec

    shards = open_shard_set("s3://clean/train", FAST)
    spec = SourceSpec(tuple(shards.paths), tuple(int(s) for s in shards.sizes), seed=1,
                      dp_rank=0, dp_size=1, batch_size=4, start=0, block_size=4,
                      window_blocks=2, read_ahead=2, storage=FAST)  # fmt: skip
    src = SampleSource(spec)
    src.batch(0)  # window 0 of epoch 0 in use: windows 1 and 2 are being read
    assert sorted(src._ahead) == [(0, 1), (0, 2)]
    for fut in src._ahead.values():
        fut.result(timeout=60)
    plain = SampleSource(dataclasses.replace(spec, read_ahead=0))
    for step in range(4):
        a, b = src.batch(step), plain.batch(step)
        for name in a:
            if name == "jpeg":
                assert all(np.array_equal(x, y) for x, y in zip(a[name], b[name], strict=True))
            else:
                assert np.array_equal(a[name], b[name]), name
    assert not plain._ahead


def test_check_paths_takes_urls_for_shards_but_not_for_checkpoints(tmp_path):
    from fgclip_mega.config import ConfigError

    ok = ["data.shards=s3://bucket/prefix/index.json", "data.eval_shards=gs://b/eval/"]
    load_config("tiny", None, ok).check_paths()
    with pytest.raises(ConfigError, match="data.shards"):
        load_config("tiny", None, [f"data.shards={tmp_path}/missing.json"]).check_paths()
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        load_config("tiny", None, ["checkpoint.init_from=s3://b/ckpt"]).check_paths()
    for bad in ("data.storage_attempts=0", "data.storage_timeout_s=0",
                "data.read_ahead_windows=-1"):  # fmt: skip
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("tiny", None, [bad])


@pytest.mark.slow
def test_build_shards_out_s3_writes_the_local_bytes_through_faults(s3):
    """build_shards --out s3://... (2 workers, through faults) writes exactly the objects of the
    local build, byte for byte; a rerun reuses every shard."""
    import s3fs

    root = s3["root"]
    args = (str(root / "raw_train/train.jsonl"), str(root / "raw_train/images"))
    s3["proxy"].reset(_plans())
    build_shards(*args, "s3://faulty/built", shard_size=SHARD, workers=2, progress=False)
    assert sum(s3["proxy"].stats.faults.values()) > 0
    again = build_shards(*args, "s3://faulty/built", shard_size=SHARD, workers=1, progress=False)
    assert again["reused_shards"] == N // SHARD
    fs = s3fs.S3FileSystem(endpoint_url=s3["server"].url)  # read back straight from moto
    local = sorted(str(p.relative_to(root / "train")) for p in (root / "train").rglob("*")
                   if p.is_file())  # fmt: skip
    remote = sorted(k.removeprefix("faulty/built/") for k in fs.find("faulty/built"))
    assert remote == local
    for rel in local:
        assert fs.cat_file(f"faulty/built/{rel}") == (root / "train" / rel).read_bytes(), rel
    assert (
        open_shard_set("s3://clean/train", FAST).fingerprint
        == open_shard_set("s3://faulty/built", FAST).fingerprint
    )


# ----------------------------------------------------------------------------- DP=2 training


def _train_runs(tmp: str, local_train: str, local_eval: str) -> dict:
    """In each of 2 ranks: the same tiny run from local shards, from s3://clean, from
    s3://faulty, and from s3://broken (expected to stop); stdout/stderr go to a file."""
    import fgclip_mega.train.loop as loop
    from tests.builders import train_config

    tmp = Path(tmp)
    rank = int(os.environ["RANK"])
    log = open(tmp / f"console_{rank}.txt", "w")  # noqa: SIM115 - kept open for the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    logging.basicConfig(level=logging.INFO, stream=log, force=True)

    def cfg(name: str, train: str, evals: str):
        c = train_config(tmp / name, tmp / "synthetic", 7, checkpoint__save_interval=7,
                         train__eval_batches=2)  # fmt: skip
        c.data.shards, c.data.eval_shards = train, evals
        c.data.read_block_size, c.data.shuffle_window_blocks = 4, 2
        c.data.storage_attempts, c.data.storage_timeout_s = 6, 1.0
        return c.validate()

    real = loop.train_step
    out: dict = {}

    def run(name: str, train: str, evals: str) -> None:
        from megatron.core import parallel_state

        from fgclip_mega.checkpoint import integrity

        if out:  # keeps torch.distributed, drops megatron's groups (as tests/test_train.py)
            parallel_state.destroy_model_parallel()
        seen: list[list[int]] = []

        def record(run_, batch, step):
            seen.append(batch.sample_ids.tolist())
            return real(run_, batch, step)

        loop.train_step = record
        try:
            res = loop.train(cfg(name, train, evals), keep_process_groups=True)
        finally:
            loop.train_step = real
        ckpt = Path(res.checkpoint)
        params = integrity.load_torch(ckpt, "model.pt", integrity.read_manifest(ckpt))
        out[name] = {"losses": res.losses, "evals": res.evals, "ids": seen,
                     "params": {k: v.clone() for k, v in params.items()}}  # fmt: skip

    run("local", local_train, local_eval)
    run("clean", "s3://clean/train/index.json", "s3://clean/eval/index.json")
    run("faulty", "s3://faulty/train/index.json", "s3://faulty/eval/index.json")
    try:
        run("broken", "s3://broken/train/index.json", "s3://broken/eval/index.json")
        out["broken_error"] = None
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        out["broken_error"] = f"{type(e).__name__}: {e}"
    log.flush()
    return out


@pytest.fixture(scope="module")
def dp2(s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3_dp2")
    s3["proxy"].reset(_plans())
    res = run_distributed(_train_runs, 2, str(tmp), str(s3["root"] / "train/index.json"),
                          str(s3["root"] / "eval/index.json"), timeout=900)  # fmt: skip
    return {"ranks": res, "tmp": tmp, "faults": dict(s3["proxy"].stats.faults)}


def _params_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), k


@pytest.mark.slow
def test_dp2_training_from_s3_equals_the_local_run_bitwise(dp2):
    for rank in dp2["ranks"]:
        local = rank["local"]
        assert len(local["losses"]) == 7 and local["evals"]
        for name in ("clean", "faulty"):
            got = rank[name]
            assert got["ids"] == local["ids"], name  # same samples, step by step
            assert got["losses"] == local["losses"], name
            assert got["evals"] == local["evals"], name  # evaluation read from S3 too
            _params_equal(got["params"], local["params"])
    r0, r1 = (r["local"]["ids"] for r in dp2["ranks"])
    # Nothing lost or read twice: the first 6 steps are epoch 0 (48 samples over 2 ranks x 4).
    epoch0 = [i for step in r0[:6] + r1[:6] for i in step]
    assert sorted(epoch0) == list(range(N))


@pytest.mark.slow
def test_dp2_faults_were_injected_and_a_lost_object_stops_the_run_by_name(dp2):
    faults = dp2["faults"]
    assert sum(faults.values()) >= 20 and set(faults) == {"drop", "503", "slow", "truncate"}, faults
    for rank in dp2["ranks"]:
        err = rank["broken_error"]
        assert err is not None, "the run over an unreadable object did not stop"
        assert "s3://broken/train/shard-" in err and "/long_tokens/c/" in err, err
        assert "after 6 attempt(s)" in err, err


@pytest.mark.slow
def test_dp2_secret_is_in_no_log_or_output_file(dp2):
    files = [p for p in dp2["tmp"].rglob("*") if p.is_file()]
    assert any(p.name.startswith("console_") for p in files)
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data, path
    for rank in dp2["ranks"]:
        assert SECRET not in json.dumps(rank["broken_error"])
