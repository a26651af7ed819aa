"""Typed configuration for fgclip_mega.

Everything a run needs is one `Config` tree of dataclasses. Presets (small functions that return
a full `Config`) and `load_config` live in fgclip_mega/presets.py; YAML files and `key.sub=value`
CLI pairs override fields (`values.py`), and any unknown key or badly typed value is an error that
names the field. The package is a leaf: it imports nothing from the rest of fgclip_mega.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fgclip_mega.config.values import (  # noqa: F401 - the package's config API, re-exported
    ConfigError,
    apply_cli,
    apply_dict,
    check_types,
    set_value,
)


@dataclass
class VisionConfig:
    image_size: int = 224
    """Input resolution in pixels (square)."""
    patch_size: int = 16
    """Side of the square patches of the conv patch embedding."""
    width: int = 768
    """Hidden size of the image transformer."""
    layers: int = 12
    """Number of transformer blocks."""
    heads: int = 12
    """Attention heads per block."""
    mlp_width: int = 3072
    """Hidden size of the block MLP."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (OpenAI CLIP uses 1e-5)."""
    activation: Literal["quick_gelu", "gelu_tanh"] = "quick_gelu"
    """MLP activation: OpenAI CLIP's quick_gelu, or SigLIP's tanh-approximated GELU."""

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    vocab_size: int = 49408
    """BPE vocabulary size of the OpenAI CLIP tokenizer."""
    width: int = 512
    """Hidden size of the text transformer."""
    layers: int = 12
    """Number of transformer blocks (causal)."""
    heads: int = 8
    """Attention heads per block."""
    mlp_width: int = 2048
    """Hidden size of the block MLP."""
    short_context: int = 77
    """Token length of short captions, region phrases and hard negatives."""
    long_context: int = 248
    """Token length of long captions."""
    long_position_split: int = 20
    """Long-text positions below this read `position_embedding_ori`, the rest `_res`."""
    eos_token_id: int = 49407
    """End-of-text id; the text embedding is taken at its first occurrence."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    activation: Literal["quick_gelu", "gelu_tanh"] = "quick_gelu"
    """MLP activation: OpenAI CLIP's quick_gelu, or SigLIP's tanh-approximated GELU."""


@dataclass
class ModelConfig:
    family: Literal["fgclip", "fgclip2"] = "fgclip"
    """FG-CLIP (OpenAI-CLIP towers, square images) or FG-CLIP 2 (SigLIP 2 NaFlex towers)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Image tower."""
    text: TextConfig = field(default_factory=TextConfig)
    """Text tower."""
    projection_dim: int = 512
    """Width of the shared image-text embedding space."""
    logit_scale_init: float = 2.6592
    """Initial log of the global temperature, ln(1/0.07) as in CLIP (SigLIP: ln 10 = 2.3026)."""
    logit_bias_init: float | None = None
    """SigLIP's learnable logit bias, created with this value (SigLIP: -10); None = no bias."""
    attention_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"
    """Attention kernel: flash-attn when installed and on CUDA, else torch SDPA."""


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks that shard each layer; the data-parallel size is world_size / this."""
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations along the sequence over the TP group."""
    activation_checkpointing: bool = False
    """Recompute activations in backward to save memory (see the two fields below)."""
    checkpoint_granularity: Literal["block", "mlp"] = "block"
    """What is recomputed: the whole block (+1 forward) or only its MLP (cheaper, less saved)."""
    checkpoint_every: int = 1
    """Recompute every k-th block only (1 = all blocks)."""
    compile_blocks: bool = False
    """torch.compile each block for training (eval: eager); needs data.text_length_multiple>=32."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto picks NCCL with CUDA and gloo without."""
    overlap_grad_reduce: bool | None = None
    """Overlap the DP gradient reduction with backward (megatron DDP); None = on with CUDA."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1, megatron-core)."""
    timeout_minutes: int = 10
    """Collective timeout; a hung rank fails the run instead of blocking it forever."""

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.tensor_parallel_size:
            raise ConfigError(
                f"parallel.tensor_parallel_size={self.tensor_parallel_size} does not divide "
                f"the world size {world_size}"
            )
        return world_size // self.tensor_parallel_size


