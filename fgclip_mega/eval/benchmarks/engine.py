"""Batches of a benchmark spread over data-parallel ranks, and the model calls the tasks make.

Batch b always holds items [b * B, (b + 1) * B), whatever the number of ranks; rank r encodes
batches r, r + world, ... and the results are all-gathered and put back in item order. Each
batch is computed the same way at any world size, so 1 and N ranks give the same embeddings bit
for bit, hence the same scores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger("fgclip_mega.eval.benchmarks")


def _world(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def map_batches(
    n: int,
    batch_size: int,
    fn: Callable[[int, int], list[Any]],
    group=None,
    what: str = "items",
) -> list[Any]:
    """[fn(start, stop) for every batch] flattened in item order on every rank of `group`;
    fn returns one picklable record per item (CPU tensors, tuples, None...)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rank, world = _world(group)
    batches = range(rank, -(-n // batch_size), world)
    local: dict[int, list[Any]] = {}
    t0, done = time.perf_counter(), 0
    for i, b in enumerate(batches):
        local[b] = fn(b * batch_size, min(n, (b + 1) * batch_size))
        done += len(local[b])
        if rank == 0 and (i + 1) % 20 == 0:
            rate = done / (time.perf_counter() - t0)
            left = (n / world - done) / max(rate, 1e-9)
            log.info(
                "%s: %d/%d on rank 0, %.1f/s, ETA %.0f s", what, done, -(-n // world), rate, left
            )
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, local, group=group)
        for part in parts:
            local.update(part)
    return [rec for b in sorted(local) for rec in local[b]]


class ModelEncoder:
    """FG-CLIP v1: the model calls the benchmarks make, under the run's autocast, returning fp32
    CPU embeddings (not normalised). `prepare` turns a PIL image into the model's input as the
    protocol resizes it (a (3, S, S) tensor); the NaFlex twin is naflex_encoder.NaFlexEncoder."""

    family = "fgclip"

    def __init__(self, model, runtime=None, protocol=None):
        self.model = model.eval()
        self.runtime = runtime
        self.protocol = protocol
        self.device = next(model.parameters()).device
        self.short_context = model.cfg.text.short_context
        self.long_context = model.cfg.text.long_context
        self.image_size = model.cfg.vision.image_size

    def _ctx(self):
        return self.runtime.autocast() if self.runtime is not None else contextlib.nullcontext()

    def prepare(self, img) -> torch.Tensor:
        """PIL RGB image -> (3, S, S) as the protocol resizes it (runs in decode threads)."""
        from fgclip_mega.eval.benchmarks.protocol import pixels

        return pixels(img, self.protocol)

    @torch.no_grad()
    def images(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """B prepared images -> (B, P) global image embeddings."""
        with self._ctx():
            return self.model.encode_image(torch.stack(items).to(self.device)).float().cpu()

    @torch.no_grad()
    def regions(self, items: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """B prepared images, rois (R, 5) [image, x1, y1, x2, y2] normalised -> (R, P) RoI
        features of FG-CLIP's dense map (the last block's value path, post-norm, projection)."""
        with self._ctx():
            dense = self.model.dense_features(torch.stack(items).to(self.device))
            return self.model.region_embeddings(dense, rois).float().cpu()

    def tokenize(self, texts: Sequence[str], length: int) -> torch.Tensor:
        """(T, length) CLIP BPE tokens, cut with EOT as HF's truncation=True."""
        from fgclip_mega.data.tokenizer import tokenize

        return torch.from_numpy(tokenize(list(texts), length)).long()

    @torch.no_grad()
    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, L) -> (T, P); L above the short context takes the long path."""
        long = tokens.shape[1] > self.short_context
        limit = self.long_context if long else self.short_context
        if tokens.shape[1] > limit:
            raise ValueError(f"text length {tokens.shape[1]} exceeds the model's {limit}")
        with self._ctx():
            return self.model.encode_text(tokens.to(self.device), long=long).float().cpu()


def encode_texts(
    encoder, texts: Sequence[str], length: int, batch_size: int, group=None
) -> torch.Tensor:
    """(len(texts), P) embeddings of `texts` tokenized at `length` by the encoder's tokenizer
    (v1: CLIP BPE; v2: the checkpoint's SigLIP 2 tokenizer, lowercased), distributed like every
    other batch."""

    def fn(a: int, b: int) -> list[torch.Tensor]:
        return list(encoder.texts(encoder.tokenize(texts[a:b], length)))

    rows = map_batches(len(texts), batch_size, fn, group, "texts")
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalised in float64 (scores compared exactly across runs)."""
    return F.normalize(x.double(), dim=-1)


def class_embeddings(
    encoder,
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]],
    length: int,
    ensemble: str,
    batch_size: int,
    group=None,
) -> torch.Tensor:
    """(C, P) unit class embeddings from prompt ensembles. A class whose name is empty (no prompt
    can be made) raises ValueError naming it."""
    from fgclip_mega.eval.benchmarks.protocol import BenchmarkError

    for i, name in enumerate(classnames):
        if not isinstance(name, str) or not name.strip():
            raise BenchmarkError(f"class {i} has no name, so no prompt: {name!r}")
    if not templates:
        raise BenchmarkError("no prompt templates")
    prompts = [t(c) for c in classnames for t in templates]
    emb = encode_texts(encoder, prompts, length, batch_size, group)  # (C*T, P)
    emb = emb.double().reshape(len(classnames), len(templates), -1)
    if ensemble == "normalise-mean-normalise":
        emb = F.normalize(emb, dim=-1)
    elif ensemble != "mean-normalise":
        raise ValueError(f"unknown prompt ensemble {ensemble!r}")
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_hits(scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """Hits at k of (N, C) scores for (N,) targets; the target's rank counts the classes scoring
    at least as high (ties against the model)."""
    if scores.shape[0] == 0:
        return {k: 0 for k in ks}
    own = scores.gather(1, target[:, None])  # (N, 1)
    rank = (scores >= own).sum(dim=1) - 1  # classes other than the target at least as good
    return {k: int((rank < k).sum()) for k in ks}


def random_features(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) Gaussian rows: the measured no-information scorer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64)
