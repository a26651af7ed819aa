"""The FG-CLIP 2 parts of the per-GPU memory model (profiling/memory.py holds the step and the
shared block formula); counted from models/fgclip2.py, naflex.py, siglip2_text.py,
objective/forward_fgclip2.py and losses/fgclip2.py.

Image tokens: N = the batch's patch budget. The batch sizing uses `data.max_patch_budget`, the
worst case a batch can get (the loader gives a batch the smallest budget its largest image
fits, so most batches hold fewer tokens); pass `patches` to size a given budget.

What a micro-batch keeps for backward, beyond the shared transformer block (memory.py
block_saved_bytes, with causal=False for both towers):
  image      the patches (B, N, 3 p^2) (the patch Linear's weight gradient), each block's
             additive attention mask (SDPA turns the bool key-padding mask into a (B, 1, 1, N)
             tensor of the compute dtype; the math backend keeps a (B, N) bool per block), the
             post-norm's input (the whole gathered tower output) and statistics;
  MAP head   (pooled) a contiguous copy of the post-norm output it reads as keys/values
             (F.linear reshapes the transposed (N, B, D) view), the (B, H, 1, N) mask
             materialised per head, the packed k/v copy (2 D per token) and its small per-image
             tensors; replicated on every TP rank, so nothing is divided by TP;
  dense head (stage 2) every patch as a query: its own copy of the keys, mask, the packed
             q/k/v copy (3 D), the fp32
             logsumexp (H), the attention output, its norm's input, output and statistics, fc1's
             output and the GELU output (2 M, the full MLP width: the head is replicated);
  regions    the dense head's output (the canvas gather keeps its input), the gather index
             (B, canvas) int64 (canvas = the batch's largest gh x largest gw; default N, exact
             for one aspect ratio), the rois, the hard-row index;
  text       three calls (long 196, short 64, and in stage 2 the box phrases and hard negatives
             at 64), each padded to its full length (SigLIP pools the last position): token ids,
             the blocks, the whole last block output (pooling reads x[-1], a view that keeps it
             alive), the final norm's statistics and output (the head's input).
Loss (`loss.recipe=fgclip2`): the global sigmoid terms and the region InfoNCE as v1's, TIC's
fp32 normalised phrases, (R, R) mask and top-k, FGT's fp32 candidates (masked, normalised and
packed as one (H (1+N), D) matrix) and its (H, H (1+N)) logits.

CUDA output copy: on CUDA a masked attention keeps one more (B, N, D/tp) tensor than on CPU.
SDPA with a mask runs the memory-efficient kernel (torch 2.14's order: flash, which takes no
mask, then memory-efficient, math, cuDNN), which allocates its output (B, N, H, hd)
contiguous, so the (N, B, H*hd) view the next Linear needs (the NaFlex blocks' transpose, the
MAP dense head's permute) is a copy, kept besides SDPA's own output; on CPU the output follows
q's (N, B, H, hd) layout and the view is free. Counted for device="cuda" (the batch sizing) in
every NaFlex block that keeps its attention and in the dense head; imitated on CPU in
tests/test_memory_fgclip2.py by an SDPA returning that layout; not measured on a GPU. The text
towers have no mask: flash allocates its output like q, no copy.
"""

from __future__ import annotations

from fgclip_mega.config import Config


def embed_dim(cfg: Config) -> int:
    """Width of the embeddings entering the objective: FG-CLIP 2 has no projections."""
    return cfg.model.vision.width


def map_head_params(width: int, mlp_width: int) -> int:
    """AttentionPoolingHead: probe, nn.MultiheadAttention (packed in_proj, out_proj), norm, MLP."""
    d, m = width, mlp_width
    return d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)


def parameter_counts(cfg: Config, block_params) -> dict[str, tuple[int, int]]:
    """Per part: (TP-sharded, replicated) parameter counts of FGCLIP2Model."""
    v, t = cfg.model.vision, cfg.model.text
    vs, vr = block_params(v.width, v.mlp_width)
    ts, tr = block_params(t.width, t.mlp_width)
    side = v.image_size // v.patch_size  # the learnt position table is side x side
    patch = 3 * v.patch_size**2 * v.width + v.width
    vision_rep = (
        patch + side * side * v.width + 2 * v.width + 2 * map_head_params(v.width, v.mlp_width)
    )
    text_rep = t.short_context * t.width + 2 * t.long_context * t.width + 2 * t.width
    temps = 3 + 1  # three logit scales and SigLIP's bias (FGCLIP2Model always has one)
    return {
        "vision": (v.layers * vs, v.layers * vr + vision_rep),
        "text": (t.layers * ts + t.vocab_size * t.width, t.layers * tr + text_rep),
        "text_heads": (0, 3 * (t.width * t.width + t.width)),
        "temperatures": (0, temps),
    }


