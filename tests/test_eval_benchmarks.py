"""`python -m fgclip_mega.eval --task ...` on tiny fixtures in each benchmark's real format:
every score equals the same protocol computed from an independent reference (transformers'
CLIPModel, torchvision's roi_align in upstream's grid units, open_clip's tokenizer), the same
numbers at 1 and 2 DP ranks, and bad input gives one clear error or a counted skip."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests import benchmark_fixtures as F
from tests import benchmark_fixtures_v2 as F2
from tests.distributed import run_distributed

TASKS = ("fgovd", "fgovd-json", "coco-boxcls", "lvis-boxcls", "lvis-crop", "sharegpt4v", "dci",
         "docci", "coco", "flickr30k", "imagenet", "imagenet-v2")  # fmt: skip
# Test cases that run a task on other files or options: their --task.
TASK_OF = {"lvis-crop": "lvis-boxcls", "imagenet-v2": "imagenet", "fgovd-json": "fgovd",
           "fgovd-jsonl-twin": "fgovd"}  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    images = F.write_images(root / "photos")
    ckpt = F.write_checkpoint(root / "ckpt")
    F2.write_checkpoint(root / "ckpt2")  # an FG-CLIP 2 twin, for the DP=2 check of its path
    retrieval = F.write_retrieval(root, images)
    files = {
        "fgovd": {"data": F.write_fgovd(root / "coco", images), "image_root": root / "coco"},
        "coco-boxcls": {"data": F.write_instances(root / "coco", images),
                        "image_root": root / "coco" / "val2017"},
        "lvis-boxcls": {"data": F.write_instances(root / "lvis", images, lvis=True),
                        "image_root": root / "lvis" / "lvis_images"},
        "imagenet": {"data": F.write_imagenet(root, images), "image_root": None},
        "imagenet-v2": {"data": F.write_imagenet(root, images, v2=True), "image_root": None},
        **retrieval,
    }  # fmt: skip
    files["lvis-crop"] = files["lvis-boxcls"]
    fgovd_json = F.write_fgovd_original(root / "coco", images)
    files["fgovd-json"] = {"data": fgovd_json["json"], "image_root": root / "coco"}
    files["fgovd-jsonl-twin"] = {"data": fgovd_json["jsonl"], "image_root": root / "coco"}
    return SimpleNamespace(root=root, ckpt=ckpt, ref=F.Reference(ckpt), files=files, results={})


def argv_of(b, task: str, out: Path) -> list[str]:
    f = b.files[task]
    name = TASK_OF.get(task, task)
    argv = ["--task", name, "--data", str(f["data"]), "--checkpoint", str(b.root / "ckpt"),
            "--out", str(out), "--batch-size", "3"]  # fmt: skip
    if f["image_root"] is not None:
        argv += ["--image-root", str(f["image_root"])]
    if task.startswith("imagenet"):
        argv += ["--classnames", str(b.root / "classnames.txt")]
    if task == "lvis-crop":
        argv += ["--box-features", "crop"]
    return argv


def run_main(argv: list[str]) -> int:
    from fgclip_mega.eval.__main__ import main

    return main(argv)


def result(b, task: str) -> dict:
    """The task's JSON at DP=1 (run once per module)."""
    if task not in b.results:
        out = b.root / "out1" / task
        assert run_main(argv_of(b, task, out)) == 0
        name = TASK_OF.get(task, task)
        b.results[task] = json.loads((out / f"{name}.json").read_text())
    return b.results[task]


# ----------------------------------------------------------------------------- FG-OVD


