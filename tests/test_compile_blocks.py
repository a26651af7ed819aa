"""`parallel.compile_blocks` (issue 21, Fusion): each transformer block compiled by torch.compile.

One test, one process (the first compile of a block costs tens of seconds on these CPUs): a
compiled run (with block activation checkpointing) takes the same stage-2 steps as an eager run
on the same batches; losses and parameters must agree to fp32 rounding, and once every text
length has been seen, steps with other texts, other box counts (so other text-batch sizes) and
the same lengths must not compile anything again.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fgclip_mega.config import ConfigError
from tests.builders import build_run, tiny_run_config


def _at_length(batch, long_len: int, short_len: int):
    """The batch with its texts padded with zeros (after every EOT) to the given lengths."""

    def pad(t, n):
        return F.pad(t, (0, n - t.shape[-1]))

    return dataclasses.replace(
        batch,
        long_tokens=pad(batch.long_tokens, long_len),
        short_tokens=pad(batch.short_tokens, short_len),
        region_tokens=pad(batch.region_tokens, short_len),
        hardneg_tokens=pad(batch.hardneg_tokens, short_len),
    )


def _fewer_boxes(batch):
    """The batch with its last box dropped: a different text-batch size (B + R + H(1+K))."""
    rois, keep = batch.region_rois, batch.region_rois.shape[0] - 1
    counts = batch.box_counts.clone()
    counts[int(rois[keep, 0])] -= 1
    hard = batch.hard_rows < keep
    return dataclasses.replace(
        batch,
        box_counts=counts,
        region_rois=rois[:keep],
        region_tokens=batch.region_tokens[:keep],
        hard_rows=batch.hard_rows[hard],
        hardneg_tokens=batch.hardneg_tokens[hard],
    )


def test_compile_blocks_needs_coarse_text_lengths(tmp_path):
    cfg = tiny_run_config(tmp_path, "regional")
    cfg.parallel.compile_blocks = True
    with pytest.raises(ConfigError, match="data.text_length_multiple"):
        cfg.validate()
    cfg.data.text_length_multiple = 32
    cfg.validate()


@pytest.mark.slow
def test_compiled_blocks_step_like_eager_and_never_recompile(world, tmp_path):
    from torch._dynamo.utils import counters

    from fgclip_mega.models.layers import Block
    from fgclip_mega.train.step import train_step

    runs = {}
    for compiled in (False, True):
        cfg = tiny_run_config(tmp_path, "regional")
        cfg.data.text_length_multiple = 32
        cfg.parallel.compile_blocks = compiled
        cfg.parallel.activation_checkpointing = compiled  # recomputing a compiled block
        runs[compiled] = build_run(world, cfg.validate())
    eager, comp = runs[False], runs[True]
    try:
        batches = [next(eager.loader) for _ in range(2)]
    finally:
        for run in runs.values():
            run.loader.close()
    blocks = [m for m in comp.model.modules() if isinstance(m, Block)]
    assert len(blocks) == 2 and all("forward" in vars(b) for b in blocks)  # the compiled one

    # Warm-up sees both long lengths (64, 96) and both short ones (32, 64); then other texts,
    # fewer boxes, other lengths' combinations: nothing may compile again.
    b0, b1 = batches
    warmup = [_at_length(b0, 64, 32), _at_length(b1, 96, 64)]
    after = [_at_length(b1, 64, 32), _fewer_boxes(_at_length(b0, 96, 64)), _at_length(b0, 96, 32)]
    losses = {False: [], True: []}
    for step, batch in enumerate(warmup, 1):
        for compiled, run in runs.items():
            losses[compiled].append(train_step(run, batch, step).values)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per block
    with torch.compiler.set_stance("fail_on_recompile"):
        for step, batch in enumerate(after, len(warmup) + 1):
            for compiled, run in runs.items():
                losses[compiled].append(train_step(run, batch, step).values)
    assert counters["stats"]["unique_graphs"] == graphs

    for a, b in zip(losses[False], losses[True], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    eager_params = dict(eager.model.named_parameters())
    for name, p in comp.model.named_parameters():
        torch.testing.assert_close(p, eager_params[name], rtol=1e-5, atol=1e-6, msg=name)


def _tp2_compiled_vs_eager(sp: bool) -> dict:
    """TP=2 (with or without SP): one forward/backward of both towers, compiled vs eager."""
    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.parallel import cpu_compat, init_parallel
    from fgclip_mega.parallel.wrap import compile_blocks
    from fgclip_mega.presets import tiny

    pc = ParallelConfig(tensor_parallel_size=2, sequence_parallel=sp)
    init_parallel(pc, seed=0)
    cfg = tiny()
    cfg.model.vision.layers = cfg.model.text.layers = 1
    cfg.data.text_length_multiple = 32
    cfg.parallel = pc
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = FGCLIPModel(cfg.model, pc)
        for tower in (model.vision, model.text):
            cpu_compat.run_forward_without_mode(tower)
        if compiled:
            compile_blocks(model, cfg)
        outs = []
        for b in (5, 7):  # two text-batch sizes: the second must reuse the first's graphs
            g = torch.Generator().manual_seed(b)
            tokens = torch.randint(1, 1000, (b, 32), generator=g)
            tokens[:, -1] = cfg.model.text.eos_token_id
            image, dense = model.encode_image(torch.randn(2, 3, 64, 64, generator=g), True)
            text = model.encode_text(tokens)
            (image.sum() + dense.square().sum() + text.sum()).backward()
            outs += [image.detach(), dense.detach(), text.detach()]
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append((outs, grads))
    (eager_outs, eager_grads), (comp_outs, comp_grads) = runs
    return {
        "out": max((a - b).abs().max().item() for a, b in zip(eager_outs, comp_outs, strict=True)),
        "grad": max(
            ((eager_grads[n] - comp_grads[n]).abs().max() / eager_grads[n].abs().max()).item()
            for n in eager_grads
        ),
        "same_params": sorted(eager_grads) == sorted(comp_grads),
    }


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_compiled_blocks_at_tp2_equal_eager(sp):
    """megatron's TP layers under torch.compile: equal to eager. (Their backward collectives
    use async_op=True, which Dynamo cannot trace: each block is then several graphs.)"""
    from tests.distributed import run_distributed

    for r in run_distributed(_tp2_compiled_vs_eager, 2, sp):
        assert r["same_params"]
        assert r["out"] < 1e-5 and r["grad"] < 1e-5, r