@dataclass
class PrecisionConfig:
    params_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Model weight dtype; auto = bf16 on CUDA (fp32 main params), fp32 on CPU (bf16 is slow)."""
    compute_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype of the forward pass; auto = bf16 on CUDA, fp32 on CPU."""
    loss_in_fp32: bool | Literal["auto"] = "auto"
    """Upcast embeddings to fp32 before the losses; auto = no on CUDA (bf16 in, fp32 inside)."""


@dataclass
class DataConfig:
    shards: str = ""
    """Shard index (index.json) or its directory, a path or URL (s3://...); empty = synthetic."""
    micro_batch_size: int = 8
    """Samples per data-parallel rank per forward; 0 = the largest the memory estimate fits."""
    max_boxes: int = 4
    """Boxes per image used in stage 2 (extra boxes are dropped, fewer are padded)."""
    num_hard_negatives: int = 10
    """Attribute-swapped negative phrases per box."""
    loader: Literal["auto", "dali", "pil"] = "auto"
    """Decoder: DALI, or the PIL reference loader (same batches); auto = DALI when installed."""
    decode_device: Literal["auto", "cpu", "mixed"] = "auto"
    """DALI decode placement: mixed (nvJPEG) with CUDA, cpu otherwise."""
    num_threads: int = 2
    """DALI CPU threads per pipeline."""
    py_num_workers: int = 1
    """Worker processes of DALI's parallel external source that read the shards."""
    prefetch_queue_depth: int = 2
    """Batches DALI prepares ahead of the training step."""
    seed: int = 1234
    """Seed of the per-epoch shard and sample shuffle."""
    synthetic_num_samples: int = 256
    """Images generated for the embedded synthetic dataset when `shards` is empty."""
    eval_shards: str = ""
    """Held-out shard index for evaluation; empty = a synthetic set with another seed."""
    synthetic_dir: str = "runs/synthetic_data"
    """Cache directory of the embedded synthetic shards (built once, shared by all ranks)."""
    read_block_size: int = 256
    """Samples per contiguous shard read; blocks are the unit of the per-epoch shuffle."""
    shuffle_window_blocks: int = 8
    """Blocks whose samples are shuffled together in memory (the shuffle buffer)."""
    region_text: Literal["random", "short", "long"] = "random"
    """Region phrase per box: short_expr, long_expr, or a seeded per-epoch coin (upstream)."""
    text_length_multiple: int = 8
    """Texts are cut after the batch's last end-of-text token, rounded up to this (<= context)."""
    resize_antialias: Literal["on", "off"] = "on"
    """Squash resize with PIL-BILINEAR-style antialiasing (on) or plain bilinear sampling."""
    py_start_method: Literal["auto", "fork", "spawn"] = "auto"
    """Reader process start; auto = fork unless CUDA is already initialised, then spawn."""
    read_ahead_windows: int = 1
    """Shuffle windows read in the background ahead of the one in use (hides storage latency)."""
    storage_attempts: int = 6
    """Tries per object-store request on transient errors (timeouts, 5xx, resets), then an error."""
    storage_timeout_s: float = 30.0
    """Connect/read timeout of one object-store request; a stalled response counts as a try."""
    tokenizer: str = ""
    """FG-CLIP 2: local SigLIP 2 tokenizer.json (or its folder); v1 uses the built-in CLIP BPE."""
    max_patch_budget: int = 1024
    """FG-CLIP 2: largest NaFlex patch budget (128, 256, 576, 784 or 1024); larger images shrink."""
    budget_patience: int = 0
    """FG-CLIP 2: windows a budget bucket holds a sample before merging it up; 0 = auto."""


