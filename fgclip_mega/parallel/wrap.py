"""Where data parallelism is applied: megatron-core DDP, optimizer and LR schedule.

The model itself is built with tensor-parallel layers (see fgclip_mega/models); this module wraps
it for data parallelism (gradient buckets reduced over the DP group, optionally overlapped with
backward) and builds megatron-core's optimizer (optionally the distributed optimizer, which
shards Adam state over DP ranks), with gradient clipping over the model-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.transformer import TransformerConfig

from fgclip_mega.config import OptimizerConfig, ParallelConfig, PrecisionConfig

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def megatron_config(parallel: ParallelConfig, precision: PrecisionConfig) -> TransformerConfig:
    """The megatron-core config object its DDP and layers read (sizes are ours, not megatron's)."""
    params_dtype = TORCH_DTYPES[precision.params_dtype]
    return TransformerConfig(
        # Placeholders: megatron validates them, our towers carry their own sizes.
        num_layers=1,
        hidden_size=64 * parallel.tensor_parallel_size,
        num_attention_heads=parallel.tensor_parallel_size,
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_parallel_size > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=True,
    )


def wrap_data_parallel(
    module: torch.nn.Module, parallel: ParallelConfig, precision: PrecisionConfig
) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        # Gradients are averaged over DP ranks: each rank's loss is its local mean.
        average_in_collective=True,
        # Fail at the step that produced a NaN/Inf gradient, naming the parameter.
        check_for_nan_in_grad=True,
    )
    return DistributedDataParallel(
        config=megatron_config(parallel, precision), ddp_config=ddp_config, module=module
    )


def skips_weight_decay(param: torch.nn.Parameter) -> bool:
    """As in CLIP: no decay on params of < 2 dims (biases, norms, the 0-dim logit scales, which
    megatron's default would decay) nor on those a model marks `no_weight_decay` (embeddings)."""
    return param.ndim < 2 or getattr(param, "no_weight_decay", False)


def build_optimizer(
    model: DistributedDataParallel,
    optim: OptimizerConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    total_steps: int,
):
    """AdamW through megatron-core, linear warm-up then cosine decay."""
    mcfg = McoreOptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=precision.params_dtype == "bf16",
        params_dtype=TORCH_DTYPES[precision.params_dtype],
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    no_decay = ParamKey(predicate=ParamPredicate(name="no_weight_decay", fn=skips_weight_decay))
    optimizer = get_megatron_optimizer(
        mcfg, [model], config_overrides={no_decay: ParamGroupOverride(wd_mult=0.0)}
    )
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
    )
    return optimizer, scheduler
