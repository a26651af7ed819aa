"""The FG-CLIP objective in one process: hand-computed values, float64 gradients, empty sets.

Test data is padded (b, M, ...) with masks; `_our_loss` flattens it the way the loader packs a
batch (valid boxes image by image, the hard boxes with [positive, negatives] stacked) and calls
`fgclip_mega.objective.Objective`.

The hand reference is explicit float64 loops over Python lists (no torch, none of our code); the
gradient reference is float64 autograd through kernels.contrastive.reference (naive full
logits) and plain torch for the hard-negative term.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fgclip_mega.config import LossConfig
from fgclip_mega.losses import hard_negative_loss, resolve_implementation
from fgclip_mega.objective import TERMS, Embeddings, LossTerm, Objective
from kernels.contrastive import sigmoid_contrastive_reference, softmax_contrastive_reference

CAP = LossConfig().max_logit_scale  # ln 100
B, M, N, D = 3, 2, 3, 5
BOX_VALID = torch.tensor([[True, True], [True, False], [False, False]])
HARD_VALID = torch.tensor([[True, False], [True, False], [False, False]])  # 2 boxes with negs
NEG_VALID = torch.tensor([[[True] * N, [True] * N], [[True, True, False], [True] * N],
                          [[True] * N, [True] * N]])  # fmt: skip
SCALES = (2.6592, 2.0, 3.0)  # logit_scale, logit_scale_finegraind, logit_scale_hardneg


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    image = r(B, D)
    return dict(
        image=image, long_text=image + r(B, D), short_text=image + 1.5 * r(B, D),
        region=r(B, M, D), phrase=r(B, M, D), hard_negatives=r(B, M, N, D),
    )  # fmt: skip


# ----------------------------------------------------------------------------- hand reference


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(u, v):
    return sum(x * y for x, y in zip(u, v, strict=True))


def _hand_infonce(A, Bs, s):
    A, Bs = [_unit(a) for a in A], [_unit(b) for b in Bs]
    n = len(A)
    L = [[s * _dot(A[i], Bs[j]) for j in range(n)] for i in range(n)]
    row = sum(math.log(sum(math.exp(L[i][j]) for j in range(n))) - L[i][i] for i in range(n)) / n
    col = sum(math.log(sum(math.exp(L[i][j]) for i in range(n))) - L[j][j] for j in range(n)) / n
    return 0.5 * (row + col)


def _hand_sigmoid(A, Bs, s, t):
    A, Bs = [_unit(a) for a in A], [_unit(b) for b in Bs]
    n, total = len(A), 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1.0 + math.exp(-z * (s * _dot(A[i], Bs[j]) + t)))
    return total / n


def _hand_fgclip(batch, scales, box_valid, hard_valid, neg_valid, kind="softmax", bias=0.0):
    s, s_fg, s_h = (math.exp(min(x, CAP)) for x in scales)
    img, long, short = (batch[k].tolist() for k in ("image", "long_text", "short_text"))
    if kind == "softmax":
        parts = {"long": _hand_infonce(img, long, s), "short": _hand_infonce(img, short, s)}
    else:
        parts = {"long": _hand_sigmoid(img, long, s, bias),
                 "short": _hand_sigmoid(img, short, s, bias)}  # fmt: skip
    regions, phrases, hard = [], [], []
    for i in range(B):
        for m in range(M):
            if not box_valid[i][m]:
                continue
            r, p = batch["region"][i][m].tolist(), batch["phrase"][i][m].tolist()
            regions.append(r)
            phrases.append(p)
            if hard_valid[i][m]:
                negs = [batch["hard_negatives"][i][m][k].tolist() for k in range(N)
                        if neg_valid[i][m][k]]  # fmt: skip
                logits = [s_h * _dot(_unit(r), _unit(c)) for c in [p, *negs]]
                hard.append(math.log(sum(math.exp(x) for x in logits)) - logits[0])
    parts["region"] = _hand_infonce(regions, phrases, s_fg) if regions else 0.0
    parts["hard"] = sum(hard) / len(hard) if hard else 0.0
    parts["loss"] = parts["long"] + parts["short"] + 0.1 * parts["region"] + 0.5 * parts["hard"]
    return parts


# ----------------------------------------------------------------------------- float64 autograd


def _torch_ref(t, scales, box_valid, hard_valid, neg_valid):
    s, s_fg, s_h = (x.clamp(max=CAP).exp() for x in scales)
    n = lambda x: F.normalize(x, dim=-1)
    img = n(t["image"])
    total = softmax_contrastive_reference(img, n(t["long_text"]), s)
    total = total + softmax_contrastive_reference(img, n(t["short_text"]), s)
    r, p = n(t["region"][box_valid]), n(t["phrase"][box_valid])
    total = total + 0.1 * softmax_contrastive_reference(r, p, s_fg)
    sel = box_valid & hard_valid
    cand = n(torch.cat([t["phrase"][sel][:, None], t["hard_negatives"][sel]], 1))
    logits = s_h * (n(t["region"][sel])[:, None] * cand).sum(-1)
    keep = torch.cat([torch.ones(sel.sum(), 1, dtype=torch.bool), neg_valid[sel]], 1)
    logits = logits.masked_fill(~keep, float("-inf"))
    hard = F.cross_entropy(logits, torch.zeros(sel.sum(), dtype=torch.long))
    return total + 0.5 * hard


def _leaves(batch, dtype):
    return {k: v.to(dtype).requires_grad_() for k, v in batch.items()}


def _scales(values, dtype=torch.float32):
    return [torch.tensor(v, dtype=dtype, requires_grad=True) for v in values]


def _temps(scales, bias=None):
    names = ("logit_scale", "logit_scale_finegraind", "logit_scale_hardneg")
    temps = dict(zip(names, scales, strict=True))
    if bias is not None:
        temps["logit_bias"] = bias
    return temps


def _flat(t, box_valid=BOX_VALID, hard_valid=HARD_VALID, neg_valid=NEG_VALID) -> Embeddings:
    if box_valid.dtype != torch.bool:  # counts (b,): the first counts[i] slots are boxes
        box_valid = torch.arange(M)[None, :] < box_valid[:, None]
    sel = box_valid & hard_valid
    hard_text = torch.cat([t["phrase"][sel][:, None], t["hard_negatives"][sel]], 1)
    return Embeddings(
        image=t["image"], long_text=t["long_text"], short_text=t["short_text"],
        region=t["region"][box_valid], region_text=t["phrase"][box_valid],
        hard_region=t["region"][sel], hard_text=hard_text,
        hard_valid=None if neg_valid is None else neg_valid[sel],
    )  # fmt: skip


def _our_loss(t, scales, cfg, box_valid=BOX_VALID, hard_valid=HARD_VALID, neg_valid=NEG_VALID,
              bias=None):  # fmt: skip
    emb = _flat(t, box_valid, hard_valid, neg_valid)
    impl = resolve_implementation(cfg.implementation, "cpu")
    objective = Objective(cfg, regional=True, impl=impl)
    return objective(emb, _temps(scales, bias))


@pytest.mark.parametrize("impl", ["chunked", "triton", "naive"])
def test_total_matches_hand_computed(impl):
    batch = _batch()
    out = _our_loss(_leaves(batch, torch.float32), _scales(SCALES), LossConfig(implementation=impl))
    hand = _hand_fgclip(batch, SCALES, BOX_VALID.tolist(), HARD_VALID.tolist(), NEG_VALID.tolist())
    for key in ("long", "short", "region", "hard", "loss"):
        assert out.parts[key].item() == pytest.approx(hand[key], rel=1e-5), key
    assert out.total.item() == pytest.approx(hand["loss"], rel=1e-5)
    assert out.counts["region"] == 3 and int(out.counts["hard"]) == 2
    assert out.parts["scale"].item() == pytest.approx(math.exp(SCALES[0]), rel=1e-6)
    assert all(not v.requires_grad for v in out.parts.values())


def test_sigmoid_total_matches_hand_computed():
    batch = _batch(1)
    cfg = LossConfig(kind="sigmoid")
    bias = torch.tensor(-4.0, requires_grad=True)
    out = _our_loss(_leaves(batch, torch.float32), _scales(SCALES), cfg, bias=bias)
    hand = _hand_fgclip(batch, SCALES, BOX_VALID.tolist(), HARD_VALID.tolist(),
                        NEG_VALID.tolist(), kind="sigmoid", bias=-4.0)  # fmt: skip
    for key in ("long", "short", "region", "hard", "loss"):
        assert out.parts[key].item() == pytest.approx(hand[key], rel=1e-5), key
    out.total.backward()
    # d/dbias against float64 autograd through the naive SigLIP reference
    b64 = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(math.exp(SCALES[0]), dtype=torch.float64)
    img = F.normalize(batch["image"], dim=-1)
    ref = sum(sigmoid_contrastive_reference(img, F.normalize(batch[k], dim=-1), s, b64)
              for k in ("long_text", "short_text"))  # fmt: skip
    ref.backward()
    assert bias.grad.item() == pytest.approx(b64.grad.item(), rel=1e-5)


def test_sigmoid_needs_bias():
    with pytest.raises(ValueError, match="temperatures.*logit_bias"):
        _our_loss(_leaves(_batch(), torch.float32), _scales(SCALES), LossConfig(kind="sigmoid"))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_gradients_match_float64_autograd(impl):
    batch = _batch(2)
    ours, scales = _leaves(batch, torch.float32), _scales(SCALES)
    _our_loss(ours, scales, LossConfig(implementation=impl)).total.backward()
    ref, ref_scales = _leaves(batch, torch.float64), _scales(SCALES, torch.float64)
    _torch_ref(ref, ref_scales, BOX_VALID, HARD_VALID, NEG_VALID).backward()
    for k in ours:
        err = (ours[k].grad.double() - ref[k].grad).abs().max() / ref[k].grad.abs().max()
        assert err <= 1e-4, (k, err.item())
    for name, a, b in zip(("scale", "fg", "hard"), scales, ref_scales, strict=True):
        assert a.grad.item() == pytest.approx(b.grad.item(), rel=1e-4, abs=1e-7), name


def _grads_zero_or_none(*tensors):
    return all(t.grad is None or not t.grad.any() for t in tensors)


def test_empty_region_and_hard_sets_are_zero_with_zero_gradients():
    # No valid box anywhere (padding filled with NaN, which must not leak), then boxes without
    # hard negatives, then flat inputs with zero boxes.
    batch = _batch(3)
    t = _leaves(batch, torch.float32)
    with torch.no_grad():
        t["region"].fill_(float("nan"))
        t["phrase"].fill_(float("nan"))
        t["hard_negatives"].fill_(float("nan"))
    scales = _scales(SCALES)
    none = torch.zeros(B, M, dtype=torch.bool)
    out = _our_loss(t, scales, LossConfig(), box_valid=none)
    assert out.parts["region"].item() == 0.0 and out.parts["hard"].item() == 0.0
    assert torch.isfinite(out.total)
    assert out.total.item() == pytest.approx(out.parts["long"].item() + out.parts["short"].item())
    out.total.backward()
    assert t["region"].grad is not None
    assert _grads_zero_or_none(t["region"], t["phrase"], t["hard_negatives"], *scales[1:])
    assert torch.isfinite(t["image"].grad).all() and t["image"].grad.abs().sum() > 0

    t = _leaves(batch, torch.float32)
    scales = _scales(SCALES)
    out = _our_loss(t, scales, LossConfig(), hard_valid=torch.zeros(B, M, dtype=torch.bool))
    assert out.parts["hard"].item() == 0.0 and int(out.counts["hard"]) == 0
    assert out.parts["region"].item() > 0
    out.total.backward()
    assert _grads_zero_or_none(t["hard_negatives"], scales[2])
    assert t["region"].grad.abs().sum() > 0

    flat = Embeddings(
        image=batch["image"].float(), long_text=batch["long_text"].float(),
        short_text=batch["short_text"].float(),
        region=torch.zeros(0, D, requires_grad=True),
        region_text=torch.zeros(0, D, requires_grad=True),
        hard_region=torch.zeros(0, D, requires_grad=True),
        hard_text=torch.zeros(0, 1 + N, D, requires_grad=True),
    )  # fmt: skip
    out = Objective(LossConfig(), regional=True)(flat, _temps(_scales(SCALES)))
    assert out.parts["region"].item() == 0.0 and out.parts["hard"].item() == 0.0
    out.total.backward()
    assert torch.isfinite(out.total)
    assert _grads_zero_or_none(flat.region, flat.region_text, flat.hard_region, flat.hard_text)


def test_box_counts_equal_mask():
    batch = _batch(4)
    a = _our_loss(_leaves(batch, torch.float32), _scales(SCALES), LossConfig())
    b = _our_loss(_leaves(batch, torch.float32), _scales(SCALES), LossConfig(),
                  box_valid=torch.tensor([2, 1, 0]))  # fmt: skip
    for key in ("region", "hard", "loss"):
        assert a.parts[key].item() == pytest.approx(b.parts[key].item(), rel=1e-6)


def test_logit_scales_clamped_and_frozen():
    batch = _batch(5)
    scales = _scales((5.0, 4.0, 7.0))  # above ln 100 except the fine-grained one
    out = _our_loss(_leaves(batch, torch.float32), scales, LossConfig())
    cap = math.exp(LossConfig().max_logit_scale)  # ~100
    assert out.parts["scale"].item() == pytest.approx(cap, rel=1e-6)
    assert out.parts["scale_hardneg"].item() == pytest.approx(cap, rel=1e-6)
    assert out.parts["scale_finegraind"].item() == pytest.approx(math.exp(4.0), rel=1e-6)
    out.total.backward()
    assert scales[0].grad.item() == 0.0 and scales[2].grad.item() == 0.0  # CLIP's clamp
    assert scales[1].grad.item() != 0.0

    scales = _scales(SCALES)
    out = _our_loss(_leaves(batch, torch.float32), scales, LossConfig(learn_temperatures=False))
    out.total.backward()
    # Frozen: exactly zero gradients (a zero term keeps them in megatron DDP's overlapped buckets).
    assert all(s.grad is not None and torch.count_nonzero(s.grad) == 0 for s in scales)


def test_stage1_terms_only_and_weights():
    batch = _batch(6)
    cfg = LossConfig(long_weight=0.3, short_weight=2.0)
    emb = Embeddings(image=batch["image"].float(), long_text=batch["long_text"].float(),
                     short_text=batch["short_text"].float())  # fmt: skip
    out = Objective(cfg, regional=False)(emb, {"logit_scale": torch.tensor(SCALES[0])})
    assert set(out.parts) == {"long", "short", "scale", "loss"}
    assert out.total.item() == pytest.approx(
        0.3 * out.parts["long"].item() + 2.0 * out.parts["short"].item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="temperatures.*logit_scale_finegraind"):
        Objective(cfg, regional=True)(emb, {"logit_scale": torch.tensor(SCALES[0])})


def test_a_new_term_is_one_entry():
    # How FG-CLIP 2-style terms are added: one LossTerm in the list (weight from LossConfig when
    # it has <name>_weight, else its default), computed from the same Embeddings.
    def text_alignment(emb, scale, ctx):  # long vs short caption of the same image
        cos = F.cosine_similarity(emb.long_text, emb.short_text, dim=-1)
        return (1 - cos).mean() * scale / scale.detach(), emb.long_text.shape[0]

    batch = _batch(8)
    t = _leaves(batch, torch.float32)
    extra = LossTerm("align", "logit_scale", regional=False, default_weight=0.25, fn=text_alignment)
    temps = _temps(_scales(SCALES))
    base = Objective(LossConfig(), regional=True)(_flat(t), temps)
    more = Objective(LossConfig(), regional=True, terms=(*TERMS, extra))(_flat(t), temps)
    want = (1 - F.cosine_similarity(t["long_text"], t["short_text"], dim=-1)).mean()
    assert more.parts["align"].item() == pytest.approx(want.item(), rel=1e-5)
    assert more.counts["align"] == B
    assert more.total.item() == pytest.approx(base.total.item() + 0.25 * want.item(), rel=1e-5)


def test_nan_in_a_masked_negative_does_not_leak_and_empty_boxes_do_not_count():
    # Issue 9: masked_fill on the logits passed NaN * 0 = NaN back into the gradients; a box whose
    # negatives are all masked still counted in the mean.
    g = torch.Generator().manual_seed(9)
    region = torch.randn(3, D, generator=g, requires_grad=True)
    cand = torch.randn(3, 1 + N, D, generator=g)
    cand[0, 2] = float("nan")  # masked negative of box 0
    cand[2, 1:] = float("nan")  # box 2: every negative masked
    cand.requires_grad_()
    valid = torch.tensor([[True, False, True], [True, True, True], [False, False, False]])
    scale = torch.tensor(10.0, requires_grad=True)
    loss, counted = hard_negative_loss(region, cand, scale, valid)
    assert int(counted) == 2 and torch.isfinite(loss)
    loss.backward()
    for t in (region, cand, scale):
        assert torch.isfinite(t.grad).all()
    assert not cand.grad[2].any() and not region.grad[2].any()
    # Equal to the mean over the two counted boxes computed without the masked entries.
    want = 0.0
    for h, keep in ((0, [0, 1, 3]), (1, [0, 1, 2, 3])):
        c = F.normalize(cand.detach()[h, keep].double(), dim=-1)
        logits = 10.0 * c @ F.normalize(region.detach()[h].double(), dim=-1)
        want += (torch.logsumexp(logits, 0) - logits[0]).item() / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_dispatch(monkeypatch):
    assert resolve_implementation("auto", "cpu") == "chunked"
    assert resolve_implementation("naive", "cpu") == "naive"
    assert resolve_implementation("chunked", "cpu") == "chunked"
    assert resolve_implementation("triton", "cpu") == "triton"  # conftest: TRITON_INTERPRET=1
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_implementation("triton", "cpu")
    with pytest.raises(ValueError):
        resolve_implementation("fast", "cpu")


@pytest.mark.gpu
def test_dispatch_picks_triton_on_cuda():
    assert resolve_implementation("auto", "cuda") == "triton"


def test_flat_layout_without_negative_mask_equals_all_valid_mask():
    batch = _batch(7)
    all_negs = torch.ones_like(NEG_VALID)
    a = _our_loss(_leaves(batch, torch.float32), _scales(SCALES), LossConfig(), neg_valid=all_negs)
    b = _our_loss(_leaves(batch, torch.float32), _scales(SCALES), LossConfig(), neg_valid=None)
    for key in ("long", "short", "region", "hard", "loss"):
        assert a.parts[key].item() == pytest.approx(b.parts[key].item(), rel=1e-6), key
