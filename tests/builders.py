"""Shared test builders: small and preset model configs, a perturbed transformers CLIPModel,
sample inputs, our model built on megatron's groups, the outputs both give, error measures. The
`world` fixture (a world of one with megatron's groups) is in conftest.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from fgclip_mega.config import ModelConfig, ParallelConfig, TextConfig, VisionConfig
from fgclip_mega.presets import PRESETS

EOS = 49407


# ----------------------------------------------------------------------------- references


def small_config() -> ModelConfig:
    """Odd token counts (17 image tokens, 77 text tokens) and widths divisible by TP 1, 2, 4."""
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_width=96),
        text=TextConfig(width=32, layers=2, heads=4, mlp_width=64),
        projection_dim=24,
    )


def b16_config() -> ModelConfig:
    return PRESETS["fgclip_vit_b16"]().model


def perturbed_clip(cfg: ModelConfig, seed: int = 0):
    """A random fp32 transformers CLIPModel (eager attention) whose biases, norms and scale are
    perturbed away from their 0/1 init so that every mapped tensor matters."""
    from transformers import CLIPModel

    from fgclip_mega.checkpoint import clip_config

    torch.manual_seed(seed)
    hf = CLIPModel(clip_config(cfg, attn_implementation="eager")).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
        hf.logit_scale.fill_(2.3)
    return hf.eval()


def fgclip_layout(hf, cfg: ModelConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """HF state dict plus FG-CLIP extras with values that differ from their derived defaults."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    t, p = cfg.text, cfg.projection_dim
    emb = "text_model.embeddings"
    sd[f"{emb}.position_embedding_ori.weight"] = torch.randn(t.long_context, t.width, generator=g)
    sd[f"{emb}.position_embedding_res.weight"] = torch.randn(t.long_context, t.width, generator=g)
    sd["text_filip_projection.weight"] = torch.randn(p, t.width, generator=g) * t.width**-0.5
    sd["logit_scale_finegraind"] = torch.tensor(3.1)
    sd["logit_scale_hardneg"] = torch.tensor(1.7)
    return sd


def sample_inputs(cfg: ModelConfig, n_images: int, n_texts: int, length: int, seed: int = 2):
    """Images (B, 3, S, S) and tokens (T, length): a random caption, EOS at a random place,
    then EOS or 0 padding (both occur in the wild; pooling takes the first EOS)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.randn(n_images, 3, s, s, generator=g)
    tokens = torch.randint(1, EOS - 1, (n_texts, length), generator=g)
    for i in range(n_texts):
        end = int(torch.randint(1, length, (1,), generator=g))
        tokens[i, end] = EOS
        tokens[i, end + 1 :] = EOS if i % 2 else 0
    return images, tokens


def long_reference(hf, sd: dict[str, torch.Tensor], cfg: ModelConfig):
    """A CLIPModel with 248 positions whose table is FG-CLIP's per-position choice (ori below
    the split, res above) and whose text projection is text_filip_projection: the long-text
    path written with transformers' modules."""
    from transformers import CLIPModel

    from fgclip_mega.checkpoint import clip_config

    t = cfg.text
    long_cfg = dataclasses.replace(cfg, text=dataclasses.replace(t, short_context=t.long_context))
    ref = CLIPModel(clip_config(long_cfg, attn_implementation="eager")).float().eval()
    emb = "text_model.embeddings"
    state = {k: v for k, v in sd.items() if k in ref.state_dict()}
    k = t.long_position_split
    ori, res = (
        sd[f"{emb}.position_embedding_ori.weight"],
        sd[f"{emb}.position_embedding_res.weight"],
    )
    state[f"{emb}.position_embedding.weight"] = torch.cat([ori[:k], res[k:]])
    state["text_projection.weight"] = sd["text_filip_projection.weight"]
    ref.load_state_dict(state, strict=True)
    return ref


@torch.no_grad()
def dense_by_hand(hf, images: torch.Tensor) -> torch.Tensor:
    """FG-CLIP dense features from HF's modules: the last block's input, its value path, then
    post_layernorm and visual_projection; (B, P, g, g)."""
    vm = hf.vision_model
    x = vm.pre_layrnorm(vm.embeddings(images))  # (B, N, D)
    for layer in vm.encoder.layers[:-1]:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    last = vm.encoder.layers[-1]
    x = x + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
    x = x + last.mlp(last.layer_norm2(x))
    x = hf.visual_projection(vm.post_layernorm(x[:, 1:]))  # (B, g*g, P)
    g = int(math.isqrt(x.shape[1]))
    return x.transpose(1, 2).reshape(x.shape[0], -1, g, g)


def hf_outputs(hf, images, tokens) -> dict[str, torch.Tensor]:
    out = hf(input_ids=tokens, pixel_values=images)
    return {
        "image": hf.get_image_features(pixel_values=images).pooler_output,
        "text": hf.get_text_features(input_ids=tokens).pooler_output,
        "logits": out.logits_per_image,
    }


def our_outputs(model, images, tokens) -> dict[str, torch.Tensor]:
    image, text = model.encode_image(images), model.encode_text(tokens)
    logits = (image / image.norm(dim=-1, keepdim=True)) @ (text / text.norm(dim=-1, keepdim=True)).T
    return {"image": image, "text": text, "logits": logits * model.logit_scale.exp()}


