"""One training step of ours vs the same step written as plain single-process PyTorch.

Prints one JSON object per line, per (preset, stage, micro-batch, TP): `samples_per_s`, `tflops`
(model FLOPs of the step, `profiling.training_flops`, at the batch's real token lengths and box
counts, over the median step time), `mfu` (against `profiling.device_peak_flops`: the GPU
datasheet peak, or the measured fp32 matmul rate on CPU), `peak_mem_mb`, `host_syncs_per_step`
and `overhead_vs_plain` = median time of our step / median time of the plain step.
With `--compile` (the default) the same step also runs with `parallel.compile_blocks` (every
transformer block torch.compile'd): `compiled_step_ms`, `compiled_vs_eager` = its median time /
our eager step's, measured interleaved in the same rounds, and `compile_warmup_s`, the warm-up
steps' time (first compiles included). All three steps then take batches whose texts are cut to
multiples of 32 (`data.text_length_multiple`, which compiling needs), so the ratio is the
compiler's alone.

Ours: `fgclip_mega.train.step.train_step` on a `TrainingRun` (megatron TP layers + DDP +
optimizer, the Objective, gradient clipping, LR schedule, temperature clamp).
Plain: transformers `CLIPModel` (SDPA attention) with FG-CLIP's extras written out so that the
FLOPs are the same: the text tower's position table has `long_context` (248) rows and serves
both the short and the long captions (ours has a 77-row table and the two long tables; lookups
are no FLOPs), a second bias-free text projection for the long captions, and in stage 2 the
dense features (the last block's value path on every token), torchvision RoIAlign, the region
and hard-negative phrases through the text tower in the same one call, and the losses written
with `F.cross_entropy` on the full logits; `torch.optim.AdamW` (default settings), gradient
clipping with `clip_grad_norm_`, the temperature clamp. Both count their forward + backward
FLOPs with `FlopCounterMode` once (`gflop_ours`, `gflop_plain`): they must agree.

Both take the same pre-built batches from memory (data loading is excluded) and run
interleaved, ours then plain, `--rounds` times after `--warmup` steps each; times are medians.
On CUDA each step is synchronised at its end (a benchmark, not the trainer). `peak_mem_mb`: on
CUDA the allocator peak of one step of ours (`peak_mem_mb_plain`: of the plain step); on CPU the
process's resident-set high-water mark (ru_maxrss, both steps), an upper bound.
`host_syncs_per_step`: device-to-host reads in one step of ours, counted by `HostSyncCounter`
(on CPU: the calls that would be syncs on a GPU; see tests/test_host_syncs.py).

  python run/bench_step.py                                  # tiny, both stages, CPU
  python run/bench_step.py --preset fgclip_vit_b16 --stage global     # the GPU check
  python run/bench_step.py --micro-batch 8 16 --rounds 100 --plot     # run/out/bench_step.png
  torchrun --nproc-per-node 2 run/bench_step.py --tp 2      # TP = world size (rank 0 prints)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fgclip_mega.profiling.host_syncs import (  # noqa: E402
    count_step_syncs,
)

# ----------------------------------------------------------------------------- plain step


class PlainFGCLIP(torch.nn.Module):
    """transformers CLIPModel plus FG-CLIP's extras, written the way a plain script would."""

    def __init__(self, cfg):
        from transformers import CLIPModel

        from fgclip_mega.checkpoint import clip_config

        super().__init__()
        t = cfg.text
        # One 248-row table for short and long captions: same FLOPs as ours (see the top).
        long_text = dataclasses.replace(t, short_context=t.long_context)
        long_cfg = dataclasses.replace(cfg, text=long_text)
        self.clip = CLIPModel(clip_config(long_cfg, attn_implementation="sdpa"))
        self.text_filip_projection = torch.nn.Linear(t.width, cfg.projection_dim, bias=False)
        scale = float(cfg.logit_scale_init)
        self.logit_scale_finegraind = torch.nn.Parameter(torch.tensor(scale))
        self.logit_scale_hardneg = torch.nn.Parameter(torch.tensor(scale))
        self.grid = cfg.vision.image_size // cfg.vision.patch_size

    def temperatures(self) -> list[torch.nn.Parameter]:
        return [self.clip.logit_scale, self.logit_scale_finegraind, self.logit_scale_hardneg]

    def encode_text(self, tokens: torch.Tensor, long: bool = False) -> torch.Tensor:
        pooled = self.clip.text_model(input_ids=tokens).pooler_output  # (B, D)
        proj = self.text_filip_projection if long else self.clip.text_projection
        return proj(pooled)  # (B, P)

    def encode_image(self, images: torch.Tensor, with_dense: bool = False):
        if not with_dense:
            return self.clip.get_image_features(pixel_values=images).pooler_output  # (B, P)
        vm = self.clip.vision_model
        x = vm.pre_layrnorm(vm.embeddings(images))  # (B, N, D)
        for layer in vm.encoder.layers[:-1]:
            x = _tensor(layer(x, None))
        last = vm.encoder.layers[-1]
        pooled = vm.post_layernorm(_tensor(last(x, None))[:, 0])  # (B, D)
        # FG-CLIP's dense features: the last block with attention replaced by its value path.
        y = x + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
        y = y + last.mlp(last.layer_norm2(y))
        dense = self.clip.visual_projection(vm.post_layernorm(y[:, 1:]))  # (B, g*g, P)
        b, g = images.shape[0], self.grid
        return self.clip.visual_projection(pooled), dense.transpose(1, 2).reshape(b, -1, g, g)


