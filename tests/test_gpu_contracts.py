"""GPU behaviours imitated on CPU (issue 12): each test stands for a class of bug that only a GPU
run would otherwise show.

- device placement: a train step run with the default device set to `meta` while the model and
  the batch are on the CPU; any tensor made without an explicit device lands on `meta` and mixing
  it with the step's tensors fails, as a CPU tensor mixed with CUDA tensors fails on a GPU;
- dtype/layout contract of attention: under bf16 autocast (fp32 or bf16 params) a stand-in flash
  function asserts what flash-attn requires (bf16, unit last-dim stride, head dim, causal flag);
- activation checkpointing under autocast: the recompute equals the forward bitwise and the
  gradients equal the run without checkpointing;
- bf16 weights with megatron's mixed-precision optimizer: temperatures are clamped where the
  optimizer keeps them (their main copy), not on a copy that the next step overwrites.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fgclip_mega.config import ParallelConfig
from fgclip_mega.presets import fgclip_vit_b16, tiny
from fgclip_mega.runtime import resolve_runtime
from tests.builders import build_run, tiny_run_config


@pytest.mark.parametrize("stage", ["global", "regional"])
def test_train_step_creates_no_tensor_on_the_default_device(world, tmp_path, stage):
    from fgclip_mega.train.loop import _read_values
    from fgclip_mega.train.step import train_step

    run = build_run(world, tiny_run_config(tmp_path, stage))
    try:
        batch = next(run.loader).to("cpu")
        torch.set_default_device("meta")
        try:
            for step in (1, 2):  # the second step also runs the optimizer on existing state
                out = train_step(run, batch, step)
                logged = _read_values(run, out)
        finally:
            torch.set_default_device(None)
    finally:
        run.loader.close()
    assert out.values.device.type == "cpu"
    assert all(isinstance(v, float) for v in logged.values())
    assert ("hard" in logged) == (stage == "regional")


def _stand_in_flash(calls: list):
    import torch.nn.functional as F

    def flash(q, k, v, causal):
        for t in (q, k, v):
            assert t.dtype == torch.bfloat16, f"flash-attn takes bf16/fp16, got {t.dtype}"
            assert t.stride(-1) == 1, "flash-attn needs unit stride in the head dim"
            assert t.shape == q.shape
        calls.append((q.shape[-1], causal))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return out.transpose(1, 2)

    return flash


@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
def test_attention_gets_what_flash_attn_requires_under_bf16_autocast(
    world, monkeypatch, params_dtype
):
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.models import attention as attn

    calls = []
    monkeypatch.setattr(attn, "flash_attention", _stand_in_flash(calls))
    cfg = tiny().model
    torch.manual_seed(0)
    model = FGCLIPModel(
        cfg,
        ParallelConfig(),
        params_dtype=params_dtype,
        compute_dtype=torch.bfloat16,
        attention_backend="flash",  # as resolved on a GPU with flash-attn
    )
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(1, 1000, (3, 16))
    tokens[:, -1] = cfg.text.eos_token_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = model.encode_image(images)
        text = model.encode_text(tokens)
    assert torch.isfinite(image.float()).all() and torch.isfinite(text.float()).all()
    vision_hd = cfg.vision.width // cfg.vision.heads
    text_hd = cfg.text.width // cfg.text.heads
    assert (vision_hd, False) in calls and (text_hd, True) in calls
    assert len(calls) == cfg.vision.layers + cfg.text.layers


@pytest.mark.parametrize(
    "granularity,every", [("block", 1), ("mlp", 1), ("block", 2)], ids=["block", "mlp", "every2"]
)
def test_activation_checkpointing_recomputes_the_autocast_forward(world, granularity, every):
    from fgclip_mega.models import FGCLIPModel

    cfg = dataclasses.replace(tiny().model)
    cfg.vision = dataclasses.replace(cfg.vision, layers=3)
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    runs = {}
    for ckpt in (False, True):
        parallel = ParallelConfig(
            activation_checkpointing=ckpt, checkpoint_granularity=granularity,
            checkpoint_every=every,
        )  # fmt: skip
        torch.manual_seed(0)
        model = FGCLIPModel(cfg, parallel)
        seen: list[torch.Tensor] = []
        # fc1 runs early in what is recomputed (torch stops a recompute once it has every saved
        # tensor back, so a hook on a module's last op may never fire again).
        hooks = [
            b.mlp.fc1.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o[0].detach()))
            for b in model.vision.transformer.blocks
        ]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.encode_image(images)
        n_forward = len(seen)
        out.float().square().sum().backward()
        for h in hooks:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[ckpt] = (seen, n_forward, grads, out.detach())
    plain, ckpt = runs[False], runs[True]
    seen, n_forward = ckpt[0], ckpt[1]
    recomputed = seen[n_forward:]
    assert recomputed, "checkpointing recomputed nothing"
    expected = 3 if every == 1 else 2  # blocks 0, k, 2k, ...
    assert len(recomputed) == expected
    first = {id(t): t for t in seen[:n_forward]}
    assert len(first) == n_forward
    # Recomputed fc1 outputs are the forward's, bitwise (same dtype: the recompute re-entered
    # autocast), in reverse block order.
    for again, orig in zip(
        recomputed, reversed([seen[i] for i in range(0, 3, every)]), strict=True
    ):
        assert again.dtype == orig.dtype
        assert torch.equal(again, orig)
    assert torch.equal(plain[3], ckpt[3])
    assert plain[2].keys() == ckpt[2].keys()
    for name, g in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], g, rtol=1e-5, atol=1e-6, msg=name)


def _main_param(optimizer, param):
    """The param the optimizer steps for `param` (its fp32 main copy, or itself)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_group, main_group in zip(
            getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", []),
            strict=True,
        ):  # fmt: skip
            for p, main in zip(model_group, main_group, strict=True):
                if p is param:
                    return main
        for group in opt.optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return param
    raise AssertionError("param not found in the optimizer")


