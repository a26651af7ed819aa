"""Published numbers of the released checkpoints, for `--compare-golden MODEL` and the README.

Only numbers read in a source are listed (percent, as published), each task with its source; a
benchmark without a readable published number is left out rather than guessed. The README's
golden table is `markdown_table()` (tests/test_eval_benchmarks.py checks they agree).

Sources:
- FG-CLIP 2 paper (arXiv 2510.10921), Table 1 (fine-grained understanding = FG-OVD top-1, and
  bounding-box classification top-1 on COCO 80 / LVIS 1203 classes) and Table 3 (English
  long / short caption retrieval, I->T and T->I, and zero-shot IN-1K / IN-v2 top-1), read from
  the tables' images on upstream's project page: 360CVGroup/FG-CLIP branch `homepage` (commit
  e32c621), images/table1.png and images/table3.png. Rows: FG-CLIP ViT-B/16 = fg-clip-base,
  ViT-L/14 = fg-clip-large; FG-CLIP 2 ViT-B/16, ViT-L/16, ViT-So/16 = fg-clip2-base, -large,
  -so400m (the backbones upstream's README gives those checkpoints).
- Cross-checks, same values: the FG-CLIP v1 radar chart (branch v1.0,
  use_imgs/radar_chart_methods.png) for fg-clip-base (ShareGPT4V 96.7 / 94.9, DCI 61.8 / 60.6,
  MSCOCO 64.1 / 45.4, Flickr30k 90.7 / 76.4, ImageNet-1K 69.0, box classification 52.3, FG-OVD
  hard 46.1 / medium 66.6); the FG-CLIP paper's (arXiv 2505.05071) fg-clip-large DCI 66.7 / 66.1
  as quoted in upstream issue #22 and confirmed by the authors' rerun there.
Retrieval numbers are R@1 (Table 3 does not print the k; the FG-CLIP papers report R@1, and
DCI's 66.7 / 66.1 is R@1 in issue #22). Not published for these checkpoints: DOCCI in English
(only DOCCI-CN, a Chinese translation), R@5 / R@10, top-5, the crop-and-resize box baseline.
The v2 numbers come from upstream's v2 protocol (NaFlex input, SigLIP 2 tokenizer, lower-cased
texts; v1: squash to 224 / 336 px, CLIP BPE at 77 / 248 tokens): compare them only under it.
"""

from __future__ import annotations

from fgclip_mega.config import ConfigError

GOLDEN: dict[str, dict[str, dict[str, float]]] = {
    # qihoo360/fg-clip-base: ViT-B/16, 224 px.
    "fgclip-v1-base": {
        "fgovd": {"hard": 46.1, "medium": 66.6, "easy": 68.7, "trivial": 83.4},
        "coco-boxcls": {"top1": 52.3},
        "lvis-boxcls": {"top1": 28.6},
        "sharegpt4v": {"i2t_r1": 96.7, "t2i_r1": 94.9},
        "dci": {"i2t_r1": 61.8, "t2i_r1": 60.6},
        "coco": {"i2t_r1": 64.1, "t2i_r1": 45.4},
        "flickr30k": {"i2t_r1": 90.7, "t2i_r1": 76.4},
        "imagenet": {"top1": 69.0},
        "imagenet-v2": {"top1": 61.8},
    },
    # qihoo360/fg-clip-large: ViT-L/14, 336 px.
    "fgclip-v1-large": {
        "fgovd": {"hard": 48.4, "medium": 69.5, "easy": 71.2, "trivial": 89.7},
        "coco-boxcls": {"top1": 63.2},
        "lvis-boxcls": {"top1": 38.3},
        "sharegpt4v": {"i2t_r1": 97.4, "t2i_r1": 96.8},
        "dci": {"i2t_r1": 66.7, "t2i_r1": 66.1},
        "coco": {"i2t_r1": 68.9, "t2i_r1": 50.9},
        "flickr30k": {"i2t_r1": 93.7, "t2i_r1": 81.5},
        "imagenet": {"top1": 76.1},
        "imagenet-v2": {"top1": 69.0},
    },
    # qihoo360/fg-clip2-base: ViT-B/16 (SigLIP 2 NaFlex).
    "fgclip2-base": {
        "fgovd": {"hard": 52.3, "medium": 76.3, "easy": 80.3, "trivial": 92.0},
        "coco-boxcls": {"top1": 74.9},
        "lvis-boxcls": {"top1": 47.3},
        "sharegpt4v": {"i2t_r1": 95.8, "t2i_r1": 95.4},
        "dci": {"i2t_r1": 64.5, "t2i_r1": 64.9},
        "coco": {"i2t_r1": 72.1, "t2i_r1": 54.5},
        "flickr30k": {"i2t_r1": 94.1, "t2i_r1": 81.9},
        "imagenet": {"top1": 79.5},
        "imagenet-v2": {"top1": 72.2},
    },
    # qihoo360/fg-clip2-large: ViT-L/16.
    "fgclip2-large": {
        "fgovd": {"hard": 55.5, "medium": 77.5, "easy": 83.1, "trivial": 92.5},
        "coco-boxcls": {"top1": 74.0},
        "lvis-boxcls": {"top1": 41.9},
        "sharegpt4v": {"i2t_r1": 96.9, "t2i_r1": 96.6},
        "dci": {"i2t_r1": 70.0, "t2i_r1": 71.6},
        "coco": {"i2t_r1": 75.1, "t2i_r1": 58.6},
        "flickr30k": {"i2t_r1": 96.6, "t2i_r1": 84.8},
        "imagenet": {"top1": 83.0},
        "imagenet-v2": {"top1": 77.4},
    },
    # qihoo360/fg-clip2-so400m: ViT-So/16.
    "fgclip2-so400m": {
        "fgovd": {"hard": 54.0, "medium": 77.4, "easy": 79.8, "trivial": 93.5},
        "coco-boxcls": {"top1": 77.4},
        "lvis-boxcls": {"top1": 43.9},
        "sharegpt4v": {"i2t_r1": 97.5, "t2i_r1": 96.7},
        "dci": {"i2t_r1": 70.6, "t2i_r1": 72.1},
        "coco": {"i2t_r1": 74.6, "t2i_r1": 56.7},
        "flickr30k": {"i2t_r1": 95.9, "t2i_r1": 85.0},
        "imagenet": {"top1": 84.1},
        "imagenet-v2": {"top1": 77.8},
    },
}
CHECKPOINTS = {
    "fgclip-v1-base": "qihoo360/fg-clip-base (ViT-B/16, 224 px)",
    "fgclip-v1-large": "qihoo360/fg-clip-large (ViT-L/14, 336 px)",
    "fgclip2-base": "qihoo360/fg-clip2-base (ViT-B/16)",
    "fgclip2-large": "qihoo360/fg-clip2-large (ViT-L/16)",
    "fgclip2-so400m": "qihoo360/fg-clip2-so400m (ViT-So/16)",
}
_PAPER = "arXiv 2510.10921"
SOURCES = {
    "fgovd": f"{_PAPER} Table 1, fine-grained understanding (FG-OVD) top-1",
    "coco-boxcls": f"{_PAPER} Table 1, BBox classification COCO (80) top-1",
    "lvis-boxcls": f"{_PAPER} Table 1, BBox classification LVIS (1203) top-1",
    "sharegpt4v": f"{_PAPER} Table 3, ShareGPT4V I->T / T->I",
    "dci": f"{_PAPER} Table 3, DCI I->T / T->I",
    "coco": f"{_PAPER} Table 3, MSCOCO I->T / T->I",
    "flickr30k": f"{_PAPER} Table 3, Flickr30k I->T / T->I",
    "imagenet": f"{_PAPER} Table 3, IN-1K top-1",
    "imagenet-v2": f"{_PAPER} Table 3, IN-v2 top-1",
}
BENCHMARK = {  # README column: the benchmark and the --task that scores it
    "fgovd": "FG-OVD (`fgovd`)",
    "coco-boxcls": "COCO val2017 boxes (`coco-boxcls`)",
    "lvis-boxcls": "LVIS v1 boxes (`lvis-boxcls`)",
    "sharegpt4v": "ShareGPT4V-1k (`sharegpt4v`)",
    "dci": "DCI (`dci`)",
    "coco": "COCO 5k (`coco`)",
    "flickr30k": "Flickr30k 1k (`flickr30k`)",
    "imagenet": "ImageNet-1k (`imagenet`)",
    "imagenet-v2": "ImageNet-V2 (`imagenet` on its folder)",
}