def _tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    logits = scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def plain_loss(model: PlainFGCLIP, batch, regional: bool, loss_cfg) -> torch.Tensor:
    import torch.nn.functional as F
    from torchvision.ops import roi_align

    cap = loss_cfg.max_logit_scale
    scale, scale_fg, scale_hn = (t.clamp(max=cap).exp() for t in model.temperatures())
    long_text = model.encode_text(batch.long_tokens, long=True)
    if not regional:
        image = model.encode_image(batch.images)
        short_text = model.encode_text(batch.short_tokens)
        return _clip_loss(image, long_text, scale) + _clip_loss(image, short_text, scale)
    image, dense = model.encode_image(batch.images, with_dense=True)  # (B, P), (B, P, g, g)
    b, r = batch.short_tokens.shape[0], batch.region_tokens.shape[0]
    h, k1, length = batch.hardneg_tokens.shape
    texts = torch.cat(
        [batch.short_tokens, batch.region_tokens, batch.hardneg_tokens.reshape(h * k1, length)]
    )
    short_text, region_text, hard_text = model.encode_text(texts).split([b, r, h * k1])
    g = model.grid
    boxes = batch.region_rois * torch.tensor([1.0, g, g, g, g], device=dense.device)
    region = roi_align(dense.float(), boxes, 1, 1.0, -1, aligned=True).flatten(1)  # (R, P)
    hard_region = F.normalize(region.index_select(0, batch.hard_rows), dim=-1)  # (H, P)
    cand = F.normalize(hard_text.float().reshape(h, k1, -1), dim=-1)  # (H, 1+K, P)
    hard_logits = scale_hn * torch.einsum("hd,hnd->hn", hard_region, cand)
    hard = F.cross_entropy(hard_logits, torch.zeros(h, dtype=torch.long, device=image.device))
    total = _clip_loss(image, long_text, scale) + _clip_loss(image, short_text, scale)
    return total + 0.1 * _clip_loss(region, region_text, scale_fg) + 0.5 * hard


def build_plain(cfg, runtime):
    torch.manual_seed(cfg.train.seed)
    model = PlainFGCLIP(cfg.model).to(runtime.device, runtime.params_dtype)
    for t in model.temperatures():
        t.data = t.data.float()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay}]
    opt = torch.optim.AdamW(
        groups,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=0.0,  # the no_decay group's
    )
    return model, opt


def plain_step(model: PlainFGCLIP, opt, batch, cfg, runtime) -> None:
    opt.zero_grad(set_to_none=True)
    with runtime.autocast():
        loss = plain_loss(model, batch, cfg.train.stage == "regional", cfg.loss)
    loss.backward()
    if cfg.optim.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    opt.step()
    with torch.no_grad():
        for t in model.temperatures():
            t.clamp_(0.0, cfg.loss.max_logit_scale)


# ----------------------------------------------------------------------------- measurement


