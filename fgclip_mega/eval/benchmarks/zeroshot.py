"""Zero-shot classification on an ImageNet-style folder: ImageNet-1k val (one folder per WordNet
id, classes in sorted folder order, as torchvision's ImageFolder in upstream
fgclip/eval/in_1K/eval_in1k.py) or ImageNet-V2 (folders named 0..999 = the class index, as
upstream fgclip/eval/in_v2/eval_inv2.py reads them). Class names and the 80 OpenAI templates
come from open_clip's package (open_clip.zero_shot_metadata; upstream's copies are equal to
them), or --classnames FILE (one name per line, in class order) for another class set.

Upstream v1 drops the last partial batch (drop_last=True, 16 of ImageNet's 50,000 images at
batch 64); every image is scored here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from fgclip_mega.eval.benchmarks.common import BenchmarkError, ImageJob, Skips, encode_images
from fgclip_mega.eval.benchmarks.engine import (
    class_embeddings,
    random_features,
    topk_hits,
    unit,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def templates_of(name: str) -> list[Callable[[str], str]]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    table = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES[:1]}
    if name not in table:
        raise BenchmarkError(f"--templates must be one of {sorted(table)}, got {name!r}")
    return list(table[name])


def read_classnames(path: Path) -> list[str]:
    if not path.is_file():
        raise BenchmarkError(f"{path}: class-name file not found")
    names = path.read_text(encoding="utf-8").split("\n")
    if names and names[-1] == "":
        names.pop()  # the final newline
    for i, n in enumerate(names, 1):
        if not n.strip():
            raise BenchmarkError(f"{path}:{i}: empty class name (class {i - 1} has no prompt)")
    return names


def read_folder(root: Path, n_classes: int) -> tuple[str, list[tuple[Path, int]]]:
    """(layout, [(image, class index)]): 'imagenet-v2' when every folder is a number."""
    if not root.is_dir():
        raise BenchmarkError(f"{root}: no such directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise BenchmarkError(f"{root}: no class folders")
    if all(p.name.isdigit() for p in folders):
        layout = "imagenet-v2"
        labels = {p: int(p.name) for p in folders}
    else:
        layout = "imagenet"
        labels = {p: i for i, p in enumerate(folders)}  # sorted order, as ImageFolder
        if len(folders) != n_classes:
            raise BenchmarkError(
                f"{root}: {len(folders)} class folders but {n_classes} class names; give "
                "--classnames with one name per folder (sorted folder order)"
            )
    for p, label in labels.items():
        if not 0 <= label < n_classes:
            raise BenchmarkError(f"{p}: class index {label} outside the {n_classes} classes")
    items = [
        (f, labels[p])
        for p in folders
        for f in sorted(p.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise BenchmarkError(f"{root}: no images in its class folders")
    return layout, items


def run(encoder, args, protocol, group) -> dict:
    if args.classnames:
        names = read_classnames(Path(args.classnames))
    else:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    layout, items = read_folder(Path(args.data), len(names))
    jobs = [ImageJob(path) for path, _ in items]
    encoded = encode_images(
        encoder,
        jobs,
        protocol,
        args.batch_size,
        group,
        global_features=True,
        skip_missing=False,
        threads=args.threads,
    )
    classes = class_embeddings(
        encoder,
        names,
        templates_of(protocol.templates),
        protocol.text_length,
        protocol.prompt_ensemble,
        args.batch_size,
        group,
    )
    feats = torch.stack([rec["image"] for rec in encoded])
    target = torch.tensor([label for _, label in items])
    ks = (1, 5) if len(names) >= 5 else (1,)
    n = len(items)
    hits = topk_hits(unit(feats) @ classes.T, target, ks)
    rand = topk_hits(random_features(n, classes.shape[1]) @ classes.T, target, ks)
    return {
        "metrics": {f"top{k}": hits[k] / n for k in ks},
        "folder_layout": layout,
        "images": n,
        "classes": len(names),
        "no_info_random_features": {f"top{k}": rand[k] / n for k in ks},
        "majority_class_top1": Counter(target.tolist()).most_common(1)[0][1] / n,
        "skipped": Skips().as_dict(),
    }
