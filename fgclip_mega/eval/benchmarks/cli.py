"""python -m fgclip_mega.eval --task NAME --data PATH --checkpoint DIR [options] [key=value ...]

Scores a checkpoint on a public benchmark in the benchmark's own file format with FG-CLIP's
published protocol, distributed over data-parallel ranks under torchrun (the same numbers at
any number of ranks), and writes <out>/<task>.json (metrics, counts, skips, the measured
no-information level, the checkpoint family and the protocol used) and <out>/<task>.md.
The family (FG-CLIP v1 / HF CLIP, or FG-CLIP 2 / HF SigLIP 2 NaFlex) comes from the checkpoint's
config.json (or a training checkpoint's saved config); each has its upstream protocol defaults
(protocol.py).
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
    p.add_argument(
        "--tokenizer",
        default="",
        help="FG-CLIP 2: the SigLIP 2 tokenizer.json (or its folder); default: the one beside "
        "the checkpoint",
    )
    g = p.add_argument_group("protocol (defaults: upstream's for the family; echoed in the JSON)")
    g.add_argument("--image-size", type=int, default=None, help="v1; default: the checkpoint's")
    g.add_argument("--resize", choices=("squash", "shortest-crop"), default=None, help="v1")
    g.add_argument(
        "--text-length",
        type=int,
        default=None,
        help="default v1: 248 long, 77 else; v2: 196 long, 64 else",
    )
    g.add_argument(
        "--patch-budget",
        choices=("dynamic", "fixed"),
        default=None,
        help="FG-CLIP 2: per-image budget (default; imagenet: fixed)",
    )
    g.add_argument(
        "--max-num-patches",
        type=int,
        default=None,
        help="FG-CLIP 2: largest patch budget (default 1024)",
    )
    g.add_argument(
        "--text-head",
        choices=("short", "long", "box"),
        default=None,
        help="FG-CLIP 2: text head of the task's texts (default: upstream's walk_type)",
    )
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


V2_OPTIONS = ("tokenizer", "patch_budget", "max_num_patches", "text_head")
V1_OPTIONS = ("image_size", "resize")
EVAL_BUDGETS = (128, 256, 576, 784, 1024, 4096)  # the training budgets and upstream's 4096


def _given(args, names) -> list[str]:
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) not in (None, "")]


def make_protocol(args, model_image_size: int, long_context: int = 248, text=None, family=None):
    """The task's protocol for the checkpoint's family: upstream's defaults, then the options
    given. An option of the other family is an error naming it. `text` (the model's TextConfig)
    is needed for FG-CLIP 2."""
    if family == "fgclip2":
        return _make_protocol_v2(args, text)
    if wrong := _given(args, V2_OPTIONS):
        raise ConfigError(f"{', '.join(wrong)}: only for FG-CLIP 2 checkpoints")
    return _make_protocol_v1(args, model_image_size, long_context)


def _make_protocol_v2(args, text):
    from fgclip_mega.eval.benchmarks.protocol import fgclip2_protocol_defaults

    if wrong := _given(args, V1_OPTIONS):
        raise ConfigError(
            f"{', '.join(wrong)}: not for FG-CLIP 2 checkpoints (NaFlex keeps each image's "
            "aspect ratio; use --max-num-patches / --patch-budget)"
        )
    if args.max_num_patches is not None and args.max_num_patches not in EVAL_BUDGETS:
        raise ConfigError(
            f"--max-num-patches {args.max_num_patches}: must be one of {list(EVAL_BUDGETS)}"
        )
    protocol = fgclip2_protocol_defaults(
        args.task,
        text_head=args.text_head,
        text_length=args.text_length,
        patch_budget=args.patch_budget,
        max_num_patches=args.max_num_patches,
        templates=args.templates,
        prompt_ensemble=args.prompt_ensemble,
        box_format=args.box_format,
        box_features=args.box_features,
    )
    # The towers pool the last position: texts are padded to the head's full length.
    want = text.long_context if protocol.text_head == "long" else text.short_context
    if protocol.text_length != want:
        raise ConfigError(
            f"--text-length {protocol.text_length}: FG-CLIP 2's {protocol.text_head} texts are "
            f"padded to {want} tokens (the last position is pooled)"
        )
    return protocol


def _make_protocol_v1(args, model_image_size: int, long_context: int):
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
    from fgclip_mega.data.siglip2_tokenizer import TokenizerError
    from fgclip_mega.eval.benchmarks.common import BenchmarkError
    from fgclip_mega.runtime import GPUUnusableError

    args = parser().parse_args(argv)
    rank = setup_logging()
    bad_input = (ConfigError, CheckpointError, BenchmarkError, FileNotFoundError, TokenizerError)
    try:
        result = evaluate(args)
    except (*bad_input, GPUUnusableError) as e:
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
    from fgclip_mega.eval.__main__ import model_config
    from fgclip_mega.eval.benchmarks.loading import load_model, make_encoder, tokenizer_for
    from fgclip_mega.eval.benchmarks.report import markdown
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    log = logging.getLogger("fgclip_mega.eval.benchmarks")
    cfg, step_dir = model_config(args.checkpoint, args.preset, args.overrides)
    m = cfg.model
    protocol = make_protocol(
        args, m.vision.image_size, m.text.long_context, text=m.text, family=m.family
    )
    # Before any process group or weights: a bad tokenizer path fails at once, naming it.
    tokenizer = tokenizer_for(cfg, args.checkpoint, args.tokenizer)
    if args.compare_golden:
        from fgclip_mega.eval.benchmarks.golden import check_model

        check_model(args.compare_golden)
    t0 = time.perf_counter()
    owned = state is None
    if owned:
        state = init_parallel(cfg, seed=cfg.train.seed)
    try:
        cfg.validate(world_size=state.world_size)
        model = load_model(cfg, step_dir, args.checkpoint, state, log)
        encoder = make_encoder(model, state.runtime, protocol, tokenizer)
        result = run_task(encoder, args, protocol, state.dp_group)
        result.update(
            task=args.task,
            data=str(args.data),
            checkpoint=str(step_dir or args.checkpoint),
            family=cfg.model.family,
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