@dataclass
class LossConfig:
    long_weight: float = 1.0
    """Weight of image vs long-caption InfoNCE."""
    short_weight: float = 1.0
    """Weight of image vs short-caption InfoNCE."""
    region_weight: float = 0.1
    """Weight of region vs phrase InfoNCE (stage 2)."""
    hard_weight: float = 0.5
    """Weight of the hard-negative loss (stage 2)."""
    kind: Literal["softmax", "sigmoid"] = "softmax"
    """Contrastive form: CLIP softmax InfoNCE or SigLIP sigmoid."""
    implementation: Literal["auto", "triton", "chunked", "naive"] = "auto"
    """Loss kernel: auto = Triton on CUDA, chunked O(B*d) PyTorch on CPU."""
    gather: Literal["allgather", "ring"] = "allgather"
    """How features of other data-parallel ranks are obtained for the global losses."""
    chunk_size: int = 1024
    """Rows/columns per tile of the chunked path."""
    learn_temperatures: bool = True
    """Train the three logit scales."""
    max_logit_scale: float = 4.6052
    """Clamp of every logit scale, ln(100)."""
    stage2_logit_scale: float | None = None
    """Log logit scale of the region/hard-negative terms at stage 2 start; None = the global one."""
    recipe: Literal["fgclip", "fgclip2"] = "fgclip"
    """Loss terms: FG-CLIP (long, short, region, hard) or FG-CLIP 2 (stage 2: region, tic, fgt)."""
    tic_weight: float = 0.1
    """FG-CLIP 2 textual intra-modal contrast of region phrases (upstream code 0.1, paper 0.1)."""
    tic_top_k: int = 10
    """TIC: most similar other phrases per phrase that enter its log-sum-exp."""
    tic_duplicate_threshold: float = 0.95
    """TIC: phrase pairs above this cosine count as duplicates and are ignored."""
    fgt_weight: float = 0.5
    """FG-CLIP 2 hard-negative term FGT (upstream code 0.5, paper 0.5)."""
    fgt_all_texts_weight: float = 0.6
    """FGT: box vs every positive and negative phrase of the rank, InfoNCE (upstream 0.6)."""
    fgt_pair_weight: float = 3.0
    """FGT: box vs its positive and its own negatives, (1+N)-way CE (upstream 3.0)."""
    cmr_weight: float = 0.4
    """FGT: cross-modal rank margin loss (upstream code 0.4 inside FGT; the paper's CMR 0.4)."""
    cmr_max_margin: float = 10.0
    """FGT: the running CMR margin (logit units) is clamped to [0, this]."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to params of < 2 dims: biases, norms, scales)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    vision_lr_mult: float = 1.0
    """Peak and final learning rate of the image tower and its projection, as a multiple of lr."""


@dataclass
class TrainConfig:
    stage: Literal["global", "regional"] = "global"
    """FG-CLIP stage: 1 = global contrastive, 2 = adds region and hard-negative losses."""
    steps: int = 1000
    """Optimizer steps."""
    log_interval: int = 10
    """Steps between log lines."""
    seed: int = 42
    """Seed of weight initialisation and dropout."""
    output_dir: str = "runs/default"
    """Where logs, plots and checkpoints go."""
    eval_batches: int = 8
    """Held-out micro-batches per evaluation (retrieval, hard-negative accuracy); 0 disables."""
    eval_interval: int = 0
    """Steps between evaluations; 0 evaluates once, at the end."""
    profile_dir: str = ""
    """Write a torch.profiler Chrome trace of a few early steps (rank 0) here; empty = off."""
    global_batch_size: int = 0
    """Samples per optimizer step over all DP ranks (micro x DP x accumulation); 0 = micro x DP."""
    device_memory_gb: float = 0.0
    """GB (1e9 bytes) per GPU an automatic micro-batch is sized for; 0 = the GPU's (80 on CPU)."""
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = field(
        default_factory=lambda: ["jsonl"]
    )
    """Metric sinks (rank 0, step as x-axis); metrics.jsonl is always written (plots, resume)."""
    wandb_project: str = "fgclip_mega"
    """W&B project of a run with 'wandb' in train.loggers (WANDB_MODE=offline works offline)."""


