"""The evaluation suite on FG-CLIP 2 (model.family=fgclip2): the SigLIP 2 text codec reads real
loader batches back to the stored phrases and their edits, the evaluation loader packs every
image once at its own budget whatever the DP layout, a metric against a float64 loop on the
model's own embeddings, the in-training evaluation, and the command line at DP 1 and DP 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fgclip_mega.data.naflex_loader import NaFlexLoader, sample_budget
from fgclip_mega.data.text_codec import Siglip2Codec
from fgclip_mega.eval import metrics as M
from fgclip_mega.eval import phrases
from fgclip_mega.family import naflex_data
from tests.builders import tiny_fgclip2_run_config
from tests.distributed import run_distributed

ATTRS = {"size", "colour", "texture", "shape"}


def _data(tmp, region_text="short"):
    cfg = tiny_fgclip2_run_config(tmp, "regional")
    cfg.data.region_text = region_text
    data, shards = naflex_data(cfg)
    return cfg, data, shards


def _stored(loader, sid: int) -> dict:
    """The sample's strings as stored in its shard (the loader's own reading of the record)."""
    return loader._sample(sid, 0)


def test_siglip2_codec_reads_loader_batches_back(tmp_path):
    cfg, data, shards = _data(tmp_path)
    loader = NaFlexLoader(data, data.tokenizer, patch_size=cfg.model.vision.patch_size,
                          shards=shards)  # fmt: skip
    codec = Siglip2Codec(loader.tok)
    try:
        seen = 0
        for _ in range(4):
            batch = next(loader)
            want_phrases, want_changes = [], []
            for sid in batch.sample_ids.tolist():
                s = _stored(loader, sid)
                want_phrases += [p.lower() for p in s["phrases"]]
                for j, hard in enumerate(s["hard"]):
                    if hard:
                        pos = s["short_exprs"][j].lower()
                        negs = [n.lower() for n in s["negs"][j]]
                        want_changes.append([phrases.changed_value(pos, n) for n in negs])
            got_phrases = [codec.decode(r) for r in batch.region_tokens]
            assert got_phrases == want_phrases
            got = phrases.negative_changes(batch.hardneg_tokens, codec.decode)
            assert got == want_changes
            # The generator's negatives each change one attribute: none is 'unknown'.
            assert {phrases.attribute_of_change(c) for row in got for c in row} <= ATTRS
            # The CLIP BPE decode (the suite's only one before) reads none of them.
            clip = phrases.negative_changes(batch.hardneg_tokens)
            assert {c for row in clip for c in row} == {phrases.UNKNOWN}
            # Text identity on rows padded to 64 with pad 0 after eos 1: same text, same id.
            ids = M.text_ids(batch.region_tokens).tolist()
            for i, a in enumerate(want_phrases):
                for j, b in enumerate(want_phrases):
                    assert (ids[i] == ids[j]) == (a == b)
            seen += len(got)
        assert seen > 0
        # Prompts: the loader's own rows (box = phrase, long = caption, short = "a photo of").
        rows = codec.tokenize(["a small red plain circle"], "box")
        assert rows.shape == (1, 64) and codec.decode(rows[0]) == "a small red plain circle"
        assert codec.decode(codec.tokenize(["a dog"], "short")[0]) == "a photo of a dog"
        assert codec.tokenize(["x"], "long").shape == (1, 196)
        with pytest.raises(ValueError, match="kind"):
            codec.tokenize(["x"], "medium")
    finally:
        loader.close()


def test_eval_loader_packs_each_image_once_at_its_own_budget(tmp_path):
    from fgclip_mega.data.naflex_eval import NaFlexEvalLoader

    cfg, data, shards = _data(tmp_path)
    data.micro_batch_size = 3  # 16 samples: short batches get repeats
    n = shards.num_samples
    for dp in (1, 2):
        loaders = [NaFlexEvalLoader(data, data.tokenizer, cfg.model.vision.patch_size, r, dp,
                                    shards) for r in range(dp)]  # fmt: skip
        try:
            counts = {ld.num_batches for ld in loaders}
            assert len(counts) == 1, counts  # every rank the same number of batches
            ids = []
            for ld in loaders:
                batches = list(ld)
                assert len(batches) == ld.num_batches
                for b in batches:
                    assert len(b.sample_ids) == 3
                    for sid in b.sample_ids.tolist():
                        w, h = _stored(ld, sid)["size"]
                        assert b.budget == sample_budget(w, h, ld.patch_size, ld.budgets)
                    ids += b.sample_ids.tolist()
            assert set(ids) == set(range(n))
        finally:
            for ld in loaders:
                ld.close()


def test_box_classification_and_pairwise_against_a_float64_loop(tmp_path):
    """The suite on a FG-CLIP 2 model's embeddings vs a float64 loop that takes its labels from
    the stored strings (not the codec) and its class prompts through the box head directly."""
    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.eval.collect import collect
    from fgclip_mega.eval.suite import run_suite
    from fgclip_mega.family import family
    from fgclip_mega.models.fgclip2 import FGCLIP2Model
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    cfg, data, _ = _data(tmp_path)
    init_parallel(ParallelConfig(), seed=0)  # a world of one: megatron's groups (TP 1)
    try:
        model = FGCLIP2Model(cfg.model, ParallelConfig()).eval()
        # The three text heads start as copies: make the box head differ, so that prompts
        # through the wrong head would change the predictions.
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.boxtext_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        loader, batches = family(cfg).eval_loader(cfg, 0, 1, "cpu", data)
        try:
            es = collect(model, loader, batches)
            stored = {sid: _stored(loader, sid) for sid in es.sample_ids.tolist()}
            tok = loader.tok
        finally:
            loader.close()
        result = run_suite(model, es)
        prompts = phrases.box_class_prompts()
        with torch.no_grad():
            classes = model.encode_text(torch.from_numpy(tok.phrases(prompts)).long(), "box")
    finally:
        destroy_parallel()
    assert result["sizes"]["images"] == len(stored) == 16

    # Box classification: each box's phrase among every attribute combination, box head.
    classes = torch.nn.functional.normalize(classes.double(), dim=-1)
    hits = total = 0
    same = dict.fromkeys(phrases.ATTRIBUTES, 0)
    for r, (sid, j) in enumerate(_slots(es.region_sample.tolist())):
        label = prompts.index(stored[sid]["short_exprs"][j].lower())
        f = torch.nn.functional.normalize(es.region[r].double(), dim=0)
        sims = [float(f @ c) for c in classes]
        hits += all(sims[label] > s for k, s in enumerate(sims) if k != label)
        pred = max(range(len(sims)), key=sims.__getitem__)
        true_a, pred_a = (phrases.phrase_attributes(prompts[i]) for i in (label, pred))
        for a in same:
            same[a] += true_a[a] == pred_a[a]
        total += 1
    got = result["box_classification"]
    assert got["boxes"] == total > 0
    assert got["accuracy"] == pytest.approx(hits / total, abs=1e-12)
    # Per attribute: the predicted class has the box's value (finer than accuracy).
    assert {a: got[a] for a in same} == pytest.approx({a: n / total for a, n in same.items()})
    assert 0 < sum(same.values()) < 4 * total  # neither all wrong nor all right

    # Pairwise hard-negative accuracy per attribute (a tie counts 1/2).
    won: dict[str, list[float]] = {}
    hard_boxes = [
        (r, sid, j)
        for r, (sid, j) in enumerate(_slots(es.region_sample.tolist()))
        if stored[sid]["hard"][j]
    ]
    assert [r for r, _, _ in hard_boxes] == es.hard_index.tolist()
    for h, (r, sid, j) in enumerate(hard_boxes):
        f = torch.nn.functional.normalize(es.region[r].double(), dim=0)
        cands = torch.nn.functional.normalize(es.hard_text[h].double(), dim=-1)
        pos = stored[sid]["short_exprs"][j].lower()
        for k, neg in enumerate(stored[sid]["negs"][j]):
            attr = phrases.changed_attribute(pos, neg.lower())
            a, b = float(f @ cands[0]), float(f @ cands[k + 1])
            won.setdefault(attr, []).append(1.0 if a > b else 0.5 if a == b else 0.0)
    pair = result["hard_negative"]["pairwise"]
    assert set(won) == set(pair) - {"all"} and set(won) <= ATTRS
    for attr, w in won.items():
        assert pair[attr] == pytest.approx(sum(w) / len(w), abs=1e-12), attr
    assert not math.isnan(result["zero_shot"]["accuracy"]) and result["zero_shot"]["images"] == 16


def _slots(samples: list[int]):
    """(sample id, slot) of each box: boxes of an image come in slot order."""
    seen: dict[int, int] = {}
    for sid in samples:
        seen[sid] = seen.get(sid, -1) + 1
        yield sid, seen[sid]


# ----------------------------------------------------------------------------- trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step FG-CLIP 2 regional run with the in-training evaluation on (8 samples)."""
    from fgclip_mega.train.loop import train

    tmp = tmp_path_factory.mktemp("fgclip2_eval")
    cfg = tiny_fgclip2_run_config(tmp, "regional")
    cfg.train.steps = 2
    cfg.train.log_interval = 1
    cfg.train.eval_batches = 2
    cfg.optim.warmup_steps = 1
    return tmp, cfg, train(cfg.validate())


