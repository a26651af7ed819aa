"""Where data parallelism is applied: megatron-core DDP, optimizer and LR schedule.

The model itself is built with tensor-parallel layers (see fgclip_mega/models); this module wraps
it for data parallelism (gradient buckets reduced over the DP group, optionally overlapped with
backward) and builds megatron-core's optimizer (optionally the distributed optimizer, which
shards Adam state over DP ranks), with gradient clipping over the model-parallel group.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from fgclip_mega.config import Config, OptimizerConfig, ParallelConfig
from fgclip_mega.models.layers import megatron_config
from fgclip_mega.parallel import cpu_compat
from fgclip_mega.parallel.optim_kernels import (
    adam_kernel_for,
    select_adam_kernel,
    use_foreach_param_copy,
)

if TYPE_CHECKING:
    from fgclip_mega.models import FGCLIPModel

_log = logging.getLogger(__name__)


def build_parallel_model(cfg: Config, state) -> tuple[FGCLIPModel, DistributedDataParallel]:
    """Where the model is parallelised, in one visible step: tensor-parallel layers (and
    sequence parallelism) over `state.tp_group` from `parallel.*`, activation checkpointing per
    its policy, the parameters this stage never trains frozen (family.freeze_unused), then
    megatron DDP over the data-parallel group. Seed the global RNG identically on every rank
    first: replicated weights must match over TP."""
    from fgclip_mega.family import family, freeze_unused

    runtime = state.runtime
    model_class = family(cfg).model_class()
    model = model_class.from_runtime(cfg.model, cfg.parallel, runtime, tp_group=state.tp_group)
    if cfg.checkpoint.init_from:
        init_weights(model, cfg)
    frozen = freeze_unused(model, cfg)
    if frozen:
        groups = sorted({n if n.endswith("probe") else n.rsplit(".", 1)[0] for n in frozen})
        _log.info("stage %s does not train (frozen): %s", cfg.train.stage, ", ".join(groups))
    if cfg.parallel.compile_blocks:
        compile_blocks(model, cfg)
    return model, wrap_data_parallel(model, cfg.parallel, runtime)


def text_lengths(cfg: Config) -> list[int]:
    """Every length the loaders cut text to (`data.text_length_multiple` up to each context)."""
    m, t = cfg.data.text_length_multiple, cfg.model.text
    contexts = (t.short_context, t.long_context)
    return sorted({min(n, c) for c in contexts for n in range(m, c + m, m)})


def compile_blocks(model: torch.nn.Module, cfg: Config) -> int:
    """`parallel.compile_blocks`: every transformer block's training forward (and, through
    AOTAutograd, its backward) runs as one torch.compile'd graph; returns the number of blocks.

    Shapes are bounded so that nothing recompiles once each shape has been seen: the token
    dimension is static and takes only `text_lengths(cfg)` and the image token count, the batch
    dimension (which varies with the boxes and hard negatives of a step) is symbolic. All blocks
    share one code object, hence one cache: its limit is raised to cover every shape, and
    exceeding it fails instead of silently running eagerly. Without grad (evaluation, with
    prompts of any length) a block runs eagerly. Activation checkpointing recomputes the
    compiled block. megatron's TP layers trace as they are: one graph per block at TP=1; at TP>=2
    their collectives with async_op=True break each block into several graphs (still equal to
    eager, tested at TP=2 with and without SP)."""
    from fgclip_mega.models.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    # Per shape: with and without the dense value path, and a size-1 batch specialised.
    shapes = 2 * 2 * (len(text_lengths(cfg)) + 1)
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, shapes)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * shapes)
    dynamo.fail_on_recompile_limit_hit = True
    for block in blocks:
        block.forward = _compiled_forward(block.forward)
    _log.info("compiled %d transformer blocks (%d shapes at most)", len(blocks), shapes)
    return len(blocks)


def _compiled_forward(eager):
    compiled = torch.compile(eager)

    def forward(x: torch.Tensor, *args, **kwargs):
        if not torch.is_grad_enabled():
            return eager(x, *args, **kwargs)
        torch._dynamo.mark_static(x, 0)  # tokens (N, or N/tp under SP): bucketed, static
        torch._dynamo.maybe_mark_dynamic(x, 1)  # batch: symbolic
        for t in (*args, *kwargs.values()):
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                torch._dynamo.maybe_mark_dynamic(t, 0)  # a (B, N) key padding mask
        return compiled(x, *args, **kwargs)

    return forward


def init_weights(model: FGCLIPModel, cfg: Config) -> None:
    """`checkpoint.init_from`: another training run's checkpoint (weights only: a fresh optimizer
    and schedule, as FG-CLIP's stage 2 starts from stage 1) or HF weights of the model's family
    (CLIPModel / FG-CLIP; Siglip2Model / FG-CLIP 2)."""
    from fgclip_mega.checkpoint.weights import (
        load_training_weights,
        saved_config,
        training_checkpoint,
    )

    path = cfg.checkpoint.init_from
    step_dir = training_checkpoint(path)
    if step_dir is None:
        from fgclip_mega.family import family

        report = family(cfg).import_weights(model, path)
        _log.info("initialised from %s (derived: %s)", path, report["derived"])
        return
    info = load_training_weights(model, step_dir)
    _log.info("initialised from training checkpoint %s (step %d)", step_dir, info["step"])
    start_stage2_temperatures(model, cfg, saved_config(step_dir))


def start_stage2_temperatures(model: FGCLIPModel, cfg: Config, saved_cfg: dict) -> None:
    """Stage 1 -> 2 (FG-CLIP), when the weights come from a global run (`saved_cfg`, its config)
    and this run is regional: the region and hard-negative temperatures start from the global
    one learnt in stage 1 (or `loss.stage2_logit_scale`), not from their untrained value."""
    if saved_cfg.get("train", {}).get("stage") != "global" or cfg.train.stage != "regional":
        return
    start = cfg.loss.stage2_logit_scale
    model.init_stage2_scales(start)
    _log.info(
        "stage 1 -> 2: region/hard-negative temperatures start at %s",
        "the global one" if start is None else f"exp({start:g})",
    )


def wrap_data_parallel(
    module: torch.nn.Module, parallel: ParallelConfig, runtime
) -> DistributedDataParallel:
    overlap = parallel.overlap_grad_reduce
    if overlap is None:  # on by default where there is something to overlap with
        overlap = runtime.device.type == "cuda"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        # ZeRO-1: the parameter all-gather after the step overlaps the next forward.
        overlap_param_gather=overlap and parallel.use_distributed_optimizer,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        # Gradients are averaged over DP ranks: each rank's loss is its local mean.
        average_in_collective=True,
        # Checked once per step on the gradient norm by the trainer (which names the
        # parameters then), not per bucket inside backward hooks (two host syncs each).
        check_for_nan_in_grad=False,
    )
    config = megatron_config(
        parallel.tensor_parallel_size, parallel.sequence_parallel, runtime.params_dtype
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    if cpu_compat.is_enabled():
        # The towers name no CUDA device: their forward skips the CPU compatibility mode (the
        # mode stays on for DDP and the optimizer, which do).
        for child in module.children():
            cpu_compat.run_forward_without_mode(child)
    return ddp


def sync_params(ddp: DistributedDataParallel) -> None:
    """Completes the distributed optimizer's overlapped parameter all-gather now. With
    overlap_param_gather the updated params arrive during the *next* forward; call this before
    anything reads them outside a forward (checkpoint save, evaluation, the end of training)."""
    if ddp.use_forward_hook:
        ddp.start_param_sync(force_sync=True)


def skips_weight_decay(param: torch.nn.Parameter) -> bool:
    """As in CLIP: no decay on params of < 2 dims (biases, norms, the 0-dim logit scales, which
    megatron's default would decay) nor on those a model marks `no_weight_decay` (embeddings)."""
    return param.ndim < 2 or getattr(param, "no_weight_decay", False)


def build_optimizer(
    model: DistributedDataParallel,
    optim: OptimizerConfig,
    parallel: ParallelConfig,
    runtime,
    total_steps: int,
):
    """AdamW through megatron-core (mixed precision with fp32 main params when the weights are
    bf16), linear warm-up then cosine decay. On CUDA the update is torch's fused AdamW kernel;
    the main -> model param copy is one multi-tensor copy (parallel/optim_kernels.py)."""
    bf16 = runtime.params_dtype == torch.bfloat16
    mcfg = McoreOptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=runtime.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    no_decay = ParamKey(predicate=ParamPredicate(name="no_weight_decay", fn=skips_weight_decay))
    overrides = {no_decay: ParamGroupOverride(wd_mult=0.0)}
    if optim.vision_lr_mult != 1.0:
        # The scheduler reads each group's max_lr / min_lr, so the multiple holds through the
        # warm-up and the cosine decay. Names are as the DDP wrapper sees them (module.vision...).
        vision = ParamKey(name=("*vision.*", "*visual_projection.*"))
        overrides[vision] = ParamGroupOverride(
            max_lr=optim.lr * optim.vision_lr_mult, min_lr=optim.min_lr * optim.vision_lr_mult
        )
    optimizer = get_megatron_optimizer(mcfg, [model], config_overrides=overrides)
    select_adam_kernel(optimizer, adam_kernel_for(runtime.device))
    use_foreach_param_copy(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        # On resume the config's schedule wins (only the step count comes from the
        # checkpoint): a run extended with a larger train.steps keeps learning.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def apply_optimizer_hyperparams(optimizer, optim: OptimizerConfig) -> None:
    """After loading optimizer state: the config's betas/eps win over the checkpoint's
    (torch restores them with the param groups); lr and weight decay come from the schedule."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in opts:
        for group in opt.param_groups:
            group["betas"] = (optim.beta1, optim.beta2)
            group["eps"] = optim.eps
    # A loaded param group brings the saved 'fused' / 'foreach' (and a CPU run's checkpoint
    # its step counters on the CPU): the kernel follows where the params live now.
    device = next(
        (p.device for o in opts for g in o.param_groups for p in g["params"]),
        torch.device("cpu"),
    )
    select_adam_kernel(optimizer, adam_kernel_for(device))
