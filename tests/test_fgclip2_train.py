"""FG-CLIP 2 (model.family=fgclip2) through the shared trainer, on the path users take.

Three spawned groups (one, two and four processes, gloo) hold every multi-process check:
- collectives per step, counted by wrapping torch.distributed (and megatron's module-level aliases
  of it) per trainer phase (forward+objective, backward+DDP, optimizer), are the same at DP 2 and
  DP 4, with and without GradCache accumulation; the ring gather (which does grow with DP) shows
  the count can tell;
- a DP=2 and a TP2+SP x DP2 stage-2 run of 3 steps equal one process computing the same math:
  the global sigmoid terms over the whole global batch, each rank's local terms (region, TIC, FGT)
  on its own slice averaged, the CMR margin from the mean of the slices' statistics, the same
  megatron optimizer (params within 1e-5);
- megatron's overlapped DDP + distributed optimizer runs stage 1 and stage 2 (init_from stage 1)
  at DP=2, and asserts ("per_param_grad_ready_counts") when the stage-unused heads are not frozen;
- stage 2 stopped at step 2 and resumed to 4 is the uninterrupted run bit for bit (params, CMR
  margin, loader state, sample ids); a checkpoint without the objective state (older format)
  resumes with the margin at zero; stage 1's frozen dense / box-text heads keep their initial
  (copied) values and train in stage 2.
Bad input at the CLI: tests/test_fgclip2_cli_errors.py.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
STEPS = 3
_COLLECTIVES = (
    "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_gather", "broadcast",
    "reduce_scatter", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
    "batch_isend_irecv", "send", "recv", "barrier", "_all_gather_base",
    "_reduce_scatter_base", "all_gather_object", "broadcast_object_list",
)  # fmt: skip


def _cfg(out: Path, data: Path, steps: int, **overrides):
    """fgclip2_tiny in fp32, stage 2, micro-batch 4, 64 synthetic mixed-size scenes, a log line and
    no evaluation; overrides as section__field=value."""
    from fgclip_mega.presets import fgclip2_tiny

    cfg = fgclip2_tiny()
    cfg.precision.params_dtype = cfg.precision.compute_dtype = "fp32"
    cfg.data.micro_batch_size = 4
    cfg.data.synthetic_num_samples = 64
    cfg.data.synthetic_dir = str(data)
    cfg.data.num_threads = 1
    cfg.train.stage = "regional"
    cfg.train.steps = steps
    cfg.train.eval_batches = 0
    cfg.train.log_interval = 1
    cfg.train.output_dir = str(out)
    cfg.optim.lr = 1e-3
    cfg.optim.warmup_steps = 1
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _params(out: Path, step: int) -> dict:
    from fgclip_mega.checkpoint import integrity

    path = Path(out) / "checkpoints" / f"step_{step:08d}"
    return integrity.load_torch(path, "model.pt", integrity.read_manifest(path))


def _train_state(out: Path, step: int) -> dict:
    from fgclip_mega.checkpoint import integrity

    path = Path(out) / "checkpoints" / f"step_{step:08d}"
    return integrity.load_torch(path, "train.pt", integrity.read_manifest(path))


def _next_layout() -> None:
    # Keeps torch.distributed and drops the TP x DP groups, so the next run may choose another TP.
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def _recording_train(cfg, build_hook=None):
    """loop.train(cfg) that also returns, per step, this rank's sample ids, the batch budget and
    the CMR margin the step starts from; `build_hook(run)` sees the built run first."""
    import fgclip_mega.train.loop as loop

    seen: list[dict] = []
    real_step, real_build = loop.train_step, loop.build_training_run

    def record(run, batch, step):
        margin = run.objective.state.get("cmr_margin")
        seen.append({"step": step, "ids": batch.sample_ids.tolist(), "budget": batch.budget,
                     "margin": None if margin is None else float(margin)})  # fmt: skip
        return real_step(run, batch, step)

    def build(cfg, state):
        run = real_build(cfg, state)
        if build_hook is not None:
            build_hook(run)
        return run

    loop.train_step, loop.build_training_run = record, build
    try:
        result = loop.train(cfg, keep_process_groups=True)
    finally:
        loop.train_step, loop.build_training_run = real_step, real_build
        _next_layout()
    return result, seen


# ----------------------------------------------------------------------------- collectives


@contextlib.contextmanager
def _count_by_phase(run):
    """Counter per trainer phase ('forward' = encode + objective, 'backward' = backward + DDP
    reduction, 'optimizer') of the torch.distributed calls made inside it. megatron binds some
    collectives to module globals at import (dist_reduce_scatter_func): those are wrapped too."""
    import torch.distributed as dist

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    current = ["other"]
    # By identity: torch.distributed's functions, wherever a module bound them. (Not isend/irecv:
    # P2POp checks its op against torch's own functions.)
    originals = {id(getattr(dist, n)): n for n in _COLLECTIVES if hasattr(dist, n)}
    patched: list[tuple[object, str, object]] = []

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[current[0]][name] += 1
            return fn(*args, **kwargs)

        return counted

    modules = [dist] + [
        m for n, m in list(sys.modules.items())
        if m is not None and n.startswith(("megatron", "fgclip_mega"))
    ]  # fmt: skip
    for module in modules:
        for attr, value in list(vars(module).items()):
            if callable(value) and id(value) in originals:
                patched.append((module, attr, value))
                setattr(module, attr, wrap(originals[id(value)], value))
    real_phase = run.timer.phase

    @contextlib.contextmanager
    def phase(name):
        previous, current[0] = current[0], name
        try:
            with real_phase(name):
                yield
        finally:
            current[0] = previous

    run.timer.phase = phase
    try:
        yield counts
    finally:
        del run.timer.phase
        for module, attr, value in patched:
            setattr(module, attr, value)


def _counted_steps(tmp: Path, name: str, **overrides) -> dict:
    """Two train_steps of a fresh stage-2 run: per step the collectives of each phase, and the
    micro-batches per step."""
    from fgclip_mega.parallel import init_parallel
    from fgclip_mega.train.build import build_training_run
    from fgclip_mega.train.step import train_step

    cfg = _cfg(tmp / name, tmp / "data", 2, **overrides)
    state = init_parallel(cfg, seed=cfg.train.seed, with_decode=False)
    cfg.validate(world_size=state.world_size)
    run = build_training_run(cfg, state)
    out = []
    try:
        for step in (1, 2):
            batches = [next(run.loader) for _ in range(run.accumulation)]
            with _count_by_phase(run) as counts:
                train_step(run, batches if len(batches) > 1 else batches[0], step)
            out.append({k: dict(v) for k, v in counts.items()})
    finally:
        run.loader.close()
        _next_layout()
    return {"accumulation": run.accumulation, "steps": out}


def _collective_checks(tmp: Path) -> dict:

    dp = int(os.environ["WORLD_SIZE"])
    return {
        "plain": _counted_steps(tmp, "count_plain"),
        # GradCache: 2 micro-batches per rank per step.
        "accum": _counted_steps(tmp, "count_accum", train__global_batch_size=2 * 4 * dp),
        # The user's GPU setting: overlapped reduction, ZeRO-1.
        "overlap": _counted_steps(
            tmp,
            "count_overlap",
            parallel__overlap_grad_reduce=True,
            parallel__use_distributed_optimizer=True,
        ),  # fmt: skip
        "ring": _counted_steps(tmp, "count_ring", loss__gather="ring"),
    }


# ----------------------------------------------------------------------------- reference


class _RankBatches:
    """The DP=2 ranks' micro-batches of one step, handed to the reference's forward as one."""

    def __init__(self, batches):
        self.batches = batches


class _RankEmbeddings(list):
    """The ranks' Embeddings; `.float()` as train_step upcasts one Embeddings."""

    def float(self):
        return _RankEmbeddings(e.float() for e in self)


