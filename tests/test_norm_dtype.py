"""Issue 21 item 4: the towers keep bf16 weights' dtype under CUDA's autocast policy.

CUDA autocast has `layer_norm` on its fp32 list: it runs the norm in fp32 and returns fp32 (CPU
autocast leaves it alone, so a CPU run never shows this). With bf16 weights an fp32 norm output
turns the residual stream, the tensors saved for backward and the sequence-parallel all-gathers
into fp32: twice the activation memory and gather traffic. Here `F.layer_norm` is replaced by
a stand-in that applies CUDA's policy whenever autocast is on, and every activation the towers
keep or send must still be bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fgclip_mega.config import ParallelConfig
from tests.builders import sample_inputs, small_config
from tests.distributed import run_distributed

BF16 = torch.bfloat16


def cuda_policy_layer_norm(original=F.layer_norm):
    """F.layer_norm as CUDA autocast runs it: every floating input cast to fp32, fp32 out."""

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled(input.device.type):
            return original(input, normalized_shape, weight, bias, eps)

        def up(t):
            return None if t is None else t.float()

        with torch.autocast(input.device.type, enabled=False):
            return original(input.float(), normalized_shape, up(weight), up(bias), eps)

    return layer_norm


def _probe_forward(model, images, tokens) -> dict[str, list]:
    """Runs both towers under bf16 autocast (with dense features and a backward) and records the
    dtypes of: block inputs/outputs, the inputs of the column-parallel layers (what sequence
    parallelism all-gathers), and every activation-sized tensor saved for backward."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from fgclip_mega.models.layers import Block

    seen: dict[str, list] = {"block_in": [], "block_out": [], "column_in": [], "saved": []}

    def block_hook(name):
        def hook(module, args, out) -> None:
            seen["block_in"].append((name, args[0].dtype))
            outs = out if isinstance(out, tuple) else (out,)
            seen["block_out"].extend((name, t.dtype) for t in outs)

        return hook

    def column_hook(name):
        def hook(module, args) -> None:
            seen["column_in"].append((name, args[0].dtype))

        return hook

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, Block):
            hooks.append(m.register_forward_hook(block_hook(name)))
        if isinstance(m, ColumnParallelLinear) and "projection" not in name:
            hooks.append(m.register_forward_pre_hook(column_hook(name)))
    width = min(model.cfg.vision.width, model.cfg.text.width)

    def pack(t):
        # Activations: floating, at least (tokens, width); norms' (N, B, 1) statistics are fp32
        # on every device and are left out, as are the fp32 temperatures (0-dim).
        if t.is_floating_point() and t.dim() >= 2 and t.shape[-1] >= width:
            seen["saved"].append((tuple(t.shape), t.dtype))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=BF16):
                image, dense = model.encode_image(images, with_dense=True)
                text = model.encode_text(tokens)
            loss = image.float().sum() + dense.float().sum() + text.float().sum()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    seen["outputs"] = [("image", image.dtype), ("dense", dense.dtype), ("text", text.dtype)]
    return seen


def _not_bf16(pairs) -> list:
    return [p for p in pairs if p[-1] != BF16]


def _assert_bf16(seen: dict[str, list]) -> None:
    assert seen["block_in"] and seen["column_in"] and seen["saved"]
    for key in ("block_in", "block_out", "column_in", "saved", "outputs"):
        assert _not_bf16(seen[key]) == [], (key, _not_bf16(seen[key])[:4])


def test_towers_keep_bf16_under_cuda_autocast_policy(world, monkeypatch):
    from fgclip_mega.models import FGCLIPModel

    monkeypatch.setattr(F, "layer_norm", cuda_policy_layer_norm())
    cfg = small_config()
    torch.manual_seed(0)
    model = FGCLIPModel(cfg, ParallelConfig(), params_dtype=BF16, compute_dtype=BF16)
    images, tokens = sample_inputs(cfg, 2, 3, 16)
    _assert_bf16(_probe_forward(model, images, tokens))


def test_stand_in_applies_cuda_policy():
    """The stand-in does what CUDA autocast does (and nothing outside autocast)."""
    ln = cuda_policy_layer_norm()
    x, w = torch.randn(3, 8, dtype=BF16), torch.ones(8, dtype=BF16)
    assert ln(x, (8,), w, w).dtype == BF16
    with torch.autocast("cpu", dtype=BF16):
        assert ln(x, (8,), w, w).dtype == torch.float32
        assert F.layer_norm(x, (8,), w, w).dtype == BF16  # CPU autocast's own policy


def _sp_gathers() -> dict:
    """TP=2 with sequence parallelism: dtypes of every all-gather in forward and backward."""
    from megatron.core.tensor_parallel import layers, mappings

    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.parallel import init_parallel

    init_parallel(ParallelConfig(tensor_parallel_size=2, sequence_parallel=True), seed=0)
    F.layer_norm = cuda_policy_layer_norm()  # a spawned process of its own: nothing to restore
    gathered: list = []
    for mod in (layers, mappings):
        original = mod.dist_all_gather_func

        def record(out, inp, *args, original=original, **kwargs):
            gathered.append((tuple(inp.shape), inp.dtype))
            return original(out, inp, *args, **kwargs)

        mod.dist_all_gather_func = record
    cfg = small_config()
    torch.manual_seed(0)
    model = FGCLIPModel(
        cfg,
        ParallelConfig(tensor_parallel_size=2, sequence_parallel=True),
        params_dtype=BF16,
        compute_dtype=BF16,
    )
    images, tokens = sample_inputs(cfg, 2, 3, 16)
    seen = _probe_forward(model, images, tokens)
    seen["gathers"] = gathered
    return seen


@pytest.mark.slow
def test_sequence_parallel_gathers_bf16_under_cuda_autocast_policy():
    for seen in run_distributed(_sp_gathers, 2):
        assert seen["gathers"], "sequence parallelism gathered nothing"
        assert _not_bf16(seen["gathers"]) == []
        _assert_bf16(seen)
