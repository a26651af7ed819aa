"""Named presets (small functions returning a full `Config`) and `load_config`: a preset, then
a YAML file, then `key.sub=value` CLI pairs, validated at the end.

FG-CLIP (OpenAI-CLIP towers): `fgclip_vit_b16`, `fgclip_vit_l14_336` and the CPU-sized `tiny`.
FG-CLIP 2 (SigLIP 2 NaFlex towers): `fgclip2_base_naflex`, `fgclip2_so400m_naflex` and the
CPU-sized `fgclip2_tiny` (model.family=fgclip2: fgclip_mega/family.py).
"""

from __future__ import annotations

from fgclip_mega.config import (
    Config,
    ConfigError,
    PrecisionConfig,
    TextConfig,
    VisionConfig,
    apply_cli,
    apply_dict,
)

FGCLIP_GLOBAL_BATCH = 32768
"""FG-CLIP's batch (both stages); each rank's micro-batch and accumulation derive from it."""

FGCLIP2_GLOBAL_BATCH = 4096
"""FG-CLIP 2's batch: upstream scripts/train/stage2_fgclip2.sh trains with
per_device_train_batch_size 512 x train_use_word_size 8 GPUs x gradient_accumulation_steps 1
(commit b1af1cd). Upstream has no stage-1 script; the presets use the same batch for both."""


def fgclip_vit_b16() -> Config:
    """FG-CLIP ViT-B/16 at 224 px: text 12 layers of width 512, projection 512; bf16 on GPUs.

    Global batch 32K, micro-batch sized from the memory estimate (`python -m fgclip_mega.env`):
    on 64 x 80 GB, 512 per rank in one micro-batch in stage 1 and 64 x 8 accumulation steps in
    stage 2, without activation checkpointing (it would cost the extra forward that accumulation
    costs, and stage 1 needs none)."""
    cfg = Config()
    cfg.train.global_batch_size = FGCLIP_GLOBAL_BATCH
    cfg.data.micro_batch_size = 0
    return cfg


def fgclip_vit_l14_336() -> Config:
    """FG-CLIP ViT-L/14 at 336 px: text width 768, projection 768."""
    cfg = Config()
    cfg.model.vision = VisionConfig(
        image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_width=4096
    )
    cfg.model.text = TextConfig(width=768, heads=12, mlp_width=3072)
    cfg.model.projection_dim = 768
    # Global batch 32K, micro-batch from the memory estimate. Block checkpointing: on 64 x 80 GB
    # stage 2 fits 32 samples per micro-batch without it (49 texts of 77 tokens each) and 128
    # with it; stage 1 fits the whole 512 per rank with it (64 x 8 accumulation without).
    cfg.train.global_batch_size = FGCLIP_GLOBAL_BATCH
    cfg.data.micro_batch_size = 0
    cfg.parallel.activation_checkpointing = True
    return cfg


def tiny() -> Config:
    """A few narrow layers on 64-px images: trains on the 2-core CPU in minutes (fp32)."""
    cfg = Config()
    cfg.precision = PrecisionConfig(params_dtype="fp32", compute_dtype="fp32")
    cfg.model.vision = VisionConfig(
        image_size=64, patch_size=8, width=64, layers=2, heads=4, mlp_width=256
    )
    cfg.model.text = TextConfig(width=64, layers=2, heads=4, mlp_width=256)
    cfg.model.projection_dim = 32
    cfg.data.micro_batch_size = 16
    cfg.optim.lr = 5e-4
    cfg.optim.warmup_steps = 10
    cfg.train.steps = 60
    cfg.train.stage = "regional"
    cfg.train.log_interval = 5
    return cfg


def _fgclip2(cfg: Config) -> Config:
    """FG-CLIP 2's recipe on SigLIP 2 towers (upstream fgclip2.py / stage2_fgclip2.sh): sigmoid
    global loss with a learnt bias, region InfoNCE at the code's weight 0.2, TIC and FGT."""
    cfg.model.family = "fgclip2"
    cfg.model.logit_scale_init = 2.3026  # ln 10 (SigLIP)
    cfg.model.logit_bias_init = -10.0
    cfg.loss.kind = "sigmoid"
    cfg.loss.recipe = "fgclip2"
    cfg.loss.region_weight = 0.2
    for tower in (cfg.model.vision, cfg.model.text):
        tower.activation = "gelu_tanh"
        tower.layer_norm_eps = 1e-6
    t = cfg.model.text
    t.short_context, t.long_context, t.long_position_split = 64, 196, 20
    return cfg


