"""`python -m fgclip_mega.eval --task ...` on FG-CLIP 2 checkpoints (released fg-clip2 layout and
plain HF Siglip2Model NaFlex): every task's score equals upstream FG-CLIP 2's protocol computed
from an independent reference (tests/benchmark_fixtures_v2.py: transformers' Siglip2Model and
Siglip2ImageProcessor one image at a time, transformers' tokenizer, torchvision's roi_align,
float64 scoring loops); config.json read for the family and shape; bad tokenizer paths named.
DP=2 equal to DP=1 is checked with the v1 tasks in test_eval_benchmarks.py (one process group)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests import benchmark_fixtures as F
from tests import benchmark_fixtures_v2 as F2
from tests.test_eval_benchmarks import _recall, argv_of, run_main

TASKS = ("fgovd", "coco-boxcls", "lvis-boxcls", "lvis-crop", "sharegpt4v", "dci", "docci",
         "coco", "flickr30k", "imagenet", "imagenet-v2")  # fmt: skip
NAME = {"lvis-crop": "lvis-boxcls", "imagenet-v2": "imagenet"}


@pytest.fixture(scope="module")
def bench2(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench2")
    images = F.write_images(root / "photos")
    state = F2.write_checkpoint(root / "ckpt")
    files = {
        "fgovd": {"data": F.write_fgovd(root / "coco", images), "image_root": root / "coco"},
        "coco-boxcls": {"data": F.write_instances(root / "coco", images),
                        "image_root": root / "coco" / "val2017"},
        "lvis-boxcls": {"data": F.write_instances(root / "lvis", images, lvis=True),
                        "image_root": root / "lvis" / "lvis_images"},
        "imagenet": {"data": F.write_imagenet(root, images), "image_root": None},
        "imagenet-v2": {"data": F.write_imagenet(root, images, v2=True), "image_root": None},
        **F.write_retrieval(root, images),
    }  # fmt: skip
    files["lvis-crop"] = files["lvis-boxcls"]
    ref = F2.Reference2(root / "ckpt", state)
    return SimpleNamespace(root=root, files=files, ref=ref, results={}, images=images)


def argv2(b, task: str, out: Path) -> list[str]:
    """argv_of, with the 80-prompt tasks' texts in batches of 64 (the tiny CPU model costs
    ~0.2 s per call whatever the batch; batches of 3 are exercised by the other tasks)."""
    argv = argv_of(b, task, out)
    if task not in ("fgovd", "sharegpt4v", "dci", "docci", "coco", "flickr30k"):
        argv[argv.index("--batch-size") + 1] = "64"
    return argv


def result(b, task: str) -> dict:
    if task not in b.results:
        out = b.root / "out1" / task
        assert run_main(argv2(b, task, out)) == 0
        b.results[task] = json.loads((out / f"{NAME.get(task, task)}.json").read_text())
    return b.results[task]


def _class_embeddings(ref, names: list[str], head: str) -> torch.Tensor:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    key = ("classes", tuple(names), head)
    if key not in ref.cache:
        ref.cache[key] = torch.stack([
            F.unit(F.unit(ref.texts([t(n) for t in OPENAI_IMAGENET_TEMPLATES], head)).mean(0))
            for n in names
        ])  # fmt: skip
    return ref.cache[key]


# ----------------------------------------------------------------------------- FG-OVD


@pytest.mark.slow
def test_fgovd_matches_upstream_fgclip2_protocol(bench2):
    from PIL import Image

    r = result(bench2, "fgovd")
    assert r["family"] == "fgclip2"
    assert r["protocol"] == {
        "resize": "naflex", "patch_budget": "dynamic", "max_num_patches": 1024,
        "text_head": "box", "text_length": 64, "templates": "openai",
        "prompt_ensemble": "normalise-mean-normalise", "box_format": "xywh", "box_features": "roi",
    }  # fmt: skip
    f = bench2.files["fgovd"]
    for level, fname in (
        ("hard", "h_attributes_llava.jsonl"),
        ("medium", "m_attributes_llava.jsonl"),
    ):
        hits = n = 0
        for line in (f["data"] / fname).read_text().split("\n"):
            if not line:
                continue
            it = json.loads(line)
            path = f["image_root"] / it["img_path"]
            x, y, w, h = it["bbox"]
            W, H = Image.open(path).size
            if not it["neg_expression"] or x + w > W + 1 or y + h > H + 1:
                continue
            texts = it["pos_expression"] + it["neg_expression"]
            s = F.unit(bench2.ref.texts(texts, "box")) @ F.unit(bench2.ref.region(path, it["bbox"]))
            hits += bool(s[0] >= s[1:].max())
            n += 1
        got = r["levels"][level]
        assert (got["items"], got["accuracy"]) == (n, hits / n), level
    assert 0 < r["levels"]["medium"]["accuracy"] < 1, "a fixture scoring neither 0 nor 1"


# ----------------------------------------------------------------------------- boxes


@pytest.mark.parametrize("task", ["coco-boxcls", "lvis-boxcls", "lvis-crop"])
def test_box_classification_matches_upstream_fgclip2_protocol(bench2, task):
    r = result(bench2, task)
    data = json.loads(Path(bench2.files[task]["data"]).read_text())
    lvis = "lvis" in task
    cats = sorted(data["categories"], key=lambda c: c["id"]) if lvis else data["categories"]
    names = [c["name"].replace("_", " ") if lvis else c["name"] for c in cats]
    index = {c["id"]: i for i, c in enumerate(cats)}
    cls = _class_embeddings(bench2.ref, names, "box")
    files = {im["id"]: im.get("file_name") or im["coco_url"].rsplit("/", 1)[1]
             for im in data["images"]}  # fmt: skip
    hits = n = 0
    for ann in data["annotations"]:
        if ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
            continue
        path = Path(bench2.files[task]["image_root"]) / files[ann["image_id"]]
        if task == "lvis-crop":
            feat = bench2.ref.image(path, ann["bbox"])
        else:
            feat = bench2.ref.region(path, ann["bbox"])
        hits += int((F.unit(feat) @ cls.T).argmax()) == index[ann["category_id"]]
        n += 1
    assert r["boxes"] == n and r["metrics"]["top1"] == hits / n
    assert r["protocol"]["text_head"] == "box"


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("task", ["sharegpt4v", "dci", "docci", "coco", "flickr30k"])
def test_retrieval_matches_upstream_fgclip2_protocol(bench2, task):
    from tests.test_eval_benchmarks import _pairs

    r = result(bench2, task)
    pairs = _pairs(bench2, task)
    head = "long" if task in ("sharegpt4v", "dci", "docci") else "short"
    images = F.unit(torch.stack([bench2.ref.image(p) for p, _ in pairs]))
    texts = [t for _, caps in pairs for t in caps]
    owner = [i for i, (_, caps) in enumerate(pairs) for _ in caps]
    sims = images @ F.unit(bench2.ref.texts(texts, head)).T
    want = {}
    for k in (1, 5, 10):
        right = [{j for j, o in enumerate(owner) if o == i} for i in range(len(pairs))]
        want[f"i2t_r{k}"] = _recall(sims, right, k)
        want[f"t2i_r{k}"] = _recall(sims.T, [{o} for o in owner], k)
    assert r["metrics"] == want
    assert r["protocol"]["text_head"] == head
    assert r["protocol"]["text_length"] == (196 if head == "long" else 64)


# ----------------------------------------------------------------------------- zero-shot


@pytest.mark.parametrize("task", ["imagenet", "imagenet-v2"])
def test_zero_shot_matches_upstream_fgclip2_protocol(bench2, task):
    r = result(bench2, task)
    cls = _class_embeddings(bench2.ref, F.IMAGENET_CLASSES, "short")
    folder = Path(bench2.files[task]["data"])
    hits = n = 0
    for label, d in enumerate(sorted(p for p in folder.iterdir())):
        for img in sorted(d.iterdir()):
            feat = bench2.ref.image(img, budget=1024)  # eval_IN1K.py: a fixed 1024
            hits += int((F.unit(feat) @ cls.T).argmax()) == label
            n += 1
    assert r["images"] == n and r["metrics"] == {"top1": hits / n}
    assert r["protocol"]["patch_budget"] == "fixed" and r["protocol"]["max_num_patches"] == 1024


# ----------------------------------------------------------------------------- plain SigLIP 2


def test_plain_hf_siglip2_checkpoint_scores_as_transformers(bench2, tmp_path):
    """transformers' own save_pretrained output (model_type siglip2, no FG-CLIP 2 extras):
    short-caption retrieval equals Siglip2Model's image/text features."""
    from transformers import Siglip2Model

    hf = bench2.ref.hf
    folder = tmp_path / "siglip2"
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((bench2.root / "ckpt" / name).read_bytes())
    assert json.loads((folder / "config.json").read_text())["model_type"] == "siglip2"
    argv = argv_of(bench2, "coco", tmp_path / "out")
    argv[argv.index("--checkpoint") + 1] = str(folder)
    assert run_main(argv) == 0
    got = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert got["family"] == "fgclip2"
    from tests.test_eval_benchmarks import _pairs

    pairs = _pairs(bench2, "coco")
    reloaded = Siglip2Model.from_pretrained(folder).eval()
    assert torch.equal(reloaded.logit_bias, hf.logit_bias)
    images = F.unit(torch.stack([bench2.ref.image(p) for p, _ in pairs]))
    texts = [t for _, caps in pairs for t in caps]
    owner = [i for i, (_, caps) in enumerate(pairs) for _ in caps]
    sims = images @ F.unit(bench2.ref.texts(texts, "short")).T
    right = [{j for j, o in enumerate(owner) if o == i} for i in range(len(pairs))]
    assert got["metrics"]["i2t_r1"] == _recall(sims, right, 1)
    assert got["metrics"]["t2i_r5"] == _recall(sims.T, [{o} for o in owner], 5)


