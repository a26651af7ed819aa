"""A checkpoint is layout-free: trained at TP1xDP1, resumed at TP2xDP1, then TP1xDP2, then back
at TP1xDP1; after every resharding the gathered model and optimizer state equal the saved state
bit for bit, and the data stream neither repeats nor skips a sample inside an epoch, at a TP
change and at a DP change (a transition epoch splits the unread samples over the new ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.builders import train_config as _cfg
from tests.distributed import run_distributed

CKPT = "checkpoints"


def _layout_cfg(tmp: Path, name: str, steps: int, tp: int, load: str = ""):
    return _cfg(
        tmp / name,
        tmp / "data",
        steps,
        parallel__tensor_parallel_size=tp,
        train__eval_batches=0,
        checkpoint__load=load,
    )


def _recording_train(cfg) -> list[tuple[int, list[int]]]:
    """Trains; returns (step, sample ids) of every micro-batch this rank took, after one
    (0, [block size, window blocks, data seed, shard sizes...]) entry describing the stream."""
    import fgclip_mega.train.loop as loop

    seen: list[tuple[int, list[int]]] = []
    real = loop.train_step

    def record(run, batch, step):
        if not seen:
            o = run.loader.order
            seen.append((0, [o.block_size, o.window_blocks, o.seed, *o.sizes.tolist()]))
        seen.append((step, batch.sample_ids.tolist()))
        return real(run, batch, step)

    loop.train_step = record
    try:
        loop.train(cfg, keep_process_groups=True)
    finally:
        loop.train_step = real
        _next_layout()
    return seen


def _next_layout() -> None:
    # Keeps torch.distributed (re-creating it on the same port races) and drops the TP x DP
    # groups, so the next run may choose another TP size.
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def _reshard_mismatches(cfg, path: Path) -> tuple[list[str], int]:
    """Loads `path` at cfg's layout, gathers the state back, compares with the files."""
    from fgclip_mega.checkpoint import full_state, integrity
    from fgclip_mega.checkpoint import training as ckpt
    from fgclip_mega.parallel import init_parallel
    from fgclip_mega.train.build import build_training_run

    state = init_parallel(cfg, seed=cfg.train.seed)
    cfg.validate(world_size=state.world_size)
    run = build_training_run(cfg, state)
    ckpt.Checkpointer(Path(cfg.train.output_dir) / CKPT, state).load(
        path, run.model, run.optimizer, run.scheduler, run.loader
    )
    model = full_state.gather_model(run.model, state.tp_group)
    optim = full_state.gather_optimizer(run.optimizer, run.model, state.tp_group, state.dp_group)
    run.loader.close()
    _next_layout()
    manifest = integrity.read_manifest(path)
    saved_model = integrity.load_torch(path, "model.pt", manifest)
    saved_optim = integrity.load_torch(path, "optimizer.pt", manifest)
    pairs = [(f"model.{n}", t, model.get(n)) for n, t in saved_model.items()]
    for n, keys in saved_optim["tensors"].items():
        pairs += [(f"optim.{n}.{k}", t, optim["tensors"][n].get(k)) for k, t in keys.items()]
    for n, keys in saved_optim["scalars"].items():
        pairs += [(f"scalar.{n}.{k}", t, optim["scalars"][n].get(k)) for k, t in keys.items()]
    bad = [
        name
        for name, a, b in pairs
        if b is None or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b)
    ]
    return bad, len(pairs)


def _one_process(tmp: str, stage: str) -> dict:
    tmp = Path(tmp)
    if stage == "a":
        return {"ids": _recording_train(_layout_cfg(tmp, "a", 1, tp=1))}
    path = tmp / "c" / CKPT / "step_00000003"
    check = _reshard_mismatches(_layout_cfg(tmp, "d", 5, tp=1), path)
    ids = _recording_train(_layout_cfg(tmp, "d", 5, tp=1, load=str(tmp / "c" / CKPT)))
    return {"check_d": check, "ids": ids}


def _two_processes(tmp: str) -> dict:
    tmp = Path(tmp)
    out = {}
    out["check_b"] = _reshard_mismatches(
        _layout_cfg(tmp, "b", 2, tp=2), tmp / "a" / CKPT / "step_00000001"
    )
    out["ids_b"] = _recording_train(_layout_cfg(tmp, "b", 2, tp=2, load=str(tmp / "a" / CKPT)))
    out["check_c"] = _reshard_mismatches(
        _layout_cfg(tmp, "c", 3, tp=1), tmp / "b" / CKPT / "step_00000002"
    )
    out["ids_c"] = _recording_train(_layout_cfg(tmp, "c", 3, tp=1, load=str(tmp / "b" / CKPT)))
    return out


@pytest.mark.slow
def test_resume_at_other_layouts_is_exact(tmp_path):
    from fgclip_mega.data.order import StreamOrder

    (a,) = run_distributed(_one_process, 1, str(tmp_path), "a", timeout=600)
    r0, r1 = run_distributed(_two_processes, 2, str(tmp_path), timeout=600)
    (d,) = run_distributed(_one_process, 1, str(tmp_path), "d", timeout=600)
    for name, (bad, count) in (("b", r0["check_b"]), ("c", r0["check_c"]), ("d", d["check_d"])):
        assert count > 100 and bad == [], (name, bad[:5])
    assert r1["check_b"] == r0["check_b"] and r1["check_c"] == r0["check_c"]

    # Sample order: 24 samples per epoch, micro-batch 4.
    def ids(seen):
        return [i for step, batch in seen if step for i in batch]

    block, window, seed, *sizes = a["ids"][0][1]
    assert sum(sizes) == 24
    assert [s for s, _ in a["ids"]] == [0, 1] and [s for s, _ in r0["ids_b"]] == [0, 2]
    assert [s for s, _ in r0["ids_c"]] == [0, 3] and [s for s, _ in d["ids"]] == [0, 4, 5]
    # TP change (DP 1 -> 1): the stream continues exactly where it stopped.
    dp1 = StreamOrder(sizes, seed, 0, 1, block, window)
    assert ids(r0["ids_b"]) == ids(r1["ids_b"])  # TP ranks read the same batch
    assert ids(a["ids"]) + ids(r0["ids_b"]) == dp1.sample_ids(0, 8).tolist()
    # DP 1 -> 2 mid-epoch: the 16 unread samples of epoch 0 are split over the two ranks.
    first8 = dp1.sample_ids(0, 8).tolist()
    c = ids(r0["ids_c"]) + ids(r1["ids_c"])
    assert len(set(c)) == 8 and not set(c) & set(first8)
    # DP 2 -> 1: the last 8 unread samples of epoch 0; each sample read exactly once.
    assert sorted(first8 + c + ids(d["ids"])) == list(range(24))