def check_texts(cfg: Config, long_len: int | None, short_len: int | None) -> tuple[int, int]:
    """SigLIP pads every text to its full length (siglip2_text.py): no other length runs."""
    t = cfg.model.text
    for name, value, full in (("long_len", long_len, t.long_context),
                              ("short_len", short_len, t.short_context)):  # fmt: skip
        if value is not None and value != full:
            raise ValueError(
                f"{name}={value}: FG-CLIP 2 pads texts to their full length {full} (SigLIP "
                "pools the last position)"
            )
    return t.long_context, t.short_context


def vision_activation_bytes(
    cfg: Config,
    batch: int,
    patches: int,
    m,
    w,
    attention: str,
    regional: bool,
    boxes: int,
    hard_boxes: int,
    canvas: int | None,
    device: str = "cuda",
) -> dict[str, float]:
    """models/naflex.py NaFlexVisionTower (+ FGCLIP2Model.region_embeddings); `m` is
    profiling.memory (the shared block formula), `w` its Widths."""
    v = cfg.model.vision
    b, n, d, h, mw = batch, patches, v.width, v.heads, v.mlp_width
    s = m._Shape(n, b, d, h, mw, causal=False)
    sp = m._sp(cfg)
    blocks = m._blocks(s, v.layers, cfg, w, attention, False)
    # The key-padding mask every block's attention keeps (with block checkpointing only the
    # recomputed blocks hold it, during their backward).
    kept = sum(m._block_mode(cfg, i) != "block" for i in range(v.layers))
    blocks += kept * (b * n * w.act if attention != "math" else b * n)
    copy = device == "cuda" and attention != "math"  # the CUDA output copy (docstring)
    if copy and m._padded(n, sp) == n:  # (SP padding copies the output anyway)
        blocks += kept * b * n * d / cfg.parallel.tensor_parallel_size * w.act
    full = m._padded(n, sp) * b * d * w.act  # the gathered tower output (with SP padding)
    tokens = b * n * d * w.act  # post-norm output, the heads' keys and values
    small = b * (4 * d + 2 * mw) * w.act + b * (h + 2) * 4  # the probe query's path
    out = {
        "images": b * n * 3 * v.patch_size**2 * w.params,
        "blocks": blocks,
        "post_norm": full + 2 * b * n * 4,
        "pooled": tokens + b * h * n * w.act + 2 * tokens + small,
    }
    if regional:
        # its own copy of the keys (F.linear reshapes the transposed input), the packed q/k/v,
        # the attention output, the norm's input and output, fc1 and GELU outputs, the mask
        # and the fp32 logsumexp and statistics; + the head's output, kept by the canvas gather
        per_token = (8 * d + 2 * mw + h) * w.act + h * 4 + 2 * 4
        cells = n if canvas is None else canvas
        out["dense"] = b * n * per_token + b * cells * 8 + boxes * 5 * 4 + hard_boxes * 8
        out["dense"] += b * n * d * w.act if device == "cuda" else 0  # the CUDA output copy
    return out


def text_activation_bytes(
    cfg: Config, rows: int, length: int, long: bool, m, w, attention: str
) -> float:
    """models/siglip2_text.py for one call of `rows` texts of `length` tokens, with its head's
    input."""
    if rows == 0:
        return 0.0
    t = cfg.model.text
    tp = cfg.parallel.tensor_parallel_size
    s = m._Shape(length, rows, t.width, t.heads, t.mlp_width, causal=False)
    ids = rows * length * 8 + (rows * length if tp > 1 else 0)  # + the vocab-range mask
    where = length if long else 0  # torch.where's (L, 1) bool condition
    last = m._padded(length, m._sp(cfg)) * rows * t.width * w.act  # kept by the x[-1] view
    head = 2 * rows * 4 + rows * t.width * w.act  # final norm statistics, its output
    return ids + where + m._blocks(s, t.layers, cfg, w, attention, False) + last + head


