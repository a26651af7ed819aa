"""Tiny benchmark fixtures in each benchmark's real file format, from scikit-image's photographs
(public domain / CC0, shipped in its wheel) and synthetic PIL scenes, plus a tiny FG-CLIP
checkpoint (config.json + model.safetensors) and an independent reference for its embeddings:
transformers' CLIPModel, torchvision's roi_align in upstream's feature-grid units, open_clip's
tokenizer and a by-hand CLIP normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.builders import (
    dense_by_hand,
    fgclip_layout,
    long_reference,
    perturbed_clip,
    small_config,
)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
CAPTIONS = {
    "astronaut": "an astronaut in a white suit holding a helmet in front of a flag",
    "chelsea": "a ginger tabby cat looking sideways on a grey background",
    "coffee": "a cup of coffee with foam on a saucer with a spoon on a red table",
    "rocket": "a rocket on a launch pad under a blue sky with clouds of smoke",
    "hubble_deep_field": "a dark sky full of small distant galaxies and stars",
    "immunohistochemistry": "a microscope image of stained tissue with brown and blue cells",
    "scene0": "a red square and a blue circle on a white background",
    "scene1": "a green triangle above a yellow stripe on a black background",
}


# ----------------------------------------------------------------------------- images


def _scene(i: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120), "white" if i == 0 else "black")
    d = ImageDraw.Draw(img)
    if i == 0:
        d.rectangle([10, 20, 70, 80], fill="red")
        d.ellipse([90, 30, 150, 90], fill="blue")
    else:
        d.polygon([(40, 10), (10, 60), (70, 60)], fill="green")
        d.rectangle([0, 80, 160, 100], fill="yellow")
    return np.asarray(img)


def write_images(folder: Path, names=None) -> dict[str, Path]:
    """name -> JPEG path; the photos come at their own sizes (none square but astronaut's)."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names or [*PHOTOS, "scene0", "scene1"]:
        arr = _scene(int(name[-1])) if name.startswith("scene") else getattr(skimage.data, name)()
        path = folder / f"{name}.jpg"
        Image.fromarray(arr).save(path, quality=92)
        out[name] = path
    return out


# ----------------------------------------------------------------------------- checkpoint


def write_checkpoint(folder: Path, text_heads: int | None = None) -> dict:
    """A tiny FG-CLIP v1 layout checkpoint (perturbed CLIP + distinct extras) with its
    config.json; returns {"hf", "sd", "cfg"} for the reference."""
    from fgclip_mega.checkpoint import save_state_dict

    cfg = small_config()
    hf = perturbed_clip(cfg)
    sd = fgclip_layout(hf, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf.config.to_dict()
    if text_heads is not None:
        config["text_config"]["num_attention_heads"] = text_heads
    (folder / "config.json").write_text(json.dumps(config, default=str))
    save_state_dict(sd, folder / "model.safetensors")
    return {"hf": hf, "sd": sd, "cfg": cfg}


class Reference:
    """Embeddings of the checkpoint computed the upstream way, without our model code."""

    def __init__(self, ckpt: dict):
        self.hf, self.cfg = ckpt["hf"], ckpt["cfg"]
        self.long = long_reference(self.hf, ckpt["sd"], self.cfg)
        self.size = self.cfg.vision.image_size

    def pixels(self, path: Path, box=None) -> torch.Tensor:
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from PIL import Image

        img = Image.open(path).convert("RGB")
        if box is not None:  # upstream's crop baseline: integer xywh box
            x, y, w, h = (int(v) for v in box)
            img = img.crop((x, y, x + w, y + h))
        img = img.resize((self.size, self.size), Image.BICUBIC)
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.float32(OPENAI_DATASET_MEAN)) / np.float32(OPENAI_DATASET_STD)
        return torch.from_numpy(x).permute(2, 0, 1)[None]

    @torch.no_grad()
    def image(self, path: Path, box=None) -> torch.Tensor:
        return self.hf.get_image_features(pixel_values=self.pixels(path, box)).pooler_output[0]

    @torch.no_grad()
    def region(self, path: Path, box) -> torch.Tensor:
        """Upstream get_image_box_roi_features: xywh pixel box -> feature-grid units."""
        from PIL import Image
        from torchvision.ops import roi_align

        w, h = Image.open(path).size
        g = self.size // self.cfg.vision.patch_size
        x, y, bw, bh = box
        grid = torch.tensor([[0, x / w * g, y / h * g, (x + bw) / w * g, (y + bh) / h * g]])
        dense = dense_by_hand(self.hf, self.pixels(path))
        return roi_align(dense, grid, (1, 1), 1.0, -1, True)[0, :, 0, 0]

    @torch.no_grad()
    def texts(self, texts: list[str], length: int = 77) -> torch.Tensor:
        import open_clip

        tokens = open_clip.tokenize(texts, context_length=length)
        model = self.long if length > 77 else self.hf
        return model.get_text_features(input_ids=tokens).pooler_output


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=-1)