def _reference_run(tmp: str) -> dict:
    """One process computing what DP=2 computes, for STEPS steps: the global terms over both
    ranks' slices (the global batch), each slice's local terms averaged (DDP averages the ranks'
    gradients), the CMR margin from the mean of the slices' statistics; same megatron optimizer,
    schedule, clipping and temperature clamp (train_step)."""
    import dataclasses

    import fgclip_mega.objective.terms as terms
    from fgclip_mega.objective import Objective, ObjectiveOutput
    from fgclip_mega.objective.terms import FGCLIP2_TERMS
    from fgclip_mega.parallel import init_parallel
    from fgclip_mega.parallel.wrap import sync_params
    from fgclip_mega.train.accumulate import concat_embeddings
    from fgclip_mega.train.build import build_training_run
    from fgclip_mega.train.step import train_step

    tmp = Path(tmp)
    cfg = _cfg(tmp / "reference", tmp / "data", STEPS)
    state = init_parallel(cfg, seed=cfg.train.seed, with_decode=False)
    cfg.validate(world_size=1)
    run = build_training_run(cfg, state)
    run.loader.close()
    loaders = [run.family.build_loader(cfg, r, 2, run.runtime.device) for r in range(2)]
    impl = run.objective.ctx.impl
    global_obj = Objective(cfg.loss, regional=False, impl=impl)  # long + short (sigmoid)
    local_terms = tuple(t for t in FGCLIP2_TERMS if t.text is None)
    local_obj = Objective(cfg.loss, regional=True, impl=impl, terms=local_terms)
    assert [t.name for t in local_terms] == ["region", "tic", "fgt"]
    real_encode, real_update = run.family.encode, terms.update_margin

    def encode(model, pair, regional):
        return _RankEmbeddings(real_encode(model, b, regional) for b in pair.batches)

    stats = []

    def objective(embs, temperatures):
        g = global_obj(concat_embeddings(embs), temperatures)
        stats.clear()
        terms.update_margin = lambda margin, statistic, *a, **k: stats.append(statistic)
        try:
            local = [local_obj(e, temperatures) for e in embs]
        finally:
            terms.update_margin = real_update
        # DP: margin <- clamp(mean over ranks of the statistic).
        mean = torch.stack([s.detach().float().reshape(()) for s in stats]).mean()
        real_update(local_obj.state["cmr_margin"], mean, cfg.loss.cmr_max_margin)
        total = g.total + sum(x.total for x in local) / len(local)
        return ObjectiveOutput(total, {"loss": total.detach()}, {})

    run.family = dataclasses.replace(run.family, encode=encode)
    run.objective = objective
    seen = []
    for step in range(1, STEPS + 1):
        batches = [next(loader) for loader in loaders]
        margin = local_obj.state.get("cmr_margin")
        seen.append({"ids": [b.sample_ids.tolist() for b in batches],
                     "budget": [b.budget for b in batches],
                     "margin": None if margin is None else float(margin)})  # fmt: skip
        train_step(run, _RankBatches(batches), step)
    for loader in loaders:
        loader.close()
    sync_params(run.ddp)
    params = {
        n: p.detach().clone()
        for n, p in run.model.state_dict().items()
        if isinstance(p, torch.Tensor)
    }
    return {"params": params, "seen": seen, "margin": float(local_obj.state["cmr_margin"])}


