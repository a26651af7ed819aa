"""Evaluation metrics on gathered embeddings: pure functions, no model, no process group.

Conventions shared by every metric here:
- embeddings are compared by cosine similarity (each row L2-normalised);
- ties count against the model: a query only "ranks" its true match above a wrong candidate
  when the score is strictly higher (a constant model scores 0, never chance by luck), except
  pairwise accuracy, where a tie counts 1/2 so that chance is exactly 0.5;
- text identity decides what a hit is: in retrieval any candidate whose text is identical to
  the query's own text counts (phrases like 'a small red plain circle' repeat in a set).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def text_ids(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token rows -> (N,) int64 ids, equal exactly when the rows are identical."""
    if tokens.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.unique(tokens.reshape(tokens.shape[0], -1), dim=0, return_inverse=True)[1]


def retrieval_recall(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_ids: torch.Tensor,
    key_ids: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[int, float]:
    """Recall@k: query i is a hit at k when a key j with key_ids[j] == query_ids[i] is among
    the k best keys; queries (N, D), keys (M, D). Rank = number of wrong keys scoring at least
    the best right key (ties against the model). Queries without any right key are skipped."""
    if queries.shape[0] == 0 or keys.shape[0] == 0:
        return {k: math.nan for k in ks}
    sims = _norm(queries) @ _norm(keys).T  # (N, M)
    right = query_ids[:, None].to(keys.device) == key_ids[None, :].to(keys.device)  # (N, M)
    has_right = right.any(dim=1)
    best_right = sims.masked_fill(~right, -math.inf).max(dim=1).values  # (N,)
    rank = ((sims >= best_right[:, None]) & ~right).sum(dim=1)  # wrong keys at least as good
    rank, n = rank[has_right], int(has_right.sum())
    return {k: (int((rank < k).sum()) / n if n else math.nan) for k in ks}


def hard_negative_scores(region: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """region (H, D), candidates (H, 1+K, D) with the true phrase at 0 -> cosines (H, 1+K)."""
    return torch.einsum("hd,hkd->hk", _norm(region), _norm(candidates))


def hard_negative_accuracy(
    scores: torch.Tensor, attributes: list[list[str]] | None = None
) -> dict[str, float]:
    """Box-level accuracy from (H, 1+K) scores: the positive scores strictly above all K
    negatives ('all'), and per changed attribute (above all negatives that change it, over boxes
    that have at least one such negative)."""
    if scores.shape[0] == 0:
        return {"all": math.nan}
    margin = scores[:, :1] - scores[:, 1:]  # (H, K) > 0 where the positive wins
    out = {"all": float((margin > 0).all(dim=1).double().mean())}
    for attr in _attribute_names(attributes):
        mask = _mask(attributes, attr, margin.shape)
        boxes = mask.any(dim=1)
        if boxes.any():
            wins = ((margin > 0) | ~mask).all(dim=1)
            out[attr] = float(wins[boxes].double().mean())
    return out


def _won(scores: torch.Tensor) -> torch.Tensor:
    """(H, 1+K) scores -> (H, K) float64: 1 where the positive beats that negative, 1/2 on a tie."""
    margin = scores[:, :1] - scores[:, 1:]
    return (margin > 0).double() + 0.5 * (margin == 0).double()


def pairwise_accuracy(
    scores: torch.Tensor, attributes: list[list[str]] | None = None
) -> dict[str, float]:
    """Positive vs each single negative, averaged over (box, negative) pairs: chance is exactly
    0.5 (a tie counts 1/2). 'all' and per changed attribute."""
    if scores.shape[0] == 0:
        return {"all": math.nan}
    out = {"all": float(_won(scores).mean())}
    if attributes:
        out.update({a: acc for a, (acc, _) in pairwise_by_label(scores, attributes).items()})
    return out


def pairwise_by_label(
    scores: torch.Tensor, labels: list[list[str]]
) -> dict[str, tuple[float, int]]:
    """{label: (pairwise accuracy, number of pairs)} over (box, negative) pairs grouped by a
    label per negative (an attribute, or the edit it makes), with `pairwise_accuracy`'s tie
    rule."""
    if scores.shape[0] == 0:
        return {}
    won = _won(scores)
    flat_labels = [c for row in labels for c in row]
    if len(flat_labels) != won.numel():
        raise ValueError(f"{len(flat_labels)} labels for {tuple(won.shape)} (box, negative) pairs")
    sums: dict[str, list[float]] = {}
    for c, w in zip(flat_labels, won.flatten().tolist(), strict=True):
        acc = sums.setdefault(c, [0.0, 0])
        acc[0] += w
        acc[1] += 1
    return {c: (total / n, n) for c, (total, n) in sorted(sums.items())}


def _attribute_names(attributes: list[list[str]] | None) -> list[str]:
    if not attributes:
        return []
    return sorted({a for row in attributes for a in row})


def _mask(attributes: list[list[str]], attr: str, shape: torch.Size) -> torch.Tensor:
    return torch.tensor([[a == attr for a in row] for row in attributes]).reshape(shape)


def classification_accuracy(
    features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor
) -> float:
    """Zero-shot accuracy: argmax over classes (C, D) of each feature (N, D) equals labels (N,).
    Ties against the model: a hit needs the true class strictly above every other class."""
    if features.shape[0] == 0:
        return math.nan
    return float(correct_predictions(features, class_embeddings, labels).double().mean())


def correct_predictions(
    features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(N,) bool: the true class scores strictly above every other class."""
    sims = _norm(features) @ _norm(class_embeddings).T  # (N, C)
    true = sims.gather(1, labels[:, None].to(sims.device))  # (N, 1)
    others = sims.scatter(1, labels[:, None].to(sims.device), -math.inf)
    return (true[:, 0] > others.max(dim=1).values).cpu()


def predictions(features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """(N,) index of the best class for each feature."""
    return (_norm(features) @ _norm(class_embeddings).T).argmax(dim=1).cpu()


def no_information_features(features: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-ins that carry no information about each item, for measured chance levels:
    'random' (a seeded Gaussian vector per row) and 'mean' (every row the set's mean)."""
    g = torch.Generator().manual_seed(seed)
    n, d = features.shape
    random = torch.randn(n, d, generator=g, dtype=torch.float64)
    mean = features.double().mean(dim=0, keepdim=True).expand(n, d)
    return {"random": random, "mean": mean}