def test_bf16_weights_clamp_temperatures_on_the_main_copy(world, tmp_path):
    from fgclip_mega.train.step import train_step

    cfg = tiny_run_config(tmp_path, "global", "bf16")
    run = build_run(world, cfg)
    try:
        model = run.model
        assert model.vision.transformer.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
        w = model.vision.transformer.blocks[0].mlp.fc1.weight
        assert _main_param(run.optimizer, w).dtype == torch.float32  # mixed precision
        with torch.no_grad():
            model.logit_scale.fill_(6.0)  # above ln 100, e.g. a checkpoint from elsewhere
        batch = next(run.loader).to("cpu")
        for step in (1, 2):
            train_step(run, batch, step)
            cap = cfg.loss.max_logit_scale
            for name, p in model.temperatures().items():
                main = _main_param(run.optimizer, p)
                assert p.dtype == main.dtype == torch.float32, name
                assert main.item() <= cap + 1e-6 and p.item() <= cap + 1e-6, (name, main.item())
    finally:
        run.loader.close()


def test_runtime_on_an_imitated_gpu_machine():
    # What a GPU run resolves to (no CUDA call is made: only the decisions).
    gpu = torch.device("cuda", 0)
    b16 = resolve_runtime(fgclip_vit_b16(), gpu, with_decode=False)
    assert b16.params_dtype == b16.compute_dtype == torch.bfloat16
    assert b16.contrastive == "triton"
    assert b16.attention in ("flash", "sdpa")  # flash only with a working flash-attn
    assert b16.roi_align in ("cuda", "missing")
    small = resolve_runtime(tiny(), gpu, with_decode=False)
    assert small.params_dtype == torch.float32  # the CPU preset stays fp32
    cpu = resolve_runtime(fgclip_vit_b16(), torch.device("cpu"), with_decode=False)
    assert cpu.params_dtype == torch.float32 and cpu.contrastive == "chunked"