@pytest.fixture(scope="module")
def reference(shared_tmp):
    (res,) = run_distributed(_reference_run, 1, str(shared_tmp), timeout=600)
    return res


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("fgclip2_train")


# ----------------------------------------------------------------------------- two processes


def _stage1_frozen_heads(run, store: dict) -> None:
    store["init"] = {
        n: p.detach().clone()
        for n, p in run.model.state_dict().items()
        if isinstance(p, torch.Tensor)
    }
    store["trainable"] = sorted(n for n, p in run.model.named_parameters() if p.requires_grad)


def _dp2_checks(tmp: str) -> dict:
    import torch.distributed as dist

    import fgclip_mega.family as family_module

    tmp = Path(tmp)
    data = tmp / "data"
    rank = int(os.environ["RANK"])
    out: dict = {"counts": _collective_checks(tmp)}

    # Sharded = unsharded: DP=2, 3 steps (CPU default: no overlap, plain optimizer).
    cfg = _cfg(tmp / "dp2", data, STEPS, checkpoint__save_interval=STEPS)
    out["dp2_seen"] = _recording_train(cfg)[1]

    # megatron's overlapped DDP + distributed optimizer: stage 1, then stage 2 from its checkpoint.
    zero = dict(parallel__overlap_grad_reduce=True, parallel__use_distributed_optimizer=True)
    store: dict = {}
    s1 = _cfg(tmp / "s1", data, STEPS, train__stage="global", **zero)
    out["s1_losses"] = _recording_train(s1, lambda run: _stage1_frozen_heads(run, store))[0].losses
    out["s1_init"], out["s1_trainable"] = store["init"], store["trainable"]
    init_from = str(tmp / "s1" / "checkpoints" / f"step_{STEPS:08d}")
    extra = dict(checkpoint__save_interval=2, checkpoint__init_from=init_from, **zero)
    full, out["full_seen"] = _recording_train(_cfg(tmp / "full", data, 4, **extra))
    out["full_losses"] = full.losses

    # Exact resume: the step-2 checkpoint of the same run, resumed to 4; and the same checkpoint
    # without the objective state (the format before the CMR margin was saved).
    from fgclip_mega.checkpoint import integrity

    dist.barrier()
    if rank == 0:
        for name in ("cut", "old"):
            shutil.copytree(tmp / "full", tmp / name)
            shutil.rmtree(tmp / name / "checkpoints" / "step_00000004")
        step2 = tmp / "old" / "checkpoints" / "step_00000002"
        manifest = integrity.read_manifest(step2)
        train_state = integrity.load_torch(step2, "train.pt", manifest)
        del train_state["objective"]
        files = dict(manifest["files"])
        files["train.pt"] = integrity.write_file(step2 / "train.pt", train_state)
        integrity.write_manifest(step2, files, 2)
    dist.barrier()
    resumed, out["cut_seen"] = _recording_train(_cfg(tmp / "cut", data, 4, **extra))
    out["cut_losses"] = resumed.losses
    out["old_seen"] = _recording_train(_cfg(tmp / "old", data, 4, **extra))[1]

    # Without freezing the stage-unused heads, megatron's overlapped DDP waits on parameters that
    # never get a gradient and asserts at the second step.
    real = family_module.freeze_unused
    family_module.freeze_unused = lambda model, cfg: []
    try:
        _recording_train(_cfg(tmp / "unfrozen", data, STEPS, train__stage="global", **zero))
        out["unfrozen"] = "no error"
    except AssertionError:
        import traceback

        out["unfrozen"] = traceback.format_exc()
    finally:
        family_module.freeze_unused = real
    return out


