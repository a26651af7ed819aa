"""A tiny FG-CLIP 2 checkpoint in the released qihoo360/fg-clip2-* layout (config.json in
upstream's Fgclip2Config schema, model.safetensors, a local tokenizer.json) built from a random
transformers Siglip2Model plus distinct FG-CLIP 2 extras, and an independent reference for its
embeddings computed the upstream way without our model code: transformers' Siglip2Model and
Siglip2ImageProcessor (one image at a time at upstream's patch budget), transformers' fast
tokenizer called as upstream's eval scripts call it, the extra heads as plain linear maps on the
HF text model's pooled state, upstream's dense head formula and torchvision's roi_align on each
image's own patch grid in grid units."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.benchmark_fixtures import CAPTIONS, IMAGENET_CLASSES, INSTANCE_CLASSES

PATCH = 32  # 32-px patches keep the photos' grids small (budgets 128 to 1024 all occur)
TABLE = 4  # a 4 x 4 learnt position table (num_patches 16), resized to each image's grid
WIDTH, LAYERS, HEADS, MLP = 32, 2, 4, 64
VOCAB = 256  # the model's rows; the trained tokenizer has at most this many
SHORT, KEEP, LONG = 64, 20, 196
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


def _corpus() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    words = list(CAPTIONS.values()) + IMAGENET_CLASSES + INSTANCE_CLASSES + ["space suit"]
    words += [t("x") for t in OPENAI_IMAGENET_TEMPLATES]
    colours = "red blue green yellow purple black white pink orange brown grey ginger"
    words += [f"a {c} {t}" for c in colours.split() for t in ("cat", "wall", "cup", "flag")]
    return [w.lower() for w in words] * 3


def write_tokenizer(folder: Path) -> Path:
    """A small SigLIP-2-style BPE tokenizer.json (<pad>=0, <eos> appended) and its config."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIALS))
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tok.token_to_id("<eos>"))]
    )
    assert tok.get_vocab_size() <= VOCAB
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"pad_token": "<pad>", "eos_token": "<eos>", "padding_side": "right"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def config_json(heads: int = HEADS) -> dict:
    """Upstream Fgclip2Config's schema as the released checkpoints' config.json spell it."""
    return {
        "architectures": ["FG_CLIP2_Model"],
        "model_type": "fgclip2",
        "text_config": {
            "model_type": "fgclip2_text_model", "vocab_size": VOCAB, "hidden_size": WIDTH,
            "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": heads,
            "max_position_embeddings": SHORT, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "keep_len": KEEP, "longtext_len": LONG,
            "projection_size": WIDTH,
        },
        "vision_config": {
            "model_type": "fgclip2_vision_model", "hidden_size": WIDTH, "intermediate_size": MLP,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_channels": 3,
            "num_patches": TABLE * TABLE, "patch_size": PATCH,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
    }  # fmt: skip


def _hf_config():
    from transformers import Siglip2Config

    c = config_json()
    drop = ("model_type", "keep_len", "longtext_len")
    text = {k: v for k, v in c["text_config"].items() if k not in drop}
    vision = {k: v for k, v in c["vision_config"].items() if k != "model_type"}
    return Siglip2Config(text_config=text, vision_config=vision)


def write_checkpoint(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """folder/{config.json, model.safetensors, tokenizer.json}; returns the released state."""
    from safetensors.torch import save_file
    from transformers import Siglip2Model

    torch.manual_seed(seed)
    hf = Siglip2Model(_hf_config()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF initialises some tensors to constants: make every one distinct
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    state = {k: v.clone() for k, v in hf.state_dict().items() if not k.endswith("position_ids")}

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    for k in [k for k in state if k.startswith("vision_model.head.")]:
        dense = "dense_feature_head." + k[len("vision_model.head.") :]
        state[dense] = state[k] + rand(*state[k].shape)
    for name in ("ori", "res"):
        state[f"text_model.embeddings.position_embedding_{name}.weight"] = rand(
            LONG, WIDTH, scale=1
        )
    for head in ("longtext_head", "boxtext_head"):
        state[f"{head}.weight"] = state["text_model.head.weight"] + rand(WIDTH, WIDTH, scale=0.3)
        state[f"{head}.bias"] = rand(WIDTH)
    state["logit_scale_finegraind"] = torch.tensor(2.0)
    state["logit_scale_hardneg"] = torch.tensor(2.5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config_json()))
    write_tokenizer(folder)
    return state


def upstream_budget(w: int, h: int) -> int:
    """upstream image_processing_fgclip2._determine_max_value, restated."""
    n = (w // PATCH) * (h // PATCH)
    for limit, budget in ((784, 1024), (576, 784), (256, 576), (128, 256)):
        if n > limit:
            return budget
    return 128


class Reference2:
    """Embeddings of the FG-CLIP 2 checkpoint computed the upstream way, without our code."""

    def __init__(self, folder: Path, state: dict[str, torch.Tensor]):
        from transformers import PreTrainedTokenizerFast, Siglip2Model
        from transformers.models.siglip2.modeling_siglip2 import (
            Siglip2MultiheadAttentionPoolingHead,
        )

        self.hf = Siglip2Model(_hf_config()).eval()
        hf_keys = set(self.hf.state_dict())
        self.hf.load_state_dict({k: v for k, v in state.items() if k in hf_keys}, strict=False)
        self.dense = Siglip2MultiheadAttentionPoolingHead(_hf_config().vision_config).eval()
        prefix = "dense_feature_head."
        self.dense.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        self.state = state
        self.cache: dict = {}
        self.tok = PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>"
        )

    def _inputs(self, img, budget: int):
        from transformers import Siglip2ImageProcessor

        proc = Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=budget)
        return proc(images=img, return_tensors="pt")

    def _open(self, path: Path, box=None):
        from PIL import Image

        img = Image.open(path).convert("RGB")
        if box is not None:  # upstream's crop baseline: integer xywh box
            x, y, w, h = (int(v) for v in box)
            img = img.crop((x, y, x + w, y + h))
        return img

    @torch.no_grad()
    def image(self, path: Path, box=None, budget: int | None = None) -> torch.Tensor:
        key = ("image", str(path), tuple(box or ()), budget)
        if key not in self.cache:
            img = self._open(path, box)
            inp = self._inputs(img, budget or upstream_budget(*img.size))
            out = self.hf.get_image_features(
                pixel_values=inp["pixel_values"],
                pixel_attention_mask=inp["pixel_attention_mask"],
                spatial_shapes=inp["spatial_shapes"],
            )
            self.cache[key] = getattr(out, "pooler_output", out)[0]
        return self.cache[key]

    @torch.no_grad()
    def _dense_map(self, path: Path):
        """(1, D, gh, gw) dense head output with every patch as its query, and the image."""
        key = ("dense", str(path))
        if key not in self.cache:
            img = self._open(path)
            inp = self._inputs(img, upstream_budget(*img.size))
            gh, gw = inp["spatial_shapes"][0].tolist()
            hidden = self.hf.vision_model(
                pixel_values=inp["pixel_values"],
                pixel_attention_mask=inp["pixel_attention_mask"],
                spatial_shapes=inp["spatial_shapes"],
            ).last_hidden_state[:, : gh * gw]  # the valid patches (padding masked as keys)
            head = self.dense
            x = head.attention(hidden, hidden, hidden)[0]
            x = x + head.mlp(head.layernorm(x))
            self.cache[key] = (x.reshape(1, gh, gw, -1).permute(0, 3, 1, 2), img.size)
        return self.cache[key]

    @torch.no_grad()
    def region(self, path: Path, box) -> torch.Tensor:
        """upstream get_image_box_roi_features: dense head with every patch as its query, then
        roi_align (1 x 1, scale 1, adaptive sampling, aligned) on the image's (gh, gw) map with
        the xywh pixel box in grid units (normalize_and_tensorize_boxes_naflex)."""
        from torchvision.ops import roi_align

        fmap, (W, H) = self._dense_map(path)
        gh, gw = fmap.shape[-2:]
        bx, by, bw, bh = box
        grid = torch.tensor([[0, bx / W * gw, by / H * gh, (bx + bw) / W * gw, (by + bh) / H * gh]])
        return roi_align(fmap, grid, (1, 1), 1.0, -1, True)[0, :, 0, 0]

    @torch.no_grad()
    def texts(self, texts: list[str], head: str) -> torch.Tensor:
        """upstream get_text_features(walk_type=head) on tokenizer([t.lower()], max_length=L,
        padding="max_length", truncation=True).input_ids (no text attention mask, as trained)."""
        length = LONG if head == "long" else SHORT
        ids = self.tok(
            [t.lower() for t in texts], padding="max_length", max_length=length, truncation=True
        ).input_ids
        ids = torch.tensor(ids)
        tm = self.hf.text_model
        if head == "short":
            out = self.hf.get_text_features(input_ids=ids)
            return getattr(out, "pooler_output", out)
        emb = tm.embeddings.token_embedding(ids)
        if head == "long":
            s = self.state
            ori = s["text_model.embeddings.position_embedding_ori.weight"]
            res = s["text_model.embeddings.position_embedding_res.weight"]
            keep = (torch.arange(LONG) < KEEP).float()[:, None]
            emb = emb + ori * keep + res * (1 - keep)
        else:
            emb = emb + tm.embeddings.position_embedding.weight
        hidden = tm.encoder(inputs_embeds=emb, attention_mask=None).last_hidden_state
        pooled = tm.final_layer_norm(hidden)[:, -1]
        name = "longtext_head" if head == "long" else "boxtext_head"
        return F.linear(pooled, self.state[f"{name}.weight"], self.state[f"{name}.bias"])
