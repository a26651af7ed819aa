"""Analytic per-GPU memory of one FG-CLIP training step, counted from the config.

FG-CLIP 2 (model.family=fgclip2) swaps in its own parameter counts, activations (NaFlex tower
at the patch budget, MAP and dense heads, SigLIP 2 texts), working set and fine-grained loss
terms from profiling/memory_fgclip2.py; the block formula, optimizer state, GradCache and the
step's phases below are shared.

What is counted follows the code (models/layers.py, vision.py, text.py, fgclip.py,
objective/forward.py, objective/terms.py, losses/*, parallel/wrap.py, train/step.py):

  parameters   this rank's TP shard, in params dtype (temperatures fp32);
  gradients    megatron DDP's gradient buffer, fp32 (grad_reduce_in_fp32), the full local shard;
  optimizer    AdamW m and v, fp32, plus fp32 main params when the weights are bf16; divided over
               the DP ranks with the distributed optimizer (ZeRO-1);
  activations  what autograd keeps for backward between the forward of a micro-batch and its
               backward, per tower call (image, dense value path, long captions, the short text
               call), per transformer block:
                 no checkpointing: block input x and ln1 output (D), the fused qkv output (3D),
                 the attention output (D), the residual h (D), ln2 output (D), fc1's GEMM
                 output and the GELU output (2M) per token, the two norms' mean/rstd and SDPA's
                 logsumexp (H per token) in fp32; the math backend keeps the (H, N, N) fp32
                 softmax instead of the logsumexp (and fp32 copies of q, k, v under bf16);
                 checkpoint 'block': the block input only; 'mlp': everything up to h;
               TP divides the per-head and MLP tensors, sequence parallelism also the residual
               stream and the norms (padded to a multiple of TP; the gathered tower outputs
               stay whole). Outside the
               blocks: the input images (patch-conv weight gradient), pre_norm, the tower
               outputs the poolers read (a view keeps the whole (N, B, D) output alive), the
               final norms, token ids and gather indices.
  loss         what the objective keeps (fp32 copies and normalised features, the gathered
               global-batch columns of the image-text terms, the region and hard-negative
               features) plus its backward working set (gradient of the gathered columns, the
               chunked kernels' logit tiles; the naive path's full logit matrices);
  grad_cache   with gradient accumulation (train/step.py): the cached embeddings of the rank's
               whole batch and their gradients;
  transient    the backward working set of one block: gradients of its widest tensors, and
               with block checkpointing the recomputed block itself;
  allowance    CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers and DALI's GPU decode
               (CONTEXT_BYTES), plus FRAGMENTATION of the dynamic memory for the caching
               allocator.
Peak = static (parameters + gradients + optimizer) + the larger of the two phases of a step:
the forward/backward of a micro-batch (activations + transient + cache gradients; without
accumulation also the loss, which then runs while the activations are held) and, with
accumulation, the objective over the rank's whole batch (loss + cache).

Token lengths default to the full contexts and all boxes valid with hard negatives: a
conservative bound of the loader's trimmed batches (pass the real ones to compare with a run).
Checked against autograd's saved tensors on CPU in tests/test_memory.py: the activations (fp32
to the byte, bf16 within 0.4%; checkpointing off / block / mlp / every k; SDPA and math; TP=2
with and without sequence parallelism, per rank) and the loss's kept tensors at DP = 1 (within
10%). Not measured: the DP gather of the loss, the working sets and the allowance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fgclip_mega.config import Config, TextConfig, VisionConfig
from fgclip_mega.profiling import memory_fgclip2 as fgclip2

GIB = 1024**3
CONTEXT_BYTES = 3 * GIB
"""CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces (~0.5), NCCL buffers (~1), DALI nvJPEG (~1)."""
FRAGMENTATION = 0.10
"""Share of the dynamic memory (activations, loss, transient) lost to allocator fragmentation."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
STAGES = ("global", "regional")