@pytest.fixture(scope="module")
def two(shared_tmp):
    return run_distributed(_dp2_checks, 2, str(shared_tmp), timeout=900)


# ----------------------------------------------------------------------------- four processes


def _dp4_checks(tmp: str) -> dict:
    tmp = Path(tmp)
    out = {"counts": _collective_checks(tmp)}
    # TP=2 with sequence parallelism x DP=2, the same 3 steps as the DP=2 run.
    cfg = _cfg(tmp / "tp2dp2", tmp / "data", STEPS, checkpoint__save_interval=STEPS,
               parallel__tensor_parallel_size=2, parallel__sequence_parallel=True)  # fmt: skip
    out["tp2_seen"] = _recording_train(cfg)[1]
    return out


@pytest.fixture(scope="module")
def four(shared_tmp):
    return run_distributed(_dp4_checks, 4, str(shared_tmp), timeout=900)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_collectives_per_step_do_not_grow_with_dp(two, four):
    for kind in ("plain", "accum", "overlap"):
        for res in (*two, *four):
            assert res["counts"][kind]["accumulation"] == (2 if kind == "accum" else 1), kind
        for step in range(2):
            at2, at4 = two[0]["counts"][kind]["steps"][step], four[0]["counts"][kind]["steps"][step]
            assert at2 == at4, (kind, step, at2, at4)
            # Every rank issues the same calls (a mismatch would hang a real run).
            for res in (*two, *four):
                assert res["counts"][kind]["steps"][step] == at2, kind
            # The counter sees the features' all-gather, the CMR margin's all-reduce in the
            # forward and megatron's gradient reduction in the backward.
            assert at2["forward"]["all_gather_into_tensor"] >= 1, (kind, at2)
            assert at2["forward"]["all_reduce"] >= 1, (kind, at2)
            backward = at2["backward"]
            assert backward.get("all_reduce", 0) + backward.get("reduce_scatter_tensor", 0) >= 1
    # The ring gather sends W - 1 blocks forward: the count does tell when collectives grow.
    ring2, ring4 = (res[0]["counts"]["ring"]["steps"][1] for res in (two, four))
    assert ring4["forward"]["batch_isend_irecv"] > ring2["forward"]["batch_isend_irecv"]


def _assert_params_close(got: dict, want: dict, tag: str) -> None:
    assert set(got) == set(want), tag
    worst = max((got[n].float() - want[n].float()).abs().max().item() for n in want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=TOL, rtol=0, msg=f"{tag}: {name}")
    assert worst <= TOL


def _assert_same_batches(ranks_seen: list[list[dict]], reference: dict) -> None:
    for step, ref in enumerate(reference["seen"]):
        got = [seen[step] for seen in ranks_seen]
        assert [g["ids"] for g in got] == ref["ids"], step
        # The global batch shares one patch budget.
        assert len({g["budget"] for g in got}) == 1 and got[0]["budget"] == ref["budget"][0]
        assert not set(ref["ids"][0]) & set(ref["ids"][1])


