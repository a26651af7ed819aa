"""SigLIP training end to end (issue 10): loss.kind=sigmoid with the model's learnable logit bias
trains, checkpoints, resumes exactly and exports. The loss itself is checked against float64
references at DP=1 and DP=2 in tests/test_losses.py and tests/test_losses_distributed.py."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from fgclip_mega.config import ConfigError
from fgclip_mega.presets import load_config


def _overrides(tmp, steps: int) -> list[str]:
    return [
        "loss.kind=sigmoid",
        f"model.logit_scale_init={math.log(10)}",
        "model.logit_bias_init=-10.0",
        "model.vision.layers=1",
        "model.text.layers=1",
        "data.micro_batch_size=4",
        "data.synthetic_num_samples=16",
        f"data.synthetic_dir={tmp / 'data'}",
        f"train.steps={steps}",
        "train.log_interval=1",
        "train.eval_batches=0",
        "checkpoint.save_interval=2",
        "checkpoint.async_save=false",
        "optim.warmup_steps=0",
        "optim.lr=1e-3",
    ]


def test_sigmoid_needs_the_bias_in_the_config():
    with pytest.raises(ConfigError, match="model.logit_bias_init"):
        load_config("tiny", None, ["loss.kind=sigmoid"])


@pytest.mark.slow
def test_siglip_trains_checkpoints_resumes_and_exports(tmp_path):
    from fgclip_mega.checkpoint import export_hf_state_dict
    from fgclip_mega.train.loop import train

    full = train(load_config("tiny", None, [*_overrides(tmp_path, 4),
                                            f"train.output_dir={tmp_path / 'full'}"]))  # fmt: skip
    assert [r["step"] for r in full.losses] == [1, 2, 3, 4]
    assert all(r["bias"] != -10.0 for r in full.losses[1:])  # the bias is learnt
    assert full.losses[0]["bias"] == pytest.approx(-10.0)
    assert full.losses[-1]["loss"] < full.losses[0]["loss"]

    # Interrupted after the step-2 checkpoint (step 4's removed), resumed to 4: the same losses,
    # bias included, as the uninterrupted run.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000002", cut / "checkpoints" /
                    "step_00000002")  # fmt: skip
    resumed = train(load_config("tiny", None, [*_overrides(tmp_path, 4),
                                               f"train.output_dir={cut}"]))  # fmt: skip
    assert resumed.steps_done == 2
    for a, b in zip(full.losses[2:], resumed.losses, strict=True):
        assert a == b

    # The checkpoint holds the bias; a model built from it exports it in the FG-CLIP layout.
    state = torch.load(cut / "checkpoints" / "step_00000004" / "model.pt", weights_only=False)
    assert state["logit_bias"].item() == pytest.approx(full.losses[-1]["bias"], abs=1e-3)
    exported = _export_from(state, export_hf_state_dict)
    assert torch.equal(
        exported["logit_bias"], state["logit_bias"].reshape(exported["logit_bias"].shape)
    )


def _export_from(state, export_hf_state_dict):
    import torch.distributed as dist

    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.parallel import destroy_parallel, init_parallel
    from fgclip_mega.presets import tiny

    started = not dist.is_initialized()
    init_parallel(ParallelConfig())
    try:
        cfg = tiny().model
        cfg.vision.layers = cfg.text.layers = 1
        cfg.logit_bias_init = -10.0
        model = FGCLIPModel(cfg, ParallelConfig())
        model.load_state_dict(state)
        return export_hf_state_dict(model)
    finally:
        if started:
            destroy_parallel()
