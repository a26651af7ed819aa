"""FG-CLIP 2's TIC and FGT (with its CMR margin) against float64 transcriptions of upstream
`fgclip2.py` (`hard_category_contrastive_loss`, `hard_contrastive_total_loss`, `get_cmr_loss`,
the threshold all-reduce), at DP 1, 2 and 4, with empty boxes, all-duplicate phrases and masked
negatives; and the collectives one stage-2 objective issues, counted at DP 2 and DP 4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fgclip_mega.config import LossConfig
from fgclip_mega.losses.fgclip2 import (
    fine_grained_textual_loss,
    text_intra_contrast_loss,
)
from fgclip_mega.objective import Embeddings, Objective
from tests.distributed import run_distributed

# ----------------------------------------------------------------------------- references


def _ref_tic(text: torch.Tensor) -> torch.Tensor:
    """Upstream hard_category_contrastive_loss + PNTextLoss, float64 (needs K >= 10)."""
    t = text.double()
    t = t / t.norm(dim=-1, keepdim=True)
    k = t.shape[0]
    sim = t @ t.T
    sim = (torch.ones(k, k, dtype=t.dtype) - torch.eye(k, dtype=t.dtype)) * sim
    sim = torch.where(sim > 0.95, torch.zeros_like(sim), sim)
    values = sim.topk(min(10, k), dim=1).values
    return torch.mean(-torch.log(1.0 / values.exp().sum(dim=1)))


def _ref_fgt(img, txt, logit_scale, tau):
    """Upstream hard_contrastive_total_loss with get_cmr_loss, float64; every negative real.
    img (H, D); txt (H, 11, D). Returns (total, new local threshold)."""
    img = img.double() / img.double().norm(dim=-1, keepdim=True)
    txt = txt.double() / txt.double().norm(dim=-1, keepdim=True)
    h = img.shape[0]
    s = torch.as_tensor(logit_scale, dtype=torch.float64).exp()
    gt, da = txt[:, 0, :], txt[:, 1:, :]
    all_text = torch.cat([gt, da.reshape(-1, gt.shape[-1])])
    per_image = s * img @ all_text.T
    per_text = s * gt @ img.T
    da_logits = s * (da @ img.unsqueeze(-1)).squeeze(-1)
    labels = torch.arange(h)
    loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    pair_logits = s * torch.einsum("bp,bdp->bd", img, txt)
    pair = F.cross_entropy(pair_logits, torch.zeros(h, dtype=torch.long))
    gt_sim = per_image.diag().reshape(-1, 1).expand(da_logits.shape)
    cmr = F.relu(tau + da_logits - gt_sim).mean()
    mask = da_logits != 0
    threshold = gt_sim.mean() - (da_logits * mask).sum() / mask.sum()
    return 0.6 * loss + 3 * pair + 0.4 * cmr, threshold.detach()


def _ref_fgt_masked(img, txt, valid, logit_scale, tau):
    """The masked generalisation, written per box with Python lists: masked negatives are
    removed from every column set; boxes with no real negative leave the (1+N)-way and CMR
    means (but stay in the box-vs-all-texts contrast)."""
    img = img.double() / img.double().norm(dim=-1, keepdim=True)
    txt = txt.double() / txt.double().norm(dim=-1, keepdim=True)
    s = torch.as_tensor(logit_scale, dtype=torch.float64).exp()
    h = img.shape[0]
    columns = [txt[i, 0] for i in range(h)]
    columns += [txt[i, 1 + j] for i in range(h) for j in range(valid.shape[1]) if valid[i, j]]
    columns = torch.stack(columns)
    contrast = 0.0
    for i in range(h):
        contrast = contrast + F.cross_entropy((s * img[i] @ columns.T)[None], torch.tensor([i]))
        contrast = contrast + F.cross_entropy((s * txt[i, 0] @ img.T)[None], torch.tensor([i]))
    contrast = contrast / (2 * h)
    pair, boxes, cmr, pairs = 0.0, 0, 0.0, 0
    for i in range(h):
        negs = [txt[i, 1 + j] for j in range(valid.shape[1]) if valid[i, j]]
        if not negs:
            continue
        cand = torch.stack([txt[i, 0], *negs])
        pair = pair + F.cross_entropy((s * cand @ img[i])[None], torch.tensor([0]))
        boxes += 1
        for n in negs:
            cmr = cmr + F.relu(tau + s * n @ img[i] - s * txt[i, 0] @ img[i])
            pairs += 1
    pair = pair / max(boxes, 1)
    cmr = cmr / max(pairs, 1)
    return 0.6 * contrast + 3 * pair + 0.4 * cmr


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("k", [12, 10, 5, 1])
def test_tic_matches_upstream_and_keeps_all_when_fewer_than_top_k(k):
    gen = torch.Generator().manual_seed(k)
    text = torch.randn(k, 16, generator=gen)
    text[1 % k] = text[0] + 1e-3 * torch.randn(16, generator=gen)  # a near-duplicate pair
    ours, g_ours = _grads(lambda t: text_intra_contrast_loss(t)[0], text)
    ref, g_ref = _grads(_ref_tic, text.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours[0].double(), g_ref[0], rtol=1e-4, atol=1e-6)
    assert text_intra_contrast_loss(text)[1] == k


def test_tic_all_duplicate_phrases_is_constant_with_zero_gradient_and_empty_is_zero():
    text = torch.randn(1, 8).repeat(12, 1)  # every region caption the same phrase
    loss, grads = _grads(lambda t: text_intra_contrast_loss(t)[0], text)
    # Every off-diagonal entry is a duplicate: each row's top 10 are zeros -> log(10).
    torch.testing.assert_close(loss, torch.tensor(10.0).log())
    assert torch.count_nonzero(grads[0]) == 0
    empty = torch.zeros(0, 8, requires_grad=True)
    loss, n = text_intra_contrast_loss(empty)
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and empty.grad.shape == (0, 8)


@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_fgt_matches_upstream_with_ten_real_negatives(tau):
    gen = torch.Generator().manual_seed(3)
    img, txt = torch.randn(6, 16, generator=gen), torch.randn(6, 11, 16, generator=gen)
    logit_scale = torch.tensor(1.2)

    def ours(i, t, ls):
        loss, counted, stat = fine_grained_textual_loss(i, t, ls.exp(), torch.tensor(tau))
        ours.stat, ours.counted = stat, counted
        return loss

    loss, g = _grads(ours, img, txt, logit_scale)
    ref, g_ref = _grads(
        lambda i, t, ls: _ref_fgt(i, t, ls, tau)[0],
        img.double(),
        txt.double(),
        logit_scale.double(),
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    _, threshold = _ref_fgt(img, txt, logit_scale, tau)
    torch.testing.assert_close(ours.stat.double(), threshold, rtol=1e-5, atol=1e-5)
    assert int(ours.counted) == 6


def test_fgt_masked_negatives_match_the_per_box_reference_and_pass_no_gradient():
    gen = torch.Generator().manual_seed(4)
    img, txt = torch.randn(5, 8, generator=gen), torch.randn(5, 11, 8, generator=gen)
    valid = torch.rand(5, 10, generator=gen) > 0.4
    valid[2] = False  # a box with no real negative
    txt[0, 1 + int((~valid[0]).nonzero()[0])] = float("nan")  # a masked negative holding NaN
    scale = torch.tensor(0.9)

    def ours(i, t, ls):
        return fine_grained_textual_loss(i, t, ls.exp(), torch.tensor(0.3), valid)[0]

    loss, g = _grads(ours, img, txt, scale)
    clean = torch.nan_to_num(txt)
    ref, g_ref = _grads(
        lambda i, t, ls: _ref_fgt_masked(i, t, valid, ls, 0.3),
        img.double(),
        clean.double(),
        scale.double(),
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[0].double(), g_ref[0], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(g[1]).all()
    masked = torch.cat([torch.zeros(5, 1, dtype=torch.bool), ~valid], 1)
    assert torch.count_nonzero(g[1][masked]) == 0
    _, counted, _ = fine_grained_textual_loss(img, clean, scale.exp(), torch.tensor(0.3), valid)
    assert int(counted) == 4


def test_fgt_without_boxes_is_zero_and_keeps_the_margin():
    region = torch.zeros(0, 8, requires_grad=True)
    cand = torch.zeros(0, 11, 8, requires_grad=True)
    margin = torch.tensor(2.5)
    loss, counted, stat = fine_grained_textual_loss(region, cand, torch.tensor(10.0), margin)
    loss.backward()
    assert loss.item() == 0.0 and int(counted) == 0 and stat is margin
    with pytest.raises(ValueError, match="candidates must be"):
        fine_grained_textual_loss(
            torch.zeros(3, 8), torch.zeros(2, 11, 8), torch.tensor(1.0), margin
        )


def _emb(gen, b=4, r=12, h=6, d=16, valid=None) -> Embeddings:
    return Embeddings(
        image=torch.randn(b, d, generator=gen),
        long_text=torch.randn(b, d, generator=gen),
        short_text=torch.randn(b, d, generator=gen),
        region=torch.randn(r, d, generator=gen),
        region_text=torch.randn(r, d, generator=gen),
        hard_region=torch.randn(h, d, generator=gen),
        hard_text=torch.randn(h, 11, d, generator=gen),
        hard_valid=valid,
    )


_TEMPS = {
    "logit_scale": torch.tensor(2.3026),
    "logit_scale_finegraind": torch.tensor(2.0),
    "logit_scale_hardneg": torch.tensor(1.5),
    "logit_bias": torch.tensor(-10.0),
}


def _cfg(**kw) -> LossConfig:
    return LossConfig(recipe="fgclip2", kind="sigmoid", implementation="naive", **kw)


def test_objective_fgclip2_terms_weights_and_margin_running_state():
    gen = torch.Generator().manual_seed(5)
    emb = _emb(gen)
    objective = Objective(_cfg(region_weight=0.2), regional=True, impl="naive")
    assert [t.name for t in objective.terms] == ["long", "short", "region", "tic", "fgt"]
    first = objective(emb, _TEMPS)
    fgt1, tau1 = _ref_fgt(emb.hard_region, emb.hard_text, _TEMPS["logit_scale_hardneg"], 0.0)
    torch.testing.assert_close(first.parts["fgt"].double(), fgt1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.parts["tic"].double(), _ref_tic(emb.region_text))
    expected = sum(
        w * first.parts[n]
        for n, w in (("long", 1), ("short", 1), ("region", 0.2), ("tic", 0.1), ("fgt", 0.5))
    )
    torch.testing.assert_close(first.total, expected)
    # Step 2 uses the margin step 1 left (clamped to [0, 10]) and updates it again, on device.
    margin = objective.state["cmr_margin"]
    torch.testing.assert_close(margin.double(), tau1.clamp(0, 10), rtol=1e-5, atol=1e-6)
    second = objective(emb, _TEMPS)
    fgt2, _ = _ref_fgt(
        emb.hard_region, emb.hard_text, _TEMPS["logit_scale_hardneg"], tau1.clamp(0, 10)
    )
    torch.testing.assert_close(second.parts["fgt"].double(), fgt2, rtol=1e-5, atol=1e-5)
    assert tau1 > 0.2
    capped = Objective(_cfg(cmr_max_margin=0.2), regional=True, impl="naive")
    capped(emb, _TEMPS)
    assert capped.state["cmr_margin"].item() == pytest.approx(0.2)


def test_objective_fgclip2_global_stage_has_no_fine_grained_terms():
    objective = Objective(_cfg(), regional=False, impl="naive")
    assert [t.name for t in objective.terms] == ["long", "short"]
    assert objective.temperature_names() == ["logit_scale", "logit_bias"]


# ----------------------------------------------------------------------------- data parallel


def _dp_body(seed: int) -> dict:
    """World of 4: the same objective over DP groups of 2 (ranks 0-1) and of 4 (all ranks);
    returns this rank's losses, margins and collective counts."""
    import collections

    import torch.distributed as dist

    from fgclip_mega.parallel.bootstrap import init_distributed

    init_distributed("gloo")
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    dist.new_group([2, 3])  # every rank takes part in creating each group
    world = dist.group.WORLD
    out = {}
    for name, group, members in (("dp2", pair, [0, 1]), ("dp4", world, [0, 1, 2, 3])):
        if rank not in members:
            continue
        gen = torch.Generator().manual_seed(seed + rank)
        # Rank 1 has no hard boxes at all: it contributes its current margin to the mean.
        emb = _emb(gen, h=0 if rank == 1 else 6)
        objective = Objective(_cfg(), regional=True, impl="naive", dp_group=group)
        counts = collections.Counter()
        originals = {}
        for n in ("all_reduce", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor",
                  "batch_isend_irecv", "broadcast"):  # fmt: skip
            originals[n] = getattr(dist, n)

            def counted(*a, _n=n, _counts=counts, _fn=originals[n], **k):
                _counts[_n] += 1
                return _fn(*a, **k)

            setattr(dist, n, counted)
        try:
            emb.image.requires_grad_(True)
            steps = []
            for _ in range(2):
                res = objective(emb, _TEMPS)
                steps.append(
                    (res.parts["fgt"].item(), objective.state["cmr_margin"].item(), res.parts)
                )
            counts_forward = dict(counts)
            res.total.backward()
            counts_total = dict(counts)
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
        out[name] = {
            "fgt": [s[0] for s in steps],
            "margin": [s[1] for s in steps],
            "hard": (emb.hard_region, emb.hard_text),
            "forward": counts_forward,
            "total": counts_total,
        }
    return out