def _config(args, stage: str, micro_batch: int | None, tp: int, work: Path):
    from fgclip_mega.presets import load_config

    overrides = [
        f"train.stage={stage}",
        "train.eval_batches=0",
        f"parallel.tensor_parallel_size={tp}",
        f"train.output_dir={work / f'run_{stage}'}",
        f"data.synthetic_dir={work / 'data'}",
    ]
    if micro_batch:
        overrides.append(f"data.micro_batch_size={micro_batch}")
    if args.compile:
        overrides.append("data.text_length_multiple=32")
    if args.layers:
        overrides += [f"model.vision.layers={args.layers}", f"model.text.layers={args.layers}"]
    cfg = load_config(args.preset, None, overrides + list(args.overrides))
    n = cfg.data.micro_batch_size * (args.batches + 1)
    cfg.data.synthetic_num_samples = max(cfg.data.synthetic_num_samples, n)
    return cfg.validate()


def _build_run(cfg, world):
    # data.loader=auto: the PIL reference loader where DALI is absent (the lent GPU machine).
    from fgclip_mega.runtime import resolve_runtime
    from fgclip_mega.train import build

    runtime = resolve_runtime(cfg, world.device, with_decode=False)
    state = dataclasses.replace(world, runtime=runtime)
    return build.build_training_run(cfg, state)


