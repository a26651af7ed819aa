"""transformers `CLIPConfig` of a ModelConfig (exports, reference models), and the reverse: our
model fields from a checkpoint's config.json (HF CLIP / released FG-CLIP v1, or HF SigLIP 2 /
released FG-CLIP 2: the family is read from `model_type` / `architectures`), checked against the
preset and overrides."""

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


class HFModelFields(dict):
    """{our dotted ModelConfig field: value} read from a config.json, with the checkpoint family
    ('fgclip' or 'fgclip2') and the config.json key each field came from (for error messages)."""

    def __init__(self, family: str, values: dict[str, Any], keys: dict[str, str]):
        super().__init__(values)
        self.family = family
        self.keys_of = keys


# config.json model_type / architectures of each family (released FG-CLIP v1 says "clip").
_V1_TYPES = ("clip", "fgclip")
_V2_TYPES = ("siglip2", "fgclip2")
_V2_ARCHITECTURES = ("Siglip2Model", "FG_CLIP2_Model", "Fgclip2Model")


def checkpoint_family(config: dict, source: str = "config.json") -> str:
    """'fgclip' (HF CLIP, released FG-CLIP v1) or 'fgclip2' (HF SigLIP 2, released FG-CLIP 2)
    from config.json's model_type (or, without one, its architectures); anything else raises
    ConfigError naming the value."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type in _V2_TYPES or (
        model_type is None and set(architectures) & set(_V2_ARCHITECTURES)
    ):
        return "fgclip2"
    if model_type is None or model_type in _V1_TYPES:
        return "fgclip"
    raise ConfigError(
        f"{source}: model_type {model_type!r} is neither an (FG-)CLIP v1 layout "
        f"({', '.join(_V1_TYPES)}) nor a SigLIP 2 / FG-CLIP 2 one ({', '.join(_V2_TYPES)})"
    )


def model_fields_from_hf(config: dict, source: str = "config.json") -> HFModelFields:
    """config.json -> {our dotted ModelConfig field: value} for either family (see
    `checkpoint_family`); `model.family` is one of the fields.

    Keys the file omits take transformers' defaults (as `from_pretrained` would). A value our
    towers cannot represent (another activation, a non-RGB input, another model type) raises
    ConfigError naming the key."""
    if checkpoint_family(config, source) == "fgclip2":
        return _siglip2_fields(config, source)
    return _clip_fields(config, source)


def _clip_fields(config: dict, source: str) -> HFModelFields:
    """HF CLIPConfig / released FG-CLIP v1 config.json."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

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
    fields["model.vision.activation"] = fields["model.text.activation"] = _ACTIVATION
    fields["model.family"] = "fgclip"
    keys = {f: hf_key_of(f) for f in fields if f in HF_FIELDS or f == "model.text.eos_token_id"}
    keys["model.vision.activation"] = "vision_config.hidden_act"
    keys["model.text.activation"] = "text_config.hidden_act"
    keys["model.family"] = f"the family of model_type {config.get('model_type', 'clip')!r}"
    return HFModelFields("fgclip", fields, keys)


# transformers 5.23's Siglip2TextConfig / Siglip2VisionConfig defaults (what `from_pretrained`
# gives a key the file omits), and upstream Fgclip2TextConfig's two long-text keys.
SIGLIP2_TEXT_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "keep_len": 20, "longtext_len": None,  # None: 4 * max_position_embeddings - 3 * keep_len
}  # fmt: skip
SIGLIP2_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "num_patches": 256, "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}  # fmt: skip
# Our field <- (section, key), for the keys read as they are.
SIGLIP2_FIELDS: dict[str, tuple[str, str]] = {
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
    "model.text.long_position_split": ("text_config", "keep_len"),
    "model.text.layer_norm_eps": ("text_config", "layer_norm_eps"),
}
_SIGLIP2_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> ours


def _siglip2_fields(config: dict, source: str) -> HFModelFields:
    """HF Siglip2Config (NaFlex) / released FG-CLIP 2 config.json. The learnt position table is
    (sqrt(num_patches))^2, which our config spells as image_size = sqrt(num_patches) * patch;
    the text heads are (D, D), so the projection size must be the text width."""
    sec = {
        "text_config": {**SIGLIP2_TEXT_DEFAULTS, **_section(config, "text_config")},
        "vision_config": {**SIGLIP2_VISION_DEFAULTS, **_section(config, "vision_config")},
    }
    fields = {ours: sec[s][k] for ours, (s, k) in SIGLIP2_FIELDS.items()}
    keys = {ours: f"{s}.{k}" for ours, (s, k) in SIGLIP2_FIELDS.items()}
    for name in ("vision", "text"):
        act = sec[f"{name}_config"]["hidden_act"]
        if act not in _SIGLIP2_ACTIVATIONS:
            raise ConfigError(
                f"{source}: {name}_config.hidden_act={act!r}, but the SigLIP 2 towers implement "
                f"{sorted(_SIGLIP2_ACTIVATIONS)}"
            )
        fields[f"model.{name}.activation"] = _SIGLIP2_ACTIVATIONS[act]
        keys[f"model.{name}.activation"] = f"{name}_config.hidden_act"
    v, t = sec["vision_config"], sec["text_config"]
    if v["num_channels"] != 3:
        raise ConfigError(f"{source}: vision_config.num_channels must be 3 (RGB)")
    side = round(v["num_patches"] ** 0.5)
    if side * side != v["num_patches"]:
        raise ConfigError(
            f"{source}: vision_config.num_patches={v['num_patches']} is not a square position table"
        )
    fields["model.vision.image_size"] = side * v["patch_size"]
    keys["model.vision.image_size"] = "vision_config.num_patches (x patch_size)"
    stretched = 4 * t["max_position_embeddings"] - 3 * t["keep_len"]
    fields["model.text.long_context"] = t["longtext_len"] or stretched
    keys["model.text.long_context"] = "text_config.longtext_len"
    projection = t.get("projection_size") or t["hidden_size"]
    if projection != t["hidden_size"]:
        raise ConfigError(
            f"{source}: text_config.projection_size={projection} differs from "
            f"text_config.hidden_size={t['hidden_size']}; FG-CLIP 2's text heads are (D, D)"
        )
    if v["hidden_size"] != t["hidden_size"]:
        raise ConfigError(
            f"{source}: vision_config.hidden_size={v['hidden_size']} differs from "
            f"text_config.hidden_size={t['hidden_size']}; FG-CLIP 2 has no projections"
        )
    fields["model.projection_dim"] = projection
    keys["model.projection_dim"] = "text_config.projection_size"
    fields["model.family"] = "fgclip2"
    keys["model.family"] = f"the family of model_type {config.get('model_type')!r}"
    return HFModelFields("fgclip2", fields, keys)


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
            key = fields.keys_of[name] if isinstance(fields, HFModelFields) else hf_key_of(name)
            clashes.append(f"{name}={mine!r} ({explicit[name]}) but {key}={value!r}")
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
