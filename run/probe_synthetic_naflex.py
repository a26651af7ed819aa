"""How much of each box's size and texture its pixels still hold after NaFlex packing of the
mixed-size synthetic scenes, beside the fixed-size scenes squashed as the v1 tiny preset trains.

    python run/probe_synthetic_naflex.py --train 400 --test 200

No model: a linear probe (L-BFGS, trained on seed 0 scenes, scored on seed 1000 scenes) on each
box's 1x1 RoIAlign mean of colour, squared colour and |pixel differences| along x, y and both
diagonals (run/probe_texture.py's features), i.e. what a region vector averaging the box could
see at best from such statistics. Rows (one JSON line each):
- fixed_squash: 128x96 scenes (train_size 64) squashed to 64x64 (the v1 tiny preset): baseline;
- naflex_own_budget: MixedSizes() scenes packed at the smallest budget any batch holding them
  gets (their own native count's budget: the smallest scale, the worst case);
- naflex_max_budget: the same scenes packed at the run's largest budget (256).
Each row: held-out accuracy per attribute and the majority-class rate of the same labels.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclip_mega.data.naflex import batch_budget, native_patches, pack_images  # noqa: E402
from fgclip_mega.data.synthetic import SIZES, TEXTURES, MixedSizes, make_scene  # noqa: E402

ATTRS = {"size": tuple(SIZES), "texture": TEXTURES}


def features(img: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """img (3, H, W) in [0, 1], boxes (R, 4) pixel x1y1x2y2 -> (R, 18) RoI-mean statistics."""
    from torchvision.ops import roi_align

    im = img[None]
    dx = F.pad((im[..., :, 1:] - im[..., :, :-1]).abs(), (0, 1))
    dy = F.pad((im[..., 1:, :] - im[..., :-1, :]).abs(), (0, 0, 0, 1))
    dd = F.pad((im[..., 1:, 1:] - im[..., :-1, :-1]).abs(), (0, 1, 0, 1))
    da = F.pad((im[..., 1:, :-1] - im[..., :-1, 1:]).abs(), (1, 0, 0, 1))
    feats = torch.cat([im, im**2, dx, dy, dd, da], dim=1)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    return roi_align(feats, rois, (1, 1), 1.0, -1, True).flatten(1)


def packed(jpeg: bytes, mode: str, sizes: MixedSizes) -> torch.Tensor:
    """(3, H, W) float in [0, 1]: the image as the model sees it in `mode`."""
    pil = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if mode == "fixed_squash":  # the v1 loaders' antialiased squash
        a = np.asarray(pil.resize((64, 64), Image.BILINEAR), np.float32) / 255
        return torch.from_numpy(a).permute(2, 0, 1)
    t = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    p = sizes.patch_size
    own = batch_budget([native_patches(t.shape[1], t.shape[2], p)], sizes.max_budget)
    budget = own if mode == "naflex_own_budget" else sizes.max_budget
    pixels, _, grids = pack_images([t], p, budget)
    gh, gw = grids[0].tolist()
    x = pixels[0, : gh * gw].reshape(gh, gw, p, p, 3).permute(4, 0, 2, 1, 3)
    return x.reshape(3, gh * p, gw * p) * 0.5 + 0.5


def collect(mode: str, seed: int, n: int, sizes: MixedSizes) -> tuple[torch.Tensor, dict]:
    xs, labels = [], {a: [] for a in ATTRS}
    for i in range(n):
        if mode == "fixed_squash":
            _, jpeg, rec = make_scene(seed, "train", i, 128, 96, train_size=64)
        else:
            _, jpeg, rec = make_scene(seed, "train", i, sizes=sizes)
        img = packed(jpeg, mode, sizes)
        h, w = img.shape[1:]
        boxes = torch.tensor([b["bbox"][:4] for b in rec["bbox_info"]]) * torch.tensor([w, h, w, h])
        xs.append(features(img, boxes.float()))
        for b in rec["bbox_info"]:
            _, size, _, texture, _ = b["short_expr"].split(" ")
            labels["size"].append(ATTRS["size"].index(size))
            labels["texture"].append(ATTRS["texture"].index(texture))
    return torch.cat(xs), {a: torch.tensor(v) for a, v in labels.items()}


def probe(xtr, ytr, xte, yte, classes: int) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, ytr) + 1e-4 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == yte).float().mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=int, default=400, help="training scenes per row")
    p.add_argument("--test", type=int, default=200, help="held-out scenes per row")
    args = p.parse_args()
    torch.manual_seed(0)
    sizes = MixedSizes()
    for mode in ("fixed_squash", "naflex_own_budget", "naflex_max_budget"):
        t0 = time.time()
        xtr, ytr = collect(mode, 0, args.train, sizes)
        xte, yte = collect(mode, 1000, args.test, sizes)
        row = {"mode": mode, "train_boxes": len(xtr), "test_boxes": len(xte)}
        for attr, names in ATTRS.items():
            row[f"{attr}_acc"] = round(probe(xtr, ytr[attr], xte, yte[attr], len(names)), 4)
            counts = torch.bincount(yte[attr], minlength=len(names))
            row[f"{attr}_majority"] = round(float(counts.max() / counts.sum()), 4)
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
