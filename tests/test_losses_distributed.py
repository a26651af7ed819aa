"""FG-CLIP losses across data-parallel ranks (gloo) against one process over the whole batch.

Each rank holds b samples of a global batch of W * b. A tiny replicated "model" (one projection
matrix per tower, identical on every rank) maps inputs to embeddings; rank r gets rows
r*b .. (r+1)*b. The single-process reference is float64 autograd through
kernels.contrastive.reference (the naive full-logit loss) over the concatenated batch, plus the
mean over ranks of the local region terms. What is compared (see fgclip_mega/losses/
global_loss.py for the convention):
  loss:     mean over ranks of L_r                           == L_ref
  features: this rank's embedding gradient                   == W * rows r of dL_ref/dembedding
  params:   DDP-averaged projection / logit-scale gradients  == dL_ref/dparam
and the collectives issued by forward and by backward, counted by wrapping torch.distributed:
allgather: one all_gather_into_tensor of the features forward (plus one tiny one of their shapes,
which must agree over ranks) and one reduce_scatter_tensor backward, whatever W and however many
text sets; ring: W - 1 batch_isend_irecv forward (plus the shape check), 2W - 1 backward.
A rank with a different batch size or feature width gets a clear error instead of gloo's SIGABRT.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
import torch.nn.functional as F

from fgclip_mega.config import LossConfig, ParallelConfig
from tests.distributed import run_distributed

_COLLECTIVES = (
    "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_gather", "broadcast",
    "reduce_scatter", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
    "batch_isend_irecv", "send", "recv", "barrier",
)  # fmt: skip


@contextlib.contextmanager
def _count_collectives():
    import torch.distributed as dist

    counts = collections.Counter()
    originals = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


B_LOCAL, D_IN, D, M = 5, 6, 7, 2


def _global_data(W):
    g = torch.Generator().manual_seed(123)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    n = W * B_LOCAL
    x_img = r(n, D_IN)
    data = dict(
        x_img=x_img, x_long=x_img + r(n, D_IN), x_short=x_img + 2 * r(n, D_IN),
        w_img=r(D_IN, D), w_long=r(D_IN, D), w_short=r(D_IN, D),
        region=r(n, M, D), phrase=r(n, M, D),
    )  # fmt: skip
    valid = torch.ones(n, M, dtype=torch.bool)
    valid[1::3, 1] = False
    valid[4] = False
    return data, valid


def _reference(data, valid, W, kind, logit_scale, bias, cfg):
    from kernels.contrastive import sigmoid_contrastive_reference, softmax_contrastive_reference

    t = {k: v.clone().requires_grad_() for k, v in data.items()}
    ls = torch.tensor(logit_scale, dtype=torch.float64, requires_grad=True)
    lb = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    feats = {k: t[f"x_{k}"] @ t[f"w_{k}"] for k in ("img", "long", "short")}
    for f in feats.values():
        f.retain_grad()
    s = ls.clamp(max=cfg.max_logit_scale).exp()
    n = lambda x: F.normalize(x, dim=-1)
    img = n(feats["img"])
    total = 0.0
    for k, w in (("long", cfg.long_weight), ("short", cfg.short_weight)):
        if kind == "softmax":
            total = total + w * softmax_contrastive_reference(img, n(feats[k]), s)
        else:
            total = total + w * sigmoid_contrastive_reference(img, n(feats[k]), s, lb)
    # Region terms are local to each rank: the global objective averages them over ranks.
    s_fg = torch.tensor(2.0, dtype=torch.float64).exp()
    for r in range(W):
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        v = valid[rows]
        reg = softmax_contrastive_reference(n(t["region"][rows][v]), n(t["phrase"][rows][v]), s_fg)
        total = total + cfg.region_weight * reg / W
    total.backward()
    grads = {k: t[k].grad for k in ("w_img", "w_long", "w_short", "region", "phrase")}
    grads.update({f"feat_{k}": f.grad for k, f in feats.items()})
    return total.item(), grads, ls.grad.item(), (lb.grad.item() if lb.grad is not None else 0.0)


def _dist_checks(impls: list[str]) -> dict:
    import torch.distributed as dist

    from fgclip_mega.losses import global_contrastive_losses
    from fgclip_mega.objective import Embeddings, Objective
    from fgclip_mega.parallel import init_parallel

    state = init_parallel(ParallelConfig(tensor_parallel_size=1), seed=0)
    W, r, group = state.dp_size, state.dp_rank, state.dp_group
    data, valid = _global_data(W)
    rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
    report = {}
    x = torch.randn(B_LOCAL, D)
    try:  # the data-parallel group must be explicit once there is more than one process
        global_contrastive_losses(x, [x], torch.tensor(1.0), group=None)
    except ValueError as e:
        assert "data-parallel process group" in str(e)
    else:
        raise AssertionError("group=None was accepted in a world of several processes")
    # Issue 9: unequal batch sizes (and widths) over ranks -> a clear error on every rank.
    for shape in ((B_LOCAL + r, D), (B_LOCAL, D + r)):
        y = torch.randn(*shape)
        try:
            global_contrastive_losses(y, [y], torch.tensor(1.0), group=group)
        except ValueError as e:
            assert "different shapes" in str(e) and "micro-batch size" in str(e), str(e)
        else:
            raise AssertionError(f"mismatched shapes {shape} over ranks were accepted")
    for kind in ("softmax", "sigmoid"):
        for gather in ("allgather", "ring"):
            for impl in impls:
                cfg = LossConfig(kind=kind, gather=gather, implementation=impl, chunk_size=3)
                ref_loss, ref_g, ref_ls, ref_lb = _reference(data, valid, W, kind, 2.3, -1.0, cfg)
                # Local rows of the inputs, replicated fp32 parameters.
                p = {k: data[k].float().requires_grad_() for k in ("w_img", "w_long", "w_short")}
                reg = data["region"][rows].float().requires_grad_()
                phr = data["phrase"][rows].float().requires_grad_()
                ls = torch.tensor(2.3, requires_grad=True)
                lb = torch.tensor(-1.0, requires_grad=True)
                feats = {
                    k: data[f"x_{k}"][rows].float() @ p[f"w_{k}"] for k in ("img", "long", "short")
                }
                for f in feats.values():
                    f.retain_grad()
                v = valid[rows]
                emb = Embeddings(
                    image=feats["img"], long_text=feats["long"], short_text=feats["short"],
                    region=reg[v], region_text=phr[v],
                    hard_region=reg[v][:0], hard_text=reg[v][:0, None].expand(0, 2, D),
                )  # fmt: skip
                temps = {"logit_scale": ls, "logit_scale_finegraind": torch.tensor(2.0),
                         "logit_scale_hardneg": torch.tensor(2.0), "logit_bias": lb}  # fmt: skip
                objective = Objective(cfg, regional=True, impl=impl, dp_group=group)
                with _count_collectives() as fwd_counts:
                    out = objective(emb, temps)
                with _count_collectives() as bwd_counts:
                    out.total.backward()
                if gather == "allgather":
                    want_f = {"all_gather_into_tensor": 2}  # the shape check, then the features
                    want_b = {"reduce_scatter_tensor": 1}
                else:
                    want_f = {"all_gather_into_tensor": 1, "batch_isend_irecv": W - 1}
                    want_b = {"batch_isend_irecv": 2 * W - 1}
                tag = f"{kind}/{gather}/{impl}"
                assert dict(fwd_counts) == want_f, (tag, dict(fwd_counts))
                assert dict(bwd_counts) == want_b, (tag, dict(bwd_counts))

                def rel(x, ref):
                    return ((x.double() - ref).abs().max() / ref.abs().max()).item()

                loss = out.total.detach().clone()
                dist.all_reduce(loss, group=group)
                errs = {"loss": abs(loss.item() / W - ref_loss) / abs(ref_loss)}
                for k in ("img", "long", "short"):
                    errs[f"feat_{k}"] = rel(feats[k].grad, W * ref_g[f"feat_{k}"][rows])
                errs["region"] = rel(reg.grad, W * ref_g["region"][rows])
                errs["phrase"] = rel(phr.grad, W * ref_g["phrase"][rows])
                for k, v in p.items():  # DDP: average parameter gradients over the DP group
                    g = v.grad.clone()
                    dist.all_reduce(g, group=group)
                    errs[k] = rel(g / W, ref_g[k])
                scalars = torch.stack([ls.grad, lb.grad if lb.grad is not None else ls.grad * 0])
                dist.all_reduce(scalars, group=group)
                errs["logit_scale"] = abs(scalars[0].item() / W - ref_ls) / abs(ref_ls)
                if kind == "sigmoid":
                    errs["logit_bias"] = abs(scalars[1].item() / W - ref_lb) / abs(ref_lb)
                for k, e in errs.items():
                    assert e <= (1e-5 if k == "loss" else 1e-4), (tag, k, e)
                report[tag] = max(errs.values())
    return report


def test_global_losses_world2_allgather_and_ring():
    reports = run_distributed(_dist_checks, 2, ["chunked", "triton"])
    assert len(reports[0]) == 2 * 2 * 2


@pytest.mark.slow
def test_global_losses_world4_allgather_and_ring():
    reports = run_distributed(_dist_checks, 4, ["chunked"], timeout=600)
    assert len(reports[0]) == 2 * 2


def _single_process_equals_reference():
    # No torch.distributed at all: the loss is the plain single-process one.
    from fgclip_mega.losses import global_contrastive_losses
    from kernels.contrastive import softmax_contrastive_reference

    data, _ = _global_data(1)
    img = data["x_img"] @ data["w_img"]
    txt = data["x_long"] @ data["w_long"]
    s = torch.tensor(12.0)
    (ours,) = global_contrastive_losses(img.float(), [txt.float()], s, group=None)
    ref = softmax_contrastive_reference(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), s)
    return ours.item(), ref.item()


def test_no_process_group_is_single_process():
    ours, ref = _single_process_equals_reference()
    assert ours == pytest.approx(ref, rel=1e-5)
