"""Synthetic scenes of mixed sizes for NaFlex (FG-CLIP 2) and their SigLIP-2-style tokenizer:
the size/aspect distribution, objects and their attributes still on the pixels after NaFlex
packing (aspect kept, the batch's budget), determinism, the fixed-size default unchanged, and a
tokenizer that covers every synthetic text without <unk>, truncation or collisions."""

import hashlib
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.synthetic import generate, parse_args
from fgclip_mega.data.naflex import batch_budget, native_patches, pack_images
from fgclip_mega.data.synthetic import (
    BOX_MARGIN,
    COLOURS,
    SIZES,
    MixedSizes,
    _background,
    make_scene,
)

CPU = MixedSizes()


def _attrs(short_expr: str) -> dict:
    _, size, colour, texture, shape = short_expr.split(" ")
    return {"size": size, "colour": colour, "texture": texture, "shape": shape}


# ----------------------------------------------------------------------------- the default


def test_fixed_size_default_is_byte_identical_to_generator_4():
    # sha256 of scenes drawn by the generator before mixed sizes existed (commit HEAD at the
    # time: GENERATOR_VERSION 4): the v1 main job's data must not change.
    expected = {
        (0, "train", 0): (
            "9930684468e0d7b6ef10a343420874739c8af16aca1a7c3ad2913e39f73fe701",
            "0ea7d93bcf555461c6e2c1caaf5d917c647c542d538ffa31c2b9d2419bb0f9bb",
        ),
        (5, "val", 17, 128, 96, 5, 10, 90, 64): (
            "92984eebadf1daa8fa56a7e7692ed31cde4ac3416484d5acf6f8be14d711d7c5",
            "1eae276c209239711b3d75067eae38421469c822602ab0cfd0635d9a972050f9",
        ),
    }
    for args, (jpeg_sha, record_sha) in expected.items():
        _, jpeg, record = make_scene(*args)
        assert hashlib.sha256(jpeg).hexdigest() == jpeg_sha, args
        assert hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest() == (
            record_sha
        ), args
        assert make_scene(*args, sizes=None) == (_, jpeg, record)


# ----------------------------------------------------------------------------- sizes


def test_sizes_span_aspects_and_budgets():
    budgets, aspects = {}, []
    for i in range(600):
        w, h = CPU.size(0, "train", i)
        _, jpeg, _ = make_scene(0, "train", i, sizes=CPU) if i < 5 else (None, None, None)
        if jpeg is not None:  # the image really has that size
            assert Image.open(io.BytesIO(jpeg)).size == (w, h)
        n = native_patches(h, w, CPU.patch_size)
        assert min(w, h) >= CPU.min_short_patches * CPU.patch_size, (w, h)
        assert n <= 1.1 * CPU.max_patches, (w, h, n)
        aspects.append(math.log(w / h))
        b = "capped" if n > CPU.max_budget else batch_budget([n], CPU.max_budget)
        budgets[b] = budgets.get(b, 0) + 1
    aspects = np.array(aspects)
    # Log-uniform in [1/3, 3]: both extremes reached, symmetric around square.
    assert np.abs(aspects).max() <= math.log(3) + 1e-9
    assert aspects.min() < -0.9 * math.log(3) and aspects.max() > 0.9 * math.log(3)
    assert abs(aspects.mean()) < 0.1 and (aspects > 0).mean() == pytest.approx(0.5, abs=0.07)
    # Every CPU budget gets a good share, and some scenes exceed the cap (downscaled to it).
    assert set(budgets) == {128, 256, "capped"}, budgets
    assert all(v >= 0.08 * 600 for v in budgets.values()), budgets
    # The GPU spec spans the patch-16 budgets 256..1024.
    gpu = MixedSizes.gpu()
    seen = {
        batch_budget([native_patches(*gpu.size(0, "train", i)[::-1], 16)], 1024) for i in range(300)
    }
    assert seen == {256, 576, 784, 1024}, seen


