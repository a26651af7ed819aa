"""python -m fgclip_mega.eval --checkpoint DIR [--data INDEX | --synthetic-seed N] [key=value ...]
   python -m fgclip_mega.eval --task NAME --data PATH --checkpoint DIR [...]  (public benchmarks)

Evaluates a training checkpoint of either family (model.family fgclip or fgclip2; any TP x DP
it was saved with) or imported HF CLIPModel / FG-CLIP weights on a held-out set, distributed
over data-parallel ranks when started with torchrun, and writes <out>/eval.json (the nested
result) and <out>/eval.md (a table).
The held-out set is `--data` (a shard index) or the synthetic scene generator with a seed that
differs from training's (built once under --synthetic-dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from fgclip_mega.cli import setup_logging
from fgclip_mega.config import Config, ConfigError, apply_cli, apply_dict
from fgclip_mega.presets import PRESETS, preset


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fgclip_mega.eval", description=__doc__)
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="training run/checkpoint dir or HF weights; repeat to compare models on one set",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="model config for HF weights (default fgclip_vit_b16; a checkpoint's config.json "
        "fills the shape and must agree with a preset named here; training checkpoints carry "
        "their own)",
    )
    p.add_argument("--data", default="", help="held-out shard index; empty = synthetic")
    p.add_argument(
        "--synthetic-seed",
        type=int,
        default=None,
        help="seed of the synthetic held-out set (default: training data.seed + 1000)",
    )
    p.add_argument("--synthetic-samples", type=int, default=512)
    p.add_argument("--synthetic-dir", default="runs/eval_data")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--num-negatives", type=int, default=10, help="hard negatives per box")
    p.add_argument("--max-boxes", type=int, default=8, help="boxes per image evaluated")
    p.add_argument("--out", default="", help="output dir (default: <first checkpoint>/eval)")
    p.add_argument(
        "--name", action="append", default=None, help="column name per --checkpoint in eval.md"
    )
    p.add_argument("overrides", nargs="*", help="config key=value pairs (e.g. parallel.*)")
    return p


DEFAULT_PRESET = "fgclip_vit_b16"


def model_config(
    checkpoint: str, preset_name: str | None, overrides: list[str]
) -> tuple[Config, Path | None]:
    """The run's config for `checkpoint`: a training checkpoint's saved config, or for HF weights
    the preset (default fgclip_vit_b16) with the shape read from the checkpoint's config.json
    when it has one; a preset named on the command line and key=value overrides may only agree
    with config.json (else ConfigError naming the field). Overrides applied last."""
    from fgclip_mega.checkpoint.hf_config import (
        model_fields_from_hf,
        read_hf_config,
        reconcile_model_config,
    )
    from fgclip_mega.checkpoint.weights import saved_config, training_checkpoint

    step_dir = training_checkpoint(checkpoint)
    hf_config = None
    if step_dir is not None:
        cfg = Config()
        saved = saved_config(step_dir)
        if not saved:
            raise ConfigError(f"--checkpoint {step_dir}: meta.json holds no config")
        apply_dict(cfg, saved)
        cfg.checkpoint.load = ""
        cfg.checkpoint.init_from = ""
    else:
        if not Path(checkpoint).exists():
            raise ConfigError(f"--checkpoint {checkpoint}: no such file or directory")
        cfg = preset(preset_name or DEFAULT_PRESET)
        hf_config = read_hf_config(checkpoint)
    # The eval run's layout is its own: TP from the overrides (default 1), DP = world / TP.
    cfg.parallel.tensor_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    apply_cli(cfg, overrides)
    if hf_config is not None:
        where = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        source = str(where / "config.json")
        fields = model_fields_from_hf(hf_config, source)
        explicit = {f: f"--preset {preset_name}" for f in fields} if preset_name else {}
        for pair in overrides:
            key = pair.split("=", 1)[0].strip()
            if key in fields:
                explicit[key] = f"override {pair}"
        reconcile_model_config(cfg, fields, explicit, source)
    return cfg, step_dir


def build_config(args, checkpoint: str, seed: int | None) -> tuple[Config, Path | None]:
    cfg, step_dir = model_config(checkpoint, args.preset, args.overrides)
    seed = seed if seed is not None else cfg.data.seed + 1000
    # The two families' held-out sets differ (square scenes vs mixed sizes): separate caches.
    family_tag = "" if cfg.model.family == "fgclip" else f"{cfg.model.family}_"
    cfg.data = dataclasses.replace(
        cfg.data,
        shards=args.data,
        micro_batch_size=args.micro_batch,
        synthetic_num_samples=args.synthetic_samples,
        synthetic_dir=f"{args.synthetic_dir}/{family_tag}seed{seed}_n{args.synthetic_samples}",
        seed=seed,
        region_text="short",  # each box's phrase is its attribute phrase
        # The evaluated set is the same whatever the training run used.
        num_hard_negatives=args.num_negatives,
        max_boxes=args.max_boxes,
        py_num_workers=0,
    )
    if step_dir is None and cfg.model.family == "fgclip2" and not cfg.data.tokenizer:
        cfg.data.tokenizer = _release_tokenizer(checkpoint)
    return cfg.validate(), step_dir


def _release_tokenizer(checkpoint: str) -> str:
    """The tokenizer.json shipped beside released FG-CLIP 2 / SigLIP 2 weights: their vocabulary
    (never the synthetic set's own, which only models trained on it share)."""
    where = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    if not (where / "tokenizer.json").is_file():
        raise ConfigError(
            f"data.tokenizer: no tokenizer.json beside the FG-CLIP 2 weights in {where}; "
            "pass data.tokenizer=PATH (the release's tokenizer.json or its folder)"
        )
    return str(where / "tokenizer.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--task" or a.startswith("--task=") for a in argv):
        # A public benchmark in its own format (fgclip_mega/eval/benchmarks/cli.py).
        from fgclip_mega.eval.benchmarks.cli import main as benchmark_main

        return benchmark_main(argv)
    args = _parser().parse_args(argv)
    names = args.name or [f"model{i}" for i in range(len(args.checkpoint))]
    if len(names) != len(args.checkpoint):
        print(
            f"error: {len(names)} --name for {len(args.checkpoint)} --checkpoint", file=sys.stderr
        )
        return 2
    rank = setup_logging()
    from fgclip_mega.checkpoint import CheckpointError
    from fgclip_mega.runtime import GPUUnusableError

    try:
        # One held-out set for every model: the first checkpoint's seed unless given.
        first, _ = build_config(args, args.checkpoint[0], args.synthetic_seed)
        models = [build_config(args, c, first.data.seed) for c in args.checkpoint]
        results = evaluate_checkpoints(models, names, args)
    except (ConfigError, CheckpointError, FileNotFoundError, GPUUnusableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        from fgclip_mega.eval.suite import summary_of

        print(json.dumps({n: summary_of(r) for n, r in results.items()}))
    return 0


def _load(cfg: Config, step_dir: Path | None, checkpoint: str, state, log):
    from fgclip_mega.checkpoint.weights import load_training_weights
    from fgclip_mega.family import family

    fam = family(cfg)
    model = fam.model_class().from_runtime(cfg.model, cfg.parallel, state.runtime, state.tp_group)
    if step_dir is not None:
        info = load_training_weights(model, step_dir)
        log.info("%s: step %d, saved %s", step_dir, info["step"], info["saved_layout"])
    else:
        fam.import_weights(model, checkpoint)
    return model.eval()


def evaluate_checkpoints(models: list[tuple[Config, Path | None]], names: list[str], args):
    from fgclip_mega.eval.collect import collect
    from fgclip_mega.eval.report import markdown_table
    from fgclip_mega.eval.suite import run_suite
    from fgclip_mega.family import family
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    log = logging.getLogger("fgclip_mega.eval")
    state = init_parallel(models[0][0], seed=models[0][0].train.seed)
    results = {}
    try:
        for (cfg, step_dir), checkpoint, name in zip(models, args.checkpoint, names, strict=True):
            t0 = time.perf_counter()
            cfg.validate(world_size=state.world_size)
            model = _load(cfg, step_dir, checkpoint, state, log)
            # Every sample at least once; repeats are dropped by sample id.
            loader, batches = family(cfg).eval_loader(
                cfg, state.dp_rank, state.dp_size, state.runtime.device
            )
            try:
                n = loader.shards.num_samples
                log.info("%s: %d held-out samples, %d batches x %d ranks", name, n, batches,
                         state.dp_size)  # fmt: skip
                es = collect(model, loader, batches, state.dp_group, state.runtime)
            finally:
                loader.close()
            result = run_suite(model, es, state.runtime)
            result.update(
                wall_s=time.perf_counter() - t0,
                checkpoint=str(step_dir or checkpoint),
                eval_data=cfg.data.shards or cfg.data.synthetic_dir,
                layout={"tp": state.tp_size, "dp": state.dp_size},
            )
            results[name] = result
            log.info("%s evaluated in %.1f s", name, result["wall_s"])
        if state.rank == 0:
            step_dir, checkpoint = models[0][1], args.checkpoint[0]
            base = step_dir.parent.parent if step_dir is not None else Path(checkpoint).parent
            out = Path(args.out) if args.out else base / "eval"
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps(results, indent=1))
            (out / "eval.md").write_text(markdown_table(results))
            log.info("wrote %s and %s", out / "eval.json", out / "eval.md")
        return results
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
