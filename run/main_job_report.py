"""The main job's report: summary.json, report.md and the PNGs (losses per stage, fine-grained
metrics per attribute for both runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fgclip_mega.eval.report import markdown_table, weakest_changes
from fgclip_mega.eval.suite import summary_of

ATTRS = ("colour", "shape", "size", "texture")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval" not in r]


def plot_losses(out: Path, s1: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Stage 2 is a new run (its steps count from 1): drawn after stage 1's s1 steps.
    two = _records(out / "stage1") + [
        {**r, "step": r["step"] + s1} for r in _records(out / "stage2")
    ]
    glob = _records(out / "global_only")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, rows, title in (
        (axes[0], two, "two-stage (stage 1 global -> stage 2 regional)"),
        (axes[1], glob, "global-only (same total steps)"),
    ):
        # FG-CLIP's stage-2 terms are region and hard; FG-CLIP 2's region, tic and fgt.
        for key in ("long", "short", "region", "hard", "tic", "fgt"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"L_{key}")
        if rows is two:
            ax.axvline(s1, color="gray", ls="--", lw=1)
            ax.text(s1, ax.get_ylim()[1] * 0.95, " stage 2", color="gray", va="top")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend()
    # Log scale: stage 2 starts far above where it ends (the region path is untrained and its
    # logit scale starts high), which a linear axis would let flatten everything else.
    axes[0].set_yscale("log")
    axes[0].set_ylabel("loss (per term, unweighted, log scale)")
    fig.tight_layout()
    path = out / "loss_by_term.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_fine_grained(out: Path, results: dict[str, dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.26
    for ax, kind, title, chance in (
        (axes[0], "pairwise", "pairwise accuracy (positive vs one negative)", 0.5),
        (axes[1], "accuracy", "hard-negative accuracy (positive beats all of that kind)", None),
    ):
        keys = ["all", *ATTRS]
        bars = {name: [r["hard_negative"][kind].get(k, math.nan) for k in keys]
                for name, r in results.items()}  # fmt: skip
        first = next(iter(results.values()))["hard_negative"]["no_info"]
        bars["no-info (measured)"] = [
            max(v[kind].get(k, math.nan) for v in first.values()) for k in keys
        ]
        for i, (name, vals) in enumerate(bars.items()):
            xs = [j + (i - 1) * width for j in range(len(keys))]
            ax.bar(xs, vals, width, label=name)
        if chance is not None:
            ax.axhline(chance, color="gray", ls=":", lw=1)
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "fine_grained.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check_targets(two: dict, glob: dict, targets: dict) -> dict:
    gain = two["hard_neg_acc"] - glob["hard_neg_acc"]
    worst = min(two["pairwise_acc"][a] for a in ATTRS if a in two["pairwise_acc"])
    drop = glob["i2t_long_r1"] - two["i2t_long_r1"]
    return {
        "hard_neg_gain": {"value": gain, "target": f">= {targets['hard_neg_gain']}",
                          "ok": gain >= targets["hard_neg_gain"]},
        "pairwise_min_attribute": {"value": worst, "target": f">= {targets['pairwise_min']}",
                                   "ok": worst >= targets["pairwise_min"]},
        "i2t_long_r1_drop": {"value": drop, "target": f"<= {targets['i2t_long_drop_max']}",
                             "ok": drop <= targets["i2t_long_drop_max"]},
    }  # fmt: skip


def write_report(
    out,
    walls,
    s1,
    s2,
    seed,
    held_out_seed,
    targets,
    overrides,
    stage2_overrides=(),
    preset="tiny",
    cpu_s=None,
    load_avg=None,
) -> dict:
    """`cpu_s`: CPU seconds per phase (all its processes); `load_avg`: the machine's 1-minute
    load average at each phase's end (other jobs share the cores: wall times depend on it)."""
    results = json.loads((out / "eval" / "eval.json").read_text())
    two, glob = summary_of(results["two_stage"]), summary_of(results["global_only"])
    two["wall_s"] = walls["stage1"] + walls["stage2"]
    glob["wall_s"] = walls["global_only"]
    two["eval_wall_s"] = results["two_stage"]["wall_s"]
    glob["eval_wall_s"] = results["global_only"]["wall_s"]
    for row, name in ((two, "two_stage"), (glob, "global_only")):
        # [edit, pairwise accuracy, pairs, no-info]: which attribute values each model confuses.
        row["weakest_edits"] = [list(r) for r in weakest_changes(results[name])]
    checks = check_targets(two, glob, targets)
    summary = {
        "two_stage": two,
        "global_only": glob,
        "targets": checks,
        "wall_s": walls,
        "steps": {"stage1": s1, "stage2": s2, "global_only": s1 + s2},
        "data_seed": seed,
        "held_out_seed": held_out_seed,
        "preset": preset,
        "overrides": list(overrides),
        "stage2_overrides": list(stage2_overrides),
        "cpu_s": cpu_s or {},
        "load_avg_1min": load_avg or {},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    loss_png, fg_png = plot_losses(out, s1), plot_fine_grained(out, results)
    family = "FG-CLIP 2" if preset.startswith("fgclip2") else "FG-CLIP"
    lines = [
        f"# {family} main job: two-stage vs global-only ({out.name})",
        "",
        f"2 data-parallel processes (torchrun, gloo on CPU), preset {preset}. Two-stage: {s1} "
        "global "
        f"steps, then {s2} regional steps as a new run from the stage-1 weights "
        "(checkpoint.init_from: a fresh optimizer, warm-up and cosine schedule, as FG-CLIP's "
        "stage 2 starts). "
        f"Global-only: {s1 + s2} global steps. Same batch, data and recipe otherwise"
        + (" (but for the stage-2-only overrides below)." if stage2_overrides else "."),
        f"Training scenes: data seed {seed}. Held-out scenes: seed {held_out_seed} "
        f"({results['two_stage']['sizes']['images']} images).",
        "",
        "Overrides of both runs: `" + " ".join(overrides) + "`",
        *(["", "Stage 2 only: `" + " ".join(stage2_overrides) + "`"] if stage2_overrides else []),
        "",
        "## Targets",
        "",
        "| check | value | target | ok |",
        "|---|---|---|---|",
    ]
    for name, c in checks.items():
        lines.append(
            f"| {name} | {c['value']:.3f} | {c['target']} | {'yes' if c['ok'] else 'NO'} |"
        )
    lines += [
        "",
        "## Held-out evaluation",
        "",
        markdown_table({"two-stage": results["two_stage"], "global-only": results["global_only"]}),
        "## Wall time (s, measured on this machine, shared CPU)",
        "",
        "CPU s: all of the phase's processes (2 ranks on 2 cores: about twice the wall time of "
        "an idle machine); load: the machine's 1-minute load average at the phase's end.",
        "",
        "| phase | wall s | CPU s | load |",
        "|---|---|---|---|",
        *[
            f"| {k} | {v:.0f} | {(cpu_s or {}).get(k, math.nan):.0f} | "
            f"{(load_avg or {}).get(k, math.nan):.1f} |"
            for k, v in walls.items()
        ],
        "",
        "## Plots",
        "",
        f"![losses]({loss_png.name})",
        "",
        f"![fine-grained]({fg_png.name})",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return summary
