"""Gradient accumulation (train/accumulate.py): a step over k micro-batches of m samples is the
step over one micro-batch of k*m samples (loss, gradients, updated parameters), the contrastive
objective sees the whole batch (not a sum of per-micro-batch losses), and a resumed run with
accumulation continues exactly."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from tests.builders import build_run, tiny_run_config
from tests.builders import train_config as _cfg
from tests.distributed import run_distributed

TOL = 1e-5


def _accum_cfg(tmp: Path, name: str, micro: int, global_batch: int, steps: int = 4, **kw):
    cfg = _cfg(
        tmp / name,
        tmp / "data",
        steps,
        train__global_batch_size=global_batch,
        data__micro_batch_size=micro,
        data__loader="pil",
        train__eval_batches=0,
        train__stage="regional",
        **kw,
    )
    return cfg


def _grads_and_params(run, distributed: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter's reduced gradient and value; with the distributed optimizer only the
    values (each rank's gradient buffer then holds its reduced shard only)."""
    from fgclip_mega.parallel.wrap import sync_params

    sync_params(run.ddp)  # the overlapped parameter all-gather of the distributed optimizer
    return {
        n: (None if distributed else p.main_grad.detach().clone(), p.detach().clone())
        for n, p in run.model.named_parameters()
    }


