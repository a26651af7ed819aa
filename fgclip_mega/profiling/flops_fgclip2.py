"""FLOPs of one FG-CLIP 2 micro-batch (models/fgclip2.py, naflex.py, siglip2_text.py,
objective/forward_fgclip2.py, losses/fgclip2.py), in profiling/flops.py's convention.

  image: the patch Linear over all N patches of the batch's budget (padding included: it runs
      on them; backward is its weight gradient only), the blocks over N tokens (attention over
      the full N x N, the masked keys included), the MAP head: the probe's q projection, the
      k/v projection of the N tokens, the probe's attention, out_proj and the MLP of one row;
  dense (stage 2): the dense head with every patch a query: packed q/k/v, N x N attention,
      out_proj and the MLP over N rows;
  long / short text: the blocks at 196 / 64 tokens (texts are never cut) and a (D, D) head;
  box text (stage 2): region phrases and hard negatives (positive + K per box) at 64 tokens;
  losses: the global sigmoid terms (long, short) b x B, the region InfoNCE R x R, TIC's R x R
      phrase similarities (one product of the phrases with themselves: 2 products backward),
      FGT's H x H(1+K) box-vs-texts logits, the H x H reverse and the H x (1+K) pair logits.
The MAP heads, the text heads and the patch Linear are replicated on every TP rank: their work
is counted once in the model FLOPs and (TP - 1) times more in `extra`, as the losses are.
"""

from __future__ import annotations

from fgclip_mega.config import Config
from fgclip_mega.profiling.flops import (
    Flops,
    _Ckpt,
    _contrastive,
    _encoder,
    block_flops,
    linear_flops,
    mlp_flops,
)


def pool_head_flops(tokens: int, width: int, mlp_width: int) -> float:
    """Forward of the MAP head on one image: one probe query over `tokens` keys/values."""
    n, d = tokens, width
    return (
        linear_flops(1, d, d)  # q of the probe
        + linear_flops(n, d, 2 * d)  # k, v of the tokens
        + 2.0 * n * d * 2  # q k^T and the weighted values for one query
        + linear_flops(1, d, d)  # out_proj
        + mlp_flops(1, d, mlp_width)
    )


def dense_head_flops(tokens: int, width: int, mlp_width: int) -> float:
    """Forward of the dense feature head on one image: every token a query."""
    n, d = tokens, width
    return (
        linear_flops(n, d, 3 * d)
        + 4.0 * n * n * d
        + linear_flops(n, d, d)
        + mlp_flops(n, d, mlp_width)
    )


def _replicated(f: Flops, tp: int) -> Flops:
    return f + Flops(extra=(tp - 1) * f.hardware)


def training_flops(
    cfg: Config,
    b: int,
    dp: int,
    stage: str,
    patches: int,
    r: int,
    h: int,
    backward: bool,
) -> dict[str, Flops]:
    """Parts of one micro-batch of `b` images at patch budget `patches`, `r` boxes of which
    `h` have hard negatives (arguments checked by flops.training_flops)."""
    v, t = cfg.model.vision, cfg.model.text
    tp = cfg.parallel.tensor_parallel_size
    ckpt = _Ckpt.of(cfg, backward)
    d = v.width
    n = patches
    k1 = 1 + cfg.data.num_hard_negatives
    regional = stage == "regional"
    bwd = 2.0 if backward else 0.0

    parts: dict[str, Flops] = {}
    patch = linear_flops(n, 3 * v.patch_size**2, d)
    patch_f = _replicated(Flops(patch, patch if backward else 0.0), tp)
    blocks = v.layers * block_flops(n, d, v.mlp_width)
    recompute = ckpt.tower(n, d, v.mlp_width, v.layers)
    pool = pool_head_flops(n, d, v.mlp_width)
    parts["image"] = b * (patch_f + _encoder(blocks, 0.0, recompute, backward))
    parts["image_head"] = b * _replicated(Flops(pool, bwd * pool), tp)
    if regional:
        dense = dense_head_flops(n, d, v.mlp_width)
        parts["dense"] = b * _replicated(Flops(dense, bwd * dense), tp)

    def text(length: int) -> tuple[Flops, Flops]:
        """(tower, head) of one text of `length` tokens."""
        tower = t.layers * block_flops(length, t.width, t.mlp_width)
        recompute = ckpt.tower(length, t.width, t.mlp_width, t.layers)
        head = linear_flops(1, t.width, t.width)
        return _encoder(tower, 0.0, recompute, backward), _replicated(Flops(head, bwd * head), tp)

    rows = {"long_text": (b, t.long_context), "short_text": (b, t.short_context)}
    if regional:
        rows["box_text"] = (r + h * k1, t.short_context)
    for name, (count, length) in rows.items():
        tower, head = text(length)
        parts[name] = count * (tower + head)

    # Losses, replicated on every TP rank; chunked/Triton recompute logit tiles in backward.
    recompute_tiles = cfg.loss.implementation != "naive"
    losses = {"loss_global": 2 * _contrastive(b, b * dp, d, recompute_tiles, 1, backward)}
    if regional:
        losses["loss_region"] = _contrastive(r, r, d, recompute_tiles, 1, backward)
        tic = 2.0 * r * r * d  # t @ t.T
        losses["loss_tic"] = Flops(tic, 2.0 * tic if backward else 0.0)
        fgt = 2.0 * h * (h * k1) * d + 2.0 * h * h * d + 2.0 * h * k1 * d
        losses["loss_fgt"] = Flops(fgt, bwd * fgt)
    for name, f in losses.items():
        parts[name] = _replicated(f, tp)
    return parts
