"""transformers `CLIPConfig` of a ModelConfig, for exports and reference models."""

from __future__ import annotations

from fgclip_mega.config import ModelConfig


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
