"""Analytic FLOPs of one FG-CLIP training micro-batch, counted from the config (FG-CLIP 2,
model.family=fgclip2: profiling/flops_fgclip2.py, at the batch's patch budget).

Convention (the one of `torch.utils.flop_counter.FlopCounterMode`): only matmuls, convolutions
and attention products count, 2 FLOPs per multiply-add; layer norms, GELU, softmax, embedding
lookups, RoIAlign and the optimizer are left out. Attention counts the full N x N score matrix
(2 N^2 d for q k^T and 2 N^2 d for the weighted values) also for the causal text tower. Backward
is 2x forward (input and weight gradients) except the patch convolution, whose input (pixels)
needs no gradient: weight gradient only, 1x.

What is counted follows the code exactly (models/vision.py, text.py, layers.py, fgclip.py,
train/step.py `forward_embeddings`, losses/fgclip.py):
  image:  patch conv, `layers` blocks over N = g^2 + 1 tokens, visual_projection of the class token;
  dense (stage 2): the last block once more with attention replaced by out_proj(v) (value path)
      and its MLP, over all N tokens, then visual_projection of the g^2 patch tokens;
  long caption: the text blocks at `long_len` tokens, text_filip_projection of the pooled token;
  short caption, region phrases, hard-negative phrases (positive + K negatives per box): the text
      blocks at `short_len` tokens and text_projection (all go through one call in stage 2);
  losses: per global term (long, short) the b x B logits of this rank against the global batch;
      stage 2 the R x R region logits and the H x (1 + K) hard-negative logits.

Two totals are reported: *model* FLOPs (the math of the model, forward + backward) and
*hardware* FLOPs (what the devices execute): model plus `extra`, which is
  - activation checkpointing: every transformer block's forward again in backward;
  - the chunked/Triton contrastive kernels recomputing each logit tile in backward;
  - softmax losses under data parallelism computing both directions (rank rows of S and of S^T);
  - work replicated on every TP rank (patch conv, losses).
Sequence-parallel padding (a few tokens) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fgclip_mega.config import Config, TextConfig

STAGES = ("global", "regional")


@dataclass(frozen=True)
class Flops:
    forward: float = 0.0
    backward: float = 0.0
    extra: float = 0.0
    """Executed on top of the model math: recompute, duplicated loss directions, TP replicas."""

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.forward + self.backward + self.extra

    def __add__(self, other: Flops) -> Flops:
        return Flops(
            self.forward + other.forward,
            self.backward + other.backward,
            self.extra + other.extra,
        )

    def __mul__(self, k: float) -> Flops:
        return Flops(self.forward * k, self.backward * k, self.extra * k)

    __rmul__ = __mul__


@dataclass
class FlopReport:
    parts: dict[str, Flops] = field(default_factory=dict)
    """Per component of the step (image, dense, long_text, ..., loss_global, ...)."""
    batch_size: int = 1
    """Samples of this data-parallel rank (the micro-batch), over which the parts are summed."""
    tensor_parallel_size: int = 1
    """Devices that share the micro-batch; per-device FLOPs are the totals over this."""
    dp_size: int = 1
    """Data-parallel ranks, each running such a micro-batch per step."""

    @property
    def total(self) -> Flops:
        out = Flops()
        for f in self.parts.values():
            out = out + f
        return out

    @property
    def model_per_sample(self) -> float:
        return self.total.model / self.batch_size

    @property
    def hardware_per_sample(self) -> float:
        return self.total.hardware / self.batch_size

    @property
    def step_model_flops(self) -> float:
        """Model FLOPs of one step of the whole job (all data-parallel ranks), for `mfu`."""
        return self.total.model * self.dp_size

    @property
    def step_hardware_flops(self) -> float:
        return self.total.hardware * self.dp_size

    def as_dict(self) -> dict[str, float]:
        t = self.total
        out = {
            "batch_size": self.batch_size,
            "model_flops": t.model,
            "hardware_flops": t.hardware,
            "forward_flops": t.forward,
            "model_flops_per_sample": self.model_per_sample,
            "hardware_flops_per_sample": self.hardware_per_sample,
        }
        for name, f in self.parts.items():
            out[f"{name}_model_flops"] = f.model
        return out


# ----------------------------------------------------------------------------- pieces


def linear_flops(rows: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * rows * fan_in * fan_out


def block_flops(tokens: int, width: int, mlp_width: int) -> float:
    """Forward of one pre-norm block over one sequence of `tokens`: qkv, q k^T, attn v,
    out_proj, fc1, fc2."""
    n, d, m = tokens, width, mlp_width
    return (
        linear_flops(n, d, 3 * d)
        + 2.0 * n * n * d  # q k^T over all heads
        + 2.0 * n * n * d  # softmax(.) v
        + linear_flops(n, d, d)
        + linear_flops(n, d, m)
        + linear_flops(n, m, d)
    )


def value_path_flops(tokens: int, width: int, mlp_width: int) -> float:
    """Forward of the dense branch of the last vision block: out_proj(v) then the MLP (the
    norm1/qkv are shared with the normal pass and not repeated)."""
    n, d, m = tokens, width, mlp_width
    return linear_flops(n, d, d) + linear_flops(n, d, m) + linear_flops(n, m, d)


def mlp_flops(tokens: int, width: int, mlp_width: int) -> float:
    return linear_flops(tokens, width, mlp_width) + linear_flops(tokens, mlp_width, width)


def checkpointed_blocks(layers: int, every: int) -> list[int]:
    """Indices of the blocks that recompute in backward (parallel.checkpoint_every = k: blocks
    0, k, 2k, ...); must match models/layers.py."""
    return list(range(0, layers, every))


@dataclass(frozen=True)
class _Ckpt:
    on: bool
    granularity: str  # "block": the whole block's forward again; "mlp": its MLP only
    every: int

    @classmethod
    def of(cls, cfg: Config, backward: bool) -> _Ckpt:
        p = cfg.parallel
        granularity = getattr(p, "checkpoint_granularity", "block")
        if granularity not in ("block", "mlp"):
            raise ValueError(f"parallel.checkpoint_granularity={granularity!r} is unknown")
        every = getattr(p, "checkpoint_every", 1)
        return cls(bool(p.activation_checkpointing and backward), granularity, every)

    def tower(self, tokens: int, width: int, mlp_width: int, layers: int) -> float:
        """Recomputed forward FLOPs of one sequence through a tower's blocks."""
        if not self.on:
            return 0.0
        per = (block_flops if self.granularity == "block" else mlp_flops)(tokens, width, mlp_width)
        return len(checkpointed_blocks(layers, self.every)) * per

    def value_path(self, tokens: int, width: int, mlp_width: int, layers: int) -> float:
        """Recompute of the dense branch, which runs inside the last vision block."""
        if not self.on or layers - 1 not in checkpointed_blocks(layers, self.every):
            return 0.0
        if self.granularity == "block":
            return value_path_flops(tokens, width, mlp_width)
        return mlp_flops(tokens, width, mlp_width)