def probe_loss(out: dict[str, torch.Tensor], seed: int = 3) -> torch.Tensor:
    """A scalar that depends on every output with random weights (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=g)).sum() for _, v in sorted(out.items()))


def build_model(cfg: ModelConfig, parallel: ParallelConfig, source=None, seed: int = 5):
    from fgclip_mega.checkpoint import import_hf_state_dict
    from fgclip_mega.models import FGCLIPModel

    torch.manual_seed(seed)
    model = FGCLIPModel(cfg, parallel)
    if source is not None:
        import_hf_state_dict(model, source)
    return model


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def grad_errors(model, hf) -> dict[str, float]:
    """Per HF key: max |exported grad - HF grad| / max(1, max |HF grad|)."""
    from fgclip_mega.checkpoint import export_hf_state_dict

    ours = export_hf_state_dict(model, layout="clip", grads=True)
    errs = {}
    for name, p in hf.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        errs[name] = max_err(ours[name], ref) / max(1.0, ref.abs().max().item())
    return errs


# ----------------------------------------------------------------------------- RoIAlign


def make_rois(gen, n_img, h, w, k, scale=1.0, empty_images=(), dtype=torch.float32):
    # Boxes in feature-map pixels: mostly inside, some straddling or wholly outside the map, some
    # zero-area; then expressed in input units (divided by spatial_scale).
    cx = torch.rand(k, generator=gen) * (w + 8) - 4
    cy = torch.rand(k, generator=gen) * (h + 8) - 4
    bw = torch.rand(k, generator=gen) * w * 0.8
    bh = torch.rand(k, generator=gen) * h * 0.8
    bw[::7] = 0.0  # zero-area (a point)
    bh[3::9] = 0.0  # zero height only
    far = torch.arange(k) % 11 == 5  # wholly outside
    cx = torch.where(far, torch.full_like(cx, w + 6.0), cx)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1) / scale
    images = [i for i in range(n_img) if i not in empty_images]
    bidx = torch.tensor(images)[torch.randint(len(images), (k,), generator=gen)]
    return torch.cat([bidx[:, None].float(), boxes], dim=1).to(dtype)  # (K, 5)


# ----------------------------------------------------------------------------- training runs


def train_config(out: Path, data: Path, steps: int, **overrides):
    """The tiny preset cut to one layer per tower, 24 synthetic samples, micro-batch 4, a log
    line every step; overrides as section__field=value."""
    from fgclip_mega.presets import tiny

    cfg = tiny()
    cfg.model.vision.layers = 1
    cfg.model.text.layers = 1
    cfg.data.micro_batch_size = 4
    cfg.data.synthetic_num_samples = 24
    cfg.data.synthetic_dir = str(data)
    cfg.train.steps = steps
    cfg.train.log_interval = 1
    cfg.train.output_dir = str(out)
    cfg.optim.warmup_steps = 1
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def tiny_run_config(tmp: Path, stage: str, dtype: str = "fp32"):
    """The tiny preset cut to one layer per tower, micro-batch 4 and 8 synthetic samples: a
    TrainingRun of it builds and steps in seconds."""
    from fgclip_mega.presets import tiny

    cfg = tiny()
    cfg.model.vision.layers = 1
    cfg.model.text.layers = 1
    cfg.precision.params_dtype = cfg.precision.compute_dtype = dtype
    cfg.data.micro_batch_size = 4
    cfg.data.synthetic_num_samples = 8
    cfg.data.synthetic_dir = str(tmp / "data")
    cfg.train.stage = stage
    cfg.train.output_dir = str(tmp / f"run_{stage}_{dtype}")
    cfg.train.eval_batches = 0
    return cfg.validate()


def tiny_fgclip2_run_config(tmp: Path, stage: str, dtype: str = "fp32"):
    """fgclip2_tiny cut to one layer per tower, micro-batch 4 and 16 mixed-size synthetic scenes
    (with their own tokenizer.json): a FG-CLIP 2 TrainingRun that builds and steps in seconds."""
    from fgclip_mega.presets import fgclip2_tiny

    cfg = fgclip2_tiny()
    cfg.model.vision.layers = 1
    cfg.model.text.layers = 1
    cfg.precision.params_dtype = cfg.precision.compute_dtype = dtype
    cfg.data.micro_batch_size = 4
    cfg.data.synthetic_num_samples = 16
    cfg.data.synthetic_dir = str(tmp / "data_fgclip2")
    cfg.train.stage = stage
    cfg.train.output_dir = str(tmp / f"run_fgclip2_{stage}_{dtype}")
    cfg.train.eval_batches = 0
    return cfg.validate()


def build_run(world, cfg):
    """A TrainingRun in this process on the `world` fixture's groups, with cfg's runtime."""
    from fgclip_mega.runtime import resolve_runtime
    from fgclip_mega.train.build import build_training_run

    state = dataclasses.replace(
        world, runtime=resolve_runtime(cfg, world.device, with_decode=False)
    )
    return build_training_run(cfg, state)


def run_at_once(
    commands: dict[str, list[str]], env: dict[str, str], timeout: float
) -> dict[str, tuple[int, str, str]]:
    """Starts every command at once in the repository root (process start costs seconds of
    imports each), then waits for each: name -> (exit code, stdout, stderr)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    procs = {
        name: subprocess.Popen(
            cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )  # fmt: skip
        for name, cmd in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        results[name] = (proc.returncode, stdout, stderr)
    return results


# ----------------------------------------------------------------------------- raw datasets


def write_raw(root: Path, n: int, seed: int = 0, width: int = 160, height: int = 120) -> Path:
    """n synthetic FineHARD records as root/train.jsonl + root/images/train/*.jpg; returns the
    jsonl path."""
    from fgclip_mega.data.synthetic import write_raw_split

    return write_raw_split(root, "train", n, seed=seed, width=width, height=height)


def read_jsonl(path: Path) -> list[dict]:
    import json

    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def jpeg_bytes(color="red", size=(32, 24)) -> bytes:
    """A solid-colour JPEG file's bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()
