"""HF `Siglip2Model` (NaFlex) / released FG-CLIP 2 weights <-> FGCLIP2Model at any TP size.

Layouts: "siglip2" is what transformers' Siglip2Model holds; "fgclip2" adds FG-CLIP 2's extras
with the released checkpoints' key names (upstream `FG_CLIP2_Model`): the long-caption position
tables, `longtext_head`, `boxtext_head`, `dense_feature_head` and the two extra temperatures
(0-dim there, where `logit_scale` / `logit_bias` are (1,)). Importing a plain SigLIP 2 checkpoint
derives the extras as upstream's `resize_postion_embeding`, `copy_weight` and
`copy_dense_feature_head` do; a checkpoint with some extras but not all is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fgclip_mega.checkpoint.errors import CheckpointError
from fgclip_mega.checkpoint.hf import (
    _full_tensor,
    check_keys,
    full_shape,
    load_state_dict,
    shard,
    unshard,
)
from fgclip_mega.config import ModelConfig
from fgclip_mega.models.text import stretch_positions

_POS = "text_model.embeddings.position_embedding.weight"
_HEAD = ("probe", "attention.in_proj_weight", "attention.in_proj_bias")
_HEAD += ("attention.out_proj.weight", "attention.out_proj.bias")
_HEAD += ("layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias")
_HEAD += ("mlp.fc2.weight", "mlp.fc2.bias")
_OUR_HEAD = {k: k.replace("mlp.", "") for k in _HEAD}  # our AttentionPoolingHead names

# FG-CLIP 2 extras: our name -> (released key, the key it is derived from in a SigLIP 2 one).
EXTRAS = {
    "text.position_embedding_ori": ("text_model.embeddings.position_embedding_ori.weight", _POS),
    "text.position_embedding_res": ("text_model.embeddings.position_embedding_res.weight", _POS),
    "longtext_head.weight": ("longtext_head.weight", "text_model.head.weight"),
    "longtext_head.bias": ("longtext_head.bias", "text_model.head.bias"),
    "boxtext_head.weight": ("boxtext_head.weight", "text_model.head.weight"),
    "boxtext_head.bias": ("boxtext_head.bias", "text_model.head.bias"),
    "logit_scale_finegraind": ("logit_scale_finegraind", "logit_scale"),
    "logit_scale_hardneg": ("logit_scale_hardneg", "logit_scale"),
}
for _k in _HEAD:
    EXTRAS[f"vision.dense_head.{_OUR_HEAD[_k]}"] = (
        f"dense_feature_head.{_k}",
        f"vision_model.head.{_k}",
    )
# HF stores these scalars as (1,); ours are 0-dim (the released extra scales are 0-dim too).
_VECTOR_SCALARS = ("logit_scale", "logit_bias")


def key_map(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the HF key(s) whose dim-0 concatenation it is."""
    m: dict[str, tuple[str, ...]] = {
        "vision.patch_embedding.weight": ("vision_model.embeddings.patch_embedding.weight",),
        "vision.patch_embedding.bias": ("vision_model.embeddings.patch_embedding.bias",),
        "vision.position_embedding": ("vision_model.embeddings.position_embedding.weight",),
        "text.token_embedding.weight": ("text_model.embeddings.token_embedding.weight",),
        "text.position_embedding": (_POS,),
        "text_head.weight": ("text_model.head.weight",),
        "text_head.bias": ("text_model.head.bias",),
        "logit_scale": ("logit_scale",),
        "logit_bias": ("logit_bias",),
    }
    for w in ("weight", "bias"):
        m[f"vision.post_norm.{w}"] = (f"vision_model.post_layernorm.{w}",)
        m[f"text.final_norm.{w}"] = (f"text_model.final_layer_norm.{w}",)
    for k in _HEAD:
        m[f"vision.head.{_OUR_HEAD[k]}"] = (f"vision_model.head.{k}",)
    for ours, hf, layers in (
        ("vision", "vision_model", cfg.vision.layers),
        ("text", "text_model", cfg.text.layers),
    ):
        for i in range(layers):
            o, h = f"{ours}.transformer.blocks.{i}", f"{hf}.encoder.layers.{i}"
            for w in ("weight", "bias"):
                m[f"{o}.norm1.{w}"] = (f"{h}.layer_norm1.{w}",)
                m[f"{o}.attn.qkv.{w}"] = tuple(f"{h}.self_attn.{p}_proj.{w}" for p in "qkv")
                m[f"{o}.attn.out_proj.{w}"] = (f"{h}.self_attn.out_proj.{w}",)
                m[f"{o}.norm2.{w}"] = (f"{h}.layer_norm2.{w}",)
                m[f"{o}.mlp.fc1.{w}"] = (f"{h}.mlp.fc1.{w}",)
                m[f"{o}.mlp.fc2.{w}"] = (f"{h}.mlp.fc2.{w}",)
    for ours, (hf, _) in EXTRAS.items():
        m[ours] = (hf,)
    return m


