"""transformers `CLIPConfig` of a ModelConfig (exports, reference models), and the reverse: our
model fields from a checkpoint's config.json, checked against the preset and overrides."""

from __future__ import annotations

import json
from functools import reduce
from pathlib import Path
from typing import Any

from fgclip_mega.config import Config, ConfigError, ModelConfig


def clip_config(cfg: ModelConfig, attn_implementation: str | None = None):
    """The HF CLIPConfig with the same towers (quick-GELU, eos-token pooling)."""
    from transformers import CLIPConfig

    v, t = cfg.vision, cfg.text
    config = CLIPConfig(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.mlp_width,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.short_context,
            hidden_act="quick_gelu",
            layer_norm_eps=t.layer_norm_eps,
            eos_token_id=t.eos_token_id,
            projection_dim=cfg.projection_dim,
        ),
        vision_config=dict(
            hidden_size=v.width,
            intermediate_size=v.mlp_width,
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act="quick_gelu",
            layer_norm_eps=v.layer_norm_eps,
            projection_dim=cfg.projection_dim,
        ),
        projection_dim=cfg.projection_dim,
        logit_scale_init_value=cfg.logit_scale_init,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


# ----------------------------------------------------------------------------- config.json -> ours

# Our ModelConfig field <- (config.json section, key). A section of None is the top level.
HF_FIELDS: dict[str, tuple[str | None, str]] = {
    "model.vision.image_size": ("vision_config", "image_size"),
    "model.vision.patch_size": ("vision_config", "patch_size"),
    "model.vision.width": ("vision_config", "hidden_size"),
    "model.vision.layers": ("vision_config", "num_hidden_layers"),
    "model.vision.heads": ("vision_config", "num_attention_heads"),
    "model.vision.mlp_width": ("vision_config", "intermediate_size"),
    "model.vision.layer_norm_eps": ("vision_config", "layer_norm_eps"),
    "model.text.vocab_size": ("text_config", "vocab_size"),
    "model.text.width": ("text_config", "hidden_size"),
    "model.text.layers": ("text_config", "num_hidden_layers"),
    "model.text.heads": ("text_config", "num_attention_heads"),
    "model.text.mlp_width": ("text_config", "intermediate_size"),
    "model.text.short_context": ("text_config", "max_position_embeddings"),
    "model.text.layer_norm_eps": ("text_config", "layer_norm_eps"),
    "model.projection_dim": (None, "projection_dim"),
}
_ACTIVATION = "quick_gelu"  # the only MLP activation our towers implement (OpenAI CLIP's)
_LEGACY_EOS = 2  # pre-2023 HF CLIP configs: pool at argmax(ids), i.e. the first EOT (49407)


def read_hf_config(checkpoint: str | Path) -> dict | None:
    """The parsed config.json of an HF checkpoint directory (or of a weights file's directory),
    None when there is none. An unreadable file raises ConfigError naming it."""
    path = Path(checkpoint)
    path = path if path.is_dir() else path.parent
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read it as JSON ({e})") from e


def model_fields_from_hf(config: dict, source: str = "config.json") -> dict[str, Any]:
    """HF CLIPConfig / released FG-CLIP v1 config.json -> {our dotted ModelConfig field: value}.

    Keys the file omits take transformers' CLIP defaults (as `from_pretrained` would). A value
    our towers cannot represent (another activation, a non-RGB input, another model type)
    raises ConfigError naming the key."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    model_type = config.get("model_type", "clip")
    if model_type not in ("clip", "fgclip"):
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not an (FG-)CLIP v1 layout; only HF CLIP "
            "and released FG-CLIP v1 checkpoints are read"
        )
    sections = {
        None: config,
        # Older HF CLIP configs spell the sections text_config_dict / vision_config_dict.
        "text_config": CLIPTextConfig(**_section(config, "text_config")).to_dict(),
        "vision_config": CLIPVisionConfig(**_section(config, "vision_config")).to_dict(),
    }
    sections[None] = {"projection_dim": config.get("projection_dim", 512)}
    for name in ("text_config", "vision_config"):
        act = sections[name].get("hidden_act")
        if act != _ACTIVATION:
            raise ConfigError(
                f"{source}: {name}.hidden_act={act!r}, but the towers implement {_ACTIVATION!r}"
            )
    if sections["vision_config"].get("num_channels", 3) != 3:
        raise ConfigError(f"{source}: vision_config.num_channels must be 3 (RGB)")
    fields = {ours: sections[sec][key] for ours, (sec, key) in HF_FIELDS.items()}
    eos = sections["text_config"].get("eos_token_id")
    vocab = fields["model.text.vocab_size"]
    # Legacy id 2 pools at argmax(ids): the first EOT when EOT is the largest id (CLIP's BPE).
    fields["model.text.eos_token_id"] = vocab - 1 if eos == _LEGACY_EOS else eos
    return fields


def _section(config: dict, name: str) -> dict:
    return config.get(name) or config.get(f"{name}_dict") or {}


def hf_key_of(field: str) -> str:
    """The config.json key a ModelConfig field is read from ('text_config.num_attention_heads')."""
    if field == "model.text.eos_token_id":
        return "text_config.eos_token_id"
    section, key = HF_FIELDS[field]
    return key if section is None else f"{section}.{key}"


def reconcile_model_config(
    cfg: Config, fields: dict[str, Any], explicit: dict[str, str], source: str
) -> Config:
    """Sets `fields` (from `model_fields_from_hf`) on `cfg`. `explicit` maps the fields the user
    set (by a chosen preset or a key=value override) to where they came from; each of those
    must equal the checkpoint's value, else ConfigError naming the field, both values and both
    sources. Fields nobody set take the checkpoint's value."""
    from fgclip_mega.config import set_value

    clashes = []
    for name, value in fields.items():
        mine = reduce(getattr, name.split("."), cfg)
        if name in explicit and not _same(mine, value):
            clashes.append(f"{name}={mine!r} ({explicit[name]}) but {hf_key_of(name)}={value!r}")
    if clashes:
        raise ConfigError(
            f"the model config disagrees with the checkpoint's {source}: "
            + "; ".join(clashes)
            + ". Drop those settings or use the matching preset"
        )
    for name, value in fields.items():
        set_value(cfg, name, value)
    return cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    return a == b