def check_model(model: str) -> None:
    if model not in GOLDEN:
        raise ConfigError(f"--compare-golden {model!r}: known models are {sorted(GOLDEN)}")


def golden_task(task: str, result: dict) -> str:
    """The GOLDEN key of a run: ImageNet-V2 by its folder layout; the crop-and-resize box
    baseline has no published number (the tables use RoI features)."""
    if task == "imagenet" and result.get("folder_layout") == "imagenet-v2":
        return "imagenet-v2"
    if task.endswith("-boxcls") and result.get("protocol", {}).get("box_features") == "crop":
        return f"{task} (crop baseline)"
    return task


def deltas(model: str, task: str, metrics: dict[str, float]) -> dict[str, tuple]:
    """{metric: (ours %, published %, ours - published)} for the published metrics of `task`."""
    check_model(model)
    published = GOLDEN[model].get(task, {})
    out = {}
    for name, value in published.items():
        ours = metrics.get(name)
        ours = None if ours is None else 100.0 * ours
        out[name] = (ours, value, None if ours is None else ours - value)
    return out


def deltas_table(model: str, task: str, metrics: dict[str, float]) -> str:
    rows = deltas(model, task, metrics)
    if not rows:
        return f"{model}: no published {task} number is recorded (see golden.py)"
    lines = [
        f"{task} vs {CHECKPOINTS[model]} ({SOURCES[task]})",
        "metric    ours  published   delta",
    ]
    for name, (ours, pub, d) in rows.items():
        o = "-" if ours is None else f"{ours:.2f}"
        dd = "-" if d is None else f"{d:+.2f}"
        lines.append(f"{name:8s} {o:>6s} {pub:10.2f} {dd:>7s}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's golden table: a row per benchmark metric, a column per model ("-": none)."""
    models = list(GOLDEN)
    lines = [
        f"| benchmark (task) | metric | {' | '.join(models)} | {_PAPER} |",
        "|---|---|" + "---|" * len(models) + "---|",
    ]
    rows = {}  # (task, metric) in first-seen order
    for tasks in GOLDEN.values():
        for task, values in tasks.items():
            rows.update({(task, m): None for m in values})
    for task, metric in rows:
        vals = [GOLDEN[m].get(task, {}).get(metric) for m in models]
        cells = " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
        table = SOURCES[task].removeprefix(f"{_PAPER} ").split(",")[0]
        lines.append(f"| {BENCHMARK[task]} | {metric} | {cells} | {table} |")
    return "\n".join(lines) + "\n"
