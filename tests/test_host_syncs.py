"""Host-sync budget of a training step (issues 14, 21): at most 1 per step of either stage, at
DP=1 and DP=2.

A host sync makes the CPU wait for the GPU (a scalar read, a copy to the host, an op whose output
shape depends on values, a copy from pageable host memory to the device). `HostSyncCounter`
(fgclip_mega/profiling/host_syncs.py) counts them on CPU as the calls that would be syncs on a
GPU: reads of CPU tensors that live on the host on a GPU too (torch Adam's step counters) and
checks that run only for CPU tensors are exempt, each listed by name. megatron's optimizer
reads the gradient norm once (a float, which the trainer's NaN check uses): that is the one sync
a step has today. Log reads happen at the log interval, outside the step.

Also here: CUDA_DEVICE_MAX_CONNECTIONS=1 under TP, set before CUDA initialises.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from fgclip_mega.profiling import host_syncs as bench
from tests.builders import build_run, tiny_fgclip2_run_config, tiny_run_config
from tests.distributed import run_distributed

BUDGET = {"global": 1, "regional": 1}


def _count(run, batch, step: int):
    from fgclip_mega.train.step import train_step

    return bench.count_step_syncs(lambda: train_step(run, batch, step), run.optimizer)


def _describe(counter) -> str:
    return "; ".join(f"{op} at {site}" for op, site in counter.events)


# ----------------------------------------------------------------------------- the counter


def test_counter_counts_each_kind_of_sync():
    x = torch.arange(6.0)
    mask = x > 2
    reps = torch.tensor([1, 2])  # made before counting: a device tensor (one made inside is host)
    cases = {
        "item": lambda: x[0].item(),
        "bool": lambda: bool(x[1] > 0),
        "float": lambda: float(x.sum()),
        "tolist": lambda: x.tolist(),
        "numpy": lambda: x.numpy(),
        "cpu": lambda: x.cpu(),
        "to('cpu')": lambda: x.to("cpu"),
        "equal": lambda: torch.equal(x, x),
        "nonzero": lambda: mask.nonzero(),
        "bool index": lambda: x[mask],
        "bool index assignment": lambda: x.clone().__setitem__(mask, 0.0),
        "masked_select": lambda: x.masked_select(mask),
        "unique": lambda: torch.unique(x),
        "repeat_interleave": lambda: torch.repeat_interleave(reps),
    }
    for name, fn in cases.items():
        with bench.HostSyncCounter() as counter:
            fn()
        assert counter.count >= 1, name
    free = {
        "arithmetic": lambda: (x * 2 + 1).sum(),
        "integer index": lambda: x[torch.tensor([0, 2])],
        "where": lambda: torch.where(mask, x, 0.0),
        "repeat_interleave with output_size": lambda: torch.repeat_interleave(reps, output_size=3),
        "assert_async": lambda: torch._assert_async(x[1] > 0),
    }
    for name, fn in free.items():
        with bench.HostSyncCounter() as counter:
            fn()
        assert counter.count == 0, (name, counter.events)


def test_counter_counts_each_kind_of_host_to_device_copy():
    from fgclip_mega.parallel.cpu_compat import CudaAsCpuMode

    # On the CPU the CPU stands in for the GPU: `dev` is a device tensor (made before counting),
    # `host` a tensor declared to live on the host (e.g. one the loader made).
    dev, host = torch.arange(4.0), torch.ones(3)
    d = dev.device
    copies = {
        "tensor(list, device=)": lambda: torch.tensor([1, 2], device=d),
        "tensor(shape, device=)": lambda: torch.tensor(dev.shape, device=d),
        "as_tensor(int, device=)": lambda: torch.as_tensor(3, dtype=torch.float32, device=d),
        "asarray(list, device=)": lambda: torch.asarray([1.0], device=d),
        "as_tensor(host tensor, device=)": lambda: torch.as_tensor(host, device=d),
        "new_tensor of a device tensor": lambda: dev.new_tensor([1.0, 2.0]),
        "to(device) of a declared host tensor": lambda: host.to(d),
        "to(device) of a host tensor made here": lambda: torch.tensor([1.0]).to(d),
        "to(device) of a host result": lambda: (torch.tensor([1, 2]) * 2).to(d, torch.float32),
        "to(other tensor)": lambda: host.to(dev),
        "to(device=, non_blocking) of pageable memory": lambda: host.to(
            device=d, non_blocking=True
        ),
        "copy_ into a device tensor": lambda: dev.clone()[:3].copy_(host),
        "cuda()": lambda: host.cuda(),
        "tensor(list, device='cuda')": lambda: torch.tensor([1.0], device="cuda"),
    }
    for name, fn in copies.items():
        with CudaAsCpuMode(), bench.HostSyncCounter(host_tensors=[host]) as counter:
            fn()
        assert counter.count == 1, (name, counter.events)
        assert counter.events[0][0].startswith("host->device"), (name, counter.events)
    free = {
        "full(number, device=)": lambda: torch.full((), 3.0, device=d),
        "zeros/arange on the device": lambda: torch.zeros(2, device=d) + torch.arange(2, device=d),
        "fill_ with a number": lambda: dev.clone().select(0, 1).fill_(5),
        "host creation without device": lambda: torch.tensor([1, 2]) * 2,
        "dtype cast of a host tensor": lambda: host.to(torch.float64),
        "device tensor to its device": lambda: dev.to(d),
        "as_tensor(device tensor, device=)": lambda: torch.as_tensor(dev, device=d),
        "new_zeros": lambda: dev.new_zeros(2),
        "copy_ between device tensors": lambda: dev.clone().copy_(dev),
        "copy_ between host tensors": lambda: torch.empty(3).copy_(host),
        "tensor(number, device='cpu') (torch Adam's step)": lambda: torch.tensor(1.0, device="cpu"),
    }
    for name, fn in free.items():
        with bench.HostSyncCounter(host_tensors=[host]) as counter:
            fn()
        assert counter.count == 0, (name, counter.events)
    # On a GPU (imitated: CUDA placements run on the CPU) a host tensor is any CPU tensor and
    # only the accelerator is a copy target.
    with CudaAsCpuMode(), bench.HostSyncCounter(device="cuda") as counter:
        torch.tensor([1.0], device="cpu")  # stays on the host
        torch.ones(2).to("cuda")  # counted
        torch.tensor([1.0], device="cuda")  # counted
    assert [op for op, _ in counter.events] == [
        "host->device Tensor.to(device) of a host tensor",
        "host->device tensor(host data, device=...)",
    ]


def _cpu_only_read(t: torch.Tensor) -> float:
    return t.item()


def test_counter_exemptions_are_exact():
    host, device = torch.tensor(3.0), torch.tensor(4.0)
    cpu_only = (("tests/test_host_syncs.py", "_cpu_only_read"),)
    with bench.HostSyncCounter(host_tensors=[host], cpu_only=cpu_only) as counter:
        host.item()  # exempt: a host tensor
        _cpu_only_read(device)  # exempt: inside a CPU-only function
        device.item()  # counted
    assert counter.count == 1 and len(counter.exempt) == 2
    assert "test_counter_exemptions_are_exact" in counter.events[0][1]


# ----------------------------------------------------------------------------- the budget


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syncs")
    built = {}
    for stage in BUDGET:
        run = build_run(world, tiny_run_config(tmp, stage))
        try:
            batch = next(run.loader).to(world.device)
        finally:
            run.loader.close()
        from fgclip_mega.train.step import train_step

        train_step(run, batch, 1)  # the optimizer state (Adam's step counters) exists after it
        built[stage] = (run, batch)
    return built


@pytest.mark.parametrize("stage", list(BUDGET))
def test_train_step_stays_within_its_host_sync_budget(runs, stage):
    run, batch = runs[stage]
    counter = _count(run, batch, 2)
    assert counter.count <= BUDGET[stage], _describe(counter)
    # Today exactly one: megatron's gradient-norm read (clip_grads), which the NaN check reuses.
    assert [site.split(":")[0] for _, site in counter.events] == [
        "megatron/core/optimizer/clip_grads.py"
    ], _describe(counter)
    # The exemptions apply where they say: Adam's host counters and the CPU-only checks.
    exempt = {why.split(" at ")[0] for _, why in counter.exempt}
    assert "host tensor" in exempt
    assert any(why.endswith("_check_token_ids") for _, why in counter.exempt)


def test_fgclip2_train_step_stays_within_the_same_budget(world, tmp_path):
    """FG-CLIP 2's step (NaFlex batch: host-int grids, RoIAlign on each image's own grid, the
    CMR margin kept on the device) has the same single sync as v1's."""
    for stage in BUDGET:
        run = build_run(world, tiny_fgclip2_run_config(tmp_path, stage))
        try:
            batch = next(run.loader).to(world.device)
        finally:
            run.loader.close()
        from fgclip_mega.train.step import train_step

        train_step(run, batch, 1)
        counter = _count(run, batch, 2)
        assert [site.split(":")[0] for _, site in counter.events] == [
            "megatron/core/optimizer/clip_grads.py"
        ], (stage, _describe(counter))


