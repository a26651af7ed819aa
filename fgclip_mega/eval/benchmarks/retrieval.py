"""Image-text retrieval, R@1/5/10 in both directions, on each benchmark's own files.

Long captions (text length 248, the long path), as upstream FG-CLIP v1 fgclip/eval/:
- sharegpt4v (shareg4v_retrieval.py): the first 1,000 rows of
  share-captioner_coco_lcs_sam_1246k_1107.json; caption = conversations[1].value, image =
  basename of `image` under the image root.
- dci (dci_retrieval.py): every JSON file of densely_captioned_images/annotations/; caption =
  extra_caption, image = `image` under the image root (upstream: sam/images/138/).
- docci (no upstream script): docci_descriptions.jsonlines, rows of --split (default test);
  caption = description, image = images/<image_file>.
Short captions (77), 5 captions per image, i2t a hit when any of the image's captions is in the
top k, t2i when its image is:
- coco: annotations/captions_val2017.json as upstream coco_retrieval.py reads it (torchvision
  CocoCaptions: images by ascending id, captions in file order, the first 5), or Karpathy's
  dataset_coco.json (split test, 5,000 images), or a BLIP-style list [{image, caption: [..]}].
- flickr30k: Karpathy's dataset_flickr30k.json (split test, 1,000 images) or the BLIP-style
  flickr30k_test.json that upstream fgclip2/eval/flickr30k_retrieval.py reads.
Ranks count wrong candidates scoring at least the best right one (ties against the model;
upstream's argsort breaks them arbitrarily).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fgclip_mega.eval import metrics as M
from fgclip_mega.eval.benchmarks.common import (
    BenchmarkError,
    ImageJob,
    Skips,
    encode_images,
    need,
    read_json,
    read_jsonl,
)
from fgclip_mega.eval.benchmarks.engine import encode_texts, random_features

LONG_TASKS = ("sharegpt4v", "dci", "docci")
SHORT_TASKS = ("coco", "flickr30k")
KS = (1, 5, 10)


def _sharegpt4v(data: Path, root: Path, args) -> list[tuple[Path, list[str]]]:
    rows = read_json(data)
    if not isinstance(rows, list):
        raise BenchmarkError(f"{data}: expected the ShareGPT4V list of conversations")
    out = []
    for i, row in enumerate(rows[: args.limit or 1000]):
        where = f"{data}: row {i}"
        conv = need(row, "conversations", where, list)
        if len(conv) < 2 or not isinstance(conv[1], dict) or "value" not in conv[1]:
            raise BenchmarkError(f"{where}: conversations[1].value (the caption) is missing")
        out.append((root / need(row, "image", where, str).rsplit("/", 1)[-1], [conv[1]["value"]]))
    return out


def _dci(data: Path, root: Path, args) -> list[tuple[Path, list[str]]]:
    if not data.is_dir():
        raise BenchmarkError(f"{data}: expected DCI's annotations directory of JSON files")
    out = []
    for f in sorted(data.glob("*.json")):
        rec = read_json(f)
        out.append((root / need(rec, "image", str(f), str), [need(rec, "extra_caption", str(f))]))
    return out


def _docci(data: Path, root: Path, args) -> list[tuple[Path, list[str]]]:
    out = []
    for line, rec in read_jsonl(data):
        where = f"{data}:{line}"
        if need(rec, "split", where, str) == args.split:
            out.append(
                (root / need(rec, "image_file", where, str), [need(rec, "description", where, str)])
            )
    return out


def _captions(data: Path, root: Path, args, split: str) -> list[tuple[Path, list[str]]]:
    d = read_json(data)
    if isinstance(d, list):  # BLIP-style [{image, caption: [..]}]
        out = []
        for i, rec in enumerate(d):
            caps = need(rec, "caption", f"{data}: [{i}]")
            out.append(
                (
                    root / need(rec, "image", f"{data}: [{i}]", str),
                    caps if isinstance(caps, list) else [caps],
                )
            )
        return out
    if isinstance(d, dict) and "annotations" in d:  # COCO captions_*.json
        files = {need(im, "id", f"{data}: images"): im["file_name"] for im in d["images"]}
        caps: dict = {k: [] for k in files}
        for i, ann in enumerate(d["annotations"]):
            img = need(ann, "image_id", f"{data}: annotations[{i}]")
            if img not in caps:
                raise BenchmarkError(f"{data}: annotations[{i}]: image_id {img} not in images")
            caps[img].append(need(ann, "caption", f"{data}: annotations[{i}]", str))
        return [(root / files[k], caps[k]) for k in sorted(files)]
    if isinstance(d, dict) and "images" in d:  # Karpathy dataset_*.json
        out = []
        for i, im in enumerate(d["images"]):
            where = f"{data}: images[{i}]"
            if need(im, "split", where, str) != split:
                continue
            sub = Path(im.get("filepath", ""))
            sents = [need(s, "raw", where, str) for s in need(im, "sentences", where, list)]
            out.append((root / sub / need(im, "filename", where, str), sents))
        return out
    raise BenchmarkError(f"{data}: not a COCO captions, Karpathy or BLIP-style caption file")


def read_pairs(task: str, data: Path, root: Path, args) -> list[tuple[Path, list[str]]]:
    if task == "sharegpt4v":
        return _sharegpt4v(data, root, args)
    if task == "dci":
        return _dci(data, root, args)
    if task == "docci":
        return _docci(data, root, args)
    return _captions(data, root, args, args.split)


def default_root(task: str, data: Path) -> Path:
    if task == "docci":
        return data.parent / "images"
    return data if data.is_dir() else data.parent


def recalls(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor) -> dict:
    ids = torch.arange(images.shape[0])
    i2t = M.retrieval_recall(images, texts, ids, owner, KS)
    t2i = M.retrieval_recall(texts, images, owner, ids, KS)
    return {
        **{f"i2t_r{k}": v for k, v in i2t.items()},
        **{f"t2i_r{k}": v for k, v in t2i.items()},
    }


def run(encoder, args, protocol, group, task: str) -> dict:
    data = Path(args.data)
    root = Path(args.image_root) if args.image_root else default_root(task, data)
    pairs = read_pairs(task, data, root, args)
    skips = Skips()
    per_image = args.captions_per_image if task in SHORT_TASKS else 1
    fewer = 0
    kept = []
    for path, caps in pairs:
        if not caps:
            skips.add("image_without_caption", str(path))
            continue
        fewer += len(caps) < per_image
        kept.append((path, caps[:per_image]))
    if not kept:
        raise BenchmarkError(f"{data}: no image-caption pairs for task {task}")
    encoded = encode_images(
        encoder,
        [ImageJob(p) for p, _ in kept],
        protocol,
        args.batch_size,
        group,
        global_features=True,
        skip_missing=args.skip_missing_images,
        threads=args.threads,
    )
    feats, texts, owner = [], [], []
    for (path, caps), rec in zip(kept, encoded, strict=True):
        if rec.get("missing"):
            skips.add("missing_image", str(path))
            continue
        owner += [len(feats)] * len(caps)
        feats.append(rec["image"])
        texts += caps
    if not feats:
        raise BenchmarkError(f"{data}: every image is missing (skips: {skips.as_dict()})")
    text_emb = encode_texts(encoder, texts, protocol.text_length, args.batch_size, group)
    images = torch.stack(feats)
    owner_t = torch.tensor(owner)
    rand = random_features(images.shape[0], images.shape[1])
    return {
        "metrics": recalls(images, text_emb, owner_t),
        "images": images.shape[0],
        "texts": len(texts),
        "images_with_fewer_captions": fewer,
        "no_info_random_image_features": recalls(rand, text_emb, owner_t),
        "skipped": skips.as_dict(),
    }