def activation_bytes(
    cfg: Config,
    batch: int,
    *,
    stage: str,
    patches: int | None,
    boxes: int | None,
    hard_boxes: int | None,
    attention: str,
    canvas: int | None = None,
    device: str = "cuda",
) -> dict[str, float]:
    from fgclip_mega.profiling import memory as m

    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r} is not 'cuda' or 'cpu'")
    w = m.widths(cfg)
    t = cfg.model.text
    n = cfg.data.max_patch_budget if patches is None else patches
    regional = stage == "regional"
    r = batch * cfg.data.max_boxes if boxes is None else boxes
    hb = r if hard_boxes is None else hard_boxes
    k1 = 1 + cfg.data.num_hard_negatives
    vision = vision_activation_bytes(
        cfg, batch, n, m, w, attention, regional, r if regional else 0, hb if regional else 0,
        canvas, device,
    )  # fmt: skip
    out = {f"image_{k}": v for k, v in vision.items()}
    out["long_text"] = text_activation_bytes(cfg, batch, t.long_context, True, m, w, attention)
    out["short_text"] = text_activation_bytes(cfg, batch, t.short_context, False, m, w, attention)
    if regional:  # one call for region phrases and hard negatives (boxtext_head)
        rows = r + hb * k1
        out["box_text"] = text_activation_bytes(cfg, rows, t.short_context, False, m, w, attention)
    return out


def transient_bytes(cfg: Config, batch: int, stage: str, patches: int) -> float:
    """Largest backward working set: a block's widest gradients (and its recompute under block
    checkpointing) over the four tower calls, or the dense head's (full MLP width)."""
    from fgclip_mega.profiling import memory as m

    v, t = cfg.model.vision, cfg.model.text
    w = m.widths(cfg)
    tp = cfg.parallel.tensor_parallel_size
    regional = stage == "regional"
    rows_box = batch * cfg.data.max_boxes * (2 + cfg.data.num_hard_negatives) if regional else 0
    calls = [
        m._Shape(patches, batch, v.width, v.heads, v.mlp_width, False),
        m._Shape(t.long_context, batch, t.width, t.heads, t.mlp_width, False),
        m._Shape(t.short_context, max(batch, rows_box), t.width, t.heads, t.mlp_width, False),
    ]
    worst = 0.0
    for s in calls:
        grads = (2 * s.t * s.mlp_width / tp + 2 * s.t * s.width) * w.act
        if cfg.parallel.activation_checkpointing:
            grads += m.block_saved_bytes(s, "none", cfg, w)
        worst = max(worst, grads)
    if regional:
        worst = max(worst, 2 * batch * patches * (v.mlp_width + v.width) * w.act)
    return worst


def loss_bytes(
    cfg: Config, rows: int, dp_size: int, stage: str, impl: str, e: int, kept: float, work: float
) -> tuple[float, float]:
    """(kept, working set) of FG-CLIP 2's fine-grained terms added to the global terms' `kept`,
    `work` (memory.loss_bytes); e = bytes of an embedding entering the objective."""
    if stage != "regional":
        return kept, work
    d = embed_dim(cfg)
    r = rows * cfg.data.max_boxes
    k1 = 1 + cfg.data.num_hard_negatives
    k = min(cfg.loss.tic_top_k, r)
    # region InfoNCE: regions and phrases, their normalised copies (as v1)
    kept += 2 * r * d * (e + 4)
    # TIC: the fp32 normalised phrases (and their fp32 copy when the phrases are bf16), the
    # (R, R) bool mask, top-k values and indices
    kept += r * d * 4 * (1 if e == 4 else 2) + r * r + r * k * 12
    # FGT: regions as fp32, normalised and scaled, the scaled positives; candidates masked,
    # normalised and packed as one matrix (three fp32 (H, 1+N, D) tensors); the log-softmax of
    # the (H, H(1+N)) box-vs-texts logits and of the (H, H) reverse
    kept += r * d * 16 + 3 * r * k1 * d * 4 + r * r * k1 * 4 + r * r * 4
    work += 2 * r * d * 4 + 2 * r * k1 * d * 4 + 2 * r * r * k1 * 4
    if impl == "naive":
        work += 2 * r * r * 4
    return kept, work
