"""Markdown of one benchmark result: metrics beside the measured no-information level, the
counts and skips, and the protocol that produced them."""

from __future__ import annotations


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}"
    return "-" if v is None else str(v)


def _no_info(result: dict, name: str, level: dict | None = None):
    src = level if level is not None else result
    for key in ("no_info_random_features", "no_info_random_image_features"):
        if key in src:
            return src[key].get(name)
    return src.get("no_info_random_features_accuracy")


def markdown(result: dict) -> str:
    lines = [
        f"# {result['task']}: {result['data']}",
        "",
        f"checkpoint `{result['checkpoint']}`",
        "",
        "| metric | value (%) | no-info (random features, %) |",
        "|---|---|---|",
    ]
    levels = result.get("levels")
    for name, value in result["metrics"].items():
        lvl = levels[name] if levels else None
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(_no_info(result, name, lvl))} |")
    if levels:
        lines += [
            "",
            "| level | items | <10 negatives | ties (hits) | chance 1/(1+n) | skipped |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in levels.items():
            skipped = sum(s["count"] for s in r["skipped"].values())
            lines.append(
                f"| {name} | {r['items']} | {r['items_with_fewer_than_10_negatives']} | "
                f"{r['ties_counted_as_hits']} | {_fmt(r['chance_mean_1_over_1_plus_negatives'])}"
                f" | {skipped} |"
            )
    else:
        skipped = {k: v["count"] for k, v in result.get("skipped", {}).items()}
        lines += ["", f"skipped: {skipped or 'none'}"]
    lines += ["", "protocol: " + ", ".join(f"{k}={v}" for k, v in result["protocol"].items())]
    lines.append(f"layout: {result['layout']}, {result['wall_s']:.1f} s")
    return "\n".join(lines) + "\n"
