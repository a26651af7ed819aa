"""Evaluation metrics against hand-computed values."""

import torch

from fgclip_mega.eval import hard_negative_accuracy, recall_at_k


def _loop_recall(q, k, top):
    hits = 0
    for i in range(len(q)):
        sims = [float(torch.dot(q[i] / q[i].norm(), k[j] / k[j].norm())) for j in range(len(k))]
        order = sorted(range(len(k)), key=lambda j: -sims[j])[:top]
        hits += i in order
    return hits / len(q)


def test_recall_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(23, 5, generator=g)
    k = q + 0.9 * torch.randn(23, 5, generator=g)  # partially aligned: recall strictly in (0, 1)
    for top in (1, 5):
        want = _loop_recall(q, k, top)
        assert 0.0 < want < 1.0
        assert recall_at_k(q, k, top) == want
    assert recall_at_k(q, q, 1) == 1.0


def test_hard_negative_accuracy_counts_boxes_where_the_true_phrase_wins():
    region = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cands = torch.tensor(
        [
            [[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]],  # true phrase closest: right
            [[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]],  # a negative is closer: wrong
            [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]],  # right
        ]
    )
    assert hard_negative_accuracy(region, cands) == 2 / 3
    assert torch.isnan(torch.tensor(hard_negative_accuracy(region[:0], cands[:0])))