# ----------------------------------------------------------------------------- benchmark files


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _negs(colour: str, thing: str, n: int) -> list[str]:
    colours = ["red", "blue", "green", "yellow", "purple", "black", "white", "pink", "orange",
               "brown", "grey"]  # fmt: skip
    return [f"a {c} {thing}" for c in colours if c != colour][:n]


def write_fgovd(root: Path, images: dict[str, Path]) -> Path:
    """root/fgovd/{h,m}_attributes_llava.jsonl over root/val2017/*.jpg, FG-CLIP's schema. The
    hard file holds one item with 3 negatives, one with none and one box outside the image."""
    from PIL import Image

    val = root / "val2017"
    val.mkdir(parents=True, exist_ok=True)
    rows = {"1_attributes": [], "2_attributes": []}
    boxes = {
        "chelsea": [(120, 30, 200, 220, "ginger", "cat"), (0, 0, 100, 80, "grey", "wall")],
        "coffee": [(150, 60, 300, 250, "white", "cup"), (400, 250, 190, 140, "red", "table")],
        "scene0": [(10, 20, 60, 60, "red", "square"), (90, 30, 60, 60, "blue", "circle")],
        "rocket": [(250, 80, 120, 300, "white", "rocket")],
        "astronaut": [(100, 50, 200, 250, "white", "suit"), (350, 0, 160, 200, "red", "flag")],
    }
    sent = 0
    for name, bs in boxes.items():
        dst = val / f"{name}.jpg"
        dst.write_bytes(images[name].read_bytes())
        w, h = Image.open(dst).size
        for i, (x, y, bw, bh, colour, thing) in enumerate(bs):
            for kind in rows:
                n_neg = 10
                if kind == "1_attributes" and name == "rocket":
                    n_neg = 3  # upstream keeps such boxes with fewer competitors
                rows[kind].append({
                    "img_path": f"val2017/{name}.jpg", "bbox": [x, y, bw, bh],
                    "pos_expression": [f"a {colour} {thing}"],
                    # medium: 1-3 negatives, so that a random tiny model scores in (0, 1)
                    "neg_expression": _negs(colour, thing, n_neg) if kind[0] == "1" else
                    [f"a {colour} {o}" for o in ("dog", "car", "tree")][: 1 + sent % 3],
                    "category_id": i, "width": w, "height": h, "image_id": sent,
                    "sent_id": sent, "test_type": kind,
                })  # fmt: skip
                sent += 1
    hard = rows["1_attributes"]
    hard.append({**hard[0], "neg_expression": [], "sent_id": 900})  # empty negatives: skipped
    hard.append({**hard[1], "bbox": [500, 100, 80, 80], "sent_id": 901})  # leaves the image
    _jsonl(root / "fgovd" / "h_attributes_llava.jsonl", hard)
    _jsonl(root / "fgovd" / "m_attributes_llava.jsonl", rows["2_attributes"])
    return root / "fgovd"


def _fgovd_category(data: dict, caption: str) -> int:
    """A new FG-OVD category (one per caption, as in the real files) -> its id."""
    cid = len(data["categories"]) + 1
    data["categories"].append({
        "name": caption, "id": cid, "synset": "", "synonyms": [], "def": "", "frequency": "f",
        "instance_count": 1, "image_count": 1,
    })  # fmt: skip
    return cid


