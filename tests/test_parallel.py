"""Process groups and megatron-core tensor-parallel layers on gloo, against one process."""

import pytest
import torch

from fgclip_mega.config import ParallelConfig
from tests.distributed import run_distributed


def _groups_and_linear_pair(tp_size: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from fgclip_mega.parallel import init_parallel

    state = init_parallel(ParallelConfig(tensor_parallel_size=tp_size), seed=7)
    world = state.world_size
    tp_members = dist.get_process_group_ranks(state.tp_group)
    dp_members = dist.get_process_group_ranks(state.dp_group)

    # Unsharded reference, identical on every rank (same seed, built before any sharding).
    torch.manual_seed(0)
    d_in, d_hidden, d_out, n = 12, 16, 10, 5
    ref1, ref2 = torch.nn.Linear(d_in, d_hidden), torch.nn.Linear(d_hidden, d_out)
    x = torch.randn(n, d_in)

    cfg = ModelParallelConfig(
        tensor_model_parallel_size=tp_size, use_cpu_initialization=True, params_dtype=torch.float32
    )
    init = torch.nn.init.zeros_
    col = ColumnParallelLinear(
        d_in, d_hidden, config=cfg, init_method=init, bias=True, gather_output=False
    )
    row = RowParallelLinear(
        d_hidden,
        d_out,
        config=cfg,
        init_method=init,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
    )
    r, s = state.tp_rank, d_hidden // tp_size
    with torch.no_grad():
        col.weight.copy_(ref1.weight[r * s : (r + 1) * s])
        col.bias.copy_(ref1.bias[r * s : (r + 1) * s])
        row.weight.copy_(ref2.weight[:, r * s : (r + 1) * s])
        row.bias.copy_(ref2.bias)

    xs = x.clone().requires_grad_(True)
    h, _ = col(xs)
    y, _ = row(torch.nn.functional.gelu(h))
    y.square().sum().backward()

    xr = x.clone().requires_grad_(True)
    yr = ref2(torch.nn.functional.gelu(ref1(xr)))
    yr.square().sum().backward()

    return {
        "rank": state.rank,
        "tp_rank": state.tp_rank,
        "dp_rank": state.dp_rank,
        "tp_size": state.tp_size,
        "dp_size": state.dp_size,
        "tp_members": tp_members,
        "dp_members": dp_members,
        "ps_tp": ps.get_tensor_model_parallel_world_size(),
        "world": world,
        "out_err": (y - yr).abs().max().item(),
        "x_grad_err": (xs.grad - xr.grad).abs().max().item(),
        "w1_grad_err": (col.weight.grad - ref1.weight.grad[r * s : (r + 1) * s]).abs().max().item(),
        "b1_grad_err": (col.bias.grad - ref1.bias.grad[r * s : (r + 1) * s]).abs().max().item(),
        "w2_grad_err": (row.weight.grad - ref2.weight.grad[:, r * s : (r + 1) * s])
        .abs()
        .max()
        .item(),
        "b2_grad_err": (row.bias.grad - ref2.bias.grad).abs().max().item(),
    }


def _check_linear_pair(results: list[dict]) -> None:
    for res in results:
        for key in (
            "out_err",
            "x_grad_err",
            "w1_grad_err",
            "b1_grad_err",
            "w2_grad_err",
            "b2_grad_err",
        ):
            assert res[key] < 1e-5, (res["rank"], key, res[key])


def test_tp2_dp2_groups_and_linear_pair_world4():
    results = run_distributed(_groups_and_linear_pair, 4, 2)
    for res in results:
        rank = res["rank"]
        assert (res["tp_size"], res["dp_size"], res["ps_tp"]) == (2, 2, 2)
        # megatron's default order puts TP innermost: TP groups are consecutive ranks.
        assert res["tp_members"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert res["dp_members"] == [rank % 2, rank % 2 + 2]
        assert res["tp_rank"] == rank % 2 and res["dp_rank"] == rank // 2
    _check_linear_pair(results)


@pytest.mark.slow
def test_tp4_groups_and_linear_pair_world4():
    results = run_distributed(_groups_and_linear_pair, 4, 4)
    for res in results:
        assert (res["tp_size"], res["dp_size"]) == (4, 1)
        assert res["tp_members"] == [0, 1, 2, 3] and res["dp_members"] == [res["rank"]]
        assert res["tp_rank"] == res["rank"]
    _check_linear_pair(results)


def test_tp2_linear_pair_world2():
    results = run_distributed(_groups_and_linear_pair, 2, 2)
    assert [r["tp_rank"] for r in results] == [0, 1]
    assert all(r["dp_size"] == 1 for r in results)
    _check_linear_pair(results)


def _failing(rank_to_fail: int) -> None:
    import os

    from fgclip_mega.parallel import init_parallel

    init_parallel(ParallelConfig())
    if int(os.environ["RANK"]) == rank_to_fail:
        raise ValueError("planted failure")
    import torch.distributed as dist

    dist.barrier()  # the healthy rank waits here forever; the harness must not


def test_harness_reports_rank_traceback_and_does_not_hang():
    with pytest.raises(AssertionError, match=r"rank\(s\) \[1\][\s\S]*planted failure"):
        run_distributed(_failing, 2, 1, timeout=120)