@dataclass(frozen=True)
class Widths:
    """Bytes per element of the tensors a step holds."""

    params: int
    """Model weights."""
    act: int
    """Activations (the compute dtype; the wider one when weights and compute differ)."""


def embed_dim(cfg: Config) -> int:
    """Width of the embeddings entering the objective (FG-CLIP 2: the towers', no projection)."""
    return fgclip2.embed_dim(cfg) if cfg.model.family == "fgclip2" else cfg.model.projection_dim


def widths(cfg: Config) -> Widths:
    """'auto' dtypes resolve as on a GPU (bf16), the device the estimate sizes batches for."""

    def size(setting: str) -> int:
        return DTYPE_BYTES["bf16" if setting == "auto" else setting]

    params = size(cfg.precision.params_dtype)
    return Widths(params=params, act=max(params, size(cfg.precision.compute_dtype)))


# ----------------------------------------------------------------------------- parameters


def block_params(width: int, mlp_width: int) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one block: qkv, out_proj and fc1/fc2 weights and
    the column biases are sharded; out_proj/fc2 biases and the two norms are replicated."""
    d, m = width, mlp_width
    sharded = 3 * d * d + 3 * d + d * d + d * m + m + m * d
    return sharded, d + d + 4 * d


def parameter_counts(cfg: Config) -> dict[str, tuple[int, int]]:
    """Per part: (TP-sharded, replicated) parameter counts of the whole model."""
    if cfg.model.family == "fgclip2":
        return fgclip2.parameter_counts(cfg, block_params)
    v, t, p = cfg.model.vision, cfg.model.text, cfg.model.projection_dim
    vs, vr = block_params(v.width, v.mlp_width)
    ts, tr = block_params(t.width, t.mlp_width)
    g2 = v.grid_size**2
    vision_rep = 3 * v.patch_size**2 * v.width + v.width + (g2 + 1) * v.width + 4 * v.width
    text_rep = t.short_context * t.width + 2 * t.long_context * t.width + 2 * t.width
    temps = 3 + (cfg.model.logit_bias_init is not None)
    return {
        "vision": (v.layers * vs, v.layers * vr + vision_rep),
        "text": (t.layers * ts + t.vocab_size * t.width, t.layers * tr + text_rep),
        "projections": ((v.width + 2 * t.width) * p, 0),
        "temperatures": (0, temps),
    }


def local_parameters(cfg: Config) -> tuple[float, int]:
    """(parameters held by one rank, of which fp32 temperatures)."""
    tp = cfg.parallel.tensor_parallel_size
    counts = parameter_counts(cfg)
    return sum(s / tp + r for s, r in counts.values()), counts["temperatures"][1]


# ----------------------------------------------------------------------------- activations


def _block_mode(cfg: Config, index: int) -> str:
    """'none', 'block' or 'mlp': what block `index` recomputes (models/layers.py's policy)."""
    p = cfg.parallel
    if not p.activation_checkpointing or index % p.checkpoint_every:
        return "none"
    return p.checkpoint_granularity


@dataclass(frozen=True)
class _Shape:
    tokens: int
    """Sequence length N of the call."""
    rows: int
    """Sequences in the call."""
    width: int
    heads: int
    mlp_width: int
    causal: bool

    @property
    def t(self) -> int:
        return self.tokens * self.rows


def _sp(cfg: Config) -> int:
    """Ranks the residual stream is split over (sequence parallelism), else 1."""
    tp = cfg.parallel.tensor_parallel_size
    return tp if cfg.parallel.sequence_parallel and tp > 1 else 1


def _padded(tokens: int, sp: int) -> int:
    return -(-tokens // sp) * sp


def block_saved_bytes(
    s: _Shape, mode: str, cfg: Config, w: Widths, attention: str = "sdpa", dense: bool = False
) -> float:
    """Bytes one block keeps for backward (models/layers.py Block.forward); `dense` adds the
    value path of FG-CLIP's last vision block."""
    tp = cfg.parallel.tensor_parallel_size
    sp = _sp(cfg)
    t, d, m, h = s.t, s.width, s.mlp_width, s.heads
    tp_rows = _padded(s.tokens, sp) * s.rows  # SP pads N to a multiple of TP
    stream = tp_rows * d / sp * w.act  # one (N, B, D) tensor of the residual stream
    stats = 2 * tp_rows / sp * 4  # a LayerNorm's fp32 mean and rstd
    if mode == "block":
        return stream  # the checkpoint keeps its input only
    qkv = 3 * tp_rows * d / tp * w.act  # SP gathers the (padded) sequence for the GEMMs
    if attention == "math":
        # models/attention.py math_attention: the fp32 softmax (and the causal mask), and
        # q, k, v as contiguous fp32 copies (matmul's batched reshape of the strided views);
        # the qkv output itself only when the value path still reads it.
        core = s.rows * h / tp * s.tokens**2 * 4 + (s.tokens**2 if s.causal else 0)
        core += 3 * t * d / tp * 4 + (qkv if dense else 0)
    else:  # flash / SDPA: q, k, v (views of qkv), the output and the fp32 logsumexp
        core = qkv + t * h / tp * 4
    out = t * d / tp * w.act  # attention output over the valid tokens (SDPA keeps it too)
    if tp_rows > t:  # SP padding: out_proj keeps the output with zero rows appended
        out += tp_rows * d / tp * w.act
    attn = stream + stats + stream + core + out  # x, ln1, q/k/v + core, out
    # ln2 out; fc1's GEMM output (models/fused.py BiasQuickGelu keeps only it and recomputes
    # the bias add and sigmoid in backward; SigLIP's tanh GELU keeps its input) and the GELU
    # output that fc2 keeps
    mlp = stats + stream + 2 * tp_rows * m / tp * w.act
    total = attn + stream  # + h (the MLP checkpoint's input, or ln2's input)
    if mode != "mlp":
        total += mlp
    if dense:  # d = x + out_proj(v) (v is a view of qkv), then the same norm2 + MLP
        total += stream + (0 if mode == "mlp" else mlp)
    return total


def _blocks(s: _Shape, layers: int, cfg: Config, w: Widths, attention: str, dense: bool) -> float:
    return sum(
        block_saved_bytes(s, _block_mode(cfg, i), cfg, w, attention, dense and i == layers - 1)
        for i in range(layers)
    )


def vision_activation_bytes(
    v: VisionConfig, batch: int, cfg: Config, w: Widths, attention: str, dense: bool, boxes: int
) -> dict[str, float]:
    """models/vision.py (+ FGCLIPModel.encode_image / region_embeddings)."""
    g2 = v.grid_size**2
    s = _Shape(g2 + 1, batch, v.width, v.heads, v.mlp_width, causal=False)
    # a whole (N, B, D) tower output (gathered, with its SP padding)
    full = _padded(s.tokens, _sp(cfg)) * batch * v.width * w.act
    out = {
        "images": batch * 3 * v.image_size**2 * w.params,  # the patch conv's weight gradient
        "pre_norm": full + 2 * s.t * 4,
        "blocks": _blocks(s, v.layers, cfg, w, attention, False),
        # post_norm reads x[0], a view that keeps the whole last-block output alive
        "pooled": full + 2 * batch * 4 + batch * v.width * w.act,
    }
    if dense:
        out["blocks"] = _blocks(s, v.layers, cfg, w, attention, True)
        out["dense"] = full + 2 * batch * g2 * 4 + batch * g2 * v.width * w.act
        out["dense"] += boxes * 5 * 4  # RoIAlign keeps only the rois
    return out


def text_activation_bytes(
    t: TextConfig, rows: int, length: int, long: bool, cfg: Config, w: Widths, attention: str
) -> float:
    """models/text.py for one call of `rows` captions cut at `length` tokens."""
    if rows == 0:
        return 0.0
    s = _Shape(length, rows, t.width, t.heads, t.mlp_width, causal=True)
    tp = cfg.parallel.tensor_parallel_size
    ids = rows * length * 8 + (rows * length if tp > 1 else 0)  # + the vocab-range mask
    where = length if long else 0  # torch.where's (L, 1) bool condition
    head = 2 * rows * 8 + rows * t.width * w.act * 2 + 2 * rows * 4  # gather idx, final norm
    return ids + where + _blocks(s, t.layers, cfg, w, attention, False) + head


def activation_bytes(
    cfg: Config,
    batch: int,
    *,
    stage: str | None = None,
    long_len: int | None = None,
    short_len: int | None = None,
    boxes: int | None = None,
    hard_boxes: int | None = None,
    attention: str = "sdpa",
    patches: int | None = None,
    canvas: int | None = None,
    device: str = "cuda",
) -> dict[str, float]:
    """Saved-for-backward bytes of one micro-batch's forward (objective/forward.py
    encode_batch, or forward_fgclip2.encode_naflex_batch), per part; arguments as
    `profiling.training_flops`. FG-CLIP 2 only: `patches` the batch's patch budget (default
    data.max_patch_budget, the worst case), `canvas` the cells of its region canvas (largest gh x
    largest gw; default `patches`), `device` the kernels' output layouts to count ("cuda", what
    batches are sized for, or "cpu", what the tests measure; see memory_fgclip2)."""
    m, t = cfg.model, cfg.model.text
    w = widths(cfg)
    stage = cfg.train.stage if stage is None else stage
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {STAGES}")
    if m.family == "fgclip2":
        fgclip2.check_texts(cfg, long_len, short_len)
        return fgclip2.activation_bytes(
            cfg, batch, stage=stage, patches=patches, boxes=boxes, hard_boxes=hard_boxes,
            attention=attention, canvas=canvas, device=device,
        )  # fmt: skip
    regional = stage == "regional"
    long_len = t.long_context if long_len is None else long_len
    short_len = t.short_context if short_len is None else short_len
    r = batch * cfg.data.max_boxes if boxes is None else boxes
    h = r if hard_boxes is None else hard_boxes
    k1 = 1 + cfg.data.num_hard_negatives
    out = {
        f"image_{k}": v
        for k, v in vision_activation_bytes(
            m.vision, batch, cfg, w, attention, regional, r if regional else 0
        ).items()
    }
    out["long_text"] = text_activation_bytes(t, batch, long_len, True, cfg, w, attention)
    short_rows = batch + (r + h * k1 if regional else 0)  # one call in stage 2
    out["short_text"] = text_activation_bytes(t, short_rows, short_len, False, cfg, w, attention)
    if regional:
        out["short_text"] += h * 8  # hard_rows of index_select
    return out


def backward_transient_bytes(
    cfg: Config, batch: int, stage: str, long_len: int, short_len: int, rows_short: int
) -> float:
    """Largest backward working set of one block: the gradients of its widest tensors (two of
    fc1's width, two of the stream), and under block checkpointing the recomputed block."""
    v, t = cfg.model.vision, cfg.model.text
    w = widths(cfg)
    tp = cfg.parallel.tensor_parallel_size
    calls = [  # (shape, has the dense value path)
        (_Shape(v.grid_size**2 + 1, batch, v.width, v.heads, v.mlp_width, False), True),
        (_Shape(long_len, batch, t.width, t.heads, t.mlp_width, True), False),
        (_Shape(short_len, rows_short, t.width, t.heads, t.mlp_width, True), False),
    ]
    worst = 0.0
    for s, dense in calls:
        grads = (2 * s.t * s.mlp_width / tp + 2 * s.t * s.width) * w.act
        if cfg.parallel.activation_checkpointing:
            dense = dense and stage == "regional"
            grads += block_saved_bytes(s, "none", cfg, w, dense=dense)
        worst = max(worst, grads)
    return worst


# ----------------------------------------------------------------------------- loss


def loss_bytes(
    cfg: Config, rows: int, dp_size: int, stage: str, impl: str = "chunked"
) -> tuple[float, float]:
    """(kept for backward, backward working set) of the objective over `rows` samples of this
    rank (the micro-batch, or the whole rank batch with accumulation): its input embeddings,
    their normalised copies, the gathered global-batch columns, the hard-negative candidates."""
    p = embed_dim(cfg)
    w = widths(cfg)
    # loss_in_fp32 "auto" keeps bf16 on GPUs (the kernels accumulate in fp32)
    upcast = w.act != 4 and getattr(cfg.precision, "loss_in_fp32", True) is True
    e = 4 if upcast else w.act  # bytes of an embedding entering the objective
    n_text = 2  # long and short captions share the image features' gather
    per_row = (1 + n_text) * p * e
    kept = rows * per_row + rows * (1 + n_text) * p * 4  # embeddings, normalised (fp32 inside)
    cols = rows * dp_size
    work = 0.0
    if dp_size > 1:
        if cfg.loss.gather == "allgather":
            width = (1 + n_text) if cfg.loss.kind == "softmax" else n_text
            gathered = cols * width * p * e
            kept += gathered
            work += 2 * gathered + rows * width * p * e  # its gradient, the cat, the scatter
        else:  # ring: two blocks in flight, gradients travelling back
            work += 4 * rows * per_row
    chunk = cfg.loss.chunk_size
    if impl == "naive":  # the whole (b, W b) logits per pair and direction, and the softmax
        pairs = 2 * n_text if cfg.loss.kind == "softmax" else n_text
        work += pairs * 2 * rows * cols * 4
    elif impl == "chunked":
        work += 3 * chunk * chunk * 4  # a logit tile, its exp and its gradient
    if cfg.loss.recipe == "fgclip2":  # region InfoNCE, TIC and FGT
        return fgclip2.loss_bytes(cfg, rows, dp_size, stage, impl, e, kept, work)
    if stage == "regional":
        r = rows * cfg.data.max_boxes
        k1 = 1 + cfg.data.num_hard_negatives
        # regions and phrases with their normalised copies; the hard boxes' regions and
        # candidates in fp32, masked and normalised (losses/fgclip.py hard_negative_loss)
        kept += 2 * r * p * (e + 4) + r * p * 8 + 2 * r * k1 * p * 4
        work += 2 * r * p * 4 + 2 * r * k1 * p * 4
        if impl == "naive":
            work += 2 * r * r * 4
    return kept, work


def grad_cache_bytes(cfg: Config, rows: int, stage: str) -> float:
    """The accumulated step's cached embeddings of `rows` samples, with their fp32 gradients."""
    p = embed_dim(cfg)
    w = widths(cfg)
    n = 3 * rows
    if stage == "regional":
        r = rows * cfg.data.max_boxes
        n += 3 * r + r * (1 + cfg.data.num_hard_negatives)
    return n * p * (w.act + 4 + (4 if w.act != 4 else 0))


# ----------------------------------------------------------------------------- the step


@dataclass
class MemoryReport:
    parts: dict[str, float] = field(default_factory=dict)
    """Bytes per part of the peak (parameters, gradients, optimizer, activations, ...)."""
    activations: dict[str, float] = field(default_factory=dict)
    """Activations of one micro-batch by tower part (they sum to parts['activations'])."""
    micro_batch_size: int = 1
    accumulation: int = 1
    dp_size: int = 1
    tensor_parallel_size: int = 1
    stage: str = "global"
    phase: str = "step"
    """Which part of the step peaks: 'step' (no accumulation), or with accumulation the
    'objective' over the rank's batch or a 'micro-batch' forward/backward."""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        def gib(parts: dict[str, float]) -> dict[str, float]:
            return {k: round(v / GIB, 3) for k, v in parts.items()}

        return {
            "stage": self.stage,
            "micro_batch_size": self.micro_batch_size,
            "accumulation": self.accumulation,
            "dp_size": self.dp_size,
            "tensor_parallel_size": self.tensor_parallel_size,
            "peak_phase": self.phase,
            "total_gib": round(self.total / GIB, 3),
            "parts_gib": gib(self.parts),
            "micro_batch_activations_gib": gib(self.activations),
        }

    def lines(self) -> list[str]:
        out = [f"  {k:<12} {v / GIB:8.2f} GiB" for k, v in self.parts.items()]
        out.append(f"  {'total':<12} {self.total / GIB:8.2f} GiB")
        return out


def memory_estimate(
    cfg: Config,
    *,
    micro_batch_size: int | None = None,
    accumulation: int = 1,
    dp_size: int = 1,
    stage: str | None = None,
    long_len: int | None = None,
    short_len: int | None = None,
    attention: str = "sdpa",
    loss_impl: str | None = None,
    patches: int | None = None,
    device: str = "cuda",
) -> MemoryReport:
    """Peak memory of one GPU of a step at this micro-batch and accumulation (see the module
    docstring for what each part holds). loss_impl default: triton for 'auto' (the GPU path).
    FG-CLIP 2: `patches` is the patch budget, default data.max_patch_budget (the worst case a
    batch can get), and texts always have their full lengths."""
    b = cfg.data.micro_batch_size if micro_batch_size is None else micro_batch_size
    if b < 1 or accumulation < 1 or dp_size < 1:
        raise ValueError(f"micro_batch_size={b}, accumulation={accumulation}, dp_size={dp_size}")
    stage = cfg.train.stage if stage is None else stage
    t = cfg.model.text
    if cfg.model.family == "fgclip2":
        long_len, short_len = fgclip2.check_texts(cfg, long_len, short_len)
    long_len = t.long_context if long_len is None else long_len
    short_len = t.short_context if short_len is None else short_len
    impl = loss_impl or ("triton" if cfg.loss.implementation == "auto" else cfg.loss.implementation)
    w = widths(cfg)
    n, temps = local_parameters(cfg)
    dp_opt = dp_size if cfg.parallel.use_distributed_optimizer else 1
    main = 4 if w.params != 4 else 0  # fp32 main params of the mixed-precision optimizer
    parts = {
        "parameters": (n - temps) * w.params + temps * 4,
        "gradients": n * 4,
        "optimizer": n * (8 + main) / dp_opt,
    }
    acts = activation_bytes(
        cfg, b, stage=stage, long_len=long_len, short_len=short_len, attention=attention,
        patches=patches, device=device,
    )  # fmt: skip
    r = b * cfg.data.max_boxes
    rows_short = b + (r * (2 + cfg.data.num_hard_negatives) if stage == "regional" else 0)
    if cfg.model.family == "fgclip2":
        n = cfg.data.max_patch_budget if patches is None else patches
        transient = fgclip2.transient_bytes(cfg, b, stage, n)
    else:
        transient = backward_transient_bytes(cfg, b, stage, long_len, short_len, rows_short)
    kept, work = loss_bytes(cfg, b * accumulation, dp_size, stage, impl)
    activations = sum(acts.values())
    if accumulation == 1:  # the objective runs while the micro-batch's activations are held
        phase = "step"
        dynamic = {"activations": activations, "loss": kept, "working": max(work, transient)}
    else:
        cache = grad_cache_bytes(cfg, b * accumulation, stage)
        objective = {"grad_cache": cache, "loss": kept, "working": work}
        micro = {"grad_cache": cache, "activations": activations, "working": transient}
        phase, dynamic = max(
            ("objective", objective), ("micro-batch", micro), key=lambda kv: sum(kv[1].values())
        )
    for name in ("activations", "loss", "working", "grad_cache"):
        parts[name] = dynamic.get(name, 0.0)
    parts["allowance"] = CONTEXT_BYTES + FRAGMENTATION * sum(dynamic.values())
    return MemoryReport(
        parts, acts, b, accumulation, dp_size, cfg.parallel.tensor_parallel_size, stage, phase
    )