def _encoder(blocks_fwd: float, head_fwd: float, recompute: float, backward: bool) -> Flops:
    """Transformer blocks + a head (projection), every input needing a gradient."""
    fwd = blocks_fwd + head_fwd
    return Flops(fwd, 2.0 * fwd, recompute) if backward else Flops(fwd)


def text_flops(
    t: TextConfig, length: int, projection_dim: int, ckpt: _Ckpt, backward: bool
) -> Flops:
    """One caption of `length` tokens through the text tower and a projection."""
    blocks = t.layers * block_flops(length, t.width, t.mlp_width)
    recompute = ckpt.tower(length, t.width, t.mlp_width, t.layers)
    return _encoder(blocks, linear_flops(1, t.width, projection_dim), recompute, backward)


def _check(name: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is outside [{lo}, {hi}]")
    return value


def _contrastive(
    rows: int, cols: int, dim: int, recompute: bool, directions: int, backward: bool
) -> Flops:
    """x = a @ b.T of (rows, cols) logits; `directions` 2 when the kernel computes them twice."""
    mm = 2.0 * rows * cols * dim
    if not backward:
        return Flops(mm, 0.0, (directions - 1) * mm)
    per_dir_hw = mm * (3.0 + (1.0 if recompute else 0.0))
    return Flops(mm, 2.0 * mm, per_dir_hw * directions - 3.0 * mm)


# ----------------------------------------------------------------------------- the step


def training_flops(
    cfg: Config,
    *,
    batch_size: int | None = None,
    dp_size: int = 1,
    stage: str | None = None,
    long_len: int | None = None,
    short_len: int | None = None,
    boxes: int | None = None,
    hard_boxes: int | None = None,
    backward: bool = True,
    patches: int | None = None,
) -> FlopReport:
    """FLOPs of one micro-batch on one data-parallel rank (summed over its TP group).

    batch_size: samples of the micro-batch (default data.micro_batch_size); dp_size: data-parallel
    ranks, the global batch of the contrastive losses is batch_size * dp_size; stage: default
    train.stage; long_len / short_len: token length of the long / all short texts after the
    loader's trimming (default the full contexts); boxes: valid boxes in the micro-batch (default
    batch_size * max_boxes); hard_boxes: those of them with hard negatives (default all);
    backward False: forward only (evaluation). FG-CLIP 2 (model.family=fgclip2,
    profiling/flops_fgclip2.py): patches = the batch's patch budget N (default
    data.max_patch_budget); texts always run at their full lengths (long_len/short_len must be
    left out or equal them).
    """
    m, t, v = cfg.model, cfg.model.text, cfg.model.vision
    b = _check("batch_size", cfg.data.micro_batch_size if batch_size is None else batch_size, 1,
               1 << 40)  # fmt: skip
    dp = _check("dp_size", dp_size, 1, 1 << 30)
    stage = cfg.train.stage if stage is None else stage
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {STAGES}")
    if m.family == "fgclip2":
        from fgclip_mega.profiling import flops_fgclip2
        from fgclip_mega.profiling.memory_fgclip2 import check_texts

        check_texts(cfg, long_len, short_len)
        n = _check("patches", cfg.data.max_patch_budget if patches is None else patches, 1,
                   1 << 24)  # fmt: skip
        max_r = b * cfg.data.max_boxes
        r = _check("boxes", max_r if boxes is None else boxes, 0, max_r)
        h = _check("hard_boxes", r if hard_boxes is None else hard_boxes, 0, r)
        parts = flops_fgclip2.training_flops(cfg, b, dp, stage, n, r, h, backward)
        return FlopReport(parts, b, cfg.parallel.tensor_parallel_size, dp)
    if patches is not None:
        raise ValueError("patches is the FG-CLIP 2 patch budget (model.family=fgclip2)")
    long_len = _check("long_len", t.long_context if long_len is None else long_len, 1,
                      t.long_context)  # fmt: skip
    short_len = _check("short_len", t.short_context if short_len is None else short_len, 1,
                       t.short_context)  # fmt: skip
    max_r = b * cfg.data.max_boxes
    r = _check("boxes", max_r if boxes is None else boxes, 0, max_r)
    h = _check("hard_boxes", r if hard_boxes is None else hard_boxes, 0, r)
    k1 = 1 + cfg.data.num_hard_negatives
    tp = cfg.parallel.tensor_parallel_size
    ckpt = _Ckpt.of(cfg, backward)
    p = m.projection_dim
    regional = stage == "regional"

    parts: dict[str, Flops] = {}
    # Image tower, per image. The patch conv is replicated on every TP rank.
    g2 = v.grid_size**2
    n = g2 + 1
    conv = linear_flops(g2, 3 * v.patch_size**2, v.width)
    conv_f = Flops(conv, conv if backward else 0.0)
    conv_f = conv_f + Flops(extra=(tp - 1) * conv_f.hardware)
    blocks = v.layers * block_flops(n, v.width, v.mlp_width)
    recompute = ckpt.tower(n, v.width, v.mlp_width, v.layers)
    head = linear_flops(1, v.width, p)
    parts["image"] = b * (conv_f + _encoder(blocks, head, recompute, backward))
    if regional:
        vp = value_path_flops(n, v.width, v.mlp_width)
        recompute = ckpt.value_path(n, v.width, v.mlp_width, v.layers)
        parts["dense"] = b * _encoder(vp, linear_flops(g2, v.width, p), recompute, backward)

    parts["long_text"] = b * text_flops(t, long_len, p, ckpt, backward)
    short = text_flops(t, short_len, p, ckpt, backward)
    parts["short_text"] = b * short
    if regional:
        parts["region_text"] = r * short
        parts["hard_text"] = (h * k1) * short

    # Losses, replicated on every TP rank. chunked/Triton (and "auto", which picks one of them)
    # recompute each logit tile in backward; naive keeps the matrix.
    recompute = cfg.loss.implementation != "naive"
    directions = 2 if cfg.loss.kind == "softmax" and dp > 1 else 1
    losses = {"loss_global": 2 * _contrastive(b, b * dp, p, recompute, directions, backward)}
    if regional:
        losses["loss_region"] = _contrastive(r, r, p, recompute, 1, backward)  # this rank only
        hard = 2.0 * h * k1 * p  # einsum kd,knd->kn
        losses["loss_hard"] = Flops(hard, 2.0 * hard if backward else 0.0)
    for name, f in losses.items():
        parts[name] = f + Flops(extra=(tp - 1) * f.hardware)
    return FlopReport(parts, b, tp, dp)