def _siglip2_text(width: int, layers: int, heads: int, mlp: int) -> TextConfig:
    # Gemma's 256K vocabulary; SigLIP pools the last position, so no EOS id is read.
    return TextConfig(vocab_size=256000, width=width, layers=layers, heads=heads, mlp_width=mlp)


def fgclip2_base_naflex() -> Config:
    """FG-CLIP 2 on siglip2-base-patch16-naflex: ViT-B/16 with a 16x16 learnt position table
    resized per image, patch budgets up to 1024; bf16 on GPUs."""
    cfg = Config()
    cfg.model.vision = VisionConfig(
        image_size=256, patch_size=16, width=768, layers=12, heads=12, mlp_width=3072
    )
    cfg.model.text = _siglip2_text(768, 12, 12, 3072)
    cfg.model.projection_dim = 768
    # Global batch 4096 (FGCLIP2_GLOBAL_BATCH), micro-batch from the memory estimate at the
    # worst-case patch budget 1024 (`python -m fgclip_mega.env --preset fgclip2_base_naflex`):
    # on 64 x 80 GB the whole 64 per rank in stage 1 and 32 x 2 accumulation steps in stage 2
    # without activation checkpointing (either costs one extra forward in stage 2).
    cfg.train.global_batch_size = FGCLIP2_GLOBAL_BATCH
    cfg.data.micro_batch_size = 0
    return _fgclip2(cfg)


def fgclip2_so400m_naflex() -> Config:
    """FG-CLIP 2 on siglip2-so400m-patch16-naflex: width 1152, 27 layers, MLP 4304."""
    cfg = Config()
    cfg.model.vision = VisionConfig(
        image_size=256, patch_size=16, width=1152, layers=27, heads=16, mlp_width=4304
    )
    cfg.model.text = _siglip2_text(1152, 27, 16, 4304)
    cfg.model.projection_dim = 1152
    # Global batch 4096, micro-batch from the memory estimate at patch budget 1024. Block
    # checkpointing (upstream trains with gradient_checkpointing too): on 64 x 80 GB both
    # stages then fit the whole 64 per rank in one micro-batch; without it stage 1 needs 32 x 2
    # and stage 2 8 x 8 (the 3072 box and hard-negative texts of 64 samples dominate).
    cfg.train.global_batch_size = FGCLIP2_GLOBAL_BATCH
    cfg.data.micro_batch_size = 0
    cfg.parallel.activation_checkpointing = True
    return _fgclip2(cfg)


def fgclip2_tiny() -> Config:
    """FG-CLIP 2 at CPU size: 2 narrow layers, 8-px patches, an 8x8 position table (fp32)."""
    cfg = tiny()
    cfg.model.vision = VisionConfig(
        image_size=64, patch_size=8, width=64, layers=2, heads=4, mlp_width=256
    )
    cfg.model.text = TextConfig(vocab_size=1024, width=64, layers=2, heads=4, mlp_width=256)
    cfg.model.projection_dim = 64
    # The embedded mixed-size synthetic scenes (data.synthetic.MixedSizes) span budgets 128/256
    # at 8-px patches; their own tokenizer.json is used when data.tokenizer is empty.
    cfg.data.max_patch_budget = 256
    return _fgclip2(cfg)


PRESETS = {
    "fgclip_vit_b16": fgclip_vit_b16,
    "fgclip_vit_l14_336": fgclip_vit_l14_336,
    "tiny": tiny,
    "fgclip2_base_naflex": fgclip2_base_naflex,
    "fgclip2_so400m_naflex": fgclip2_so400m_naflex,
    "fgclip2_tiny": fgclip2_tiny,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(
    preset_name: str = "tiny", yaml_path: str | None = None, overrides: list[str] | None = None
) -> Config:
    """Preset, then the YAML file, then CLI pairs; validated at the end."""
    cfg = preset(preset_name)
    if yaml_path:
        import yaml

        with open(yaml_path) as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{yaml_path}: top level must be a mapping")
        apply_dict(cfg, values)
    apply_cli(cfg, overrides or [])
    return cfg.validate()
