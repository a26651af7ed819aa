"""The protocol settings that change a benchmark's numbers, with upstream's defaults per family.

Every setting is an explicit command-line option and is echoed in the output JSON (settings that
do not apply to the checkpoint's family are left out), so two runs are only compared when their
protocols match.

FG-CLIP v1 (360CVGroup/FG-CLIP at commit 0fcea59, fgclip/eval/): every script does the same
image preprocessing: `img.resize((S, S))` (PIL bicubic, aspect ignored), then
CLIPImageProcessor (its resize and centre crop are no-ops at S x S), i.e. a squash to the
model's resolution and CLIP's mean/std.

FG-CLIP 2 (same commit, fgclip2/eval/, commands in scripts/eval/eval.sh): each image alone
through Fgclip2ImageProcessor: NaFlex (aspect kept, mean/std 0.5) with its own patch budget, the
smallest of 128/256/576/784/1024 holding its native (W // 16) * (H // 16) patches
(`dynamic_max_patches`, the processor's default: retrieval, FG-OVD, box classification), or a
fixed 1024 (eval_IN1K.py, inv2.py). Texts lowercased, no prefix ("a photo of " is a training
prefix only), `padding="max_length"`: 64 tokens through `text_head` (short retrieval, ImageNet),
196 through `longtext_head` (ShareGPT4V, DCI), 64 through `boxtext_head` (FG-OVD, COCO/LVIS box
classification, with the 80 OpenAI templates). Upstream ranks by sigmoid(scale * cos + bias)
(retrieval) or softmax(100 * cos) (boxes, FG-OVD): both monotone in the cosine, so the cosine is
ranked here (float64; no fp32 saturation of the sigmoid, which can tie distinct scores).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgclip_mega.data.batch import CLIP_MEAN, CLIP_STD

SHORT, LONG = 77, 248  # v1 text lengths: upstream's --max_length (> 100 selects the long path)
SHORT_V2, LONG_V2 = 64, 196  # FG-CLIP 2: text_head / boxtext_head at 64, longtext_head at 196


@dataclass(frozen=True)
class Protocol:
    image_size: int | None
    """v1: model input resolution (must equal the checkpoint's; upstream: 224 base, 336 large).
    None for FG-CLIP 2 (NaFlex: each image at its own size under a patch budget)."""
    resize: str = "squash"
    """'squash' (upstream: PIL bicubic to S x S, aspect ignored) or 'shortest-crop' (OpenAI
    CLIP: bicubic resize of the short side to S, then centre crop); 'naflex' for FG-CLIP 2
    (aspect kept, bilinear antialiased, as HF Siglip2ImageProcessor)."""
    patch_budget: str | None = None
    """FG-CLIP 2: 'dynamic' (each image's budget: the smallest allowed one holding its native
    patches, capped at max_num_patches; upstream's default) or 'fixed' (max_num_patches for
    every image; upstream's ImageNet scripts)."""
    max_num_patches: int | None = None
    """FG-CLIP 2: the largest patch budget (upstream: 1024)."""
    text_head: str | None = None
    """FG-CLIP 2: the text head of the task's texts: 'short' (text_head), 'long'
    (longtext_head, 196 tokens) or 'box' (boxtext_head), upstream's walk_type."""
    text_length: int = SHORT
    """Token length; above the model's short context the long path (248 positions,
    text_filip_projection) encodes the text, as upstream's `max_length > 100` does."""
    templates: str = "openai"
    """Prompt templates of classification tasks: 'openai' (open_clip's 80
    OPENAI_IMAGENET_TEMPLATES, equal to upstream's imagenet_templates) or 'simple'."""
    prompt_ensemble: str = "normalise-mean-normalise"
    """Class embedding from its prompts: 'normalise-mean-normalise' (upstream and OpenAI: unit
    prompt embeddings averaged, then renormalised) or 'mean-normalise' (raw mean)."""
    box_format: str = "xywh"
    """Box coordinates in the annotation files: 'xywh' pixels (COCO, LVIS, FG-OVD) or 'xyxy'.
    Boxes reach the model normalised to [0, 1] by the decoded image's size; upstream's
    get_image_box_roi_features takes feature-grid units (x / W * grid) instead."""
    box_features: str = "roi"
    """Box classification: 'roi' (RoIAlign on the dense map of the full image, upstream) or
    'crop' (crop the box, squash it to S x S, global image embedding: the baseline)."""

    def as_dict(self) -> dict:
        """The settings that apply (None = not this family's)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def protocol_defaults(task_text_length: int, image_size: int, **overrides) -> Protocol:
    """Upstream v1's settings for a task, then any explicit option."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return Protocol(**{"image_size": image_size, "text_length": task_text_length, **given})


# Upstream FG-CLIP 2's text head of each task (walk_type in scripts/eval/eval.sh and the
# scripts' defaults) and its patch budget rule.
V2_TEXT_HEAD = {
    "fgovd": "box", "coco-boxcls": "box", "lvis-boxcls": "box",
    "sharegpt4v": "long", "dci": "long", "docci": "long",
    "coco": "short", "flickr30k": "short", "imagenet": "short",
}  # fmt: skip
V2_FIXED_BUDGET_TASKS = ("imagenet",)


def fgclip2_protocol_defaults(task: str, **overrides) -> Protocol:
    """Upstream FG-CLIP 2's settings for a task, then any explicit option."""
    head = overrides.get("text_head") or V2_TEXT_HEAD[task]
    base = {
        "image_size": None,
        "resize": "naflex",
        "patch_budget": "fixed" if task in V2_FIXED_BUDGET_TASKS else "dynamic",
        "max_num_patches": 1024,
        "text_head": head,
        "text_length": LONG_V2 if head == "long" else SHORT_V2,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    return Protocol(**{**base, **given})


class BenchmarkError(ValueError):
    """Bad benchmark input (schema, missing file, empty set): the message names the culprit."""


_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD = np.asarray(CLIP_STD, dtype=np.float32)


def open_rgb(path: Path):
    """PIL RGB image; a missing or undecodable file raises FileNotFoundError / ValueError naming
    the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e


def pixels(img, protocol: Protocol) -> torch.Tensor:
    """PIL RGB image -> (3, S, S) float32, CLIP-normalised, as the protocol resizes it."""
    from PIL import Image

    s = protocol.image_size
    if protocol.resize == "squash":
        img = img.resize((s, s), Image.BICUBIC)
    elif protocol.resize == "shortest-crop":
        w, h = img.size
        scale = s / min(w, h)
        img = img.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
        left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
        img = img.crop((left, top, left + s, top + s))
    else:
        raise ValueError(f"--resize must be 'squash' or 'shortest-crop', got {protocol.resize!r}")
    x = (np.asarray(img, dtype=np.float32) / 255.0 - _MEAN) / _STD  # (S, S, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def normalised_box(box, width: int, height: int, box_format: str) -> list[float] | None:
    """Pixel box in `box_format` -> [x1, y1, x2, y2] / image size, or None when the box has no
    area or leaves the image by more than a pixel (a counted skip, never a silent clip)."""
    x, y, a, b = (float(v) for v in box)
    x1, y1, x2, y2 = (x, y, x + a, y + b) if box_format == "xywh" else (x, y, a, b)
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        return None
    if x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1:
        return None
    return [x1 / width, y1 / height, x2 / width, y2 / height]