@pytest.mark.parametrize("stage", list(BUDGET))
@pytest.mark.parametrize("kind", ["item", "host->device"])
def test_budget_catches_a_sync_added_to_the_step(runs, stage, kind, monkeypatch):
    run, batch = runs[stage]
    original = run.family.encode

    def with_sync(model, b, regional):
        emb = original(model, b, regional)
        if kind == "item":
            emb.image.sum().item()  # what a careless debug print adds
        else:  # a constant made on the device: a copy from pageable host memory
            emb.image * torch.tensor([0.5], device=emb.image.device)
        return emb

    monkeypatch.setattr(run, "family", dataclasses.replace(run.family, encode=with_sync))
    counter = _count(run, batch, 3)
    assert counter.count == 2, _describe(counter)
    (added,) = [op for op, site in counter.events if "with_sync" in site]
    assert added.startswith("host->device") == (kind == "host->device"), added


def _dp2_syncs(tmp: str) -> dict[str, list[tuple[str, str]]]:
    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.parallel import init_parallel
    from fgclip_mega.train.step import train_step

    world = init_parallel(ParallelConfig(), seed=0)
    assert world.dp_size == 2
    out = {}
    for stage in BUDGET:
        run = build_run(world, tiny_run_config(Path(tmp), stage))
        try:
            batch = next(run.loader).to(world.device)
        finally:
            run.loader.close()
        train_step(run, batch, 1)
        out[stage] = _count(run, batch, 2).events
    return out


