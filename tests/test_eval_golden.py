"""The paper's published numbers (fgclip_mega/eval/benchmarks/golden.py): `--compare-golden`'s
deltas for every recorded number, and the README's golden table generated from them."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_compare_golden_prints_deltas_against_the_published_numbers():
    from fgclip_mega.config import ConfigError
    from fgclip_mega.eval.benchmarks.golden import GOLDEN, deltas, deltas_table

    got = deltas("fgclip-v1-large", "dci", {"i2t_r1": 0.6, "t2i_r1": 0.7, "i2t_r5": 0.9})
    assert got["i2t_r1"] == (pytest.approx(60.0), 66.7, pytest.approx(-6.7))
    assert got["t2i_r1"] == (pytest.approx(70.0), 66.1, pytest.approx(3.9))
    assert set(got) == {"i2t_r1", "t2i_r1"}  # only what was published
    assert "-6.70" in deltas_table("fgclip-v1-large", "dci", {"i2t_r1": 0.6, "t2i_r1": 0.7})
    assert "no published docci number" in deltas_table("fgclip-v1-large", "docci", {})
    fgovd = deltas("fgclip-v1-large", "fgovd", {"hard": 0.5, "medium": 0.6, "easy": 0.7})
    assert fgovd["hard"] == (pytest.approx(50.0), 48.4, pytest.approx(1.6))
    assert fgovd["trivial"] == (None, 89.7, None)  # not measured: shown, no delta
    with pytest.raises(ConfigError, match="known models"):
        deltas("fgclip-v9", "dci", {})
    # Every recorded number prints as a delta line: ours - published, to 2 decimals.
    assert set(GOLDEN) == {
        "fgclip-v1-base", "fgclip-v1-large", "fgclip2-base", "fgclip2-large", "fgclip2-so400m"
    }  # fmt: skip
    for model, tasks in GOLDEN.items():
        assert set(tasks) == {"fgovd", "coco-boxcls", "lvis-boxcls", "sharegpt4v", "dci", "coco",
                              "flickr30k", "imagenet", "imagenet-v2"}, model  # fmt: skip
        for task, published in tasks.items():
            ours = {m: (i + 1) / 10 for i, m in enumerate(published)}
            lines = deltas_table(model, task, ours).split("\n")
            assert "arXiv 2510.10921 Table" in lines[0], (model, task)
            assert len(lines) == 2 + len(published)
            for line, (m, pub) in zip(lines[2:], published.items(), strict=True):
                want = 100 * ours[m] - pub
                assert line.split() == [m, f"{100 * ours[m]:.2f}", f"{pub:.2f}", f"{want:+.2f}"]


def test_readme_golden_table_is_golden_py():
    from fgclip_mega.eval.benchmarks.golden import BENCHMARK, GOLDEN, markdown_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = markdown_table()
    assert table in readme, "README's golden table differs from golden.markdown_table()"
    # Each published number is in the table, in its model's column and its metric's row.
    rows = {tuple(c.strip() for c in r.split("|")[1:3]): r.split("|") for r in table.split("\n")}
    header = [c.strip() for c in table.split("\n")[0].split("|")]
    for model, tasks in GOLDEN.items():
        col = header.index(model)
        for task, values in tasks.items():
            for metric, v in values.items():
                row = rows[BENCHMARK[task], metric]
                assert row[col].strip() == f"{v:.1f}", (model, task, metric)
