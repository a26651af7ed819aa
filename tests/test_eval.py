"""Evaluation metrics on hand-made embeddings with known answers (perfect, random, tied,
duplicated texts), the phrase-attribute derivation, and the whole suite at DP=1 vs DP=2."""

import math

import pytest
import torch

from fgclip_mega.data.synthetic import make_scene
from fgclip_mega.data.tokenizer import tokenize
from fgclip_mega.eval import metrics as M
from fgclip_mega.eval import phrases
from tests.distributed import run_distributed
from tests.eval_builders import suite_on_scenes


def _ref_recall(q, k, qid, kid, top):
    """Loop reference: rank of the best right key = wrong keys scoring at least as high."""
    hits, n = 0, 0
    for i in range(len(q)):
        s = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) for j in range(len(k))]
        right = [j for j in range(len(k)) if kid[j] == qid[i]]
        if not right:
            continue
        n += 1
        best = max(s[j] for j in right)
        rank = sum(1 for j in range(len(k)) if kid[j] != qid[i] and s[j] >= best)
        hits += rank < top
    return hits / n


def test_text_ids_equal_exactly_for_identical_rows():
    t = torch.tensor([[1, 2, 0], [1, 3, 0], [1, 2, 0], [4, 0, 0]])
    ids = M.text_ids(t)
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3


def test_recall_perfect_random_and_against_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    ids = torch.arange(30)
    assert M.retrieval_recall(x, x, ids, ids) == {1: 1.0, 5: 1.0, 10: 1.0}
    q = torch.randn(40, 6, generator=g)
    k = q + 1.2 * torch.randn(40, 6, generator=g)  # partly aligned: recall strictly in (0, 1)
    qid = torch.randint(0, 25, (40,), generator=g)  # repeated texts
    got = M.retrieval_recall(q, k, qid, qid, (1, 5))
    for top in (1, 5):
        want = _ref_recall(q, k, qid.tolist(), qid.tolist(), top)
        assert 0.0 < want < 1.0
        assert got[top] == pytest.approx(want, abs=1e-12)


def test_recall_counts_any_identical_text_and_ties_against_the_model():
    # Images 0 and 1 have the same caption; image 0 looks exactly like caption row 1.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.2]])
    ids = torch.tensor([7, 7, 9])
    assert M.retrieval_recall(img, txt, ids, ids, (1,))[1] == 1.0
    index = torch.arange(3)  # the index-only rule misses image 0 (and image 1's best is row 0)
    assert M.retrieval_recall(img, txt, index, index, (1,))[1] == pytest.approx(1 / 3)
    # A constant model ties everything: no hits at 1 when wrong keys exist.
    const = torch.ones(4, 3)
    assert M.retrieval_recall(const, const, torch.arange(4), torch.arange(4), (1, 4)) == {
        1: 0.0,
        4: 1.0,
    }


def _scores_case():
    # 3 boxes, K = 3 negatives; scores given directly as cosines of unit vectors in 2-D.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.95],  # loses to the shape negative only
            [0.5, 0.5, 0.1, 0.0],  # ties the colour negative
            [0.8, 0.1, 0.2, 0.3],  # wins
        ],
        dtype=torch.float64,
    )
    attrs = [["colour", "size", "shape"], ["colour", "shape", "shape"], ["size", "size", "colour"]]
    return scores, attrs