def test_fgovd_levels_match_the_reference_with_counted_skips(bench):
    r = result(bench, "fgovd")
    assert set(r["levels"]) == {"hard", "medium"}
    ref = bench.ref
    for level, fname in (
        ("hard", "h_attributes_llava.jsonl"),
        ("medium", "m_attributes_llava.jsonl"),
    ):
        lines = [
            json.loads(x)
            for x in (bench.files["fgovd"]["data"] / fname).read_text().split("\n")
            if x
        ]
        hits = n = few = 0
        chance = 0.0
        for it in lines:
            path = bench.files["fgovd"]["image_root"] / it["img_path"]
            x, y, w, h = it["bbox"]
            from PIL import Image

            W, H = Image.open(path).size
            if not it["neg_expression"] or x + w > W + 1 or y + h > H + 1:
                continue
            texts = it["pos_expression"] + it["neg_expression"]
            s = F.unit(ref.texts(texts)) @ F.unit(ref.region(path, it["bbox"]))
            hits += bool(s[0] >= s[1:].max())
            n += 1
            few += len(texts) - 1 < 10
            chance += 1 / len(texts)
        got = r["levels"][level]
        if level == "medium":
            assert 0 < hits < n, "a fixture where the score is neither 0 nor 1"
        assert (got["items"], got["accuracy"]) == (n, hits / n), level
        assert got["items_with_fewer_than_10_negatives"] == few
        assert got["chance_mean_1_over_1_plus_negatives"] == pytest.approx(chance / n)
        assert 0 <= got["no_info_random_features_accuracy"] <= 1
    skipped = r["levels"]["hard"]["skipped"]
    assert skipped["empty_negatives"]["count"] == 1
    assert skipped["box_outside_image_or_empty"]["count"] == 1
    assert r["levels"]["hard"]["items_with_fewer_than_10_negatives"] == 1
    assert r["protocol"]["text_length"] == 77 and r["protocol"]["resize"] == "squash"


