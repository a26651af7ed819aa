"""fgclip-export: a training run or checkpoint -> a folder that transformers or FG-CLIP loads.

    fgclip-export runs/main_job/stage2 out/hf                    # CLIPModel.from_pretrained(out/hf)
    fgclip-export runs/x/checkpoints/step_00000400 out/fg --format fgclip

RUN_OR_CHECKPOINT is a run's output dir, its checkpoints/ dir or one step dir (the newest intact
checkpoint is taken, its hashes verified). Training checkpoints hold full parameters by name
whatever TP x DP wrote them (checkpoint/full_state.py), so no process group is needed: the
names are mapped to HF keys by the same key map the trainer's import and export use (hf.py).

Formats:
  hf-clip  config.json (CLIPConfig of the run's model) + model.safetensors with the global towers,
           projections and logit_scale: `transformers.CLIPModel.from_pretrained(OUT_DIR)`.
  fgclip   the released FG-CLIP layout: the same keys plus the long-text position tables,
           text_filip_projection and the region / hard-negative temperatures (and SigLIP's
           logit_bias when the run trains one); `checkpoint.init_from` and the evaluation read it.
Also written: fgclip_export.json (source checkpoint, step, format, the run's config).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMATS = {"hf-clip": "clip", "fgclip": "fgclip"}  # CLI name -> hf.py layout
WEIGHTS = "model.safetensors"


def export_checkpoint(source: str | Path, out_dir: str | Path, fmt: str = "hf-clip") -> Path:
    """Writes OUT_DIR/{config.json, model.safetensors, fgclip_export.json}; returns OUT_DIR.
    Raises CheckpointError naming the path when `source` holds no intact training checkpoint."""
    import torch
    from safetensors.torch import save_file

    from fgclip_mega.checkpoint import integrity
    from fgclip_mega.checkpoint.errors import CheckpointError
    from fgclip_mega.checkpoint.hf import hf_state_from_full
    from fgclip_mega.checkpoint.hf_config import clip_config
    from fgclip_mega.checkpoint.training import read_meta
    from fgclip_mega.checkpoint.weights import training_checkpoint
    from fgclip_mega.config import Config, apply_dict

    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {sorted(FORMATS)}")
    step_dir = training_checkpoint(source)
    if step_dir is None:
        raise CheckpointError(
            f"{source}: no intact training checkpoint (expected a run dir, its checkpoints/ "
            "or a step_NNNNNNNN dir with manifest.json)"
        )
    meta = read_meta(step_dir)
    if not meta.get("config"):
        raise CheckpointError(f"{step_dir}: meta.json holds no config")
    cfg = apply_dict(Config(), meta["config"])
    full = integrity.load_torch(step_dir, "model.pt", integrity.read_manifest(step_dir))
    state = hf_state_from_full(full, cfg.model, FORMATS[fmt])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = clip_config(cfg.model)
    # The released FG-CLIP checkpoints are CLIP configs whose model class is FG-CLIP's.
    config.architectures = ["CLIPModel"] if fmt == "hf-clip" else ["FGCLIPModel"]
    dtypes = {t.dtype for t in state.values()}
    config.torch_dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
    config.save_pretrained(out)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})  # transformers checks it
    provenance = {
        "source": str(step_dir),
        "step": int(meta["step"]),
        "saved_layout": meta.get("layout"),
        "format": fmt,
        "keys": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "torch": torch.__version__,
        "config": meta["config"],
    }
    (out / "fgclip_export.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgclip-export",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT")
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--format", choices=sorted(FORMATS), default="hf-clip")
    args = parser.parse_args(argv)
    from fgclip_mega.cli import setup_logging

    setup_logging()
    from fgclip_mega.checkpoint.errors import CheckpointError
    from fgclip_mega.config import ConfigError

    try:
        out = export_checkpoint(args.source, args.out_dir, args.format)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "fgclip_export.json").read_text())
    print(json.dumps({k: info[k] for k in ("source", "step", "format", "keys", "parameters")}
                     | {"out": str(out)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