def test_hard_negative_and_pairwise_accuracy_by_attribute():
    scores, attrs = _scores_case()
    acc = M.hard_negative_accuracy(scores, attrs)
    assert acc["all"] == pytest.approx(1 / 3)  # a tie is a miss
    assert acc["colour"] == pytest.approx(2 / 3)  # box 1 ties on colour
    assert acc["shape"] == pytest.approx(1 / 2)  # box 0 loses on shape, box 2 has none
    assert acc["size"] == pytest.approx(1.0)
    pair = M.pairwise_accuracy(scores, attrs)
    assert pair["all"] == pytest.approx((2 + 2.5 + 3) / 9)
    assert pair["colour"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert pair["shape"] == pytest.approx((0 + 1 + 1) / 3)
    assert pair["size"] == pytest.approx(1.0)
    assert math.isnan(M.hard_negative_accuracy(scores[:0])["all"])


def test_pairwise_by_label_groups_pairs_and_agrees_with_pairwise_accuracy():
    scores, attrs = _scores_case()
    by = M.pairwise_by_label(scores, attrs)
    pair = M.pairwise_accuracy(scores, attrs)
    assert by == {
        "colour": (pytest.approx((1 + 0.5 + 1) / 3), 3),
        "shape": (pytest.approx((0 + 1 + 1) / 3), 3),
        "size": (pytest.approx(1.0), 3),
    }
    assert {k: v[0] for k, v in by.items()} == pytest.approx({k: pair[k] for k in by})
    # Finer labels split a group: box 1's second shape negative is scored apart.
    edits = [["c", "s", "x"], ["c", "x", "y"], ["s", "s", "c"]]
    by = M.pairwise_by_label(scores, edits)
    assert by["x"] == (pytest.approx(0.5), 2) and by["y"] == (1.0, 1)
    with pytest.raises(ValueError, match="labels"):
        M.pairwise_by_label(scores, attrs[:2])
    assert M.pairwise_by_label(scores[:0], []) == {}


def test_weakest_changes_lists_confused_values_beside_their_no_info_level():
    from fgclip_mega.eval.report import weakest_changes, weakest_changes_table

    def edits(accs):
        return {e: {"acc": a, "pairs": p} for e, (a, p) in accs.items()}

    h = {
        "pairwise_by_change": edits(
            {
                "texture: striped -> checkered": (0.5, 40),
                "texture: plain -> dotted": (0.45, 30),
                "colour: red -> blue": (1.0, 50),
                "shape: star -> circle": (0.2, 5),  # too few pairs to rank
            }
        ),
        "no_info": {
            "random": {"pairwise_by_change": edits({"texture: plain -> dotted": (0.48, 30)})},
            "mean": {"pairwise_by_change": edits({"texture: plain -> dotted": (0.52, 30)})},
        },
    }
    rows = weakest_changes({"hard_negative": h}, n=2)
    assert rows == [
        ("texture: plain -> dotted", 0.45, 30, 0.52),
        ("texture: striped -> checkered", 0.5, 40, None),
    ]
    table = weakest_changes_table({"m": {"hard_negative": h}}, n=2)
    assert "| texture: plain -> dotted | 30 | 0.450 | 0.520 |" in table
    assert "| texture: striped -> checkered | 40 | 0.500 | – |" in table


def test_hard_negative_perfect_random_and_tied_models():
    g = torch.Generator().manual_seed(1)
    h, k, d = 3000, 10, 16
    cands = torch.randn(h, 1 + k, d, generator=g)
    perfect = M.hard_negative_scores(cands[:, 0], cands)
    assert M.hard_negative_accuracy(perfect)["all"] == 1.0
    assert M.pairwise_accuracy(perfect)["all"] == 1.0
    random = M.hard_negative_scores(torch.randn(h, d, generator=g), cands)
    # Exchangeable candidates: chance is 1/(1+K) box-level and 1/2 pairwise (3000 boxes).
    assert M.hard_negative_accuracy(random)["all"] == pytest.approx(1 / (1 + k), abs=0.02)
    assert M.pairwise_accuracy(random)["all"] == pytest.approx(0.5, abs=0.01)
    tied = M.hard_negative_scores(torch.ones(5, d), torch.ones(5, 1 + k, d))
    assert M.hard_negative_accuracy(tied)["all"] == 0.0
    assert M.pairwise_accuracy(tied)["all"] == 0.5


def test_classification_accuracy():
    classes = torch.eye(4)
    feats = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 1.0, 0], [0.5, 0.5, 0, 0]])
    labels = torch.tensor([0, 3, 0])
    assert M.classification_accuracy(feats, classes, labels) == pytest.approx(1 / 3)  # tie: miss
    assert M.predictions(feats, classes)[:2].tolist() == [0, 2]


def test_no_information_features_are_seeded_and_uninformative():
    x = torch.randn(6, 4)
    a, b = M.no_information_features(x, 3), M.no_information_features(x, 3)
    assert torch.equal(a["random"], b["random"])
    assert torch.allclose(a["mean"], x.double().mean(0).expand(6, 4))