@pytest.mark.slow
def test_in_training_eval_of_a_fgclip2_run(trained):
    _, cfg, result = trained
    ev = result.evals[-1]
    assert ev["eval_images"] == cfg.train.eval_batches * cfg.data.micro_batch_size == 8
    assert ev["eval_hard_boxes"] > 0
    attrs = {k.split(".", 1)[1] for k in ev if k.startswith("pairwise_acc.")}
    assert attrs and attrs <= ATTRS, attrs  # read from SigLIP tokens: no 'unknown'
    for key in ("box_cls_acc", "box_cls_no_info", "zero_shot_acc", "hard_neg_acc"):
        assert 0.0 <= ev[key] <= 1.0, (key, ev[key])


def _cli(argv: list[str]) -> int:
    from fgclip_mega.eval.__main__ import main

    return main(argv)


@pytest.mark.slow
def test_cli_on_a_fgclip2_run_equal_at_dp1_and_dp2(trained):
    tmp, _, _ = trained
    run = tmp / "run_fgclip2_regional_fp32"

    def argv(out):
        return ["--checkpoint", str(run), "--name", "v2", "--synthetic-seed", "5",
                "--synthetic-samples", "12", "--synthetic-dir", str(tmp / "eval_data"),
                "--micro-batch", "4", "--out", str(tmp / out)]  # fmt: skip

    assert _cli(argv("dp1")) == 0
    assert run_distributed(_cli, 2, argv("dp2")) == [0, 0]
    one, two = (json.loads((tmp / d / "eval.json").read_text())["v2"] for d in ("dp1", "dp2"))
    assert (one.pop("layout"), two.pop("layout")) == ({"tp": 1, "dp": 1}, {"tp": 1, "dp": 2})
    one.pop("wall_s"), two.pop("wall_s")
    assert one == two
    assert one["sizes"]["images"] == 12
    h = one["hard_negative"]
    assert set(h["pairwise"]) == {"all"} | ATTRS
    assert set(h["no_info"]) == {"random", "mean"}
    assert one["box_classification"]["boxes"] == one["sizes"]["boxes"] > 0
    assert one["zero_shot"]["images"] == 12
    assert "| " in (tmp / "dp2" / "eval.md").read_text()