@pytest.mark.slow  # two spawned ranks building both stages: ~60 s on the shared CPU
def test_host_sync_budget_at_dp2(tmp_path):
    for rank_events in run_distributed(_dp2_syncs, 2, str(tmp_path)):
        over = {s: ev for s, ev in rank_events.items() if len(ev) > BUDGET[s]}
        assert not over, {
            s: f"{len(ev)}: " + "; ".join(map(" at ".join, ev)) for s, ev in over.items()
        }


# ----------------------------------------------------------------------------- TP on GPUs


def test_tensor_parallel_sets_cuda_device_max_connections_before_cuda(monkeypatch):
    import torch.distributed as dist

    from fgclip_mega.parallel import bootstrap

    seen = {}
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: None)
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: seen.setdefault("env", os.environ.get(
            "CUDA_DEVICE_MAX_CONNECTIONS"))
    )  # fmt: skip
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    bootstrap.init_distributed("nccl", tensor_parallel_size=2)
    assert seen["env"] == "1"  # already set when CUDA is first touched

    seen.clear()
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    bootstrap.init_distributed("nccl", tensor_parallel_size=1)
    assert seen["env"] is None  # without TP, CUDA keeps its default queues


def test_pool_rois_makes_no_host_to_device_copy():
    from kernels.roi_align import pool_rois

    tokens = torch.randn(2, 16, 8, requires_grad=True)  # (B, h*w, C) on "the device"
    rois = torch.tensor([[0, 0.1, 0.1, 0.6, 0.5], [1, 0.0, 0.3, 1.0, 1.0]])  # device rois
    # The value checks of CPU rois are exempt as in a step: on a GPU they run on host rois only.
    with bench.HostSyncCounter(cpu_only=bench.CPU_ONLY_CHECKS) as counter:
        out = pool_rois(tokens, rois, grid_size=(4, 4))
    assert counter.count == 0, _describe(counter)
    # The scaling by the grid (x by w, y by h) is the one torchvision's roi_align expects.
    from torchvision.ops import roi_align

    fmap = tokens.detach().transpose(1, 2).reshape(2, 8, 4, 4)
    scaled = rois * torch.tensor([1.0, 4, 4, 4, 4])
    ref = roi_align(fmap, scaled, (1, 1), 1.0, -1, aligned=True)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-6, atol=1e-6)
