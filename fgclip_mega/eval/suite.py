"""The evaluation suite over one gathered `EvalSet`: retrieval, hard negatives, box and
zero-shot image classification, each fine-grained metric next to measured no-information levels.

`run_suite` returns a nested dict (written as JSON); `summary_of` picks the headline numbers and
`flat` makes float-only keys for the training log.
"""

from __future__ import annotations

import contextlib
import math

import torch

from fgclip_mega.eval import metrics as M
from fgclip_mega.eval import phrases
from fgclip_mega.eval.collect import EvalSet
from fgclip_mega.family import family_of_model

NO_INFO_SEED = 0


def _codec(model, es: EvalSet):
    """The set's text codec (collect sets it); a hand-built set takes its model family's (which
    for FG-CLIP 2 needs the loader's tokenizer: an error without it)."""
    return es.codec if es.codec is not None else family_of_model(model).text_codec(model, None)


@torch.no_grad()
def _encode_prompts(model, codec, prompts: list[str], kind: str, runtime=None) -> torch.Tensor:
    tokens = codec.tokenize(prompts, kind)  # (C, L)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with runtime.autocast() if runtime is not None else contextlib.nullcontext():
            out = [
                codec.encode(model, chunk.to(device), kind).float().cpu()
                for chunk in tokens.split(256)
            ]
    finally:
        model.train(was_training)
    return torch.cat(out)  # (C, P)


