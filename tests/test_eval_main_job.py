"""The main job's report: summary.json keys, the target checks and the plots, from suite results
of hand-made models (a perfect one as 'two-stage', a random one as 'global-only')."""

import json
import sys
from pathlib import Path

import pytest

from tests.eval_builders import suite_on_scenes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report_module():
    sys.path.insert(0, str(ROOT))
    from run import main_job_report

    return main_job_report


def _metrics(path: Path, stage: str, steps: range) -> None:
    path.mkdir(parents=True)
    keys = ("long", "short") + (("region", "hard") if stage == "regional" else ())
    lines = [json.dumps({"step": s, **{k: 3.0 / s for k in keys}}) for s in steps]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_summary_targets_and_plots(tmp_path, report_module):
    results = {
        "two_stage": suite_on_scenes("perfect", 0, 1, None),
        "global_only": suite_on_scenes("random", 0, 1, None),
    }
    for r in results.values():
        r["wall_s"] = 1.0
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(results))
    _metrics(tmp_path / "stage1", "global", range(1, 11))
    _metrics(tmp_path / "stage2", "regional", range(11, 31))
    _metrics(tmp_path / "global_only", "global", range(1, 31))
    walls = {"stage1": 10.0, "stage2": 20.0, "global_only": 25.0, "eval": 5.0, "job": 60.0}
    targets = {"hard_neg_gain": 0.35, "pairwise_min": 0.85, "i2t_long_drop_max": 0.05}
    summary = report_module.write_report(
        tmp_path, walls, 10, 20, 7, 1007, targets, ["a=1"], ["optim.warmup_steps=5"]
    )

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    required = ("hard_neg_acc", "hard_neg_no_info", "pairwise_acc", "i2t_long_r1", "t2i_long_r1",
                "i2t_short_r1", "t2i_short_r1", "box_cls_acc", "wall_s")  # fmt: skip
    for run in ("two_stage", "global_only"):
        for key in required:
            assert key in summary[run], (run, key)
    assert set(summary["two_stage"]["pairwise_acc"]) == {"colour", "shape", "size", "texture"}
    assert summary["two_stage"]["wall_s"] == 30.0
    # Weakest edits (here every edit has < 20 pairs, so the lists are empty; ranked with any
    # count: the perfect model confuses nothing, the random one's worst come first).
    from fgclip_mega.eval.report import weakest_changes

    assert summary["two_stage"]["weakest_edits"] == summary["global_only"]["weakest_edits"] == []
    perfect = weakest_changes(results["two_stage"], min_pairs=1)
    random = weakest_changes(results["global_only"], n=100, min_pairs=1)
    assert len(perfect) == 8 and all(row[1] == 1.0 for row in perfect)
    assert len(random) > 20 and random[0][1] < 0.5
    assert [row[1] for row in random] == sorted(row[1] for row in random)
    t = summary["targets"]
    # Perfect vs random: the fine-grained targets pass, with the measured values.
    gain = summary["two_stage"]["hard_neg_acc"] - summary["global_only"]["hard_neg_acc"]
    assert t["hard_neg_gain"]["value"] == pytest.approx(gain) and t["hard_neg_gain"]["ok"]
    assert t["pairwise_min_attribute"]["value"] == 1.0 and t["pairwise_min_attribute"]["ok"]
    assert t["i2t_long_r1_drop"]["ok"]
    # Swapped roles fail them.
    swapped = report_module.check_targets(summary["global_only"], summary["two_stage"], targets)
    assert not swapped["hard_neg_gain"]["ok"] and not swapped["pairwise_min_attribute"]["ok"]
    text = (tmp_path / "report.md").read_text()
    assert "| hard_neg_gain |" in text and "two-stage no-info" in text
    assert "Overrides of both runs: `a=1`" in text
    assert "Stage 2 only: `optim.warmup_steps=5`" in text
    assert "recipe otherwise (but for the stage-2-only overrides below)." in text
    for png in ("loss_by_term.png", "fine_grained.png"):
        assert (tmp_path / png).stat().st_size > 10_000
