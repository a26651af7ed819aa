"""Patch cost of FG-CLIP 2 NaFlex batches: budget-grouped (`data.budget_groups`) vs upstream's
ungrouped rule, on the same shuffled stream of mixed image sizes (sizes only: no pixels).

Upstream (`train_fgclip2.py`) cuts each rank's stream into micro-batches and packs each at the
smallest allowed budget holding its largest image; NaFlex then resizes every image (up or down,
aspect kept) to fill that budget, so a small image in a batch with a large one is *upsampled*
to the large budget: the cost is patches, not padding. Per (dataset, micro x DP) this prints one
JSON line with, for both: `patches_per_sample` (what the vision tower processes),
`padding_fraction` (padded patches / total: each grid rounded below its budget), and
`excess_fraction` = (patches - patches at each image's own budget) / patches; plus
`patch_ratio` = ungrouped / grouped patches, and the grouper's `max_pending` samples and
`max_wait_windows`.

    .venv/bin/python run/bench_naflex_padding.py [--samples 60000] [--window 2048] \
        [--patience 1 0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fgclip_mega.data.budget_groups import BudgetGrouper
from fgclip_mega.data.naflex import PATCH_BUDGETS, grid_for_budget
from fgclip_mega.data.naflex_loader import sample_budget

ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 3.0)


def dataset(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) (width, height) of a mixed-size dataset."""
    if name == "loguniform_64_1024":  # short side log-uniform in [64, 1024] px
        short = np.exp(rng.uniform(np.log(64), np.log(1024), n))
    elif name == "mostly_small":  # 70% thumbnails (64-256 px), 30% photos (256-1024 px)
        small = rng.random(n) < 0.7
        short = np.where(small, rng.uniform(64, 256, n), rng.uniform(256, 1024, n))
    else:
        raise ValueError(name)
    aspect = rng.choice(ASPECTS, n)
    width = np.maximum(16, short * np.maximum(1.0, aspect)).astype(np.int64)
    height = np.maximum(16, short * np.maximum(1.0, 1 / aspect)).astype(np.int64)
    return np.stack([width, height], 1)


def costs(sizes: np.ndarray, budgets: np.ndarray, patch: int, memo: dict) -> tuple[int, int]:
    """(padded, total) patches of images `sizes` packed at `budgets`."""
    padded = 0
    for (w, h), b in zip(sizes.tolist(), budgets.tolist(), strict=True):
        key = (w, h, b)
        if key not in memo:
            gh, gw = grid_for_budget(h, w, patch, b)
            memo[key] = b - gh * gw
        padded += memo[key]
    return padded, int(budgets.sum())


def run(
    name: str, n: int, micro: int, dp: int, window: int, patch: int, seed: int, patience: int
) -> dict:
    rng = np.random.default_rng(seed)
    sizes = dataset(name, n, rng)
    own = np.array([sample_budget(w, h, patch, PATCH_BUDGETS) for w, h in sizes.tolist()])
    order = rng.permutation(n)  # the shuffled stream
    g = BudgetGrouper(micro * dp, PATCH_BUDGETS, patience)
    ids, grouped, waits, pending = [], [], [], 0
    for w0 in range(0, n, window):
        chunk = order[w0 : w0 + window]
        g.add_window(chunk.tolist(), [0] * len(chunk), own[chunk].tolist())
        pending = max(pending, g.pending())
        while (batch := g.pop()) is not None:
            ids += [sid for sid, _, _ in batch[1]]
            grouped += [batch[0]] * len(batch[1])
            waits += [g.serial - 1 - s for _, _, s in batch[1]]
    ids = np.array(ids)
    # Upstream: each rank's consecutive micro-batches of the same stream, own-largest budget.
    stream = order[: len(ids)]
    per_rank = own[stream][: len(stream) // micro * micro].reshape(-1, micro)
    ungrouped = np.repeat(per_rank.max(1), micro)
    memo: dict = {}
    pad_g, tot_g = costs(sizes[ids], np.array(grouped), patch, memo)
    pad_u, tot_u = costs(sizes[stream[: len(ungrouped)]], ungrouped, patch, memo)
    ideal_g, ideal_u = int(own[ids].sum()), int(own[stream[: len(ungrouped)]].sum())
    return {
        "dataset": name,
        "samples": int(len(ids)),
        "micro_batch": micro,
        "dp": dp,
        "window": window,
        "patience": patience,
        "patch_size": patch,
        "own_budget_histogram": {int(b): int((own == b).sum()) for b in PATCH_BUDGETS},
        "grouped": {
            "patches_per_sample": tot_g / len(ids),
            "padding_fraction": pad_g / tot_g,
            "excess_fraction": (tot_g - ideal_g) / tot_g,
        },
        "ungrouped_upstream": {
            "patches_per_sample": tot_u / len(ungrouped),
            "padding_fraction": pad_u / tot_u,
            "excess_fraction": (tot_u - ideal_u) / tot_u,
        },
        "patch_ratio": (tot_u / len(ungrouped)) / (tot_g / len(ids)),
        "max_pending": pending,
        "max_wait_windows": int(max(waits)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--window", type=int, default=2048, help="samples per shuffle window")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    auto = "0 = the loader's auto rule (data.budget_patience=0)"
    ap.add_argument("--patience", type=int, nargs="+", default=[1, 0], help=auto)
    args = ap.parse_args()
    t0 = time.perf_counter()
    for name in ("loguniform_64_1024", "mostly_small"):
        for micro, dp in ((32, 1), (32, 8), (64, 16), (64, 64)):
            for patience in args.patience:
                auto = max(1, -(-8 * micro * dp // args.window))  # naflex_loader.auto_patience
                row = run(name, args.samples, micro, dp, args.window, args.patch, args.seed,
                          patience or auto)  # fmt: skip
                row["patience_auto"] = patience == 0
                row["elapsed_s"] = round(time.perf_counter() - t0, 2)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