def _step_pair(tmp: Path, world_size: int, overlap: bool, distributed: bool = False) -> dict:
    """Two runs from the same weights: micro 2 x 2 accumulation steps vs micro 4, two steps."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as Group

    from fgclip_mega.parallel import init_parallel
    from fgclip_mega.train.build import build_training_run
    from fgclip_mega.train.step import train_step

    # Every bucket group's reduction must start once per step, whatever the accumulation.
    started: list[int] = []
    real_start = Group.start_grad_sync

    def counting(self, *args, **kwargs):
        started.append(id(self))
        return real_start(self, *args, **kwargs)

    Group.start_grad_sync = counting
    out = {}
    for name, micro in (("accum", 2), ("single", 4)):
        cfg = _accum_cfg(tmp, f"{name}_{distributed}", micro, 4 * world_size,
                         parallel__overlap_grad_reduce=overlap,
                         parallel__use_distributed_optimizer=distributed)  # fmt: skip
        state = init_parallel(cfg, seed=cfg.train.seed, with_decode=False)
        cfg.validate(world_size=state.world_size)
        run = build_training_run(cfg, state)
        steps = []
        for step in (1, 2):
            batches = [next(run.loader) for _ in range(run.accumulation)]
            started.clear()
            res = train_step(run, batches if len(batches) > 1 else batches[0], step)
            steps.append(
                {
                    "reductions": (len(started), len(set(started)), len(run.ddp.bucket_groups)),
                    "ids": torch.cat([b.sample_ids for b in batches]).tolist(),
                    "values": dict(zip(res.names, res.values.tolist(), strict=True)),
                    "grad_norm": res.grad_norm,
                    "state": _grads_and_params(run, distributed),
                }
            )
        run.loader.close()
        out[name] = {"accumulation": run.accumulation, "steps": steps}
    Group.start_grad_sync = real_start
    return out


def _recording_train(cfg) -> list[tuple[int, list[int], float]]:
    """(step, sample ids of the step, loss) of every step this rank took."""
    import fgclip_mega.train.loop as loop

    seen = []
    real = loop.train_step

    def record(run, batch, step):
        batches = batch if isinstance(batch, list) else [batch]
        out = real(run, batch, step)
        loss = dict(zip(out.names, out.values.tolist(), strict=True))["loss"]
        seen.append((step, torch.cat([b.sample_ids for b in batches]).tolist(), loss))
        return out

    loop.train_step = record
    try:
        loop.train(cfg, keep_process_groups=True)
    finally:
        loop.train_step = real
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    return seen


def _dp2_checks(tmp: str) -> dict:
    tmp = Path(tmp)
    # (c) resume: 4 steps with a checkpoint at 2, then the run resumed from step 2.
    full = _recording_train(_accum_cfg(tmp, "full", 2, 8, checkpoint__save_interval=2))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.copytree(tmp / "full", tmp / "resumed")
        shutil.rmtree(tmp / "resumed" / "checkpoints" / "step_00000004")
    torch.distributed.barrier()
    resumed = _recording_train(_accum_cfg(tmp, "resumed", 2, 8))
    # (a) accumulation = one big micro-batch, with megatron's overlapped reduction.
    pair = _step_pair(tmp, 2, overlap=True)
    # ... and with the distributed optimizer, whose overlapped parameter all-gather runs in the
    # forward hooks that the cached forward and the re-forward both pass.
    zero1 = _step_pair(tmp, 2, overlap=True, distributed=True)
    return {"full": full, "resumed": resumed, "pair": pair, "zero1": zero1}


def _compare_pair(pair: dict) -> None:
    acc, one = pair["accum"], pair["single"]
    assert (acc["accumulation"], one["accumulation"]) == (2, 1)
    for a, b in zip(acc["steps"], one["steps"], strict=True):
        assert a["ids"] == b["ids"]  # the same samples in the same order
        calls, distinct, groups = a["reductions"]
        assert calls == distinct == groups >= 1, a["reductions"]  # each bucket reduced once
        assert b["reductions"] == a["reductions"]
        assert a["values"].keys() == b["values"].keys()
        for k, v in a["values"].items():
            assert v == pytest.approx(b["values"][k], abs=TOL, rel=TOL), k
        assert a["values"]["n_region"] > 0 and a["values"]["n_hard"] > 0  # stage 2 terms ran
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOL)
        for name, (grad, param) in a["state"].items():
            g, p = b["state"][name]
            if grad is not None:
                torch.testing.assert_close(grad, g, atol=TOL, rtol=TOL, msg=name)
            torch.testing.assert_close(param, p, atol=TOL, rtol=TOL, msg=name)
    # The steps changed the weights and the temperatures.
    before, after = one["steps"][0]["state"], one["steps"][1]["state"]
    assert (after["logit_scale_hardneg"][1] - before["logit_scale_hardneg"][1]).abs() > 0
    assert max((after[n][1] - before[n][1]).abs().max().item() for n in after) > 1e-4


@pytest.mark.slow
def test_dp2_accumulated_step_equals_one_big_micro_batch_and_resumes_exactly(tmp_path):
    results = run_distributed(_dp2_checks, 2, str(tmp_path), timeout=900)
    for res in results:
        _compare_pair(res["pair"])
        _compare_pair(res["zero1"])
        full, resumed = res["full"], res["resumed"]
        assert [s for s, _, _ in full] == [1, 2, 3, 4]
        assert [s for s, _, _ in resumed] == [3, 4]
        for (s, ids, loss), (s2, ids2, loss2) in zip(full[2:], resumed, strict=True):
            assert (s, ids) == (s2, ids2)
            assert loss == pytest.approx(loss2, abs=1e-6)
        # 2 micro-batches of 2 per step: 4 distinct samples per rank per step, 8 over DP.
        assert all(len(ids) == 4 for _, ids, _ in full)
    # The ranks read disjoint samples.
    for (_, a, _), (_, b, _) in zip(results[0]["full"], results[1]["full"], strict=True):
        assert not set(a) & set(b)


def test_objective_sees_the_whole_batch_once(world, tmp_path):
    """One objective call over all 8 samples of the step, whose loss is the one-micro-batch loss
    and not the mean of the two micro-batches' losses (which is measurably different)."""
    from fgclip_mega.data import build_config_loader
    from fgclip_mega.objective import encode_batch
    from fgclip_mega.train.step import train_step

    cfg = tiny_run_config(tmp_path, "regional")
    cfg.train.global_batch_size = 8  # micro 4 x DP 1 x 2
    run = build_run(world, cfg)
    assert run.accumulation == 2
    batches = [next(run.loader) for _ in range(2)]
    big_cfg = tiny_run_config(tmp_path, "regional")
    big_cfg.data.micro_batch_size = 8
    with build_config_loader(big_cfg, 0, 1, "cpu") as loader:
        big = next(loader)
    assert big.sample_ids.tolist() == torch.cat([b.sample_ids for b in batches]).tolist()

    temps = run.model.temperatures()
    with torch.no_grad():
        whole = run.objective(encode_batch(run.model, big, True), temps).parts["loss"].item()
        halves = [
            run.objective(encode_batch(run.model, b, True), temps).parts["loss"].item()
            for b in batches
        ]
    calls = []
    real = run.objective

    def recording(emb, temperatures):
        calls.append((emb.image.shape[0], emb.region.shape[0]))
        return real(emb, temperatures)

    run.objective = recording
    out = train_step(run, batches, 1)
    loss = dict(zip(out.names, out.values.tolist(), strict=True))["loss"]
    assert calls == [(8, big.region_rois.shape[0])]
    assert loss == pytest.approx(whole, abs=1e-5)
    mean_of_halves = sum(halves) / 2
    assert abs(whole - mean_of_halves) > 1e-2, (whole, halves)
    assert abs(loss - mean_of_halves) > 1e-2
    run.loader.close()


