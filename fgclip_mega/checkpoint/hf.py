"""HF `CLIPModel` / released FG-CLIP weights <-> FGCLIPModel at any tensor-parallel size.

The key map is explicit: each of our parameters is one HF tensor, or (the fused qkv) the
concatenation of HF's q/k/v tensors along dim 0. Import gives each TP rank its slice according to
megatron's sharding attributes; export all-gathers the slices over the TP group and splits them
back into HF keys. FG-CLIP's extras are derived only for a plain CLIP checkpoint (none of them
present); a checkpoint with some but not all of them is refused. A model with SigLIP's
`logit_bias` (model.logit_bias_init set) maps it to the HF SigLIP key `logit_bias`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fgclip_mega.checkpoint.errors import CheckpointError
from fgclip_mega.config import ModelConfig
from fgclip_mega.models.text import stretch_positions

log = logging.getLogger(__name__)

_POS_IDS = "position_ids"  # HF buffers stored by older transformers versions; not weights
_BIAS = "logit_bias"  # SigLIP's learnable bias of the global logits (HF SiglipModel's key)
_TEXT_POS = "text_model.embeddings.position_embedding.weight"

# FG-CLIP extras: our name -> (HF key, HF key it is derived from when absent).
_TEXT_EMB = "text_model.embeddings"
EXTRAS = {
    "text.position_embedding_ori": (f"{_TEXT_EMB}.position_embedding_ori.weight", _TEXT_POS),
    "text.position_embedding_res": (f"{_TEXT_EMB}.position_embedding_res.weight", _TEXT_POS),
    "text_filip_projection.weight": ("text_filip_projection.weight", "text_projection.weight"),
    "logit_scale_finegraind": ("logit_scale_finegraind", "logit_scale"),
    "logit_scale_hardneg": ("logit_scale_hardneg", "logit_scale"),
}


def key_map(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the HF key(s) whose dim-0 concatenation it is."""
    m: dict[str, tuple[str, ...]] = {
        "vision.patch_embed.weight": ("vision_model.embeddings.patch_embedding.weight",),
        "vision.class_embedding": ("vision_model.embeddings.class_embedding",),
        "vision.position_embedding": ("vision_model.embeddings.position_embedding.weight",),
        "text.token_embedding.weight": ("text_model.embeddings.token_embedding.weight",),
        "text.position_embedding": (_TEXT_POS,),
        "visual_projection.weight": ("visual_projection.weight",),
        "text_projection.weight": ("text_projection.weight",),
        "logit_scale": ("logit_scale",),
    }
    for w in ("weight", "bias"):
        m[f"vision.pre_norm.{w}"] = (f"vision_model.pre_layrnorm.{w}",)
        m[f"vision.post_norm.{w}"] = (f"vision_model.post_layernorm.{w}",)
        m[f"text.final_norm.{w}"] = (f"text_model.final_layer_norm.{w}",)
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
    if cfg.logit_bias_init is not None:
        m[_BIAS] = (_BIAS,)
    return m


# ----------------------------------------------------------------------------- files


def load_state_dict(source: str | Path | dict | nn.Module) -> dict[str, torch.Tensor]:
    """A state dict from a dict, a module, a .safetensors / torch file, or an HF directory
    (model.safetensors, its sharded index, or pytorch_model.bin)."""
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).exists():
                return load_state_dict(path / name)
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        if path.name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(load_state_dict(path.parent / shard))
            return out
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file: name it, say why
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Writes safetensors for a .safetensors path, else a torch file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


# ----------------------------------------------------------------------------- sharding


def _tp(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition dim, stride) for a TP-sharded parameter, None for a replicated one."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if (spec := _tp(param)) is not None:
        shape[spec[0]] *= tp_size
    return tuple(shape)


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of `full`, laid out as megatron's CPU init does: the dim is cut into
    stride * size pieces and rank r owns pieces r, r + size, ... (stride 3 = [q_r; k_r; v_r])."""
    if (spec := _tp(param)) is None:
        return full
    dim, stride = spec
    pieces = full.chunk(stride * size, dim)
    return torch.cat([pieces[j * size + rank] for j in range(stride)], dim)


def unshard(local: torch.Tensor, param: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `shard`: all-gathers the slices of the TP group (collective on all ranks)."""
    if (spec := _tp(param)) is None:
        return local
    dim, stride = spec
    size = group.size()
    if size == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    per_rank = [g.chunk(stride, dim) for g in gathered]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(size)], dim)


# ----------------------------------------------------------------------------- import / export


