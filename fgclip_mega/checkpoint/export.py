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
FG-CLIP 2 runs (model.family=fgclip2):
  siglip2  config.json (Siglip2Config, NaFlex) + the SigLIP 2 towers, `text_model.head`, scale and
           bias: `transformers.Siglip2Model.from_pretrained(OUT_DIR)`.
  fgclip2  the released qihoo360/fg-clip2-* layout (model_type fgclip2): the same keys plus the
           long position tables, longtext_head, boxtext_head, dense_feature_head and the two
           fine-grained temperatures; `checkpoint.init_from` and the evaluation read it.
Also written: fgclip_export.json (source checkpoint, step, format, the run's config).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMATS = {"hf-clip": "clip", "fgclip": "fgclip", "siglip2": "siglip2", "fgclip2": "fgclip2"}
FAMILY_FORMATS = {"fgclip": ("hf-clip", "fgclip"), "fgclip2": ("siglip2", "fgclip2")}
WEIGHTS = "model.safetensors"


def export_checkpoint(source: str | Path, out_dir: str | Path, fmt: str | None = None) -> Path:
    """Writes OUT_DIR/{config.json, model.safetensors, fgclip_export.json}; returns OUT_DIR.
    `fmt` None = the family's HF format (hf-clip for FG-CLIP, siglip2 for FG-CLIP 2).
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

    if fmt is not None and fmt not in FORMATS:
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
    allowed = FAMILY_FORMATS[cfg.model.family]
    fmt = allowed[0] if fmt is None else fmt
    if fmt not in allowed:
        raise CheckpointError(
            f"{step_dir}: a model.family={cfg.model.family} run exports as --format "
            f"{' or '.join(allowed)}, not {fmt}"
        )
    full = integrity.load_torch(step_dir, "model.pt", integrity.read_manifest(step_dir))
    if cfg.model.family == "fgclip2":
        from fgclip_mega.checkpoint.hf_fgclip2 import fgclip2_state_from_full, siglip2_config

        state = fgclip2_state_from_full(full, cfg.model, FORMATS[fmt])
        config = siglip2_config(cfg.model)
        config.architectures = ["Siglip2Model"] if fmt == "siglip2" else ["FG_CLIP2_Model"]
    else:
        state = hf_state_from_full(full, cfg.model, FORMATS[fmt])
        config = clip_config(cfg.model)
        # The released FG-CLIP checkpoints are CLIP configs whose model class is FG-CLIP's.
        config.architectures = ["CLIPModel"] if fmt == "hf-clip" else ["FGCLIPModel"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in state.values()}
    config.torch_dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
    config.save_pretrained(out)
    if fmt == "fgclip2":  # upstream's Fgclip2Config: SigLIP 2's plus the long-text fields
        written = json.loads((out / "config.json").read_text())
        written["model_type"] = "fgclip2"
        written["text_config"].update(
            model_type="fgclip2_text_model",
            keep_len=cfg.model.text.long_position_split,
            longtext_len=cfg.model.text.long_context,
        )
        written["vision_config"]["model_type"] = "fgclip2_vision_model"
        (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
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
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default=None,
        help="default: hf-clip for an FG-CLIP run, siglip2 for an FG-CLIP 2 run",
    )  # fmt: skip
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
