import dataclasses
import subprocess
import sys

import pytest

from fgclip_mega.config import Config, ConfigError, apply_cli
from fgclip_mega.presets import PRESETS, fgclip_vit_b16, fgclip_vit_l14_336, load_config, tiny


def _all_fields(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        yield f"{prefix}{f.name}", f
        if dataclasses.is_dataclass(value):
            yield from _all_fields(value, f"{prefix}{f.name}.")


def test_every_field_has_a_one_line_docstring():
    import ast
    import inspect

    import fgclip_mega.config as mod

    tree = ast.parse(inspect.getsource(mod))
    missing = []
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        body = cls.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                ok = (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                    and "\n" not in nxt.value.value.strip()
                )
                if not ok:
                    missing.append(f"{cls.name}.{stmt.target.id}")
    assert not missing, missing


def test_presets_match_the_published_architectures():
    b16 = fgclip_vit_b16().validate()
    assert (b16.model.vision.image_size, b16.model.vision.patch_size) == (224, 16)
    assert (b16.model.vision.width, b16.model.vision.layers, b16.model.vision.heads) == (
        768,
        12,
        12,
    )
    assert (b16.model.text.width, b16.model.text.layers, b16.model.projection_dim) == (512, 12, 512)
    assert (b16.model.text.short_context, b16.model.text.long_context) == (77, 248)
    l14 = fgclip_vit_l14_336().validate()
    assert (l14.model.vision.image_size, l14.model.vision.patch_size) == (336, 14)
    assert (l14.model.vision.width, l14.model.vision.layers) == (1024, 24)
    assert (l14.model.text.width, l14.model.projection_dim) == (768, 768)
    assert l14.model.vision.grid_size == 24 and b16.model.vision.grid_size == 14
    t = tiny().validate()
    assert t.model.vision.image_size == 64 and t.model.vision.layers <= 4
    loss = Config().loss
    assert (loss.long_weight, loss.short_weight, loss.region_weight, loss.hard_weight) == (
        1.0,
        1.0,
        0.1,
        0.5,
    )
    assert set(PRESETS) == {
        "fgclip_vit_b16", "fgclip_vit_l14_336", "tiny",
        "fgclip2_base_naflex", "fgclip2_so400m_naflex", "fgclip2_tiny",
    }  # fmt: skip
    for name, make in PRESETS.items():
        assert (make().model.family == "fgclip2") == name.startswith("fgclip2_"), name


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  vision:\n    layers: 3\nparallel:\n  tensor_parallel_size: 2\n"
        "optim:\n  lr: 3.0e-4\n"
    )
    overrides = ["optim.lr=1e-3", "loss.kind=sigmoid", "model.logit_bias_init=-10",
                 "parallel.sequence_parallel=true"]  # fmt: skip
    cfg = load_config("tiny", str(path), overrides)
    assert cfg.model.vision.layers == 3
    assert cfg.parallel.tensor_parallel_size == 2
    assert cfg.optim.lr == pytest.approx(1e-3)  # CLI wins over YAML
    assert cfg.loss.kind == "sigmoid" and cfg.parallel.sequence_parallel is True
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "pair, field_name",
    [
        ("model.vision.layerz=3", "layerz"),
        ("nosuch.x=1", "nosuch"),
        ("model.vision.layers=three", "model.vision.layers"),
        ("loss.kind=cosine", "loss.kind"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
        ("model.vision.layers.x=1", "model.vision.layers"),
        ("model.vision=3", "model.vision"),
        ("optim.lr", "optim.lr"),
    ],
)
def test_bad_override_names_the_field(pair, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        apply_cli(tiny(), [pair])


def test_yaml_unknown_key_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=r"data\.micro_batch"):
        load_config("tiny", str(path))


@pytest.mark.parametrize(
    "pair, field_name",
    [
        ("parallel.tensor_parallel_size=3", "model.vision.heads"),
        ("model.vision.patch_size=7", "model.vision.image_size"),
        ("model.text.long_position_split=100", "model.text.long_position_split"),
        ("data.micro_batch_size=-1", "data.micro_batch_size"),
        # Issue 11: values that used to be accepted and failed late (or trained nonsense).
        ("train.steps=-1", "train.steps"),
        ("train.steps=0", "train.steps"),
        ("train.eval_batches=-1", "train.eval_batches"),
        ("train.log_interval=-5", "train.log_interval"),
        ("train.eval_interval=-1", "train.eval_interval"),
        ("checkpoint.save_interval=-1", "checkpoint.save_interval"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("optim.beta2=1.0", "optim.beta2"),
        ("optim.vision_lr_mult=0", "optim.vision_lr_mult"),
        ("optim.vision_lr_mult=nan", "optim.vision_lr_mult"),
        ("model.logit_scale_init=nan", "model.logit_scale_init"),
        ("model.logit_scale_init=inf", "model.logit_scale_init"),
        ("loss.region_weight=-0.1", "loss.region_weight"),
        ("loss.kind=sigmoid", "model.logit_bias_init"),
        ("parallel.checkpoint_every=0", "parallel.checkpoint_every"),
    ],
)
def test_validation_names_the_field(pair, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        load_config("tiny", None, [pair])


def test_missing_input_paths_name_the_field(tmp_path):
    for field in ("data.shards", "data.eval_shards", "checkpoint.init_from", "checkpoint.load"):
        cfg = load_config("tiny", None, [f"{field}={tmp_path / 'nope'}"])
        with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*no such file"):
            cfg.check_paths()
    load_config("tiny", None, [f"data.eval_shards={tmp_path}"]).check_paths()  # exists: fine


def test_world_size_must_be_divisible_by_tp():
    cfg = load_config("tiny", None, ["parallel.tensor_parallel_size=2"])
    assert cfg.parallel.data_parallel_size(4) == 2
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        cfg.validate(world_size=3)


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="preset"):
        load_config("vit_h")


def test_package_imports_without_optional_accelerators_and_env_reports_them():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util, fgclip_mega, fgclip_mega.config, fgclip_mega.parallel\n"
            "from fgclip_mega import env\n"
            "names = {f.name: f for f in env.probe()}\n"
            "for n in ('cuda', 'flash_attn', 'apex', 'dali_gpu_decode', 'triton'):\n"
            "    f = names[n]; assert f.available or f.fallback, n\n"
            "run = env.run_settings('fgclip_vit_b16')\n"
            "assert {'params_dtype', 'compute_dtype', 'attention'} <= set(run), run\n"
            "print('OK', names['flash_attn'].fallback)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import torch

    if not torch.cuda.is_available():  # flash-attn is never used without CUDA
        assert "OK torch scaled_dot_product_attention" in out.stdout


def test_fgclip2_has_no_projection_width_to_set():
    """FG-CLIP 2's towers and heads are all (D, D): a projection_dim or text width that differs
    from the vision width would be silently ignored by the model, so it is refused by name."""
    from fgclip_mega.presets import fgclip2_tiny

    fgclip2_tiny().validate()
    for key, value in (("model.projection_dim", "128"), ("model.text.width", "96")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": .*no projections"):
            load_config("fgclip2_tiny", None, [f"{key}={value}"])