def _derived(name: str, state: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    source = state[EXTRAS[name][1]]
    if name.startswith("text.position_embedding_"):
        t = cfg.text
        if source.shape[0] != t.short_context:
            raise CheckpointError(
                f"{EXTRAS[name][1]}: has {source.shape[0]} rows, expected {t.short_context} "
                f"to stretch into {EXTRAS[name][0]}"
            )
        return stretch_positions(source.float(), t.long_position_split, t.long_context)
    return source.reshape(()) if name.startswith("logit_") else source


@torch.no_grad()
def import_fgclip2_state_dict(
    model: nn.Module, source: str | Path | dict | nn.Module
) -> dict[str, list[str]]:
    """Loads HF Siglip2Model or released FG-CLIP 2 weights into an FGCLIP2Model of any TP size;
    each rank copies its slice. Missing, unexpected or misshapen keys raise naming them."""
    state = {k: v for k, v in load_state_dict(source).items() if not k.endswith("position_ids")}
    mapping = key_map(model.cfg)
    params = check_keys(state, mapping, {hf for hf, _ in EXTRAS.values()}, model, "FG-CLIP 2")
    rank, size = model.tp_group.rank(), model.tp_group.size()
    derived = []
    for name, param in params.items():
        shape = full_shape(param, size)
        keys = mapping[name]
        if name in EXTRAS and keys[0] not in state:
            derived.append(keys[0])
            full = _derived(name, state, model.cfg)
        elif name in _VECTOR_SCALARS or name in EXTRAS and name.startswith("logit_"):
            full = state[keys[0]].reshape(())
        else:
            full = _full_tensor(name, keys, state, shape)
        if tuple(full.shape) != shape:
            raise CheckpointError(
                f"{keys[0]}: checkpoint shape {tuple(full.shape)}, model parameter {name} "
                f"expects {shape}"
            )
        param.copy_(shard(full, param, rank, size).to(param.dtype))
    return {"derived": derived}


@torch.no_grad()
def export_fgclip2_state_dict(model: nn.Module, layout: str = "fgclip2") -> dict[str, torch.Tensor]:
    """The full HF-layout state dict (CPU) on every TP rank; a collective over the TP group.
    "siglip2" loads into transformers' Siglip2Model; "fgclip2" is the released layout."""
    if layout not in ("fgclip2", "siglip2"):
        raise ValueError(f"layout must be 'fgclip2' or 'siglip2', got {layout!r}")
    mapping = key_map(model.cfg)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if layout == "siglip2" and name in EXTRAS:
            continue
        full = unshard(param.detach(), param, model.tp_group).cpu()
        keys = mapping[name]
        if name in _VECTOR_SCALARS:
            full = full.reshape(1)
        if len(keys) == 1:
            out[keys[0]] = full.clone()
        else:
            for key, part in zip(keys, full.chunk(len(keys), 0), strict=True):
                out[key] = part.clone()
    return out


def fgclip2_state_from_full(
    full: dict[str, torch.Tensor], cfg: ModelConfig, layout: str = "fgclip2"
) -> dict[str, torch.Tensor]:
    """Our full (unsharded) parameters by name (a training checkpoint's model.pt) -> the HF-layout
    state dict, without a model or process group; layouts as `export_fgclip2_state_dict`. A name
    missing from `full` or unknown to the key map raises naming it."""
    if layout not in ("fgclip2", "siglip2"):
        raise ValueError(f"layout must be 'fgclip2' or 'siglip2', got {layout!r}")
    mapping = key_map(cfg)
    wanted = {n for n in mapping if not (layout == "siglip2" and n in EXTRAS)}
    missing, unexpected = sorted(wanted - set(full)), sorted(set(full) - set(mapping))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the FG-CLIP 2 model config: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    out: dict[str, torch.Tensor] = {}
    for name in sorted(wanted):
        keys, tensor = mapping[name], full[name]
        if name in _VECTOR_SCALARS:
            tensor = tensor.reshape(1)
        parts = tensor.chunk(len(keys), dim=0) if len(keys) > 1 else [tensor]
        for key, part in zip(keys, parts, strict=True):
            out[key] = part.clone()
    return out


def siglip2_config(cfg: ModelConfig):
    """transformers' Siglip2Config of a FG-CLIP 2 model config (NaFlex towers: the learnt
    position table has (image_size / patch_size)^2 rows; the text table short_context rows)."""
    from transformers import Siglip2Config

    v, t = cfg.vision, cfg.text
    act = {"gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
    return Siglip2Config(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.mlp_width,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.short_context,
            hidden_act=act[t.activation],
            layer_norm_eps=t.layer_norm_eps,
            projection_size=t.width,
        ),
        vision_config=dict(
            hidden_size=v.width,
            intermediate_size=v.mlp_width,
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
            num_patches=(v.image_size // v.patch_size) ** 2,
            patch_size=v.patch_size,
            hidden_act=act[v.activation],
            layer_norm_eps=v.layer_norm_eps,
        ),
    )