def test_mixed_scenes_are_deterministic_and_independent_of_workers(tmp_path):
    a = make_scene(3, "val", 9, sizes=CPU)
    assert make_scene(3, "val", 9, sizes=CPU) == a
    assert make_scene(4, "val", 9, sizes=CPU)[1] != a[1]
    assert CPU.size(3, "val", 9) != CPU.size(3, "train", 9)
    args = parse_args(["--out", str(tmp_path), "--num-train", "10", "--num-val", "2",
                       "--num-test", "0", "--workers", "2", "--sizes", "mixed", "--seed", "3",
                       "--no-progress"])  # fmt: skip
    generate(args)
    for split, n in (("train", 10), ("val", 2)):
        lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for i, line in enumerate(lines):
            f_path, jpeg, rec = make_scene(3, split, i, sizes=CPU)
            assert json.loads(line) == rec
            assert (tmp_path / "images" / f_path).read_bytes() == jpeg
    assert not (tmp_path / "tokenizer.json").exists()  # only with --tokenizer


def test_bad_mixed_sizes_name_the_field():
    with pytest.raises(ValueError, match="patch budget 300"):
        MixedSizes(max_budget=300)
    with pytest.raises(ValueError, match="MixedSizes.min_patches"):
        MixedSizes(min_patches=400, max_patches=300)
    with pytest.raises(ValueError, match="MixedSizes.max_aspect"):
        MixedSizes(max_aspect=0.5)


# ----------------------------------------------------------------------------- pixels


