"""DALI decoding in the FG-CLIP 2 NaFlex loader, against the PIL reference loader.

The PIL loader's batches equal HF's Siglip2ImageProcessor (test_naflex_loader.py), so DALI
batches equal to them bit for bit are HF's too. DALI's CPU decoder (libjpeg-turbo) decodes our
JPEGs exactly as PIL does, including grey, CMYK, progressive, 4:4:4 and EXIF-rotated files (the
rotation ignored, as PIL and the stored sizes do): pixels are compared with torch.equal.

The GPU path (nvJPEG, data.decode_device=mixed) cannot run here: the dispatch is checked with a
CUDA device faked at DALI's device count, the hand-over to a device with the meta device, and
the real path by `test_mixed_gpu_decode_matches_cpu` on a GPU (run/gpu_check.sh).
"""

from __future__ import annotations

import io
import json
import os
import weakref

import numpy as np
import pytest
import torch

from fgclip_mega.config import DataConfig
from fgclip_mega.data import loader as v1_loader
from fgclip_mega.data.embedded_naflex import ensure_synthetic_naflex_shards
from fgclip_mega.data.naflex import NaFlexError, pack_images
from fgclip_mega.data.naflex_loader import NaFlexLoader
from fgclip_mega.data.shards import write_index, write_shard
from fgclip_mega.data.synthetic import MixedSizes

P, MAX_BUDGET = MixedSizes().patch_size, MixedSizes().max_budget  # 8, 256
FIELDS = ("pixels", "valid", "long_tokens", "short_tokens", "region_rois", "region_tokens",
          "hard_rows", "hardneg_tokens", "sample_ids", "sample_epochs")  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """24 mixed-size synthetic scenes (budgets 128 and 256 at patch 8) in 3 shards."""
    index, tok = ensure_synthetic_naflex_shards(
        tmp_path_factory.mktemp("naflex_dali"), num_samples=24, shard_size=8
    )
    return index.parent, tok.parent


def _cfg(root, tok, **kw) -> DataConfig:
    base = dict(shards=str(root), micro_batch_size=3, max_boxes=3, num_hard_negatives=10,
                read_block_size=4, shuffle_window_blocks=2, seed=1, num_threads=2,
                tokenizer=str(tok))  # fmt: skip
    return DataConfig(**{**base, **kw})


def _loader(data, rank=0, dp=1, **kw) -> NaFlexLoader:
    return NaFlexLoader(_cfg(*data, **kw), patch_size=P, max_budget=MAX_BUDGET, dp_rank=rank,
                        dp_size=dp)  # fmt: skip


def _assert_same(a, b) -> None:
    assert (a.budget, a.grids, a.keys) == (b.budget, b.grids, b.keys)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_dali_batches_equal_pil_batches_and_close_stops_dali(synthetic):
    with _loader(synthetic, loader="pil") as pil:
        want = [next(pil) for _ in range(10)]  # > 1 epoch (8 batches of 3)
        assert pil.decoder.kind == "pil"
    before = _threads()
    dali = _loader(synthetic, loader="dali")
    assert (dali.decoder.kind, dali.decoder.decode_device) == ("dali", "cpu")
    got = [next(dali) for _ in range(10)]
    for a, b in zip(got, want, strict=True):
        _assert_same(a, b)
    assert {b.budget for b in got} == {128, 256}  # the set really mixes budgets
    assert sum(len(b.hard_rows) for b in got) > 0 and sum(len(b.region_rois) for b in got) > 0
    # close() tears DALI down now (no later GC pass): the pipeline is gone, its threads too.
    pipe = weakref.ref(dali.decoder._pipe)
    assert _threads() >= before + dali.decoder.num_threads
    dali.close()
    assert pipe() is None and _threads() <= before


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=87, **kw)
    return buf.getvalue()