def _fgovd_json_reference(b, path: Path) -> dict:
    """The level scored from FG-OVD's own JSON without our reader: captions as FG-CLIP's JSONL
    carries them ("." appended where missing), upstream's v1 scoring on the reference model."""
    from PIL import Image

    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    hits = n = few = 0
    chance = 0.0
    for ann in data["annotations"]:
        img = b.files["fgovd-json"]["image_root"] / files[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        W, H = Image.open(img).size
        if not ann["neg_category_ids"] or x + w > W + 1 or y + h > H + 1:
            continue
        texts = [names[c] for c in [ann["category_id"], *ann["neg_category_ids"]]]
        texts = [t if t.endswith(".") else t + "." for t in texts]
        s = F.unit(b.ref.texts(texts)) @ F.unit(b.ref.region(img, ann["bbox"]))
        hits += bool(torch.equal(s.max(), s[0]))  # upstream: torch.equal(max, s[0])
        n += 1
        few += len(texts) - 1 < 10
        chance += 1 / len(texts)
    return {"accuracy": hits / n, "items": n, "few": few, "chance": chance / n}


def test_fgovd_in_its_own_json_format_matches_the_reference_and_fgclip_jsonl(bench, tmp_path):
    from fgclip_mega.eval.benchmarks import fgovd
    from fgclip_mega.eval.benchmarks.common import Skips

    r = result(bench, "fgovd-json")
    folder = bench.files["fgovd-json"]["data"]
    assert set(r["levels"]) == {"hard", "medium"}
    for level, stem in (("hard", "1_attributes"), ("medium", "2_attributes")):
        got, want = r["levels"][level], _fgovd_json_reference(bench, folder / f"{stem}.json")
        assert got["format"] == "fgovd-json"
        assert (got["items"], got["accuracy"]) == (want["items"], want["accuracy"]), level
        assert got["items_with_fewer_than_10_negatives"] == want["few"]
        assert got["chance_mean_1_over_1_plus_negatives"] == pytest.approx(want["chance"])
        if level == "medium":
            assert 0 < want["accuracy"] < 1, "a fixture where the score is neither 0 nor 1"
    hard = r["levels"]["hard"]
    assert hard["skipped"]["empty_negatives"]["count"] == 1
    assert "annotations[1] (id 10)" in hard["skipped"]["empty_negatives"]["examples"][0]
    assert hard["skipped"]["box_outside_image_or_empty"]["count"] == 1
    assert hard["items_with_fewer_than_10_negatives"] == 1  # kept, as upstream
    # Captions exactly as FG-CLIP's JSONL carries them: "." appended, "x. " -> "x. .".
    _, items = fgovd.read_items(folder / "1_attributes.json", Skips())
    assert items[0]["texts"][:3] == ["A ginger cat.", "A red cat.", "A blue cat. ."]
    assert items[0]["img"] == "val2017/000000056288.jpg"
    assert items[0]["box"] == [120.5, 30.25, 200, 220.75]
    # The same benchmark converted to FG-CLIP's JSONL gives the same numbers.
    assert run_main(argv_of(bench, "fgovd-jsonl-twin", tmp_path)) == 0
    twin = json.loads((tmp_path / "fgovd.json").read_text())["levels"]
    for level, got in r["levels"].items():
        assert twin[level]["format"] == "fgclip-jsonl"
        drop = ("file", "format", "skipped")
        assert {k: v for k, v in got.items() if k not in drop} == {
            k: v for k, v in twin[level].items() if k not in drop
        }, level
        assert {k: v["count"] for k, v in got["skipped"].items()} == {
            k: v["count"] for k, v in twin[level]["skipped"].items()
        }


def test_fgovd_json_bad_input_is_one_clear_error_or_a_counted_skip(bench, tmp_path, capsys):
    from fgclip_mega.eval.benchmarks import fgovd
    from fgclip_mega.eval.benchmarks.common import BenchmarkError, Skips

    folder = bench.files["fgovd-json"]["data"]
    medium = json.loads((folder / "2_attributes.json").read_text())
    # A missing image: an error naming it, or with --skip-missing-images a counted skip of
    # each of its annotations.
    gone = json.loads(json.dumps(medium))
    gone["images"][0]["file_name"] = "val2017/not_there.jpg"
    lost = sum(a["image_id"] == gone["images"][0]["id"] for a in gone["annotations"])
    (tmp_path / "2_attributes.json").write_text(json.dumps(gone))
    argv = ["--task", "fgovd", "--data", str(tmp_path / "2_attributes.json"),
            "--image-root", str(bench.files["fgovd-json"]["image_root"]),
            "--checkpoint", str(bench.root / "ckpt"), "--out", str(tmp_path / "o")]  # fmt: skip
    assert run_main(argv) == 2
    assert "not_there.jpg: image file not found" in capsys.readouterr().err
    assert run_main([*argv, "--skip-missing-images"]) == 0
    r = json.loads((tmp_path / "o" / "fgovd.json").read_text())["levels"]["medium"]
    assert r["skipped"]["missing_image"]["count"] == lost >= 1
    assert r["items"] == len(medium["annotations"]) - lost
    # Unknown ids name the annotation; a file of neither format names both formats.
    for key, value, msg in (
        ("neg_category_ids", [1, 99999], r"annotations\[0\] \(id 3\): category id 99999 is not"),
        ("image_id", 7, r"annotations\[0\] \(id 3\): image_id 7 is not in images"),
    ):
        bad = json.loads(json.dumps(medium))
        bad["annotations"][0][key] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(BenchmarkError, match=msg):
            fgovd.read_items(tmp_path / "bad.json", Skips())
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(BenchmarkError, match="neither FG-OVD's benchmark JSON"):
        fgovd.read_items(tmp_path / "bad.json", Skips())
    # Levels: from the file name (attribute sets keep their own), and one format per level.
    assert fgovd.level_files(folder) == {
        "hard": folder / "1_attributes.json", "medium": folder / "2_attributes.json"
    }  # fmt: skip
    (tmp_path / "color.json").write_text(json.dumps(medium))
    assert fgovd.level_files(tmp_path / "color.json") == {"color": tmp_path / "color.json"}
    both = tmp_path / "both"
    both.mkdir()
    (both / "2_attributes.json").write_text(json.dumps(medium))
    twin = bench.files["fgovd-jsonl-twin"]["data"] / "m_attributes_llava.jsonl"
    (both / "m_attributes_llava.jsonl").write_text(twin.read_text())
    with pytest.raises(BenchmarkError, match="both m_attributes_llava.jsonl and 2_attributes"):
        fgovd.level_files(both)


# ----------------------------------------------------------------------------- boxes


def _box_reference(b, task: str, crop: bool) -> tuple[float, int, int]:
    data = json.loads(Path(b.files[task]["data"]).read_text())
    lvis = "lvis" in task
    cats = sorted(data["categories"], key=lambda c: c["id"]) if lvis else data["categories"]
    names = [c["name"].replace("_", " ") if lvis else c["name"] for c in cats]
    index = {c["id"]: i for i, c in enumerate(cats)}
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    cls = torch.stack([
        F.unit(F.unit(b.ref.texts([t(n) for t in OPENAI_IMAGENET_TEMPLATES])).mean(0))
        for n in names
    ])  # fmt: skip
    files = {im["id"]: im.get("file_name") or im["coco_url"].rsplit("/", 1)[1]
             for im in data["images"]}  # fmt: skip
    hits = n = skipped = 0
    for ann in data["annotations"]:
        if ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
            skipped += 1
            continue
        path = Path(b.files[task]["image_root"]) / files[ann["image_id"]]
        feat = b.ref.image(path, ann["bbox"]) if crop else b.ref.region(path, ann["bbox"])
        hits += int((F.unit(feat) @ cls.T).argmax()) == index[ann["category_id"]]
        n += 1
    return hits / n, n, skipped


@pytest.mark.parametrize("task", ["coco-boxcls", "lvis-boxcls", "lvis-crop"])
def test_box_classification_matches_the_reference(bench, task):
    r = result(bench, task)
    acc, n, skipped = _box_reference(bench, task, crop=task == "lvis-crop")
    assert r["boxes"] == n and r["metrics"]["top1"] == acc
    assert r["skipped"]["box_outside_image_or_empty"]["count"] == skipped
    assert r["classes"] == len(F.INSTANCE_CLASSES) and "top5" in r["metrics"]
    assert r["protocol"]["box_features"] == ("crop" if task == "lvis-crop" else "roi")
    if task == "coco-boxcls":
        assert r["crowd_boxes_included"] == 1


# ----------------------------------------------------------------------------- retrieval


def _recall(sims: torch.Tensor, right: list[set[int]], k: int) -> float:
    """Loop reference: a hit when fewer than k wrong candidates score >= the best right one."""
    hits = 0
    for i, row in enumerate(sims.tolist()):
        best = max(row[j] for j in right[i])
        wrong = sum(1 for j, s in enumerate(row) if j not in right[i] and s >= best)
        hits += wrong < k
    return hits / len(right)


def _pairs(b, task: str) -> list[tuple[Path, list[str]]]:
    f = b.files[task]
    data = Path(f["data"])
    if task == "sharegpt4v":
        rows = json.loads(data.read_text())[:1000]
        return [(Path(f["image_root"]) / r["image"].split("/")[-1],
                 [r["conversations"][1]["value"]]) for r in rows]  # fmt: skip
    if task == "dci":
        recs = [json.loads(p.read_text()) for p in sorted(data.glob("*.json"))]
        return [(Path(f["image_root"]) / r["image"], [r["extra_caption"]]) for r in recs]
    if task == "docci":
        recs = [json.loads(x) for x in data.read_text().split("\n") if x]
        return [(data.parent / "images" / r["image_file"], [r["description"]])
                for r in recs if r["split"] == "test"]  # fmt: skip
    if task == "coco":
        d = json.loads(data.read_text())
        caps = {}
        for a in d["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        files = {im["id"]: im["file_name"] for im in d["images"]}
        return [(Path(f["image_root"]) / files[k], caps[k][:5]) for k in sorted(files)]
    d = json.loads(data.read_text())
    return [(Path(f["image_root"]) / im["filename"], [s["raw"] for s in im["sentences"]][:5])
            for im in d["images"] if im["split"] == "test"]  # fmt: skip


@pytest.mark.parametrize("task", ["sharegpt4v", "dci", "docci", "coco", "flickr30k"])
def test_retrieval_matches_the_reference(bench, task):
    r = result(bench, task)
    pairs = _pairs(bench, task)
    length = 248 if task in ("sharegpt4v", "dci", "docci") else 77
    images = F.unit(torch.stack([bench.ref.image(p) for p, _ in pairs]))
    texts = [t for _, caps in pairs for t in caps]
    owner = [i for i, (_, caps) in enumerate(pairs) for _ in caps]
    sims = images @ F.unit(bench.ref.texts(texts, length)).T  # (N, M)
    want = {}
    for k in (1, 5, 10):
        want[f"i2t_r{k}"] = _recall(sims, [{j for j, o in enumerate(owner) if o == i}
                                           for i in range(len(pairs))], k)  # fmt: skip
        want[f"t2i_r{k}"] = _recall(sims.T, [{o} for o in owner], k)
    assert r["metrics"] == want
    assert any(0 < v < 1 for v in want.values()), "a fixture where recall is not all 0 or 1"
    assert (r["images"], r["texts"]) == (len(pairs), len(texts))
    assert r["protocol"]["text_length"] == length


# ----------------------------------------------------------------------------- zero-shot


@pytest.mark.parametrize("task", ["imagenet", "imagenet-v2"])
def test_zero_shot_matches_the_reference(bench, task):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    r = result(bench, task)
    cls = torch.stack([
        F.unit(F.unit(bench.ref.texts([t(n) for t in OPENAI_IMAGENET_TEMPLATES])).mean(0))
        for n in F.IMAGENET_CLASSES
    ])  # fmt: skip
    folder = Path(bench.files[task]["data"])
    hits = n = 0
    for label, d in enumerate(sorted(p for p in folder.iterdir())):
        for img in sorted(d.iterdir()):
            hits += int((F.unit(bench.ref.image(img)) @ cls.T).argmax()) == label
            n += 1
    assert r["images"] == n and r["metrics"] == {"top1": hits / n}
    assert r["folder_layout"] == ("imagenet-v2" if task == "imagenet-v2" else "imagenet")
    assert r["protocol"]["templates"] == "openai"


# ----------------------------------------------------------------------------- DP = 2


def _all_tasks_dp(argvs: dict[str, list[str]]) -> None:
    # One process group for every task: torchrun would start one launch per task, and
    # re-creating the gloo group on one port in a process is not what users do.
    from fgclip_mega.eval.__main__ import model_config
    from fgclip_mega.eval.benchmarks.cli import evaluate, parser
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    first = parser().parse_args(next(iter(argvs.values())))
    state = init_parallel(model_config(first.checkpoint, None, [])[0], seed=0)
    try:
        for argv in argvs.values():
            evaluate(parser().parse_args(argv), state)
    finally:
        destroy_parallel()


# FG-CLIP 2's own code paths (NaFlex images and RoI, crops, the long/short/box heads, the
# fixed ImageNet budget), run on the twin checkpoint in the same process group.
V2_TASKS = ("fgovd", "lvis-crop", "dci", "coco", "imagenet")


def _on_fgclip2(b, argv: list[str]) -> list[str]:
    argv = list(argv)
    argv[argv.index("--checkpoint") + 1] = str(b.root / "ckpt2")
    return argv


@pytest.mark.slow
def test_every_task_gives_the_same_numbers_at_2_ranks(bench):
    single = {t: result(bench, t) for t in TASKS}
    argvs = {t: argv_of(bench, t, bench.root / "out2" / t) for t in TASKS}
    for t in V2_TASKS:
        one = bench.root / "out1" / f"v2-{t}"
        assert run_main(_on_fgclip2(bench, argv_of(bench, t, one))) == 0
        single[f"v2-{t}"] = json.loads((one / f"{TASK_OF.get(t, t)}.json").read_text())
        assert single[f"v2-{t}"]["family"] == "fgclip2"
        argvs[f"v2-{t}"] = _on_fgclip2(bench, argv_of(bench, t, bench.root / "out2" / f"v2-{t}"))
    run_distributed(_all_tasks_dp, 2, argvs, timeout=1200)
    for t in argvs:
        name = TASK_OF.get(t.removeprefix("v2-"), t.removeprefix("v2-"))
        two = json.loads((bench.root / "out2" / t / f"{name}.json").read_text())
        assert two["layout"]["dp"] == 2 and single[t]["layout"]["dp"] == 1
        for key in ("metrics", "levels", "skipped", "boxes", "images", "texts"):
            assert two.get(key) == single[t].get(key), (t, key)
        assert (bench.root / "out2" / t / f"{name}.md").is_file()


# ----------------------------------------------------------------------------- bad input


def test_missing_image_fails_naming_it_or_is_counted(bench, tmp_path, capsys):
    f = bench.files["fgovd"]
    lines = (f["data"] / "m_attributes_llava.jsonl").read_text().split("\n")
    gone = json.loads(lines[0])
    gone["img_path"] = "val2017/not_there.jpg"
    (tmp_path / "m_attributes_llava.jsonl").write_text(json.dumps(gone) + "\n" + "\n".join(lines))
    argv = ["--task", "fgovd", "--data", str(tmp_path), "--image-root", str(f["image_root"]),
            "--checkpoint", str(bench.root / "ckpt"), "--out", str(tmp_path / "o")]  # fmt: skip
    assert run_main(argv) == 2
    assert "not_there.jpg: image file not found" in capsys.readouterr().err
    assert run_main([*argv, "--skip-missing-images"]) == 0
    r = json.loads((tmp_path / "o" / "fgovd.json").read_text())["levels"]["medium"]
    assert r["skipped"]["missing_image"]["count"] == 1
    assert r["items"] == len([x for x in lines if x])


def test_class_without_a_prompt_is_an_error(bench, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("tabby cat\n\nspace shuttle\n")
    argv = ["--task", "imagenet", "--data", str(bench.files["imagenet"]["data"]),
            "--classnames", str(names), "--checkpoint", str(bench.root / "ckpt"),
            "--out", str(tmp_path)]  # fmt: skip
    assert run_main(argv) == 2
    assert "names.txt:2: empty class name (class 1 has no prompt)" in capsys.readouterr().err
    data = json.loads(Path(bench.files["lvis-boxcls"]["data"]).read_text())
    data["categories"][1]["name"] = ""
    bad = tmp_path / "lvis_bad.json"
    bad.write_text(json.dumps(data))
    argv = [
        "--task",
        "lvis-boxcls",
        "--data",
        str(bad),
        "--checkpoint",
        str(bench.root / "ckpt"),
        "--image-root",
        str(bench.files["lvis-boxcls"]["image_root"]),
        "--out",
        str(tmp_path),
    ]
    assert run_main(argv) == 2
    assert "class 1 has no name, so no prompt: ''" in capsys.readouterr().err


# ----------------------------------------------------------------------------- config.json


def test_config_json_fills_the_shape_and_a_disagreeing_preset_fails_naming_the_field(
    bench, tmp_path, capsys
):
    from fgclip_mega.config import ConfigError
    from fgclip_mega.eval.__main__ import model_config

    cfg, _ = model_config(str(bench.root / "ckpt"), None, [])
    small = F.small_config()
    assert cfg.model.vision == small.vision and cfg.model.text.heads == small.text.heads
    assert cfg.model.projection_dim == small.projection_dim
    # A checkpoint whose config says 8 text heads (the rest as the tiny preset) refuses the
    # 4-head tiny preset, naming that field alone.
    from fgclip_mega.checkpoint import clip_config
    from fgclip_mega.presets import PRESETS

    config = clip_config(PRESETS["tiny"]().model).to_dict()
    config["text_config"]["num_attention_heads"] = 8
    (tmp_path / "eight").mkdir()
    (tmp_path / "eight" / "config.json").write_text(json.dumps(config, default=str))
    (tmp_path / "eight" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        model_config(str(tmp_path / "eight"), "tiny", [])
    msg = str(err.value)
    assert "model.text.heads=4 (--preset tiny) but text_config.num_attention_heads=8" in msg
    assert msg.count(" but ") == 1, msg
    tiny_default, _ = model_config(str(tmp_path / "eight"), None, [])  # no preset named
    assert tiny_default.model.text.heads == 8 and tiny_default.model.vision.image_size == 64
    with pytest.raises(ConfigError, match=r"model\.vision\.layer_norm_eps=0\.001 \(override"):
        model_config(str(bench.root / "ckpt"), None, ["model.vision.layer_norm_eps=1e-3"])
    model_config(str(bench.root / "ckpt"), None, ["model.text.heads=4"])  # agrees: fine
    config = json.loads((bench.root / "ckpt" / "config.json").read_text())
    # openai/clip-vit-*'s legacy eos_token_id=2 (argmax pooling = the first EOT) and the older
    # *_config_dict spelling both read as our EOT-pooled tower.
    from fgclip_mega.checkpoint.hf_config import model_fields_from_hf

    legacy = {"text_config_dict": {**config["text_config"], "eos_token_id": 2},
              "vision_config_dict": config["vision_config"], "projection_dim": 24}  # fmt: skip
    fields = model_fields_from_hf(legacy)
    assert fields["model.text.eos_token_id"] == 49407 and fields["model.text.heads"] == 4
    assert fields["model.vision.image_size"] == 32 and fields["model.projection_dim"] == 24
    config["vision_config"]["hidden_act"] = "gelu"
    (tmp_path / "gelu").mkdir()
    (tmp_path / "gelu" / "config.json").write_text(json.dumps(config))
    (tmp_path / "gelu" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="vision_config.hidden_act='gelu'"):
        model_config(str(tmp_path / "gelu"), None, [])
    argv = ["--task", "dci", "--data", str(bench.files["dci"]["data"]), "--preset", "tiny",
            "--checkpoint", str(tmp_path / "eight"), "--out", str(tmp_path)]  # fmt: skip
    assert run_main(argv) == 2
    assert "model.text.heads=4 (--preset tiny)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- golden


# The golden table itself: tests/test_eval_golden.py. Here: --compare-golden on a run.


def test_compare_golden_on_a_run_prints_deltas_of_its_metrics(bench, capsys):
    r = result(bench, "imagenet-v2")  # ImageNet-V2 by its folder layout: its own golden row
    capsys.readouterr()
    out = bench.root / "golden"
    argv = [*argv_of(bench, "imagenet-v2", out), "--compare-golden", "fgclip-v1-base"]
    assert run_main(argv) == 0
    printed = capsys.readouterr().out
    ours = 100 * r["metrics"]["top1"]
    assert "imagenet-v2 vs qihoo360/fg-clip-base" in printed
    assert f"top1     {ours:6.2f}      61.80 {ours - 61.8:+7.2f}" in printed
    argv = [*argv_of(bench, "lvis-crop", out), "--compare-golden", "fgclip2-so400m"]
    assert run_main(argv) == 0
    assert "no published lvis-boxcls (crop baseline) number" in capsys.readouterr().out


def test_caption_files_karpathy_coco_and_blip_style_lists(tmp_path):
    from fgclip_mega.eval.benchmarks.common import BenchmarkError
    from fgclip_mega.eval.benchmarks.retrieval import read_pairs

    args = SimpleNamespace(split="test", limit=1000)
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test",
         "sentences": [{"raw": f"cap {i}"} for i in range(5)]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": []},
    ]}  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    got = read_pairs("coco", tmp_path / "dataset_coco.json", tmp_path / "imgs", args)
    assert got == [(tmp_path / "imgs" / "val2014" / "a.jpg", [f"cap {i}" for i in range(5)])]
    blip = [{"image": "flickr30k-images/1.jpg", "caption": ["x", "y"]},
            {"image": "flickr30k-images/2.jpg", "caption": "z"}]  # fmt: skip
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(blip))
    got = read_pairs("flickr30k", tmp_path / "flickr30k_test.json", tmp_path, args)
    assert got == [(tmp_path / "flickr30k-images/1.jpg", ["x", "y"]),
                   (tmp_path / "flickr30k-images/2.jpg", ["z"])]  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(BenchmarkError, match="not a COCO captions, Karpathy or BLIP-style"):
        read_pairs("coco", tmp_path / "bad.json", tmp_path, args)
    (tmp_path / "share.json").write_text(json.dumps([{"image": "x.jpg", "conversations": []}]))
    with pytest.raises(BenchmarkError, match=r"row 0: conversations\[1\]\.value"):
        read_pairs("sharegpt4v", tmp_path / "share.json", tmp_path, args)


def test_lvis_image_paths_and_protocol_defaults(tmp_path):
    from fgclip_mega.config import ConfigError
    from fgclip_mega.eval.benchmarks.boxcls import _image_path
    from fgclip_mega.eval.benchmarks.cli import make_protocol, parser

    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "1.jpg").write_bytes(b"x")
    (tmp_path / "2.jpg").write_bytes(b"x")
    assert _image_path(tmp_path, "train2017/1.jpg") == tmp_path / "train2017" / "1.jpg"
    assert _image_path(tmp_path, "val2017/2.jpg") == tmp_path / "2.jpg"  # one flat folder
    assert _image_path(tmp_path, "val2017/3.jpg") == tmp_path / "val2017" / "3.jpg"  # named

    def proto(*extra):
        args = parser().parse_args(["--data", "x", "--checkpoint", "c", *extra])
        return make_protocol(args, 336).as_dict()

    assert proto("--task", "dci")["text_length"] == 248
    assert proto("--task", "fgovd") == {
        "image_size": 336, "resize": "squash", "text_length": 77, "templates": "openai",
        "prompt_ensemble": "normalise-mean-normalise", "box_format": "xywh", "box_features": "roi",
    }  # fmt: skip
    assert proto("--task", "coco", "--text-length", "248")["text_length"] == 248
    with pytest.raises(ConfigError, match=r"--text-length 300: must be in \[2, 248\]"):
        proto("--task", "dci", "--text-length", "300")
    with pytest.raises(ConfigError, match="--image-size 224: the checkpoint's image size is 336"):
        proto("--task", "coco", "--image-size", "224")
