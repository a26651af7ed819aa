"""Hand-made evaluation inputs: a fake text model (one fixed random vector per distinct text)
and synthetic scenes embedded with it, run through the suite as a perfect or random model.
Shared by tests/test_eval.py and tests/test_eval_main_job.py."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fgclip_mega.data.synthetic import make_scene
from fgclip_mega.data.tokenizer import EOT_ID, tokenize
from fgclip_mega.eval import phrases
from fgclip_mega.eval.collect import _batch_records, _gather_records, _merge, _ordered
from fgclip_mega.eval.suite import run_suite
from fgclip_mega.objective import Embeddings

DIM = 256  # random unit vectors in 256-D have |cos| < 0.3: a 'perfect' model wins clearly


def _vector(key: bytes, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key) * 7919 + salt)
    return F.normalize(torch.randn(DIM, generator=g, dtype=torch.float64), dim=0).float()


class FakeTextModel(torch.nn.Module):
    """encode_text: one fixed random vector per distinct text (tokens up to the first EOT), so
    identical texts embed identically whatever the padding."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(
            family="fgclip", text=SimpleNamespace(short_context=77, long_context=248)
        )
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens: torch.Tensor, long: bool = False) -> torch.Tensor:
        rows = []
        for row in tokens.reshape(-1, tokens.shape[-1]).tolist():
            end = row.index(EOT_ID) + 1 if EOT_ID in row else len(row)
            rows.append(_vector(str(row[:end]).encode(), 1 if long else 0))
        return torch.stack(rows).reshape(*tokens.shape[:-1], DIM)


def _trim(t: torch.Tensor) -> torch.Tensor:
    last = int((t == EOT_ID).nonzero()[:, -1].max()) + 1
    return t[..., : -(-last // 8) * 8]


def _scene_batches(model: FakeTextModel, kind: str, per_batch: int = 4, n: int = 12):
    """Batch-like objects and Embeddings of n generated scenes (boxes, phrases, negatives)."""
    out = []
    for b0 in range(0, n, per_batch):
        recs = [make_scene(3, "train", i, 64, 48)[2] for i in range(b0, b0 + per_batch)]
        longs = torch.from_numpy(tokenize([r["caption"] for r in recs], 248)).long()
        shorts = torch.from_numpy(tokenize([r["short_caption"] for r in recs], 77)).long()
        rois, regions, hard_rows, hard = [], [], [], []
        for img, rec in enumerate(recs):
            for box in rec["bbox_info"]:
                negs = list(box["short_expr_negs"].values())
                if len(negs) == 10:
                    hard_rows.append(len(rois))
                    hard.append(tokenize([box["short_expr"], *negs], 77))
                rois.append([img, *box["bbox"][:4]])
                regions.append(box["short_expr"])
        batch = SimpleNamespace(
            sample_ids=torch.arange(b0, b0 + per_batch),
            long_tokens=_trim(longs),
            short_tokens=_trim(shorts),
            region_rois=torch.tensor(rois, dtype=torch.float32),
            region_tokens=_trim(torch.from_numpy(tokenize(regions, 77)).long()),
            hard_rows=torch.tensor(hard_rows, dtype=torch.int64),
            hardneg_tokens=_trim(torch.from_numpy(__import__("numpy").stack(hard)).long()),
        )
        long_emb = model.encode_text(batch.long_tokens, long=True)
        short_emb = model.encode_text(batch.short_tokens)
        region_text = model.encode_text(batch.region_tokens)
        if kind == "perfect":
            # The image matches its captions and its zero-shot class prompt.
            labels = [phrases.scene_label(r["caption"].lower()) for r in recs]
            prompts = [f"a {bg} background with {c} objects." for bg, c in labels]
            prompt_emb = model.encode_text(torch.from_numpy(tokenize(prompts, 248)).long(), True)
            image = long_emb + short_emb + prompt_emb
            region = region_text.clone()
        else:
            image = torch.stack([_vector(b"img%d" % int(i), 5) for i in batch.sample_ids])
            region = torch.stack([_vector(b"box%d" % i, 6 + b0) for i in range(len(rois))])
        emb = Embeddings(
            image=image,
            long_text=long_emb,
            short_text=short_emb,
            region=region,
            region_text=region_text,
            hard_region=region.index_select(0, batch.hard_rows),
            hard_text=model.encode_text(batch.hardneg_tokens),
        )
        out.append((batch, emb))
    return out


def suite_on_scenes(kind: str, rank: int, world: int, group) -> dict:
    model = FakeTextModel()
    batches = _scene_batches(model, kind)
    # DP=2: rank 0 takes batches 0 and 2, rank 1 batch 1 and a repeat of batch 0 (a loader run
    # for ceil(N / global batch) steps repeats samples): the gathered set must be the same.
    mine = {1: [0, 1, 2], 2: [[0, 2], [1, 0]][rank]}[world]
    records = _merge([_batch_records(*batches[i]) for i in mine])
    return run_suite(model, _ordered(_gather_records(records, group)))