def test_decode_and_changed_attribute():
    text = "a small red plain circle"
    assert phrases.decode(torch.from_numpy(tokenize(text, 20)[0])) == text
    assert phrases.phrase_attributes(text) == {
        "size": "small",
        "colour": "red",
        "texture": "plain",
        "shape": "circle",
    }
    cases = {
        "a large red plain circle": "size",
        "a small cyan plain circle": "colour",
        "a small red checkered circle": "texture",
        "a small red plain hexagon": "shape",
        "a large cyan plain circle": "unknown",  # two words differ
        "a small red plain thing": "unknown",  # not an attribute value
        "a small red circle": "unknown",
    }
    for neg, want in cases.items():
        assert phrases.changed_attribute(text, neg) == want, neg
    assert phrases.phrase_attributes("a dog on a sofa") is None
    assert phrases.changed_value(text, "a small red checkered circle") == (
        "texture: plain -> checkered"
    )
    assert phrases.changed_value(text, "a large cyan plain circle") == "unknown"
    assert phrases.attribute_of_change("texture: plain -> checkered") == "texture"
    assert phrases.attribute_of_change("unknown") == "unknown"


def test_negative_attributes_of_generated_records_match_the_generator():
    for index in range(6):
        _, _, rec = make_scene(5, "train", index, 64, 48)
        for box in rec["bbox_info"]:
            negs = list(box["short_expr_negs"].values())
            if not negs:
                continue
            rows = torch.from_numpy(tokenize([box["short_expr"], *negs], 77))[None]
            edits = phrases.negative_changes(rows)[0]
            got = phrases.attributes_of_changes([edits])[0]
            pos = phrases.phrase_attributes(box["short_expr"])
            for neg, attr in zip(negs, got, strict=True):
                other = phrases.phrase_attributes(neg)
                changed = [a for a in pos if pos[a] != other[a]]
                assert changed == [attr]
            assert edits == [
                f"{a}: {pos[a]} -> {phrases.phrase_attributes(neg)[a]}"
                for neg, a in zip(negs, got, strict=True)
            ]


def _suite_dp(world: int, model_kind: str):
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo")
    try:
        group = dist.group.WORLD if world > 1 else None
        rank = dist.get_rank() if world > 1 else 0
        return suite_on_scenes(model_kind, rank, world, group)
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_suite_perfect_model_and_dp2_equals_dp1():
    single = {kind: _suite_dp(1, kind) for kind in ("perfect", "random")}
    p = single["perfect"]
    for name in ("i2t_long", "t2i_long", "i2t_short", "t2i_short", "region_to_phrase"):
        assert p["retrieval"][name]["r1"] == 1.0, name
    h = p["hard_negative"]
    assert h["accuracy"]["all"] == 1.0
    assert set(h["pairwise"]) == {"all", "size", "colour", "texture", "shape"}
    assert all(v == 1.0 for v in h["pairwise"].values())
    edits = h["pairwise_by_change"]
    assert all(e["acc"] == 1.0 for e in edits.values())
    # Every edit names its attribute and the two values; the pairs add up per attribute.
    for attr, n in h["negatives_per_attribute"].items():
        assert sum(e["pairs"] for k, e in edits.items() if k.startswith(attr + ":")) == n
    assert p["box_classification"]["accuracy"] == 1.0
    assert p["zero_shot"]["accuracy"] == 1.0
    # Measured no-information levels are far below the perfect model, pairwise near 1/2.
    assert h["no_info"]["random"]["accuracy"]["all"] < 0.5
    assert 0.2 < h["no_info"]["random"]["pairwise"]["all"] < 0.8
    r = single["random"]
    assert r["hard_negative"]["accuracy"]["all"] < 0.5
    assert r["box_classification"]["accuracy"] < 0.2
    # One spawn for every DP=2 check: the same nested result, number for number.
    both = run_distributed(_dp2_both, 2)
    for rank_result in both:
        for kind in ("perfect", "random"):
            assert rank_result[kind] == single[kind], kind


def _dp2_both():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        return {
            kind: suite_on_scenes(kind, rank, 2, dist.group.WORLD) for kind in ("perfect", "random")
        }
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- hand-made model