def _odd_jpegs() -> dict[str, bytes]:
    """JPEG variants a real dataset has, at sizes that are not multiples of the patch."""
    from PIL import Image

    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 255, 61)[None, :, None] * np.ones((43, 1, 3))
    rgb = Image.fromarray((0.6 * ramp + rng.integers(0, 100, (43, 61, 3))).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": DALI would apply it by default, PIL does not
    return {
        "grey.jpg": _jpeg(rgb.convert("L")),
        "cmyk.jpg": _jpeg(rgb.convert("CMYK")),
        "progressive.jpg": _jpeg(rgb, progressive=True),
        "444.jpg": _jpeg(rgb, subsampling=0),
        "exif_rotated.jpg": _jpeg(rgb, exif=exif),
        "tall.jpg": _jpeg(rgb.transpose(Image.Transpose.ROTATE_90).resize((19, 150))),
    }


def _write(root, images: dict[str, bytes]) -> None:
    from PIL import Image

    from tests.test_naflex_loader import K, _sample

    samples = []
    for i, (key, data) in enumerate(images.items()):
        s = _sample(i, 40, 40)  # captions and boxes; the image replaced
        s.key, s.image = key, data
        try:
            s.width, s.height = Image.open(io.BytesIO(data)).size
        except Exception:  # noqa: BLE001 - the corrupt case: the size a builder would have read
            s.width, s.height = 40, 40
        samples.append(s)
    write_shard(root / "shard-000000.zarr", samples, K)
    write_index(root, [{"path": "shard-000000.zarr", "num_samples": len(samples)}], {})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tests.test_siglip2_tokenizer import _write_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    _write_tokenizer(tok)
    return tok


def test_dali_decodes_jpeg_variants_as_pil(tmp_path, tokenizer_dir):
    from tests.test_naflex_loader import K

    _write(tmp_path, _odd_jpegs())
    batches = {}
    for kind in ("dali", "pil"):
        cfg = _cfg(tmp_path, tokenizer_dir, micro_batch_size=2, num_hard_negatives=K, loader=kind)
        with NaFlexLoader(cfg, patch_size=P, max_budget=MAX_BUDGET) as ld:
            batches[kind] = [next(ld) for _ in range(3)]
    assert sorted(k for b in batches["dali"] for k in b.keys) == sorted(_odd_jpegs())
    for a, b in zip(batches["dali"], batches["pil"], strict=True):
        _assert_same(a, b)


def _summary(batch):
    return (batch.budget, batch.keys, batch.pixels.double().sum().item(),
            batch.region_tokens.sum().item(), batch.hardneg_tokens.sum().item())  # fmt: skip


def test_dali_resume_is_exact_and_dp2_ranks_share_budgets(synthetic):
    with _loader(synthetic, loader="dali") as ld:
        straight = [_summary(next(ld)) for _ in range(12)]
    with _loader(synthetic, loader="dali") as ld:
        first = [_summary(next(ld)) for _ in range(5)]
        state = json.loads(json.dumps(ld.state_dict()))  # as a checkpoint stores it
    with _loader(synthetic, loader="dali") as ld:
        ld.load_state_dict(state)
        assert first + [_summary(next(ld)) for _ in range(7)] == straight
    # DP=2: both ranks' loaders in one process (each reads only its own JPEGs).
    ranks = [_loader(synthetic, rank=r, dp=2, micro_batch_size=2, loader="dali") for r in (0, 1)]
    with _loader(synthetic, rank=1, dp=2, micro_batch_size=2, loader="pil") as pil1:
        for _ in range(6):  # 6 x 2 x 2 = 24 samples
            b0, b1, ref = next(ranks[0]), next(ranks[1]), next(pil1)
            assert b0.budget == b1.budget and b0.pixels.shape == b1.pixels.shape
            assert not set(b0.keys) & set(b1.keys)
            _assert_same(b1, ref)
    for ld in ranks:
        ld.close()


@pytest.mark.parametrize("kind", ["dali", "pil"])
@pytest.mark.parametrize("damage", ["truncated", "not_a_jpeg"])
def test_corrupt_jpeg_is_one_error_naming_the_sample(tmp_path, tokenizer_dir, kind, damage):
    from tests.test_naflex_loader import K

    good = _odd_jpegs()
    bad = good["444.jpg"][: len(good["444.jpg"]) // 3] if damage == "truncated" else b"GIF89a.."
    # The culprit third in a batch of four: the error must not name its neighbours.
    images = {"a.jpg": good["grey.jpg"], "b.jpg": good["444.jpg"], "broken.jpg": bad,
              "d.jpg": good["cmyk.jpg"]}  # fmt: skip
    _write(tmp_path, images)
    cfg = _cfg(tmp_path, tokenizer_dir, micro_batch_size=4, num_hard_negatives=K, loader=kind,
               read_block_size=8, seed=0)  # fmt: skip
    with NaFlexLoader(cfg, patch_size=P, max_budget=MAX_BUDGET) as ld:
        with pytest.raises(NaFlexError) as err:
            next(ld)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'shard-000000.zarr'} row 2 (broken.jpg): the JPEG does")
    assert "\n" not in msg and kind.upper() in msg.upper()
    if kind == "dali":  # DALI's error gives no reason: PIL's verdict is added
        assert ld.decoder._pipe is None  # the failed pipeline was dropped
        assert ": DALI cpu: " in msg and "; PIL: " in msg


def test_dali_failure_of_a_whole_batch_blames_no_sample(tmp_path, tokenizer_dir, monkeypatch):
    # A failure that is not one JPEG's (e.g. out of device memory) must not be pinned on the
    # batch's first sample: each sample is retried alone, and only one failing alone is named.
    from fgclip_mega.data.naflex_dali import DaliDecoder
    from tests.test_naflex_loader import K

    _write(tmp_path, {k: v for k, v in list(_odd_jpegs().items())[:2]})
    real = DaliDecoder._run

    def flaky(self, jpegs):
        if len(jpegs) > 1:
            raise RuntimeError("Critical error in pipeline:\nout of memory")
        return real(self, jpegs)

    monkeypatch.setattr(DaliDecoder, "_run", flaky)
    cfg = _cfg(tmp_path, tokenizer_dir, micro_batch_size=2, num_hard_negatives=K, loader="dali")
    with NaFlexLoader(cfg, patch_size=P, max_budget=MAX_BUDGET) as ld:
        with pytest.raises(NaFlexError, match=r"DALI \(cpu\) failed on the batch \[(grey|cmyk)"
                           r".jpg, (grey|cmyk).jpg\] although each JPEG decodes on its own: "
                           r"Critical error in pipeline:$"):  # fmt: skip
            next(ld)


def test_decode_device_dispatch(synthetic, monkeypatch):
    root, tok = synthetic
    make = lambda device="cpu", **kw: NaFlexLoader(  # noqa: E731
        _cfg(root, tok, **kw), patch_size=P, max_budget=MAX_BUDGET, device=device
    )
    # data.loader as v1: auto = DALI where installed (the fallback to PIL is v1's function,
    # tested in test_loader.py); kind= overrides it.
    assert v1_loader.resolve_loader_kind("auto") == "dali"
    with make() as ld:
        assert (ld.decoder.kind, ld.decoder.decode_device) == ("dali", "cpu")
    with NaFlexLoader(_cfg(root, tok), patch_size=P, max_budget=MAX_BUDGET, kind="pil") as ld:
        assert ld.decoder.kind == "pil"
    # mixed without a CUDA device: refused when the loader is built, naming the setting.
    with pytest.raises(ValueError, match="data.decode_device=mixed needs a CUDA training device"):
        make(decode_device="mixed")
    with pytest.raises(ValueError, match="DALI CUDA devices=0"):
        make("cuda", decode_device="mixed")  # CUDA asked for but DALI sees none
    with make("cuda") as ld:  # auto with no CUDA DALI can see: the CPU decoder
        assert ld.decoder.decode_device == "cpu"
    # A GPU DALI can see: auto and mixed pick nvJPEG on the training device's GPU, cpu stays.
    # Nothing touches CUDA until the first batch (the pipeline is built then).
    monkeypatch.setattr(v1_loader, "dali_cuda_devices", lambda: 1)
    for setting, device, want, device_id in [("auto", "cuda", "mixed", 0),
                                              ("mixed", "cuda:1", "mixed", 1),
                                              ("cpu", "cuda", "cpu", None),
                                              ("auto", "cpu", "cpu", None)]:  # fmt: skip
        with make(device, decode_device=setting) as ld:
            dec = ld.decoder
            assert (dec.decode_device, dec.device_id, dec._pipe) == (want, device_id, None)
            assert dec.device.type == ("cuda" if want == "mixed" else "cpu")
    with make("cuda", loader="pil") as ld:
        assert ld.decoder.kind == "pil"  # PIL decodes on the CPU whatever the device


def test_batches_are_handed_over_on_the_training_device(synthetic):
    # The meta device stands in for the GPU: a tensor the loader forgot to move stays on the
    # CPU; host geometry (grids) and bookkeeping (sample ids) must stay on the host.
    with _loader(synthetic, loader="dali") as cpu:
        want = next(cpu)
    root, tok = synthetic
    with NaFlexLoader(_cfg(root, tok, loader="dali"), patch_size=P, max_budget=MAX_BUDGET,
                      device="meta") as ld:  # fmt: skip
        got = next(ld)
    for name in FIELDS:
        x = getattr(got, name)
        assert x.device.type == ("cpu" if name.startswith("sample_") else "meta"), name
        assert x.shape == getattr(want, name).shape and x.dtype == getattr(want, name).dtype
    assert got.grids == want.grids and got.keys == want.keys


def test_pack_images_packs_on_the_decoded_images_device():
    # Decoded on a GPU (mixed), images are device tensors: the packing allocates there and
    # reads nothing back; the meta device stands in (a CPU allocation would fail to mix).
    images = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in [(40, 64), (90, 17)]]
    ref_pixels, ref_valid, ref_grids = pack_images(images, P, 128)
    pixels, valid, grids = pack_images([x.to("meta") for x in images], P, 128)
    assert pixels.device.type == valid.device.type == "meta" and grids.device.type == "cpu"
    assert (pixels.shape, valid.shape, valid.dtype) == (ref_pixels.shape, ref_valid.shape,
                                                        ref_valid.dtype)  # fmt: skip
    assert torch.equal(grids, ref_grids)
    with pytest.raises(NaFlexError, match="image 1 is on cpu, image 0 on meta"):
        pack_images([images[0].to("meta"), images[1]], P, 128)


