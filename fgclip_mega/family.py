"""FG-CLIP and FG-CLIP 2 side by side: the seams where the two recipes differ, in one table.

    model     FGCLIPModel (OpenAI-CLIP towers)     | FGCLIP2Model (SigLIP 2 NaFlex towers)
    loader    DALI / PIL square-image loader       | NaFlexLoader (batches grouped by budget)
    forward   objective.forward.encode_batch       | objective.forward_fgclip2.encode_naflex_batch
    weights   HF CLIPModel / released FG-CLIP      | HF Siglip2Model / released FG-CLIP 2
    eval      held-out loader, CLIP BPE text codec | every image at its own budget, SigLIP 2 codec

Everything else (the objective and its terms, megatron DDP and optimizer, checkpoints, the loop,
metrics) is shared. The trainer, the evaluator and the tools pick the family by
`cfg.model.family` here and nowhere else. Imports are lazy: a family costs nothing until used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fgclip_mega.config import Config, ConfigError, DataConfig


@dataclass(frozen=True)
class Family:
    name: str
    """`model.family` value."""
    model_class: Callable[[], type]
    """Returns the model class (built with `from_runtime(cfg.model, cfg.parallel, runtime)`)."""
    build_loader: Callable[..., object]
    """(cfg, dp_rank, dp_size, device, data=None) -> this rank's endless training loader."""
    encode: Callable[..., object]
    """(model, batch, regional) -> Embeddings: the forward both training and evaluation run."""
    import_weights: Callable[[torch.nn.Module, str | Path], dict]
    """Loads HF-layout weights (a file, a directory or a state dict) into the model."""
    stage_frozen: Callable[[Config], tuple[str, ...]]
    """Parameter-name prefixes a stage never trains: frozen, so that megatron's overlapped DDP
    (which waits for every bucketed parameter's gradient) and the optimizer never see them."""
    eval_loader: Callable[..., tuple[object, int]]
    """(cfg, dp_rank, dp_size, device, data=None, max_batches=None) -> (loader, batches): a
    held-out set for eval/collect.py; max_batches None = every sample at least once, else at
    most one pass of about that many global batches."""
    text_codec: Callable[[torch.nn.Module, object], object]
    """(model, its eval loader or None) -> the evaluation's text codec (data/text_codec.py)."""


# ----------------------------------------------------------------------------- FG-CLIP


def _v1_model() -> type:
    from fgclip_mega.models.fgclip import FGCLIPModel

    return FGCLIPModel


def _v1_loader(cfg: Config, dp_rank: int, dp_size: int, device, data: DataConfig | None = None):
    from fgclip_mega.data.loader import build_config_loader

    return build_config_loader(cfg, dp_rank, dp_size, device, data)


def _v1_encode(model, batch, regional: bool):
    from fgclip_mega.objective.forward import encode_batch

    return encode_batch(model, batch, regional)


def _v1_import(model, source) -> dict:
    from fgclip_mega.checkpoint import import_hf_state_dict

    return import_hf_state_dict(model, source)


def _v1_frozen(cfg: Config) -> tuple[str, ...]:
    # Every FG-CLIP parameter is used in both stages (the unused temperatures of stage 1 join
    # through the objective's zero term instead, as they did before this table existed).
    return ()


def _v1_eval_loader(cfg, dp_rank, dp_size, device, data=None, max_batches=None):
    import math

    from fgclip_mega.data.loader import build_config_loader

    loader = build_config_loader(cfg, dp_rank, dp_size, device, data)
    n, size = loader.shards.num_samples, (data or cfg.data).micro_batch_size * dp_size
    if max_batches is None:
        return loader, math.ceil(n / size)  # every sample; repeats are dropped by sample id
    return loader, min(max_batches, n // size)  # one pass at most: no sample twice


def _v1_codec(model, loader=None):
    from fgclip_mega.data.text_codec import ClipCodec

    return ClipCodec(model.cfg.text)


# ----------------------------------------------------------------------------- FG-CLIP 2


def _v2_model() -> type:
    from fgclip_mega.models.fgclip2 import FGCLIP2Model

    return FGCLIP2Model


def naflex_data(cfg: Config, data: DataConfig | None = None) -> tuple[DataConfig, object]:
    """(data config, shard set) of a FG-CLIP 2 run: `data.shards`, or the embedded mixed-size
    synthetic set built once in `data.synthetic_dir`, whose own tokenizer.json is used when
    `data.tokenizer` is empty."""
    from fgclip_mega.data.shards import open_shard_set
    from fgclip_mega.data.stream import storage_policy

    data = data or cfg.data
    if data.shards:
        return data, open_shard_set(data.shards, storage_policy(data))
    from fgclip_mega.data.embedded_naflex import ensure_synthetic_naflex_shards
    from fgclip_mega.data.synthetic import MixedSizes

    sizes = MixedSizes(patch_size=cfg.model.vision.patch_size, max_budget=data.max_patch_budget)
    index, tokenizer = ensure_synthetic_naflex_shards(
        data.synthetic_dir, data.synthetic_num_samples, sizes, seed=data.seed,
        num_negatives=data.num_hard_negatives,
    )  # fmt: skip
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=str(tokenizer))
    return data, open_shard_set(index)


