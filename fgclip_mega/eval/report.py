"""Markdown tables of evaluation results: one column per model, the measured no-information
level next to each fine-grained metric."""

from __future__ import annotations

import math

_ATTRS = ("colour", "shape", "size", "texture")
MIN_PAIRS = 20
"""Edits with fewer (box, negative) pairs are not ranked among the weakest (too noisy)."""


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}"


def _rows(result: dict) -> list[tuple[str, float | None, float | None]]:
    """(metric, value, no-information level) rows of one nested suite result."""
    r, h = result["retrieval"], result["hard_negative"]
    no = h["no_info"]

    def level(kind: str, key: str):
        vals = [v[kind].get(key) for v in no.values() if v[kind].get(key) is not None]
        return max(vals) if vals else None

    rows = []
    for name in ("i2t_long", "t2i_long", "i2t_short", "t2i_short", "region_to_phrase"):
        for k in ("r1", "r5", "r10"):
            rows.append((f"{name} R@{k[1:]}", r[name][k], None))
    rows.append(("hard-negative accuracy", h["accuracy"]["all"], level("accuracy", "all")))
    for a in _ATTRS + ("unknown",):
        if a in h["accuracy"]:
            rows.append((f"  hard-neg acc, {a} negatives", h["accuracy"][a], level("accuracy", a)))
    rows.append(("pairwise accuracy", h["pairwise"]["all"], level("pairwise", "all")))
    for a in _ATTRS + ("unknown",):
        if a in h["pairwise"]:
            rows.append((f"  pairwise, {a}", h["pairwise"][a], level("pairwise", a)))
    box = result["box_classification"]
    box_no = box.get("no_info", {})
    rows.append(
        (
            f"box classification ({box.get('classes', 0)} classes)",
            box["accuracy"],
            max((v["accuracy"] for v in box_no.values()), default=None),
        )
    )
    for a in _ATTRS:
        if a in box:
            rows.append(
                (
                    f"  box cls, {a} right",
                    box[a],
                    max((v[a] for v in box_no.values()), default=None),
                )
            )
    zs = result["zero_shot"]
    zs_no = zs.get("no_info", {})
    rows.append(
        (
            f"zero-shot scene classification ({zs.get('classes', 0)} classes)",
            zs["accuracy"],
            max((v["accuracy"] for v in zs_no.values()), default=None),
        )
    )
    return rows


def weakest_changes(result: dict, n: int = 8, min_pairs: int = MIN_PAIRS) -> list[tuple]:
    """The n edits ('texture: striped -> checkered') with the lowest pairwise accuracy among
    those with at least `min_pairs` (box, negative) pairs: (edit, accuracy, pairs, no-info)."""
    h = result["hard_negative"]
    edits = h.get("pairwise_by_change", {})
    rows = []
    for edit, e in edits.items():
        if e["pairs"] < min_pairs:
            continue
        levels = [
            v["pairwise_by_change"][edit]["acc"]
            for v in h["no_info"].values()
            if edit in v.get("pairwise_by_change", {})
        ]
        rows.append((edit, e["acc"], e["pairs"], max(levels) if levels else None))
    return sorted(rows, key=lambda r: (r[1], r[0]))[:n]


def weakest_changes_table(results: dict[str, dict], n: int = 8) -> str:
    """Per model, its weakest edits: which attribute values it confuses."""
    lines = []
    for name, result in results.items():
        rows = weakest_changes(result, n)
        if not rows:
            continue
        lines += [
            f"Weakest edits of {name} (pairwise accuracy, edits with >= {MIN_PAIRS} pairs):",
            "",
            "| edit (positive -> negative) | pairs | accuracy | no-info |",
            "|---|---|---|---|",
        ]
        lines += [f"| {e} | {p} | {_fmt(a)} | {_fmt(lv)} |" for e, a, p, lv in rows]
        lines.append("")
    return "\n".join(lines)


def markdown_table(results: dict[str, dict]) -> str:
    """Side-by-side table of nested suite results {model name: result}."""
    names = list(results)
    rows_by_model = {n: _rows(results[n]) for n in names}
    first = rows_by_model[names[0]]
    head = "| metric | " + " | ".join(f"{n} | {n} no-info" for n in names) + " |"
    sep = "|---|" + "---|---|" * len(names)
    lines = [head, sep]
    for i, (metric, _, _) in enumerate(first):
        cells = []
        for n in names:
            _, value, level = rows_by_model[n][i]
            cells += [_fmt(value), _fmt(level)]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    sizes = results[names[0]]["sizes"]
    lines.append("")
    lines.append(
        f"Evaluated on {sizes['images']} images, {sizes['boxes']} boxes, "
        f"{sizes['hard_boxes']} boxes with hard negatives. No-info = the same metric with the "
        "region (image) embedding replaced by a random vector or by the set's mean embedding, "
        "whichever scores higher (measured, not a formula)."
    )
    weakest = weakest_changes_table(results)
    if weakest:
        lines += ["", weakest]
    return "\n".join(lines) + "\n"