def write_fgovd_original(root: Path, images: dict[str, Path]) -> dict[str, Path]:
    """FG-OVD as distributed (lorebianchi98/FG-OVD benchmarks/1_attributes.json = hard,
    2_attributes.json = medium: LVIS-style images / annotations with neg_category_ids /
    categories whose names are the captions) over root/val2017/*.jpg, plus the JSONL that
    FG-CLIP's data/fgovd/ conversion makes of the same files ("." appended to a caption not
    ending in one, annotations in file order). Captions end in ".", nothing or ". " (all three
    occur in the real files). Hard holds an item with 3 negatives, one with none and one box
    leaving the image. Returns {"json": dir, "jsonl": dir}."""
    from PIL import Image

    val = root / "val2017"
    val.mkdir(parents=True, exist_ok=True)
    boxes = {
        "chelsea": [(120.5, 30.25, 200, 220.75, "ginger", "cat"), (0, 0, 100, 80, "grey", "wall")],
        "coffee": [(150, 60, 300, 250, "white", "cup"), (400.4, 250, 190, 140, "red", "table")],
        "scene0": [(10, 20, 60, 60, "red", "square"), (90, 30, 60, 60, "blue", "circle")],
        "rocket": [(250, 80, 120, 300, "white", "rocket")],
        "astronaut": [(100, 50, 200, 250, "white", "suit"), (350, 0, 160, 200, "red", "flag")],
    }  # fmt: skip
    ends = ("", ".", ". ")
    out = {"json": root / "FG-OVD" / "benchmarks", "jsonl": root / "fgovd_converted"}
    for level, stem in (("hard", "1_attributes"), ("medium", "2_attributes")):
        data = {"images": [], "annotations": [], "categories": []}
        jsonl = []
        for img_id, (name, bs) in enumerate(boxes.items(), start=56288):
            dst = val / f"{img_id:012d}.jpg"
            dst.write_bytes(images[name].read_bytes())
            w, h = Image.open(dst).size
            file_name = f"val2017/{dst.name}"
            data["images"].append({
                "id": img_id, "width": w, "height": h, "license": 4,
                "coco_url": f"http://images.cocodataset.org/{file_name}",
                "flickr_url": "http://farm1.staticflickr.com/0/0_z.jpg", "file_name": file_name,
                "neg_category_ids": [], "not_exhaustive_category_ids": [], "checked": True,
            })  # fmt: skip
            for x, y, bw, bh, colour, thing in bs:
                k = len(data["annotations"])
                if level == "hard":
                    n_neg = 3 if name == "rocket" else 10
                    negs = _negs(colour, thing, n_neg)
                else:  # 1-3 negatives: a random tiny model scores in (0, 1)
                    negs = [f"a {colour} {o}" for o in ("dog", "car", "tree")][: 1 + k % 3]
                caps = [f"A {colour} {thing}", *(n[0].upper() + n[1:] for n in negs)]
                caps = [c + ends[(k + i) % 3] for i, c in enumerate(caps)]
                cat, *negs_ids = (_fgovd_category(data, c) for c in caps)
                ann = {
                    "bbox": [x, y, bw, bh], "area": bw * bh,
                    "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
                    "category_id": cat, "neg_category_ids": negs_ids, "image_id": img_id,
                    "needs_revision": False, "id": 3 + 7 * k,
                }  # fmt: skip
                if level == "hard" and k == 1:
                    ann["neg_category_ids"] = []  # empty negatives: a counted skip
                if level == "hard" and k == 3:
                    ann["bbox"] = [w - 20.0, 10.0, 80.0, 40.0]  # leaves the image
                data["annotations"].append(ann)
                fix = [c if c.endswith(".") else c + "." for c in caps]
                jsonl.append({
                    "img_path": file_name, "bbox": ann["bbox"], "pos_expression": fix[:1],
                    "neg_expression": fix[1:] if ann["neg_category_ids"] else [],
                    "category_id": 0, "neg_category_ids": list(range(1, len(caps))),
                    "width": w, "height": h, "image_id": img_id, "sent_id": 10676 + k,
                    "test_type": stem,
                })  # fmt: skip
        out["json"].mkdir(parents=True, exist_ok=True)
        (out["json"] / f"{stem}.json").write_text(json.dumps(data))
        _jsonl(out["jsonl"] / f"{level[0]}_attributes_llava.jsonl", jsonl)
    return out