def _v2_loader(cfg: Config, dp_rank: int, dp_size: int, device, data: DataConfig | None = None):
    from fgclip_mega.data.naflex_loader import NaFlexLoader

    data, shards = _v2_data(cfg, data)
    # Decoded by DALI (nvJPEG on a CUDA device) or PIL (data.loader, data.decode_device) and
    # handed over on `device`, as v1's loader does.
    return NaFlexLoader(
        data, _v2_tokenizer(cfg, data), patch_size=cfg.model.vision.patch_size,
        dp_rank=dp_rank, dp_size=dp_size, shards=shards, device=device,
    )  # fmt: skip


def _v2_data(cfg: Config, data: DataConfig | None) -> tuple[DataConfig, object]:
    data, shards = naflex_data(cfg, data)
    if not data.tokenizer:
        raise ConfigError(
            "data.tokenizer: FG-CLIP 2 reads its text with a SigLIP 2 tokenizer.json; give its "
            "path (the file or its folder)"
        )
    return data, shards


def _v2_tokenizer(cfg: Config, data: DataConfig):
    """data.tokenizer padding texts to the text tower's contexts (the tower pools the last
    position, so rows must be exactly model.text.short_context / long_context long)."""
    from fgclip_mega.data.siglip2_tokenizer import Siglip2Tokenizer

    t = cfg.model.text
    return Siglip2Tokenizer(data.tokenizer, t.short_context, t.long_context)


def _v2_eval_loader(cfg, dp_rank, dp_size, device, data=None, max_batches=None):
    from fgclip_mega.data.naflex_eval import NaFlexEvalLoader

    data, shards = _v2_data(cfg, data)
    # Every image at its own budget (layout-independent embeddings), so a pass takes a few
    # more batches than samples / global batch: max_batches bounds the samples, not batches.
    limit = None if max_batches is None else max_batches * data.micro_batch_size * dp_size
    loader = NaFlexEvalLoader(
        data, _v2_tokenizer(cfg, data), patch_size=cfg.model.vision.patch_size,
        dp_rank=dp_rank, dp_size=dp_size, shards=shards, max_samples=limit,
    )  # fmt: skip
    return loader, loader.num_batches


def _v2_codec(model, loader=None):
    from fgclip_mega.data.text_codec import Siglip2Codec

    return Siglip2Codec(getattr(loader, "tok", None))


def _v2_encode(model, batch, regional: bool):
    from fgclip_mega.objective.forward_fgclip2 import encode_naflex_batch

    return encode_naflex_batch(model, batch, regional)


def _v2_import(model, source) -> dict:
    from fgclip_mega.checkpoint.hf_fgclip2 import import_fgclip2_state_dict

    return import_fgclip2_state_dict(model, source)


def _v2_frozen(cfg: Config) -> tuple[str, ...]:
    # The dense head's MAP probe is never read: every patch is its own query there (upstream's
    # copy_dense_feature_head too). Stage 1 uses neither the dense head nor the box-text head.
    frozen = ("vision.dense_head.probe",)
    if cfg.train.stage != "regional":
        frozen += ("vision.dense_head.", "boxtext_head.")
    return frozen


FAMILIES = {
    "fgclip": Family(
        "fgclip",
        _v1_model,
        _v1_loader,
        _v1_encode,
        _v1_import,
        _v1_frozen,
        _v1_eval_loader,
        _v1_codec,
    ),
    "fgclip2": Family(
        "fgclip2",
        _v2_model,
        _v2_loader,
        _v2_encode,
        _v2_import,
        _v2_frozen,
        _v2_eval_loader,
        _v2_codec,
    ),
}


def family(cfg: Config | str) -> Family:
    name = cfg if isinstance(cfg, str) else cfg.model.family
    if name not in FAMILIES:
        raise ConfigError(f"model.family: {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_model(model: torch.nn.Module) -> Family:
    """The family of a built model (both keep their ModelConfig as `model.cfg`)."""
    return family(model.cfg.family)


def freeze_unused(model: torch.nn.Module, cfg: Config) -> list[str]:
    """Turns off requires_grad of the parameters `cfg`'s stage never trains; returns their names."""
    prefixes = family(cfg).stage_frozen(cfg)
    frozen = []
    for name, p in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


__all__ = ["FAMILIES", "Family", "family", "family_of_model", "freeze_unused", "naflex_data"]
