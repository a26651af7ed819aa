"""python -m fgclip_mega.train [--preset NAME] [--config FILE.yaml] [key.sub=value ...]"""

from __future__ import annotations

import argparse
import json
import sys

from fgclip_mega.cli import setup_logging
from fgclip_mega.config import ConfigError
from fgclip_mega.presets import PRESETS, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgclip_mega.train", description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--config", help="YAML file of overrides")
    parser.add_argument("overrides", nargs="*", help="key.sub=value pairs, applied last")
    args = parser.parse_args(argv)
    rank = setup_logging()
    try:
        # Every check that needs no process group or model, before the heavy imports.
        cfg = load_config(args.preset, args.config, args.overrides).check_paths()
        _check_tokenizer(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fgclip_mega.checkpoint import CheckpointError
    from fgclip_mega.data.naflex import NaFlexError
    from fgclip_mega.data.siglip2_tokenizer import TokenizerError
    from fgclip_mega.data.stream import ImageDecodeError
    from fgclip_mega.runtime import GPUUnusableError
    from fgclip_mega.train.loop import train

    try:
        result = train(cfg)
    except (
        ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, GPUUnusableError,
        TokenizerError, NaFlexError, ImageDecodeError,
    ) as e:  # fmt: skip
        # A user error (a wrong path, a bad checkpoint, an impossible layout, a GPU this torch
        # cannot use, a tokenizer that is none, an image NaFlex cannot take, a JPEG that does
        # not decode): one clear line.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        summary = {
            "steps": result.last_step,
            "final": result.final,
            "eval": result.evals[-1] if result.evals else {},
            "checkpoint": result.checkpoint,
            "preempted": result.preempted,
        }
        print(json.dumps(summary))
    return 0


def _check_tokenizer(cfg) -> None:
    """FG-CLIP 2: data.tokenizer is read now (a light import), not after the model is built."""
    if cfg.model.family != "fgclip2" or not cfg.data.tokenizer:
        return  # v1 has its built-in BPE; an empty path means the synthetic set's own tokenizer
    from fgclip_mega.data.siglip2_tokenizer import Siglip2Tokenizer, TokenizerError

    try:
        Siglip2Tokenizer(cfg.data.tokenizer)
    except TokenizerError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