def retrieval(es: EvalSet, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    long_ids, short_ids = M.text_ids(es.long_tokens), M.text_ids(es.short_tokens)
    out = {}
    for name, text, ids in (
        ("long", es.long_text, long_ids),
        ("short", es.short_text, short_ids),
    ):
        i2t = M.retrieval_recall(es.image, text, ids, ids, ks)
        t2i = M.retrieval_recall(text, es.image, ids, ids, ks)
        out[f"i2t_{name}"] = {f"r{k}": v for k, v in i2t.items()}
        out[f"t2i_{name}"] = {f"r{k}": v for k, v in t2i.items()}
    region_ids = M.text_ids(es.region_tokens)
    r2p = M.retrieval_recall(es.region, es.region_text, region_ids, region_ids, ks)
    out["region_to_phrase"] = {f"r{k}": v for k, v in r2p.items()}
    # The old index-only definition, kept for comparison with earlier logs.
    index = torch.arange(es.region.shape[0])
    out["region_to_phrase"]["r1_same_index"] = M.retrieval_recall(
        es.region, es.region_text, index, index, (1,)
    )[1]
    return out


def hard_negatives(es: EvalSet, decode) -> dict:
    """`decode`: one token row of the set -> its text (the set's codec's)."""
    changes = phrases.negative_changes(es.hard_tokens, decode)
    attrs = phrases.attributes_of_changes(changes)
    scores = M.hard_negative_scores(es.hard_region, es.hard_text)
    result = {
        "accuracy": M.hard_negative_accuracy(scores, attrs),
        "pairwise": M.pairwise_accuracy(scores, attrs),
        # Per edit ('texture: striped -> checkered'): which values of an attribute the model
        # confuses; an attribute's pairwise accuracy is the pair-weighted mean of its edits.
        "pairwise_by_change": _by_change(scores, changes),
    }
    # No-information levels: the same metrics with the region embedding replaced by a vector
    # that knows nothing about the box (a random one; the mean region of the set).
    stand_ins = M.no_information_features(es.region, NO_INFO_SEED)
    result["no_info"] = {}
    for name, feats in stand_ins.items():
        level = M.hard_negative_scores(feats.index_select(0, es.hard_index), es.hard_text)
        result["no_info"][name] = {
            "accuracy": M.hard_negative_accuracy(level, attrs),
            "pairwise": M.pairwise_accuracy(level, attrs),
            "pairwise_by_change": _by_change(level, changes),
        }
    counts: dict[str, int] = {}
    for row in attrs:
        for a in row:
            counts[a] = counts.get(a, 0) + 1
    result["negatives_per_attribute"] = counts
    result["boxes"] = int(es.hard_index.shape[0])
    return result


def _by_change(scores, changes: list[list[str]]) -> dict[str, dict[str, float]]:
    """{edit: {"acc": pairwise accuracy, "pairs": number of (box, negative) pairs}}."""
    return {c: {"acc": a, "pairs": n} for c, (a, n) in M.pairwise_by_label(scores, changes).items()}


def box_classification(model, es: EvalSet, runtime=None) -> dict:
    """Each box's region embedding vs one prompt per attribute combination (the paper's COCO
    box classification with the synthetic attribute sets as classes); boxes whose phrase is not
    a synthetic attribute phrase are left out (real data: nothing to classify -> NaN). Prompts
    take the region phrases' text head ("box")."""
    codec = _codec(model, es)
    prompts = phrases.box_class_prompts()
    index = {p: i for i, p in enumerate(prompts)}
    labels, rows = [], []
    for i, row in enumerate(es.region_tokens):
        text = codec.decode(row)
        if text in index:
            labels.append(index[text])
            rows.append(i)
    if not rows:
        return {"accuracy": math.nan, "boxes": 0, "classes": len(prompts)}
    classes = _encode_prompts(model, codec, prompts, "box", runtime)
    label_t = torch.tensor(labels)
    feats = es.region[torch.tensor(rows)]
    result = _classification(feats, classes, label_t, prompts)
    result["no_info"] = {
        name: _classification(f, classes, label_t, prompts)
        for name, f in M.no_information_features(feats, NO_INFO_SEED).items()
    }
    result.update(boxes=len(rows), classes=len(prompts))
    return result


def _classification(feats, classes, labels, prompts) -> dict:
    out = {"accuracy": M.classification_accuracy(feats, classes, labels)}
    pred = M.predictions(feats, classes)
    true_attrs = [phrases.phrase_attributes(prompts[i]) for i in labels.tolist()]
    pred_attrs = [phrases.phrase_attributes(prompts[i]) for i in pred.tolist()]
    for attr in phrases.ATTRIBUTES:
        hits = [t[attr] == p[attr] for t, p in zip(true_attrs, pred_attrs, strict=True)]
        out[attr] = sum(hits) / len(hits)
    return out


def zero_shot(model, es: EvalSet, runtime=None) -> dict:
    """Zero-shot image classification of the synthetic scenes: background x object count,
    prompts written like the first sentence of the long captions (long-text path)."""
    codec = _codec(model, es)
    labels = [phrases.scene_label(codec.decode(row)) for row in es.long_tokens]
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    if not keep:
        return {"accuracy": math.nan, "images": 0}
    counts = sorted({labels[i][1] for i in keep}, key=_count_order)
    classes = phrases.scene_class_prompts(counts)
    index = {(bg, n): i for i, (bg, n, _) in enumerate(classes)}
    label_t = torch.tensor([index[labels[i]] for i in keep])
    emb = _encode_prompts(model, codec, [p for _, _, p in classes], "long", runtime)
    feats = es.image[torch.tensor(keep)]

    def score(f):
        pred = M.predictions(f, emb)
        pairs = [classes[i] for i in pred.tolist()]
        truth = [classes[i] for i in label_t.tolist()]
        n = len(truth)
        return {
            "accuracy": M.classification_accuracy(f, emb, label_t),
            "background": sum(p[0] == t[0] for p, t in zip(pairs, truth, strict=True)) / n,
            "count": sum(p[1] == t[1] for p, t in zip(pairs, truth, strict=True)) / n,
        }

    out = score(feats)
    out["no_info"] = {
        name: score(f) for name, f in M.no_information_features(feats, NO_INFO_SEED).items()
    }
    out.update(images=len(keep), classes=len(classes))
    return out


def _count_order(word: str) -> int:
    from fgclip_mega.data.synthetic import _COUNT_WORDS

    return _COUNT_WORDS.index(word) if word in _COUNT_WORDS else len(_COUNT_WORDS)


def run_suite(model, es: EvalSet, runtime=None) -> dict:
    return {
        "retrieval": retrieval(es),
        "hard_negative": hard_negatives(es, _codec(model, es).decode),
        "box_classification": box_classification(model, es, runtime),
        "zero_shot": zero_shot(model, es, runtime),
        "sizes": {
            "images": int(es.sample_ids.shape[0]),
            "boxes": int(es.region.shape[0]),
            "hard_boxes": int(es.hard_index.shape[0]),
        },
    }


def summary_of(result: dict) -> dict:
    """Headline numbers: the keys of the main job's summary.json."""
    r, h = result["retrieval"], result["hard_negative"]
    no_info = h["no_info"]
    box = result["box_classification"]
    attrs = [a for a in h["pairwise"] if a != "all"]
    return {
        "hard_neg_acc": h["accuracy"]["all"],
        "hard_neg_no_info": max(v["accuracy"]["all"] for v in no_info.values()),
        "hard_neg_acc_by_attribute": {a: h["accuracy"][a] for a in attrs if a in h["accuracy"]},
        "pairwise_acc": {a: h["pairwise"][a] for a in attrs},
        "pairwise_acc_all": h["pairwise"]["all"],
        "pairwise_no_info": {
            a: max(v["pairwise"].get(a, math.nan) for v in no_info.values()) for a in attrs
        },
        "i2t_long_r1": r["i2t_long"]["r1"],
        "t2i_long_r1": r["t2i_long"]["r1"],
        "i2t_short_r1": r["i2t_short"]["r1"],
        "t2i_short_r1": r["t2i_short"]["r1"],
        "region_r1": r["region_to_phrase"]["r1"],
        "box_cls_acc": box["accuracy"],
        "box_cls_no_info": max(
            (v["accuracy"] for v in box.get("no_info", {}).values()), default=math.nan
        ),
        "zero_shot_acc": result["zero_shot"]["accuracy"],
    }


def flat(d: dict, prefix: str = "") -> dict[str, float]:
    """Nested dict -> {'a.b.c': float} (for metric logs)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (int, float)):
            out[key] = float(v)
    return out


def evaluate(model, loader, num_batches: int, dp_group=None, runtime=None) -> dict:
    """Collects `num_batches` micro-batches per rank (gathered over `dp_group`) and runs the
    suite; every rank returns the same nested result."""
    from fgclip_mega.eval.collect import collect

    return run_suite(model, collect(model, loader, num_batches, dp_group, runtime), runtime)