def _full_tensor(
    name: str, keys: tuple[str, ...], state: dict[str, torch.Tensor], shape: tuple[int, ...]
) -> torch.Tensor:
    part_shape = (shape[0] // len(keys), *shape[1:]) if keys and shape else shape
    parts = []
    for key in keys:
        t = state[key]
        if tuple(t.shape) != part_shape:
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(t.shape)}, model parameter "
                f"{name} expects {part_shape}"
            )
        parts.append(t)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _derived(name: str, state: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    source = state[EXTRAS[name][1]]
    if name.startswith("text.position_embedding_"):
        t = model.cfg.text
        if source.shape[0] != t.short_context:
            raise CheckpointError(
                f"{EXTRAS[name][1]}: has {source.shape[0]} rows, expected "
                f"{t.short_context} to stretch into {EXTRAS[name][0]}"
            )
        return stretch_positions(source.float(), t.long_position_split, t.long_context)
    return source


def _listing(keys: list[str]) -> str:
    more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
    return f"{keys[:10]}{more}"


def check_keys(
    state: dict[str, torch.Tensor],
    mapping: dict[str, tuple[str, ...]],
    extras: set[str],
    model: nn.Module,
    family: str,
) -> dict[str, nn.Parameter]:
    """A checkpoint's keys against a key map: unexpected or missing keys, or some but not all of
    the family's extras (only a checkpoint without any gets derived ones), raise naming them.
    Returns the model's parameters by name (which the key map must cover exactly)."""
    known = {k for keys in mapping.values() for k in keys}
    unexpected = sorted(set(state) - known)
    if unexpected:
        raise CheckpointError(f"unexpected key(s) in checkpoint: {_listing(unexpected)}")
    missing = sorted(known - extras - set(state))
    if missing:
        raise CheckpointError(f"missing key(s) in checkpoint: {_listing(missing)}")
    present = extras & set(state)
    if present and present != extras:
        raise CheckpointError(
            f"{family} checkpoint is incomplete: it has {_listing(sorted(present))} but lacks "
            f"{_listing(sorted(extras - present))}; refusing to derive a mix"
        )
    params = dict(model.named_parameters())
    if set(params) != set(mapping):
        raise AssertionError(f"key map out of date: {sorted(set(params) ^ set(mapping))}")
    return params


@torch.no_grad()
def import_hf_state_dict(
    model: nn.Module, source: str | Path | dict | nn.Module
) -> dict[str, list[str]]:
    """Loads HF CLIPModel or FG-CLIP weights into `model` (an FGCLIPModel of any TP size); each
    rank copies its own slice. Missing, unexpected or misshapen keys raise CheckpointError
    naming them. Returns {"derived": [FG-CLIP keys built because the source lacked them]}."""
    state = {k: v for k, v in load_state_dict(source).items() if not k.endswith(_POS_IDS)}
    mapping = key_map(model.cfg)
    has_bias = model.cfg.logit_bias_init is not None
    if (_BIAS in state) != has_bias:
        raise CheckpointError(
            f"the checkpoint {'has' if _BIAS in state else 'has no'} {_BIAS} (SigLIP) but the "
            f"model {'has' if has_bias else 'has none'}: "
            + ("set model.logit_bias_init" if not has_bias else "unset model.logit_bias_init")
        )
    params = check_keys(state, mapping, {hf for hf, _ in EXTRAS.values()}, model, "FG-CLIP")
    rank, size = model.tp_group.rank(), model.tp_group.size()
    derived = []
    for name, param in params.items():
        shape = full_shape(param, size)
        keys = mapping[name]
        if name in EXTRAS and keys[0] not in state:
            derived.append(keys[0])
            full = _derived(name, state, model)
            if tuple(full.shape) != shape:
                raise CheckpointError(
                    f"{EXTRAS[name][1]}: shape {tuple(full.shape)} cannot "
                    f"initialise {keys[0]} of shape {shape}"
                )
        else:
            full = _full_tensor(name, keys, state, shape)
        param.copy_(shard(full, param, rank, size).to(param.dtype))
    if derived:
        log.info("derived FG-CLIP parameters missing from the checkpoint: %s", derived)
    return {"derived": derived}


@torch.no_grad()
def export_hf_state_dict(
    model: nn.Module, layout: str = "fgclip", grads: bool = False
) -> dict[str, torch.Tensor]:
    """The full HF-layout state dict (CPU tensors) on every rank of the TP group; a collective.
    layout "fgclip" includes FG-CLIP's extras, "clip" is loadable by transformers' CLIPModel.
    With `grads`, exports the parameters' .grad instead (zeros where a grad is None); under
    sequence parallelism reduce the `sequence_parallel` params' grads over TP first."""
    _check_layout(model.cfg, layout)
    full: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if layout == "clip" and name in EXTRAS:
            continue
        local = param.detach()
        if grads:
            local = param.grad if param.grad is not None else torch.zeros_like(param)
        full[name] = unshard(local, param, model.tp_group).cpu()
    return hf_state_from_full(full, model.cfg, layout)


def _check_layout(cfg: ModelConfig, layout: str) -> None:
    if layout not in ("fgclip", "clip"):
        raise ValueError(f"layout must be 'fgclip' or 'clip', got {layout!r}")
    if layout == "clip" and cfg.logit_bias_init is not None:
        raise CheckpointError(
            f"layout 'clip' (transformers CLIPModel) has no {_BIAS}: export layout 'fgclip'"
        )


def hf_state_from_full(
    full: dict[str, torch.Tensor], cfg: ModelConfig, layout: str = "fgclip"
) -> dict[str, torch.Tensor]:
    """Our full (unsharded) parameters by name -> the HF-layout state dict, without a model or
    process group (a training checkpoint's model.pt holds exactly these). Layout as in
    `export_hf_state_dict`; a name missing from `full` or unknown to the key map raises."""
    _check_layout(cfg, layout)
    mapping = key_map(cfg)
    wanted = {n for n in mapping if not (layout == "clip" and n in EXTRAS)}
    missing, unexpected = sorted(wanted - set(full)), sorted(set(full) - set(mapping))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the model config: missing {_listing(missing)}, "
            f"unexpected {_listing(unexpected)}"
        )
    out: dict[str, torch.Tensor] = {}
    for name in sorted(wanted):
        keys, tensor = mapping[name], full[name]
        parts = tensor.chunk(len(keys), dim=0) if len(keys) > 1 else [tensor]
        for key, part in zip(keys, parts, strict=True):
            out[key] = part.clone()
    return out