def _packed(image: np.ndarray, budget: int, p: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the NaFlex-packed image (gh*p, gw*p, 3) in 0..255 floats, through
    the loader's own `pack_images` (equal to HF's Siglip2ImageProcessor)."""
    t = torch.from_numpy(image.copy()).permute(2, 0, 1)
    pixels, valid, grids = pack_images([t], p, budget)
    gh, gw = grids[0].tolist()
    assert valid[0].sum() == gh * gw <= budget
    x = pixels[0, : gh * gw].reshape(gh, gw, p, p, 3).permute(0, 2, 1, 3, 4)
    return (x.reshape(gh * p, gw * p, 3).numpy() * 0.5 + 0.5) * 255


def test_objects_and_attributes_survive_naflex_packing():
    # Each scene is packed at the smallest budget any batch holding it gets (its own native
    # count's budget, capped: the smallest scale) and at the run's largest budget. Objects are
    # found on the pixels (scene minus its own background, redrawn from the scene's stream and
    # packed the same way), independent of the generator's geometry: each box holds exactly its
    # object plus a background margin of BOX_MARGIN of the short side, its colour is at its
    # centre, the object's share of its box separates the three sizes whatever the aspect
    # ratio, and textured squares still show two pure shades (not a blurred mix).
    p = CPU.patch_size
    share = {s: [] for s in SIZES}
    seen = {s: [] for s in SIZES}
    textures = set()
    aspects = []
    for i in range(36):
        _, jpeg, rec = make_scene(1, "train", i, sizes=CPU, jpeg_quality=100)
        src = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        h, w = src.shape[:2]
        aspects.append(w / h)
        bg_src = np.asarray(_background(np.random.default_rng([1, 11, i]), w, h)[1])
        own = batch_budget([native_patches(h, w, p)], CPU.max_budget)
        for budget in sorted({own, CPU.max_budget}):
            img, bg = _packed(src, budget, p), _packed(bg_src, budget, p)
            ph, pw = img.shape[:2]
            obj = np.abs(img - bg).max(-1) > 40
            for b in rec["bbox_info"]:
                attrs = _attrs(b["short_expr"])
                x1, y1, x2, y2 = np.array(b["bbox"][:4]) * [pw, ph, pw, ph]
                assert 0 <= x1 < x2 <= pw + 1e-6 and 0 <= y1 < y2 <= ph + 1e-6, b
                inner = obj[round(y1) : round(y2), round(x1) : round(x2)]
                ys, xs = np.nonzero(inner)
                mx = BOX_MARGIN * min(w, h) * pw / w  # the margin, in packed pixels
                my = BOX_MARGIN * min(w, h) * ph / h
                where = (i, budget, (w, h), b["short_expr"])
                # Object pixels start about one margin in from each side: +-2 source px
                # (antialiasing, JPEG) scaled by the resize, +-1.5 px box rounding and blur.
                tol = 1.5 + 2 * max(pw / w, ph / h)
                assert abs(xs.min() - mx) <= tol, where
                assert abs(inner.shape[1] - 1 - xs.max() - mx) <= tol, where
                assert abs(ys.min() - my) <= tol, where
                assert abs(inner.shape[0] - 1 - ys.max() - my) <= tol, where
                ring = np.ones_like(inner)
                ring[2:-2, 2:-2] = False
                assert not (inner & ring).any(), where  # the margin holds no other object
                # The object's share of its box (the box checked above to hold it one margin
                # in on each side): what the 1x1 region pooling sees of the size. On the pixels
                # too, in the mean (small objects are a few packed pixels: +-1 px is 10%).
                tight = (x2 - x1 - 2 * mx) * (y2 - y1 - 2 * my)
                share[attrs["size"]].append(tight / ((x2 - x1) * (y2 - y1)))
                covered = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
                seen[attrs["size"]].append(covered / inner.size)
                base = np.array(COLOURS[attrs["colour"]], float)
                shade = base // 2 if base.sum() > 200 else base + 110
                cy, cx = round((y1 + y2) / 2), round((x1 + x2) / 2)
                centre = img[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3)
                dist = np.minimum(np.abs(centre - base).max(1), np.abs(centre - shade).max(1))
                assert dist.min() <= 40, where
                if attrs["shape"] == "square" and attrs["texture"] != "plain":
                    crop = img[round(y1 + my) + 2 : round(y2 - my) - 2,
                               round(x1 + mx) + 2 : round(x2 - mx) - 2]  # fmt: skip
                    d = shade - base
                    t = ((crop - base) @ d) / (d @ d)  # 0 = base colour, 1 = shade
                    assert ((t < 0.25) | (t > 0.75)).mean() >= 0.55, where
                    assert (t > 0.75).mean() >= 0.05 and (t < 0.25).mean() >= 0.05, where
                    textures.add(attrs["texture"])
    assert min(aspects) < 0.6 and max(aspects) > 1.7  # elongated scenes both ways were seen
    assert textures == {"striped", "dotted", "checkered"}, textures
    lo = {s: min(v) for s, v in share.items()}
    hi = {s: max(v) for s, v in share.items()}
    assert all(len(v) >= 10 for v in share.values()), {s: len(v) for s, v in share.items()}
    assert hi["small"] < lo["medium"] and hi["medium"] < lo["large"], (lo, hi)
    mean = {s: np.mean(v) for s, v in seen.items()}
    assert mean["small"] + 0.06 < mean["medium"] and mean["medium"] + 0.06 < mean["large"], mean


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def synth_tokenizer(tmp_path_factory):
    from fgclip_mega.data.siglip2_tokenizer import Siglip2Tokenizer
    from fgclip_mega.data.synthetic_tokenizer import write_tokenizer

    directory = tmp_path_factory.mktemp("tok")
    path = write_tokenizer(directory)
    assert path == directory / "tokenizer.json"
    return Siglip2Tokenizer(directory)


def _scene_texts(n: int) -> list[dict]:
    recs = [make_scene(0, "train", i, 64, 48)[2] for i in range(n)]
    return recs + [make_scene(2, "val", i, sizes=CPU)[2] for i in range(n)]


def test_tokenizer_is_deterministic_and_siglip2_shaped(synth_tokenizer, tmp_path):
    from fgclip_mega.presets import fgclip2_tiny

    code = (
        "import sys; from fgclip_mega.data.synthetic_tokenizer import write_tokenizer; "
        "write_tokenizer(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == synth_tokenizer.path.read_bytes()
    tok = synth_tokenizer
    specials = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    assert {k: tok.backend.token_to_id(k) for k in specials} == specials
    assert tok.pad_id == 0 and tok.padding_side == "right"
    assert tok.vocab_size <= fgclip2_tiny().model.text.vocab_size
    rows = tok(["A Large RED striped circle", "a large red striped circle"], 64)
    assert (rows[0] == rows[1]).all()  # lowercase-only
    n = int((rows[0] != 0).sum())
    assert n == 6 and rows[0, n - 1] == 1 and (rows[0, n:] == 0).all()  # 5 words, then <eos>


def test_cli_writes_the_tokenizer_beside_the_data(synth_tokenizer, tmp_path):
    args = parse_args(["--out", str(tmp_path), "--num-train", "1", "--num-val", "0",
                       "--num-test", "0", "--tokenizer", "--no-progress"])  # fmt: skip
    generate(args)
    assert (tmp_path / "tokenizer.json").read_bytes() == synth_tokenizer.path.read_bytes()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"


def test_tokenizer_covers_every_synthetic_text(synth_tokenizer):
    tok = synth_tokenizer
    recs = _scene_texts(40)
    longs = [r["caption"] for r in recs]
    shorts = [r["short_caption"] for r in recs]
    phrases, groups = [], []
    for r in recs:
        for b in r["bbox_info"]:
            phrases += [b["short_expr"], b["long_expr"]]
            if b["flag_short_neg"]:
                groups.append([b["short_expr"], *b["short_expr_negs"].values()])
    encoded = ((tok.long(longs), 196), (tok.short(shorts), 64), (tok.phrases(phrases), 64))
    for rows, length in encoded:
        assert rows.shape[1] == length
        assert not (rows == 3).any()  # no <unk>
        # Not truncated: every row's last real token is <eos>, followed by padding only.
        n = (rows != 0).sum(1)
        assert (n < length).all() and (rows[np.arange(len(rows)), n - 1] == 1).all()
    # Every word of the vocabulary is one token: the texts are words, not characters.
    words = {w.strip(".,") for t in longs + shorts + phrases for w in t.lower().split()}
    for word in words:  # (the backend pads: count the real tokens)
        ids = tok.backend.encode(word, add_special_tokens=False).ids
        assert sum(i != tok.pad_id for i in ids) == 1, word
    # Every hard negative tokenizes differently from its positive (and from each other).
    assert len(groups) > 50
    for group in groups:
        rows = tok.phrases(group)
        assert len({r.tobytes() for r in rows}) == len(group), group


def _real_tokens(tok, text: str) -> int:
    """Tokens of `text` without padding and without the appended <eos>."""
    return int((tok([text], 512)[0] != tok.pad_id).sum()) - 1


def _longest(tok, texts) -> str:
    texts = list(texts)
    return texts[int((tok(texts, 512) != tok.pad_id).sum(1).argmax())]


def test_longest_synthetic_texts_fit_the_main_job_contexts(synth_tokenizer):
    # The FG-CLIP 2 main job sizes the text contexts to the synthetic texts (the tower pools
    # the last position, so a truncated caption would lose its <eos> silently). Every word is
    # one token and sentences do not merge across spaces, so the longest caption is the longest
    # frame plus max_objects times the longest sentence: built from the argmaxes and
    # tokenized whole, it must fit with its <eos>.
    import inspect
    import itertools

    from fgclip_mega.data.synthetic import _COUNT_WORDS, _SENTENCES, BACKGROUNDS, SHAPES, TEXTURES
    from fgclip_mega.data.synthetic_tokenizer import POSITIONS
    from fgclip_mega.presets import load_config
    from run import recipe_fgclip2

    cfg = load_config("fgclip2_tiny", overrides=recipe_fgclip2.RECIPE)
    short_ctx, long_ctx = cfg.model.text.short_context, cfg.model.text.long_context
    n = inspect.signature(make_scene).parameters["max_objects"].default
    tok = synth_tokenizer
    frame = _longest(
        tok, (f"A {bg} background with {_COUNT_WORDS[n]} objects." for bg in BACKGROUNDS)
    )
    sentences = (
        t.format(position=p, size=z, colour=c, shape=h, texture=x)
        for t, p, z, c, h, x in itertools.product(
            _SENTENCES, POSITIONS, SIZES, COLOURS, SHAPES, TEXTURES
        )
    )
    sentence = _longest(tok, sentences)
    caption = " ".join([frame] + [sentence] * n)
    assert _real_tokens(tok, caption) == _real_tokens(tok, frame) + n * _real_tokens(tok, sentence)
    names = [_longest(tok, (f"a {c} {h}" for c in COLOURS for h in SHAPES))] * n
    bg = _longest(tok, BACKGROUNDS)
    short = ", ".join(names[:-1]) + " and " + names[-1] + f" on a {bg} background"
    for rows, ctx in ((tok.long([caption]), 196), (tok.short([short]), 64)):
        used = int((rows[0] != tok.pad_id).sum())  # with <eos>
        assert rows[0, used - 1] == 1  # ends in <eos>: not truncated at upstream's length
        assert used <= {196: long_ctx, 64: short_ctx}[ctx], (used, short_ctx, long_ctx)
    assert (_real_tokens(tok, caption) + 1, _real_tokens(tok, "a photo of " + short) + 1) == (
        89,
        28,
    )  # the numbers the recipe's comment gives
    # The region phrases (long_expr, with the position) fit the short context too.
    from fgclip_mega.data.synthetic import SceneObject

    longest = _longest(tok, (
        SceneObject(h, c, z, x, (0, 0, 0, 0), p).long_expr
        for h, c, z, x, p in itertools.product(SHAPES, COLOURS, SIZES, TEXTURES, POSITIONS)
    ))  # fmt: skip
    assert _real_tokens(tok, longest) + 1 <= short_ctx


# ----------------------------------------------------------------------------- end to end


def test_embedded_naflex_set_feeds_the_naflex_loader(tmp_path):
    # The FG-CLIP 2 synthetic data path: mixed-size scenes sharded with the tokenizer beside
    # them, read by the NaFlex loader: batches of both CPU budgets, each image at its own
    # aspect-kept grid, its stored size = its JPEG's, texts without <unk>.
    from fgclip_mega.config import DataConfig
    from fgclip_mega.data.embedded_naflex import ensure_synthetic_naflex_shards
    from fgclip_mega.data.naflex import grid_for_budget
    from fgclip_mega.data.naflex_loader import NaFlexLoader

    index, tok = ensure_synthetic_naflex_shards(tmp_path, num_samples=48, shard_size=16)
    built = index.stat().st_mtime_ns
    assert ensure_synthetic_naflex_shards(tmp_path, num_samples=48, shard_size=16) == (index, tok)
    assert index.stat().st_mtime_ns == built  # reused, not rebuilt
    cfg = DataConfig(shards=str(index.parent), micro_batch_size=4, max_boxes=5,
                     num_hard_negatives=10, read_block_size=4, shuffle_window_blocks=2, seed=1,
                     num_threads=1, tokenizer=str(tok.parent))  # fmt: skip
    budgets, keys = {}, []
    with NaFlexLoader(cfg, patch_size=CPU.patch_size, max_budget=CPU.max_budget) as loader:
        for _ in range(12):  # one epoch of 48
            b = next(loader)
            budgets[b.budget] = budgets.get(b.budget, 0) + 1
            keys += [(int(e), k) for e, k in zip(b.sample_epochs, b.keys, strict=True)]
            for key, grid in zip(b.keys, b.grids, strict=True):
                w, h = Image.open(tmp_path / "raw" / "images" / key).size
                assert grid == grid_for_budget(h, w, CPU.patch_size, b.budget), key
            for rows in (b.long_tokens, b.short_tokens, b.region_tokens, b.hardneg_tokens):
                assert not (rows == 3).any()
    # (budget grouping may hold a sample back past the epoch's end: no repeats within an epoch)
    assert len(set(keys)) == len(keys) and sum(e == 0 for e, _ in keys) >= 40, keys
    assert set(budgets) == {128, 256}, budgets
    index2, _ = ensure_synthetic_naflex_shards(tmp_path, num_samples=48, shard_size=16, seed=1)
    assert json.loads(index2.read_text())["synthetic_naflex"]["seed"] == 1  # rebuilt
