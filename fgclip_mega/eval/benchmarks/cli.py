"""python -m fgclip_mega.eval --task NAME --data PATH --checkpoint DIR [options] [key=value ...]

Scores a checkpoint on a public benchmark in the benchmark's own file format with FG-CLIP's
published protocol, distributed over data-parallel ranks under torchrun (the same numbers at
any number of ranks), and writes <out>/<task>.json (metrics, counts, skips, the measured
no-information level and the protocol used) and <out>/<task>.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fgclip_mega.config import ConfigError
from fgclip_mega.presets import PRESETS

TASKS = {
    "fgovd": "FG-OVD hard/medium/easy/trivial (FG-OVD's JSON or FG-CLIP's JSONL, COCO images)",
    "sharegpt4v": "ShareGPT4V-1k long-caption retrieval",
    "dci": "DCI long-caption retrieval",
    "docci": "DOCCI long-caption retrieval (test split)",
    "coco": "COCO 5k short-caption retrieval",
    "flickr30k": "Flickr30k 1k short-caption retrieval",
    "imagenet": "zero-shot classification on an ImageNet(-V2) folder",
    "coco-boxcls": "COCO val2017 box classification",
    "lvis-boxcls": "LVIS v1 box classification",
}
LONG_TEXT_TASKS = ("sharegpt4v", "dci", "docci")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fgclip_mega.eval", description=__doc__)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="the benchmark's annotation file or folder")
    p.add_argument("--image-root", default="", help="folder the annotation's image paths are in")
    p.add_argument("--checkpoint", required=True, help="HF / FG-CLIP weights or training run")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS))
    p.add_argument("--out", default="", help="output folder (default runs/benchmarks)")
    p.add_argument("--batch-size", type=int, default=32, help="images or texts per batch")
    p.add_argument(
        "--skip-missing-images",
        action="store_true",
        help="count and skip annotation entries whose image file is missing (default: fail)",
    )
    p.add_argument("--threads", type=int, default=4, help="image decode threads per rank")
    p.add_argument("--limit", type=int, default=1000, help="sharegpt4v: first N rows")
    p.add_argument("--split", default="test", help="Karpathy / DOCCI split")
    p.add_argument("--captions-per-image", type=int, default=5, help="coco, flickr30k")
    p.add_argument("--classnames", default="", help="imagenet: one class name per line")
    g = p.add_argument_group("protocol (defaults: upstream FG-CLIP v1's; echoed in the JSON)")
    g.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--resize", choices=("squash", "shortest-crop"), default=None)
    g.add_argument("--text-length", type=int, default=None, help="default 248 long, 77 else")
    g.add_argument("--templates", choices=("openai", "simple"), default=None)
    g.add_argument(
        "--prompt-ensemble",
        choices=("normalise-mean-normalise", "mean-normalise"),
        default=None,
    )
    g.add_argument("--box-format", choices=("xywh", "xyxy"), default=None)
    g.add_argument("--box-features", choices=("roi", "crop"), default=None)
    p.add_argument(
        "--compare-golden",
        default="",
        help="print deltas against the paper's numbers of this model (see golden.py)",
    )
    p.add_argument("overrides", nargs="*", help="config key=value pairs (e.g. parallel.*)")
    return p


def run_task(encoder, args, protocol, group) -> dict:
    from fgclip_mega.eval.benchmarks import boxcls, fgovd, retrieval, zeroshot

    if args.task == "fgovd":
        return fgovd.run(encoder, args, protocol, group)
    if args.task in ("coco-boxcls", "lvis-boxcls"):
        return boxcls.run(encoder, args, protocol, group, args.task.split("-")[0])
    if args.task == "imagenet":
        return zeroshot.run(encoder, args, protocol, group)
    return retrieval.run(encoder, args, protocol, group, args.task)


def make_protocol(args, model_image_size: int, long_context: int = 248):
    from fgclip_mega.eval.benchmarks.protocol import LONG, SHORT, protocol_defaults

    if args.text_length is not None and not 2 <= args.text_length <= long_context:
        raise ConfigError(f"--text-length {args.text_length}: must be in [2, {long_context}]")
    size = args.image_size or model_image_size
    if size != model_image_size:
        raise ConfigError(
            f"--image-size {size}: the checkpoint's image size is {model_image_size} (position "
            "embeddings are not interpolated)"
        )
    return protocol_defaults(
        LONG if args.task in LONG_TEXT_TASKS else SHORT,
        size,
        text_length=args.text_length,
        resize=args.resize,
        templates=args.templates,
        prompt_ensemble=args.prompt_ensemble,
        box_format=args.box_format,
        box_features=args.box_features,
    )


def main(argv: list[str] | None = None) -> int:
    from fgclip_mega.checkpoint import CheckpointError
    from fgclip_mega.cli import setup_logging
    from fgclip_mega.eval.benchmarks.common import BenchmarkError
    from fgclip_mega.runtime import GPUUnusableError

    args = parser().parse_args(argv)
    rank = setup_logging()
    try:
        result = evaluate(args)
    except (ConfigError, CheckpointError, BenchmarkError, FileNotFoundError, GPUUnusableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps({args.task: result["metrics"]}))
        if args.compare_golden:
            from fgclip_mega.eval.benchmarks.golden import deltas_table, golden_task

            task = golden_task(args.task, result)  # ImageNet-V2 by its folder layout
            print(deltas_table(args.compare_golden, task, result["metrics"]))
    return 0


def evaluate(args, state=None) -> dict:
    """One task. Sets up (and tears down) the process groups unless given a ParallelState
    (several tasks in one launch: the tests)."""
    from fgclip_mega.eval.__main__ import _load, model_config
    from fgclip_mega.eval.benchmarks.engine import ModelEncoder
    from fgclip_mega.eval.benchmarks.report import markdown
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    log = logging.getLogger("fgclip_mega.eval.benchmarks")
    cfg, step_dir = model_config(args.checkpoint, args.preset, args.overrides)
    protocol = make_protocol(args, cfg.model.vision.image_size, cfg.model.text.long_context)
    if args.compare_golden:
        from fgclip_mega.eval.benchmarks.golden import check_model

        check_model(args.compare_golden)
    t0 = time.perf_counter()
    owned = state is None
    if owned:
        state = init_parallel(cfg, seed=cfg.train.seed)
    try:
        cfg.validate(world_size=state.world_size)
        model = _load(cfg, step_dir, args.checkpoint, state, log)
        encoder = ModelEncoder(model, state.runtime)
        result = run_task(encoder, args, protocol, state.dp_group)
        result.update(
            task=args.task,
            data=str(args.data),
            checkpoint=str(step_dir or args.checkpoint),
            protocol=protocol.as_dict(),
            layout={"tp": state.tp_size, "dp": state.dp_size},
            wall_s=time.perf_counter() - t0,
        )
        if state.rank == 0:
            out = Path(args.out or "runs/benchmarks")
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{args.task}.json").write_text(json.dumps(result, indent=1))
            (out / f"{args.task}.md").write_text(markdown(result))
            log.info("wrote %s", out / f"{args.task}.json")
        return result
    finally:
        if owned:
            destroy_parallel()