INSTANCE_CLASSES = ["cat", "cup", "rocket", "square", "circle", "astronaut", "flag"]


def write_instances(root: Path, images: dict[str, Path], lvis: bool = False) -> Path:
    """COCO val2017 instances JSON (or LVIS v1: coco_url, ids 1..C, names with '_')."""
    folder = root / ("lvis_images" if lvis else "val2017")
    folder.mkdir(parents=True, exist_ok=True)
    anns = {
        "chelsea": [(120, 30, 200, 220, "cat", 0)],
        # fractional: the crop baseline cuts int(x), int(w) as upstream, RoI keeps them
        "coffee": [(150.6, 60.4, 300.7, 250.2, "cup", 0), (140, 50, 320, 270, "cup", 1)],
        "rocket": [(250, 80, 120, 300, "rocket", 0)],
        "scene0": [(10, 20, 60, 60, "square", 0), (90, 30, 60, 60, "circle", 0),
                   (100, 40, 0, 30, "circle", 0)],  # zero width: a counted skip
        "astronaut": [(100, 50, 200, 250, "astronaut", 0), (350, 0, 160, 200, "flag", 0)],
    }  # fmt: skip
    names = [c.replace("astronaut", "space_suit") if lvis else c for c in INSTANCE_CLASSES]
    cat_ids = {c: (i + 1 if lvis else [1, 47, 5, 80, 81, 2, 90][i])
               for i, c in enumerate(INSTANCE_CLASSES)}  # fmt: skip
    data = {"images": [], "annotations": [], "categories": []}
    for c, name in zip(INSTANCE_CLASSES, names, strict=True):
        cat = {"id": cat_ids[c], "name": name, "supercategory": "thing"}
        if lvis:
            cat.update(synonyms=[name], frequency="c", synset=f"{c}.n.01")
        data["categories"].append(cat)
    if not lvis:  # COCO lists categories in its own order, not by id
        data["categories"].reverse()
    for img_id, (name, boxes) in enumerate(anns.items(), start=100):
        dst = folder / f"{img_id:012d}.jpg"
        dst.write_bytes(images[name].read_bytes())
        entry = {"id": img_id, "height": 0, "width": 0}
        if lvis:
            entry["coco_url"] = f"http://images.cocodataset.org/val2017/{dst.name}"
        else:
            entry["file_name"] = dst.name
        data["images"].append(entry)
        for x, y, w, h, c, crowd in boxes:
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": img_id, "bbox": [x, y, w, h],
                "category_id": cat_ids[c], "iscrowd": crowd, "area": w * h,
            })  # fmt: skip
    name = "lvis_v1_val.json" if lvis else "instances_val2017.json"
    path = root / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_retrieval(root: Path, images: dict[str, Path]) -> dict[str, dict]:
    """{task: {"data", "image_root"}} for sharegpt4v, dci, docci, coco (captions_val2017.json)
    and flickr30k (Karpathy dataset_flickr30k.json)."""
    names = list(CAPTIONS)
    out = {}
    # ShareGPT4V: a list of conversations; images found by basename under the image root.
    share = root / "sharegpt4v"
    rows = []
    for n in names:
        (share / "imgs").mkdir(parents=True, exist_ok=True)
        (share / "imgs" / f"{n}.jpg").write_bytes(images[n].read_bytes())
        rows.append({"id": n, "image": f"coco/train2017/{n}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": CAPTIONS[n] + ". " + CAPTIONS[names[-1]] * 3}]})  # fmt: skip
    (share / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(rows))
    out["sharegpt4v"] = {"data": share / "share-captioner_coco_lcs_sam_1246k_1107.json",
                         "image_root": share / "imgs"}  # fmt: skip
    # DCI: one JSON per image with extra_caption.
    dci = root / "dci"
    (dci / "annotations").mkdir(parents=True, exist_ok=True)
    (dci / "images").mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names[:6]):
        (dci / "images" / f"sa_{i}.jpg").write_bytes(images[n].read_bytes())
        rec = {"image": f"sa_{i}.jpg", "short_caption": n, "extra_caption": CAPTIONS[n],
               "mask_data": {}}  # fmt: skip
        (dci / "annotations" / f"sa_{i}.json").write_text(json.dumps(rec))
    out["dci"] = {"data": dci / "annotations", "image_root": dci / "images"}
    # DOCCI: descriptions jsonlines with a split column; images/ beside it.
    docci = root / "docci"
    (docci / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, n in enumerate(names):
        (docci / "images" / f"test_{i:05d}.jpg").write_bytes(images[n].read_bytes())
        rows.append({"example_id": f"test_{i:05d}", "split": "test" if i % 4 else "train",
                     "image_file": f"test_{i:05d}.jpg", "description": CAPTIONS[n]})  # fmt: skip
    _jsonl(docci / "docci_descriptions.jsonlines", rows)
    out["docci"] = {"data": docci / "docci_descriptions.jsonlines", "image_root": None}
    # COCO captions_val2017.json: 5-6 captions per image, ids out of order in the file.
    coco = root / "coco"
    (coco / "val2017").mkdir(parents=True, exist_ok=True)
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": [], "annotations": []}
    for i, n in enumerate(names):
        img_id = 1000 - 7 * i
        (coco / "val2017" / f"{img_id:012d}.jpg").write_bytes(images[n].read_bytes())
        data["images"].append({"id": img_id, "file_name": f"{img_id:012d}.jpg"})
        words = CAPTIONS[n].split()
        for j in range(6 if i % 3 == 0 else 5):
            cap = " ".join(words[: 4 + j]) if j < 5 else "an extra sixth caption"
            data["annotations"].append({"id": 10 * img_id + j, "image_id": img_id,
                                        "caption": cap})  # fmt: skip
    data["annotations"].sort(key=lambda a: a["id"] % 7)  # captions interleaved across images
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    out["coco"] = {"data": coco / "annotations" / "captions_val2017.json",
                   "image_root": coco / "val2017"}  # fmt: skip
    # Flickr30k, Karpathy's dataset_flickr30k.json: split test only.
    fl = root / "flickr30k"
    (fl / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    data = {"dataset": "flickr30k", "images": []}
    for i, n in enumerate(names):
        (fl / "flickr30k-images" / f"{i}.jpg").write_bytes(images[n].read_bytes())
        words = CAPTIONS[n].split()
        data["images"].append({"filename": f"{i}.jpg", "imgid": i,
                               "split": "train" if i == 2 else "test",
                               "sentences": [{"raw": " ".join(words[j:]), "tokens": []}
                                             for j in range(5)]})  # fmt: skip
    (fl / "dataset_flickr30k.json").write_text(json.dumps(data))
    out["flickr30k"] = {"data": fl / "dataset_flickr30k.json",
                        "image_root": fl / "flickr30k-images"}  # fmt: skip
    return out


IMAGENET_CLASSES = ["tabby cat", "coffee mug", "space shuttle"]
IMAGENET_MEMBERS = {0: ["chelsea", "scene0"], 1: ["coffee", "scene1"], 2: ["rocket", "astronaut"]}


def write_imagenet(root: Path, images: dict[str, Path], v2: bool = False) -> Path:
    """ImageNet val layout (WordNet-id folders, sorted = class order) or ImageNet-V2 (0..C-1)."""
    wnids = ["n02123045", "n03063599", "n04266014"]
    folder = root / ("imagenetv2" if v2 else "imagenet_val")
    for cls, members in IMAGENET_MEMBERS.items():
        d = folder / (str(cls) if v2 else wnids[cls])
        d.mkdir(parents=True, exist_ok=True)
        for n in members:
            (d / f"{n}.{'jpeg' if v2 else 'JPEG'}").write_bytes(images[n].read_bytes())
    (root / "classnames.txt").write_text("\n".join(IMAGENET_CLASSES) + "\n")
    return folder