@pytest.mark.slow
def test_dp2_and_tp2_sp_dp2_stage2_runs_equal_one_process(two, four, reference, shared_tmp):
    want = reference["params"]
    _assert_same_batches([r["dp2_seen"] for r in two], reference)
    _assert_params_close(_params(shared_tmp / "dp2", STEPS), want, "DP=2")
    # TP ranks (0, 1) and (2, 3) read the same micro-batch; DP ranks 0 and 2 read the slices.
    _assert_same_batches([four[0]["tp2_seen"], four[2]["tp2_seen"]], reference)
    assert four[0]["tp2_seen"] == four[1]["tp2_seen"]
    _assert_params_close(_params(shared_tmp / "tp2dp2", STEPS), want, "TP2+SP x DP2")
    # The margin: saved by both runs, the same as the reference's, not the starting 0.
    margins = [float(_train_state(shared_tmp / n, STEPS)["objective"]["cmr_margin"])
               for n in ("dp2", "tp2dp2")]  # fmt: skip
    assert margins == pytest.approx([reference["margin"]] * 2, abs=1e-6)
    assert [s["margin"] for s in two[0]["dp2_seen"][1:]] == pytest.approx(
        [s["margin"] for s in reference["seen"][1:]], abs=1e-6
    )
    assert any(s["margin"] for s in reference["seen"][1:]) or reference["margin"] > 0
    # The steps trained (the same seed built stage 1's initial weights): the comparison is not
    # between two untouched copies.
    init = two[0]["s1_init"]
    moved = [n for n in want if (want[n] - init[n]).abs().max() > 100 * TOL]
    assert len(moved) > 0.8 * len(want), sorted(set(want) - set(moved))


@pytest.mark.slow
def test_overlapped_ddp_with_zero1_runs_both_stages_and_fails_without_freezing(two):
    for res in two:
        assert len(res["s1_losses"]) == STEPS and len(res["full_losses"]) == 4
        for losses in (res["s1_losses"], res["full_losses"]):
            assert all(np.isfinite(v) for rec in losses for v in rec.values())
        # Stage 2 really ran its fine-grained terms.
        assert {"region", "tic", "fgt"} <= set(res["full_losses"][0])
    trainable = two[0]["s1_trainable"]
    assert not any(n.startswith(("vision.dense_head.", "boxtext_head.")) for n in trainable)
    message = two[0]["unfrozen"]
    assert message != "no error", "unfrozen stage-1 heads did not trip megatron's overlapped DDP"
    assert "per_param_grad_ready_counts" in message or "has not been issued" in message, message


@pytest.mark.slow
def test_stage2_resume_is_exact_and_an_old_checkpoint_starts_the_margin_at_zero(two, shared_tmp):
    for res in two:
        assert [s["step"] for s in res["cut_seen"]] == [3, 4]
        assert res["cut_seen"] == res["full_seen"][2:]  # ids, budget and the margin the step used
        assert res["cut_losses"] == res["full_losses"][2:]
        # The older-format checkpoint resumes with the margin at its starting zero.
        assert [s["step"] for s in res["old_seen"]] == [3, 4]
        assert res["old_seen"][0]["margin"] is None
        assert res["old_seen"][0]["ids"] == res["full_seen"][2]["ids"]
    margin_at_3 = two[0]["full_seen"][2]["margin"]
    assert margin_at_3 is not None and margin_at_3 > 0, margin_at_3  # a real saved value
    full, cut = shared_tmp / "full", shared_tmp / "cut"
    want, got = _params(full, 4), _params(cut, 4)
    assert set(want) == set(got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    a, b = _train_state(full, 4), _train_state(cut, 4)
    assert torch.equal(a["objective"]["cmr_margin"], b["objective"]["cmr_margin"])
    assert a["loader"] == b["loader"]  # the next batch is the same
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.slow
def test_stage1_keeps_its_frozen_heads_at_their_copies_and_stage2_trains_them(two, shared_tmp):
    init = two[0]["s1_init"]
    stage1 = _params(shared_tmp / "s1", STEPS)
    heads = [n for n in init if n.startswith(("vision.dense_head.", "boxtext_head."))]
    assert len(heads) > 5
    for name in heads:
        assert torch.equal(stage1[name], init[name]), name
    # Their initial values are the copies of the MAP head and the short-text head...
    for name in heads:
        source = name.replace("vision.dense_head.", "vision.head.").replace(
            "boxtext_head.", "text_head."
        )
        assert torch.equal(init[name], init[source]), name
    # ... which stage 1 trained away from them.
    assert not torch.equal(stage1["vision.head.fc1.weight"], init["vision.head.fc1.weight"])
    assert not torch.equal(stage1["text_head.weight"], init["text_head.weight"])
    stage2 = _params(shared_tmp / "full", 4)
    for name in heads:
        if name == "vision.dense_head.probe":  # never read: frozen in both stages
            assert torch.equal(stage2[name], init[name])
        else:
            assert not torch.equal(stage2[name], stage1[name]), name