@pytest.mark.gpu
def test_mixed_gpu_decode_matches_cpu(synthetic):
    """nvJPEG + torchvision's float resize on the GPU against the CPU path (libjpeg-turbo +
    torchvision's uint8 kernel = HF on CPU): geometry and texts equal, pixels within v1's bound
    for nvJPEG (test_loader.py: its IDCT differs; mean <= 1 grey level, max <= 24). The resize
    alone accounts for at most 1 level (float vs uint8 kernel on these images, measured on the
    CPU: max 1, mean 0.17); the rest is nvJPEG's, not measured here (no GPU)."""
    with _loader(synthetic, loader="dali") as cpu:
        want = [next(cpu) for _ in range(4)]
    root, tok = synthetic
    cfg = _cfg(root, tok, loader="dali", decode_device="mixed")
    with NaFlexLoader(cfg, patch_size=P, max_budget=MAX_BUDGET, device="cuda") as gpu:
        assert gpu.decoder.decode_device == "mixed"
        got = [next(gpu) for _ in range(4)]
    for a, b in zip(got, want, strict=True):
        assert a.pixels.is_cuda and a.valid.is_cuda and a.region_tokens.is_cuda
        assert a.sample_ids.device.type == "cpu"
        assert (a.budget, a.grids, a.keys) == (b.budget, b.grids, b.keys)
        for name in FIELDS[1:]:
            assert torch.equal(getattr(a, name).cpu(), getattr(b, name)), name
        levels = (a.pixels.cpu() - b.pixels).abs() * 255 / 2  # normalised with std 0.5
        real = b.valid[..., None].expand_as(levels)
        assert (levels[~real] == 0).all()  # padding stays zero
        assert levels[real].mean() <= 1.0 and levels.max() <= 24, levels.max()


def test_loader_signature_only_grew_keyword_arguments():
    # family.py and the tests call NaFlexLoader positionally up to `patience`.
    import inspect

    params = list(inspect.signature(NaFlexLoader).parameters.values())
    names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert names == ["cfg", "tokenizer", "patch_size", "max_budget", "dp_rank", "dp_size",
                     "shards", "num_threads", "patience"]  # fmt: skip
    assert {p.name for p in params if p.kind is p.KEYWORD_ONLY} == {"device", "kind"}