def _export_hf(run, cfg, out):
    """The run's last checkpoint as released FG-CLIP 2 files: model.safetensors (fg-clip2 key
    layout), config.json (Siglip2Config), the tokenizer.json it was trained with."""
    import shutil

    from safetensors.torch import save_file

    from fgclip_mega.checkpoint.hf_fgclip2 import export_fgclip2_state_dict, siglip2_config
    from fgclip_mega.checkpoint.weights import load_training_weights, training_checkpoint
    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.models.fgclip2 import FGCLIP2Model
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    out.mkdir()
    init_parallel(ParallelConfig(), seed=0)
    try:
        model = FGCLIP2Model(cfg.model, ParallelConfig())
        load_training_weights(model, training_checkpoint(str(run)))
        state = {k: v.contiguous() for k, v in export_fgclip2_state_dict(model).items()}
    finally:
        destroy_parallel()
    save_file(state, str(out / "model.safetensors"))
    siglip2_config(cfg.model).to_json_file(str(out / "config.json"))
    tokenizer = naflex_data(cfg)[0].tokenizer
    shutil.copy(tokenizer, out / "tokenizer.json")


@pytest.mark.slow
def test_cli_on_released_fgclip2_files_equals_the_training_checkpoint(trained):
    from fgclip_mega.config import ConfigError
    from fgclip_mega.eval.__main__ import _parser, build_config

    tmp, cfg, _ = trained
    run, hf = tmp / "run_fgclip2_regional_fp32", tmp / "hf_release"
    _export_hf(run, cfg, hf)
    shape = ["model.vision.layers=1", "model.text.layers=1"]  # config.json says 1 layer
    argv = ["--checkpoint", str(run), "--name", "trained", "--checkpoint", str(hf), "--name",
            "released", "--preset", "fgclip2_tiny", "--synthetic-seed", "6",
            "--synthetic-samples", "8", "--synthetic-dir", str(tmp / "eval_data"),
            "--micro-batch", "4", "--out", str(tmp / "hf_eval"), *shape]  # fmt: skip
    # Released weights read the tokenizer.json shipped beside them.
    got, _ = build_config(_parser().parse_args(argv), str(hf), 6)
    assert got.model.family == "fgclip2" and got.data.tokenizer == str(hf / "tokenizer.json")
    assert _cli(argv) == 0
    result = json.loads((tmp / "hf_eval" / "eval.json").read_text())
    for r in result.values():
        for key in ("wall_s", "checkpoint"):
            r.pop(key)
    assert result["trained"] == result["released"]
    assert result["released"]["sizes"]["images"] == 8
    (hf / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json beside the FG-CLIP 2 weights"):
        build_config(_parser().parse_args(argv), str(hf), 6)