def _timed(fn, cuda: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _counted_gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _peak_mb(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_case(args, world, stage: str, micro_batch: int | None, work: Path) -> dict:
    from fgclip_mega.parallel import cpu_compat
    from fgclip_mega.profiling import device_peak_flops, mfu, training_flops
    from fgclip_mega.train.step import train_step

    cfg = _config(args, stage, micro_batch, world.tp_size, work)
    run = _build_run(cfg, world)
    runtime, cuda = run.runtime, run.runtime.device.type == "cuda"
    try:
        batches = [next(run.loader).to(runtime.device) for _ in range(args.batches)]
    finally:
        run.loader.close()
    comp_run = None
    if args.compile:
        ccfg = dataclasses.replace(
            cfg, parallel=dataclasses.replace(cfg.parallel, compile_blocks=True)
        ).validate()
        comp_run = _build_run(ccfg, world)
        comp_run.loader.close()  # takes the same pre-built batches
    model, opt = build_plain(cfg, runtime)
    step = 0

    def ours() -> None:
        nonlocal step
        step += 1
        train_step(run, batches[step % len(batches)], step)

    def plain() -> None:
        # A plain script runs without megatron's CPU compatibility mode (a no-op on GPUs).
        with cpu_compat.suspended():
            plain_step(model, opt, batches[step % len(batches)], cfg, runtime)

    def compiled() -> None:
        train_step(comp_run, batches[step % len(batches)], step)

    compile_warmup = 0.0
    for _ in range(args.warmup):
        ours()
        plain()
        if comp_run is not None:
            compile_warmup += _timed(compiled, cuda)[0]
    syncs = count_step_syncs(lambda: train_step(run, batches[0], step + 1), run.optimizer)
    step += 1
    gflop_ours, gflop_plain = _counted_gflop(ours), _counted_gflop(plain)
    peak_ours, peak_plain = _peak_mb(ours, cuda), _peak_mb(plain, cuda)
    t_ours, t_plain, t_comp = [], [], []
    for _ in range(args.rounds):  # interleaved: all see the same machine load
        t_ours.append(_timed(ours, cuda))
        t_plain.append(_timed(plain, cuda))
        if comp_run is not None:
            t_comp.append(_timed(compiled, cuda))
    sec, sec_plain = (statistics.median(w for w, _ in t) for t in (t_ours, t_plain))
    cpu, cpu_plain = (statistics.median(c for _, c in t) for t in (t_ours, t_plain))

    b = batches[0]
    flops = training_flops(
        cfg,
        batch_size=len(b),
        dp_size=world.dp_size,
        long_len=b.long_tokens.shape[1],
        short_len=b.short_tokens.shape[1],
        boxes=b.region_rois.shape[0],
        hard_boxes=b.hard_rows.shape[0],
    )
    step_flops = flops.step_model_flops
    peak = device_peak_flops(runtime.device, runtime.compute_dtype)
    record = {
        "preset": args.preset,
        "stage": stage,
        "micro_batch": len(b),
        "tp": world.tp_size,
        "dp": world.dp_size,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(runtime.compute_dtype).removeprefix("torch."),
        "samples_per_s": round(len(b) * world.dp_size / sec, 2),
        "step_ms": round(1e3 * sec, 2),
        "plain_step_ms": round(1e3 * sec_plain, 2),
        "tflops": round(step_flops / sec / 1e12, 4),
        "mfu": round(mfu(step_flops, sec, world.world_size, peak), 4),
        "peak_mem_mb": round(peak_ours, 1),
        "peak_mem_mb_plain": round(peak_plain, 1) if cuda else None,
        "host_syncs_per_step": syncs.count,
        "overhead_vs_plain": round(sec / sec_plain, 3),
        # The same ratio in process CPU time: steadier than wall time on a shared machine.
        "overhead_vs_plain_cpu_time": round(cpu / cpu_plain, 3),
        "gflop_ours": round(gflop_ours, 3),
        "gflop_plain": round(gflop_plain, 3),
        "gflop_model": round(flops.total.model / 1e9, 3),
        "long_len": b.long_tokens.shape[1],
        "short_len": b.short_tokens.shape[1],
        "rounds": args.rounds,
    }
    if comp_run is not None:
        sec_comp = statistics.median(w for w, _ in t_comp)
        cpu_comp = statistics.median(c for _, c in t_comp)
        record.update(
            compiled_step_ms=round(1e3 * sec_comp, 2),
            compiled_vs_eager=round(sec_comp / sec, 3),
            compiled_vs_eager_cpu_time=round(cpu_comp / cpu, 3),
            compile_warmup_s=round(compile_warmup, 1),
            text_length_multiple=cfg.data.text_length_multiple,
        )
    if syncs.count:
        record["host_sync_sites"] = sorted({site for _, site in syncs.events})
    return record


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['stage']}\nb={r['micro_batch']} tp={r['tp']}" for r in records]
    ours = [r["step_ms"] for r in records]
    plain = [r["plain_step_ms"] for r in records]
    x = range(len(records))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(records)), 3.5))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="ours (megatron)")
    ax.bar([i + 0.2 for i in x], plain, 0.4, label="plain PyTorch")
    for i, r in enumerate(records):
        ax.text(i, max(ours[i], plain[i]), f"x{r['overhead_vs_plain']}", ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"{records[0]['preset']} on {records[0]['device']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", nargs="+", default=["global", "regional"],
                   choices=["global", "regional"])  # fmt: skip
    p.add_argument("--micro-batch", nargs="+", type=int, default=[None],
                   help="default: the preset's data.micro_batch_size")  # fmt: skip
    p.add_argument("--tp", type=int, default=None, help="must equal the world size (torchrun)")
    p.add_argument("--layers", type=int, default=0, help="override both towers' layer count")
    p.add_argument("--rounds", type=int, default=None, help="default 60 on CPU, 20 on CUDA")
    # 10: on CPU the ratio drifted over the first tens of steps (measured 1.15 -> 1.02 over 60
    # interleaved steps; allocator warm-up is the likely cause): 3 measured the start-up.
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each first")
    p.add_argument("--batches", type=int, default=4, help="distinct pre-built batches cycled")
    p.add_argument("--work", default=str(ROOT / "run/out/bench_step_work"))
    p.add_argument("--plot", action="store_true", help="write run/out/bench_step.png")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the step with parallel.compile_blocks")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_args()

    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tp or world_size
    if tp != world_size:
        p.error(f"--tp {tp} needs a world of {tp} processes (torchrun), this one has {world_size}")
    if args.rounds is None:
        args.rounds = 20 if torch.cuda.is_available() else 60
    world = init_parallel(ParallelConfig(tensor_parallel_size=tp), seed=0)
    records = []
    try:
        for stage in args.stage:
            for mb in args.micro_batch:
                record = bench_case(args, world, stage, mb, Path(args.work))
                records.append(record)
                if world.rank == 0:
                    print(json.dumps(record), flush=True)
    finally:
        destroy_parallel()
    if args.plot and world.rank == 0 and records:
        path = ROOT / "run/out/bench_step.png"
        plot(records, path)
        print(json.dumps({"plot": str(path)}), flush=True)


if __name__ == "__main__":
    main()
