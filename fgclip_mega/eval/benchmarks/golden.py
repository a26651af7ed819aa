"""Published numbers of the released checkpoints, for `--compare-golden MODEL`.

Only numbers whose source could be read are listed (percent, as published), each with its
source; a benchmark without a readable published number is left out rather than guessed.
"""

from __future__ import annotations

from fgclip_mega.config import ConfigError

GOLDEN: dict[str, dict[str, dict[str, float]]] = {
    # FG-CLIP ViT-L/14 at 336 px (qihoo360/fg-clip-large). DCI: paper arXiv 2505.05071, as
    # quoted in upstream issue 360CVGroup/FG-CLIP#22 and confirmed there by the authors' rerun
    # (text length 248, 336 px, one normalisation). FG-OVD hard / medium and COCO 5k T2I R@1:
    # the FG-CLIP series of upstream's comparison figure use_imgs/FGCLIP2_compare_all_n.png
    # (labels read off the figure; its DCI 66.7 / 66.1 and FG-Hard 48.4 are the ViT-L/14 ones).
    "fgclip-v1-large": {
        "dci": {"i2t_r1": 66.7, "t2i_r1": 66.1},
        "fgovd": {"hard": 48.4, "medium": 69.5},
        "coco": {"t2i_r1": 50.9},
    },
}
SOURCES = {
    "fgclip-v1-large": (
        "arXiv 2505.05071 (DCI, via 360CVGroup/FG-CLIP issue #22); FG-OVD and COCO from "
        "upstream's figure use_imgs/FGCLIP2_compare_all_n.png"
    ),
}


def check_model(model: str) -> None:
    if model not in GOLDEN:
        raise ConfigError(f"--compare-golden {model!r}: known models are {sorted(GOLDEN)}")


def deltas(model: str, task: str, metrics: dict[str, float]) -> dict[str, tuple]:
    """{metric: (ours %, published %, ours - published)} for the published metrics of `task`."""
    check_model(model)
    published = GOLDEN[model].get(task, {})
    out = {}
    for name, value in published.items():
        ours = metrics.get(name)
        ours = None if ours is None else 100.0 * ours
        out[name] = (ours, value, None if ours is None else ours - value)
    return out


def deltas_table(model: str, task: str, metrics: dict[str, float]) -> str:
    rows = deltas(model, task, metrics)
    if not rows:
        return f"{model}: no published {task} number is recorded (see golden.py)"
    lines = [f"{task} vs {model} ({SOURCES[model]})", "metric    ours  published   delta"]
    for name, (ours, pub, d) in rows.items():
        o = "-" if ours is None else f"{ours:.2f}"
        dd = "-" if d is None else f"{d:+.2f}"
        lines.append(f"{name:8s} {o:>6s} {pub:10.2f} {dd:>7s}")
    return "\n".join(lines)