@dataclass
class CheckpointConfig:
    save_interval: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    load: str = ""
    """Checkpoint directory to resume from (model, optimizer, loader state)."""
    init_from: str = ""
    """Weights to start from: a training checkpoint (weights only) or HF CLIPModel / FG-CLIP."""
    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted after a new one is complete."""
    on_corrupt: Literal["fallback", "fail"] = "fallback"
    """A corrupt/incomplete newest checkpoint: resume from the newest intact one, or stop."""
    async_save: bool = True
    """Write checkpoint files in a background thread (the loop waits only for the CPU copy)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/sequence/data parallelism."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Weight and compute dtypes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights and kernels."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and loading."""

    def validate(self, world_size: int | None = None) -> Config:
        check_types(self, "")
        v, t, p = self.model.vision, self.model.text, self.parallel
        _require(
            v.image_size % v.patch_size == 0,
            "model.vision.image_size",
            f"{v.image_size} is not a multiple of patch_size {v.patch_size}",
        )
        for name, tower in (("vision", v), ("text", t)):
            _require(
                tower.width % tower.heads == 0,
                f"model.{name}.heads",
                f"{tower.heads} does not divide width {tower.width}",
            )
            for f in ("heads", "mlp_width"):
                _require(
                    getattr(tower, f) % p.tensor_parallel_size == 0,
                    f"model.{name}.{f}",
                    f"{getattr(tower, f)} is not divisible by parallel.tensor_parallel_size"
                    f"={p.tensor_parallel_size}",
                )
        _require(
            t.short_context <= t.long_context,
            "model.text.short_context",
            "must not exceed long_context",
        )
        _require(
            0 < t.long_position_split <= t.short_context,
            "model.text.long_position_split",
            f"must be in (0, short_context={t.short_context}]",
        )
        if self.model.family == "fgclip2":  # no projections: every tower and head is (D, D)
            for name, value in (
                ("model.text.width", t.width),
                ("model.projection_dim", self.model.projection_dim),
            ):
                _require(value == v.width, name, f"{value}: FG-CLIP 2 has no projections; it "
                         f"must equal model.vision.width={v.width}")  # fmt: skip
        _require(p.tensor_parallel_size >= 1, "parallel.tensor_parallel_size", "must be >= 1")
        if world_size is not None:
            p.data_parallel_size(world_size)
        _require(p.checkpoint_every >= 1, "parallel.checkpoint_every", "must be >= 1")
        _require(
            not p.compile_blocks or self.data.text_length_multiple >= 32,
            "data.text_length_multiple",
            f"{self.data.text_length_multiple} with parallel.compile_blocks: every text length "
            "is one more compile of the blocks; use 32 or more (e.g. 32: 9 lengths up to 248)",
        )
        _require(self.data.text_length_multiple >= 1, "data.text_length_multiple", "must be >= 1")
        _require(p.timeout_minutes >= 1, "parallel.timeout_minutes", "must be >= 1")
        d = self.data
        for name in ("max_boxes", "num_hard_negatives", "py_num_workers", "synthetic_num_samples"):
            _require(getattr(d, name) >= 0, f"data.{name}", "must be >= 0")
        _require(d.micro_batch_size >= 0, "data.micro_batch_size", "must be >= 0 (0 = auto)")
        for name in ("num_threads", "prefetch_queue_depth", "read_block_size"):
            _require(getattr(d, name) >= 1, f"data.{name}", "must be >= 1")
        _require(d.shuffle_window_blocks >= 1, "data.shuffle_window_blocks", "must be >= 1")
        _require(d.read_ahead_windows >= 0, "data.read_ahead_windows", "must be >= 0")
        _require(d.storage_attempts >= 1, "data.storage_attempts", "must be >= 1")
        _require(d.storage_timeout_s > 0, "data.storage_timeout_s", "must be > 0")
        budgets = (128, 256, 576, 784, 1024)  # data.naflex.PATCH_BUDGETS (config is a leaf)
        _require(
            d.max_patch_budget in budgets,
            "data.max_patch_budget",
            f"one of {budgets}, got {d.max_patch_budget}",
        )
        _require(d.budget_patience >= 0, "data.budget_patience", "must be >= 0 (0 = auto)")
        loss = self.loss
        _require(loss.chunk_size >= 1, "loss.chunk_size", "must be >= 1")
        for name in (
            "long_weight", "short_weight", "region_weight", "hard_weight", "tic_weight",
            "fgt_weight", "fgt_all_texts_weight", "fgt_pair_weight", "cmr_weight", "cmr_max_margin",
        ):  # fmt: skip
            _require(getattr(loss, name) >= 0, f"loss.{name}", "must be >= 0")
        _require(loss.tic_top_k >= 1, "loss.tic_top_k", "must be >= 1")
        _require(
            -1 <= loss.tic_duplicate_threshold <= 1,
            "loss.tic_duplicate_threshold",
            "is a cosine: must be in [-1, 1]",
        )
        _require(loss.max_logit_scale > 0, "loss.max_logit_scale", "must be > 0")
        start = loss.stage2_logit_scale
        _require(
            start is None or 0 <= start <= loss.max_logit_scale,
            "loss.stage2_logit_scale",
            f"must be in [0, loss.max_logit_scale={loss.max_logit_scale}], got {start}",
        )
        _require(
            loss.kind != "sigmoid" or self.model.logit_bias_init is not None,
            "model.logit_bias_init",
            "loss.kind=sigmoid trains SigLIP's logit bias: set it (SigLIP uses -10)",
        )
        o = self.optim
        _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}]")
        _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(o, name) < 1, f"optim.{name}", "must be in [0, 1)")
        _require(o.eps > 0, "optim.eps", "must be > 0")
        _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
        _require(
            o.vision_lr_mult > 0, "optim.vision_lr_mult", f"must be > 0, got {o.vision_lr_mult}"
        )
        tr = self.train
        _require(tr.steps >= 1, "train.steps", f"must be >= 1, got {tr.steps}")
        for name in ("log_interval", "eval_batches", "eval_interval"):
            _require(getattr(tr, name) >= 0, f"train.{name}", "must be >= 0 (0 = off)")
        _require(len(set(tr.loggers)) == len(tr.loggers), "train.loggers", f"repeats: {tr.loggers}")
        _check_batch(tr.global_batch_size, d.micro_batch_size, tr.device_memory_gb, world_size, p)
        c = self.checkpoint
        _require(c.save_interval >= 0, "checkpoint.save_interval", "must be >= 0 (0 = at the end)")
        _require(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _require(c.on_corrupt in ("fallback", "fail"), "checkpoint.on_corrupt", "fallback or fail")
        return self

    def check_paths(self) -> Config:
        """Input paths exist (checked before any heavy work); the error names the field."""
        for name, value in (
            ("data.shards", self.data.shards),
            ("data.eval_shards", self.data.eval_shards),
            ("checkpoint.init_from", self.checkpoint.init_from),
            ("checkpoint.load", self.checkpoint.load),
            # FG-CLIP 2's SigLIP 2 tokenizer (v1 ignores the field: its BPE is built in).
            ("data.tokenizer", self.data.tokenizer if self.model.family == "fgclip2" else ""),
        ):
            # Shards at an object-store URL (s3://...) are checked when the loader opens them
            # (with retries); checkpoints are local paths.
            remote = name.startswith("data.") and "://" in value and not value.startswith("file:")
            local = value.removeprefix("file://")
            missing = bool(value) and not remote and not Path(local).exists()
            _require(not missing, name, f"{value}: no such file or directory")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


def _check_batch(
    global_batch: int, micro: int, memory_gb: float, world_size: int | None, p: ParallelConfig
) -> None:
    """global = micro x DP x accumulation (an integer); with micro auto, global / DP whole."""
    _require(global_batch >= 0, "train.global_batch_size", f"must be >= 0, got {global_batch}")
    _require(memory_gb >= 0, "train.device_memory_gb", f"must be >= 0, got {memory_gb}")
    if world_size is None or not global_batch:
        return
    dp = p.data_parallel_size(world_size)
    _require(
        global_batch % dp == 0,
        "train.global_batch_size",
        f"{global_batch} is not divisible by the {dp} data-parallel ranks",
    )
    _require(
        not micro or global_batch % (micro * dp) == 0,
        "data.micro_batch_size",
        f"train.global_batch_size={global_batch} is not micro_batch_size={micro} x {dp} "
        f"data-parallel ranks x a whole number of accumulation steps (set 0 = auto)",
    )