# ----------------------------------------------------------------------------- config.json


def test_config_json_gives_family_and_shape_and_a_preset_must_agree(bench2, tmp_path):
    from transformers import Siglip2TextConfig, Siglip2VisionConfig

    from fgclip_mega.checkpoint.hf_config import (
        SIGLIP2_TEXT_DEFAULTS,
        SIGLIP2_VISION_DEFAULTS,
        model_fields_from_hf,
        reconcile_model_config,
    )
    from fgclip_mega.config import ConfigError
    from fgclip_mega.eval.__main__ import model_config
    from fgclip_mega.presets import fgclip2_tiny

    cfg, _ = model_config(str(bench2.root / "ckpt"), None, [])
    m = cfg.model
    assert m.family == "fgclip2" and m.vision.activation == m.text.activation == "gelu_tanh"
    assert (m.vision.image_size, m.vision.patch_size, m.vision.width) == (128, 32, 32)
    assert (m.text.short_context, m.text.long_context, m.text.long_position_split) == (64, 196, 20)
    assert m.text.vocab_size == 256 and m.text.layer_norm_eps == 1e-6
    # Keys a file omits take transformers' defaults.
    for ours, theirs in ((SIGLIP2_TEXT_DEFAULTS, Siglip2TextConfig()),
                         (SIGLIP2_VISION_DEFAULTS, Siglip2VisionConfig())):  # fmt: skip
        for key, value in ours.items():
            if value is not None and key not in ("keep_len",):
                assert getattr(theirs, key) == value, key
    # A checkpoint saying 8 text heads against a 4-head preset agreeing on every other field:
    # that field alone is named.
    from fgclip_mega.config import set_value

    tiny = fgclip2_tiny()
    for name, value in model_fields_from_hf(F2.config_json()).items():
        set_value(tiny, name, value)
    fields = model_fields_from_hf(F2.config_json(heads=8))
    explicit = {f: "--preset fgclip2_tiny" for f in fields}
    with pytest.raises(ConfigError) as err:
        reconcile_model_config(tiny, fields, explicit, "ckpt/config.json")
    msg = str(err.value)
    assert "model.text.heads=4 (--preset fgclip2_tiny) but text_config.num_attention_heads=8" in msg
    assert msg.count(" but ") == 1, msg
    # The unmodified preset (8-px patches, width 64) disagrees on the shape, each field named.
    with pytest.raises(ConfigError) as err:
        reconcile_model_config(fgclip2_tiny(), fields, explicit, "ckpt/config.json")
    assert "model.vision.patch_size=8 (--preset fgclip2_tiny) but vision_config.patch_size=32" in (
        str(err.value)
    )
    # The v1 tiny preset against an FG-CLIP 2 checkpoint names the family first of all.
    with pytest.raises(ConfigError, match=r"model\.family='fgclip' \(--preset tiny\) but the "
                       r"family of model_type 'fgclip2'='fgclip2'"):  # fmt: skip
        model_config(str(bench2.root / "ckpt"), "tiny", [])
    with pytest.raises(ConfigError, match=r"model\.text\.heads=8 \(override"):
        model_config(str(bench2.root / "ckpt"), None, ["model.text.heads=8"])
    bad = F2.config_json()
    bad["vision_config"]["hidden_act"] = "gelu"
    with pytest.raises(ConfigError, match="vision_config.hidden_act='gelu'"):
        model_fields_from_hf(bad)
    bad = F2.config_json()
    bad["vision_config"]["num_patches"] = 15
    with pytest.raises(ConfigError, match="vision_config.num_patches=15 is not a square"):
        model_fields_from_hf(bad)
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        model_fields_from_hf({"model_type": "bert"})


