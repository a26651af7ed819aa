"""How much of a box's texture the vision tower's region vector can learn, beside what the box's
pixels hold: the check behind the main job's texture gap (README, "The main job").

    python run/probe_texture.py --checkpoint runs/main_job/stage1 --mode pixels
    python run/probe_texture.py --checkpoint runs/main_job/stage1 --mode model --steps 1000

The training run's config gives the model, image size and synthetic training scenes (its data
seed); the held-out scenes use seed + 1000, as the main job. Labels are each box's texture word.
- pixels: a linear probe (L-BFGS) on RoI-averaged colour, squared colour and |pixel differences|
  along x, y and both diagonals; nothing learnt below the probe.
- model: the checkpoint's vision tower + projection and a linear head trained end to end on the
  labels (AdamW at a constant --lr, one process, --batch images per step): the region vector as
  the FG-CLIP losses see it, with the most direct signal there is. --init random starts the
  tower from fresh weights instead (same architecture) to tell what stage 1 contributes.
  Reports accuracy on the last 100 training batches beside held-out: memorising the training
  scenes shows as the gap.
Prints one JSON line: held-out accuracy, the majority-class rate and the confusion counts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclip_mega.checkpoint.weights import (  # noqa: E402
    load_training_weights,
    saved_config,
    training_checkpoint,
)
from fgclip_mega.config import Config, apply_dict  # noqa: E402
from fgclip_mega.data import build_config_loader  # noqa: E402
from fgclip_mega.data.synthetic import TEXTURES  # noqa: E402
from fgclip_mega.eval.phrases import decode, phrase_attributes  # noqa: E402

HELD_OUT_SAMPLES = 512  # as the main job


def box_labels(batch) -> torch.Tensor:
    """(H,) texture index of each box with hard negatives (their row 0 is the box's phrase)."""
    return torch.tensor(
        [
            TEXTURES.index(phrase_attributes(decode(t))["texture"])
            for t in batch.hardneg_tokens[:, 0]
        ]
    )


def pixel_features(batch) -> torch.Tensor:
    """(H, 18) RoI means of colour, colour^2 and |differences| along x, y and the diagonals."""
    from torchvision.ops import roi_align

    im = batch.images  # (B, 3, S, S)
    dx = F.pad((im[..., :, 1:] - im[..., :, :-1]).abs(), (0, 1))
    dy = F.pad((im[..., 1:, :] - im[..., :-1, :]).abs(), (0, 0, 0, 1))
    dd = F.pad((im[..., 1:, 1:] - im[..., :-1, :-1]).abs(), (0, 1, 0, 1))
    da = F.pad((im[..., 1:, :-1] - im[..., :-1, 1:]).abs(), (1, 0, 0, 1))
    feats = torch.cat([im, im**2, dx, dy, dd, da], dim=1)
    rois = batch.region_rois[batch.hard_rows].clone()
    rois[:, 1:] *= im.shape[-1]
    return roi_align(feats, rois, (1, 1), 1.0, -1, True).flatten(1)


def run_config(checkpoint: str) -> tuple[Config, Path]:
    step_dir = training_checkpoint(checkpoint)
    if step_dir is None:
        raise SystemExit(f"--checkpoint {checkpoint}: not a training run or checkpoint")
    cfg = Config()
    apply_dict(cfg, saved_config(step_dir))
    cfg.parallel.tensor_parallel_size, cfg.parallel.sequence_parallel = 1, False
    cfg.checkpoint.load = cfg.checkpoint.init_from = ""
    return cfg, step_dir


def loaders(cfg: Config, held_out_dir: str, batch: int):
    held = dataclasses.replace(
        cfg.data,
        seed=cfg.data.seed + 1000,
        synthetic_dir=held_out_dir,
        synthetic_num_samples=HELD_OUT_SAMPLES,
    )
    train = build_config_loader(
        cfg, 0, 1, "cpu", data=dataclasses.replace(cfg.data, micro_batch_size=batch)
    )
    test = build_config_loader(cfg, 0, 1, "cpu", data=held)
    return train, test, math.ceil(HELD_OUT_SAMPLES / held.micro_batch_size)


def confusion(y: torch.Tensor, pred: torch.Tensor) -> dict:
    counts = collections.Counter(zip(y.tolist(), pred.tolist(), strict=True))
    return {f"{TEXTURES[t]}->{TEXTURES[p]}": n for (t, p), n in sorted(counts.items())}


def probe_pixels(train, test, test_batches: int, train_batches: int) -> dict:
    def collect(loader, n):
        xs, ys = [], []
        for _, b in zip(range(n), loader, strict=False):
            xs.append(pixel_features(b))
            ys.append(box_labels(b))
        return torch.cat(xs), torch.cat(ys)

    xtr, ytr = collect(train, train_batches)
    xte, yte = collect(test, test_batches)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(a.shape[1], len(TEXTURES), requires_grad=True)
    bias = torch.zeros(len(TEXTURES), requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, ytr) + 1e-4 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (b @ w + bias).argmax(1)
    return {"y": yte, "pred": pred, "train_boxes": len(ytr)}


def probe_model(
    cfg, step_dir, train, test, test_batches: int, steps: int, lr: float, init: str
) -> dict:
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    state = init_parallel(cfg, seed=0)
    try:
        model = FGCLIPModel.from_runtime(cfg.model, cfg.parallel, state.runtime, state.tp_group)
        if init == "checkpoint":
            load_training_weights(model, step_dir)
        head = torch.nn.Linear(cfg.model.projection_dim, len(TEXTURES))
        params = [*model.vision.parameters(), *model.visual_projection.parameters()]
        opt = torch.optim.AdamW([*params, *head.parameters()], lr=lr, weight_decay=0.0)

        def logits(b):
            _, dense = model.encode_image(b.images, with_dense=True)
            region = model.region_embeddings(dense, b.region_rois[b.hard_rows])
            return head(F.normalize(region, dim=-1) * 10)

        model.train()
        t0, it = time.time(), iter(train)
        last = collections.deque(maxlen=100)  # (correct, boxes) of the last training batches
        for step in range(1, steps + 1):
            b = next(it)
            out, labels = logits(b), box_labels(b)
            loss = F.cross_entropy(out, labels)
            last.append((int((out.argmax(1) == labels).sum()), len(labels)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps:
                rate = step / (time.time() - t0)
                print(
                    f"step {step}/{steps} loss {loss.item():.3f} | {rate:.2f} steps/s | "
                    f"ETA {(steps - step) / rate:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        model.eval()
        ys, preds = [], []
        with torch.no_grad():
            for _, b in zip(range(test_batches), test, strict=False):
                ys.append(box_labels(b))
                preds.append(logits(b).argmax(1))
        train_acc = sum(c for c, _ in last) / max(1, sum(n for _, n in last))
        return {
            "y": torch.cat(ys),
            "pred": torch.cat(preds),
            "steps": steps,
            "lr": lr,
            "init": init,
            "train_acc_last_100_steps": round(train_acc, 4),
        }
    finally:
        destroy_parallel()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training run or checkpoint dir")
    p.add_argument("--mode", choices=("pixels", "model"), required=True)
    p.add_argument("--steps", type=int, default=300, help="model mode: training steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init", choices=("checkpoint", "random"), default="checkpoint")
    p.add_argument(
        "--batch",
        type=int,
        default=32,
        help="training images per step (default: the main job's 2 ranks x 16)",
    )
    p.add_argument("--held-out-dir", default="runs/eval_data")
    args = p.parse_args()
    cfg, step_dir = run_config(args.checkpoint)
    train, test, test_batches = loaders(cfg, args.held_out_dir, args.batch)
    if args.mode == "pixels":
        train_batches = math.ceil(cfg.data.synthetic_num_samples / args.batch)
        out = probe_pixels(train, test, test_batches, train_batches)
    else:
        out = probe_model(cfg, step_dir, train, test, test_batches, args.steps, args.lr, args.init)
    y, pred = out.pop("y"), out.pop("pred")
    result = {
        "mode": args.mode,
        "batch": args.batch,
        "checkpoint": str(step_dir),
        "training_scenes": cfg.data.synthetic_num_samples,
        "held_out_texture_acc": round(float((pred == y).float().mean()), 4),
        "majority_class_rate": round(float(torch.bincount(y).max() / len(y)), 4),
        "held_out_boxes": len(y),
        **out,
        "confusion": confusion(y, pred),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
