"""run/probe_texture.py's pixel features: RoI means that tell stripe orientation apart (the
baseline the README quotes beside the model's texture probe)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(ROOT))
    from run import probe_texture

    return probe_texture


def test_pixel_features_separate_vertical_from_horizontal_stripes(probe):
    s = 32
    xx = torch.arange(s).view(1, s).expand(s, s)
    img = torch.zeros(1, 3, s, s)
    img[0, :, :, : s // 2] = ((xx[:, : s // 2] // 2) % 2).float()  # left: vertical stripes
    img[0, :, :, s // 2 :] = ((xx.T[:, s // 2 :] // 2) % 2).float()  # right: horizontal ones
    batch = SimpleNamespace(
        images=img,
        region_rois=torch.tensor([[0, 0.0, 0.0, 0.5, 1.0], [0, 0.5, 0.0, 1.0, 1.0]]),
        hard_rows=torch.tensor([1, 0]),
    )
    f = probe.pixel_features(batch)  # rows follow hard_rows: right box first
    assert f.shape == (2, 18)
    dx, dy = f[:, 6:9].mean(1), f[:, 9:12].mean(1)
    assert dy[0] > 3 * dx[0] and dx[1] > 3 * dy[1]
    # Both boxes are half shade: their colour means agree, only the differences tell them apart.
    assert torch.allclose(f[0, :6], f[1, :6], atol=0.05)


def test_box_labels_and_confusion(probe):
    from fgclip_mega.data.tokenizer import tokenize

    rows = torch.from_numpy(tokenize(["a small red striped circle", "a large blue plain star"], 16))
    batch = SimpleNamespace(hardneg_tokens=rows[:, None, :])
    y = probe.box_labels(batch)
    assert [probe.TEXTURES[i] for i in y] == ["striped", "plain"]
    assert probe.confusion(y, torch.tensor([1, 1])) == {"plain->striped": 1, "striped->striped": 1}