def test_v2_protocol_options(bench2, tmp_path, capsys):
    argv = argv_of(bench2, "dci", tmp_path / "o")
    assert run_main([*argv, "--image-size", "224"]) == 2
    assert "--image-size: not for FG-CLIP 2 checkpoints" in capsys.readouterr().err
    assert run_main([*argv, "--text-length", "64"]) == 2
    assert "--text-length 64: FG-CLIP 2's long texts are padded to 196" in capsys.readouterr().err
    assert run_main([*argv, "--max-num-patches", "300"]) == 2
    assert "--max-num-patches 300: must be one of" in capsys.readouterr().err
    assert run_main([*argv, "--text-head", "box", "--max-num-patches", "256"]) == 0
    got = json.loads((tmp_path / "o" / "dci.json").read_text())["protocol"]
    assert (got["text_head"], got["text_length"], got["max_num_patches"]) == ("box", 64, 256)


# ----------------------------------------------------------------------------- tokenizer


def test_bad_tokenizer_path_is_one_clear_error(bench2, tmp_path, capsys):
    argv = argv_of(bench2, "dci", tmp_path / "o")
    assert run_main([*argv, "--tokenizer", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert err == [f"error: {tmp_path / 'nowhere'}: no such tokenizer file or directory"]
    (tmp_path / "vocab.txt").write_text("a b c")
    assert run_main([*argv, "--tokenizer", str(tmp_path / "vocab.txt")]) == 2
    assert "vocab.txt: expected a tokenizer.json" in capsys.readouterr().err
    # A checkpoint folder without tokenizer.json and no --tokenizer: named, with the hint.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((bench2.root / "ckpt" / name).read_bytes())
    argv[argv.index("--checkpoint") + 1] = str(bare)
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "no tokenizer.json or tokenizer.model in this directory (pass --tokenizer PATH)" in err
    assert not (tmp_path / "o").exists()  # nothing written
    assert run_main([*argv, "--tokenizer", str(bench2.root / "ckpt")]) == 0