@pytest.mark.slow
def test_fgt_margin_is_the_dp_mean_and_collectives_do_not_grow_with_dp():
    results = run_distributed(_dp_body, 4, 11)
    scale = _TEMPS["logit_scale_hardneg"]
    for name, members in (("dp2", [0, 1]), ("dp4", [0, 1, 2, 3])):
        tau, stats = torch.tensor(0.0, dtype=torch.float64), {}
        for step in range(2):
            for r in members:
                region, text = results[r][name]["hard"]
                if region.shape[0] == 0:
                    stats[r] = tau
                    expected_loss = 0.0
                else:
                    expected_loss, stats[r] = _ref_fgt(region, text, scale, tau)
                got = results[r][name]["fgt"][step]
                assert abs(got - float(expected_loss)) < 1e-4, (name, step, r)
            tau = (sum(stats[r] for r in members) / len(members)).clamp(0, 10)
            for r in members:
                assert abs(results[r][name]["margin"][step] - tau.item()) < 1e-5, (name, step, r)
    # The same collectives at DP 2 and DP 4: per objective call one gather of the image features
    # (and one of their shapes) for the global terms and one all-reduce of the CMR margin.
    assert results[0]["dp2"]["forward"] == results[0]["dp4"]["forward"]
    assert results[0]["dp2"]["total"] == results[0]["dp4"]["total"]
    assert results[0]["dp4"]["forward"]["all_reduce"] == 2  # two objective calls, one each