def test_reforward_replays_the_random_draws_of_the_cached_forward(world, tmp_path):
    """A forward that draws random numbers (as dropout would) gets the gradient of one forward
    over both micro-batches with the same draws: the re-forward restores each micro-batch's RNG
    state, and the generator ends where that forward leaves it."""
    import fgclip_mega.train.accumulate as accumulate
    from fgclip_mega.objective import encode_batch

    def noisy_encode(model, batch, regional):
        emb = encode_batch(model, batch, regional)
        # Multiplicative noise: the gradient w.r.t. the weights depends on the draw.
        emb.image = emb.image * (1 + 0.5 * torch.randn_like(emb.image))
        return emb

    cfg = tiny_run_config(tmp_path, "regional")
    cfg.train.global_batch_size = 8
    run = build_run(world, cfg)
    run.family = dataclasses.replace(run.family, encode=noisy_encode)
    batches = [next(run.loader) for _ in range(2)]
    params = dict(run.model.named_parameters())

    def grads():
        return {n: p.main_grad.clone() for n, p in params.items()}

    start = torch.get_rng_state()
    run.ddp.zero_grad_buffer()
    parts = [noisy_encode(run.model, b, True) for b in batches]
    emb = accumulate.concat_embeddings(parts)
    run.objective(emb, run.model.temperatures()).total.backward()
    reference, reference_end = grads(), torch.get_rng_state()

    torch.set_rng_state(start)
    run.ddp.zero_grad_buffer()
    accumulate.accumulated_backward(run, batches, upcast=False)
    got = grads()
    assert torch.equal(torch.get_rng_state(), reference_end)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, atol=TOL, rtol=TOL, msg=name)
    assert reference["vision.patch_embed.weight"].abs().max() > 0
    run.loader.close()


def test_trainer_sizes_an_auto_micro_batch_from_the_estimate(world, tmp_path):
    """data.micro_batch_size=0: the run's micro-batch is the largest divisor of the rank's share
    whose estimate fits train.device_memory_gb; the loader and the accumulation follow it."""
    from fgclip_mega.profiling.memory import memory_estimate

    cfg = tiny_run_config(tmp_path, "regional")
    cfg.train.global_batch_size = 8
    cfg.data.micro_batch_size = 0
    fits_4 = memory_estimate(cfg, micro_batch_size=4, accumulation=2, stage="regional").total
    fits_8 = memory_estimate(cfg, micro_batch_size=8, accumulation=1, stage="regional").total
    assert fits_4 < fits_8
    cfg.train.device_memory_gb = (fits_4 + fits_8) / 2 / 1e9
    run = build_run(world, cfg)
    assert (run.cfg.data.micro_batch_size, run.accumulation) == (4, 2)
    assert cfg.data.micro_batch_size == 0  # the caller's config is left as it was
    assert len(next(run.loader)) == 4
    run.loader.close()
