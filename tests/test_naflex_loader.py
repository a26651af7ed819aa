"""FG-CLIP 2 NaFlex loader: batches against an independent recomputation (PIL decode + HF
Siglip2ImageProcessor for pixels, transformers' fast tokenizer called as upstream for tokens),
budget grouping (bounded carry, every sample once, less padding than upstream's ungrouped rule),
exact resume, and DP=2 (ranks share each step's budget, every sample of an epoch once)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from fgclip_mega.config import Config, ConfigError, DataConfig
from fgclip_mega.data.budget_groups import BudgetGrouper
from fgclip_mega.data.ingest import Sample
from fgclip_mega.data.naflex import PATCH_BUDGETS, NaFlexError, batch_budget, native_patches
from fgclip_mega.data.naflex_loader import NaFlexLoader, padding_fraction, sample_budget
from fgclip_mega.data.shards import ShardReader, open_shard_set, write_index, write_shard
from fgclip_mega.data.siglip2_tokenizer import TokenizerError
from fgclip_mega.data.source import region_coins

P = 8  # patch size: keeps the fixture's images small (256 x 256 px = 1024 patches)
K = 2  # hard negatives per box
WORDS = ["red", "blue", "green", "striped", "circle", "square", "small", "large", "left"]


def _image(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """Mixed sizes and aspect ratios: mostly small, some large, tall and wide (width, height)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scale = rng.choice([40, 80, 130, 200, 260], p=[0.35, 0.25, 0.2, 0.1, 0.1])
        aspect = rng.choice([0.25, 0.5, 1.0, 2.0, 3.0])
        w = max(P, int(scale * np.sqrt(aspect)))
        h = max(P, int(scale / np.sqrt(aspect)))
        out.append((w, h))
    return out


def _sample(i: int, width: int, height: int) -> Sample:
    rng = np.random.default_rng(100 + i)
    words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    n_boxes = int(rng.integers(0, 4))
    s = Sample(key=f"img{i:03d}.jpg", caption=f"A LONG caption {i} " + words(30),
               short_caption=f"Short {i} " + words(3), image=_image(width, height, i),
               width=width, height=height)  # fmt: skip
    for j in range(n_boxes):
        s.short_exprs.append(f"Box {j} " + words(2))
        s.long_exprs.append(f"the long box {j} " + words(6))
        flag = int(rng.integers(0, 2))
        s.neg_flags.append(flag)
        s.negs.append([f"Neg {j} {m} " + words(2) for m in range(K)] if flag else [])
    x0, y0 = rng.uniform(0, 0.5, (2, n_boxes))
    s.boxes = np.stack([x0, y0, x0 + 0.4, y0 + 0.3], 1).astype(np.float32).reshape(-1, 4)
    return s


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.test_siglip2_tokenizer import _write_tokenizer

    root = tmp_path_factory.mktemp("naflex")
    sizes = _sizes(46, seed=0)
    shards, i = [], 0
    for s, n in enumerate((17, 12, 17)):  # odd shard sizes: blocks cut at shard ends
        name = f"shard-{s:06d}.zarr"
        write_shard(root / name, [_sample(i + j, *sizes[i + j]) for j in range(n)], K)
        shards.append({"path": name, "num_samples": n})
        i += n
    write_index(root, shards, {})
    tok_dir = root / "tok"
    tok_dir.mkdir()
    _write_tokenizer(tok_dir)
    return root, tok_dir


def _cfg(root, micro=2, **kw) -> DataConfig:
    base = dict(shards=str(root), micro_batch_size=micro, max_boxes=2, num_hard_negatives=K,
                read_block_size=4, shuffle_window_blocks=2, seed=7, num_threads=2)  # fmt: skip
    return DataConfig(**{**base, **kw})


def _loader(dataset, rank=0, dp=1, **kw) -> NaFlexLoader:
    root, tok = dataset
    cfg = _cfg(root, tokenizer=str(tok), **kw)
    return NaFlexLoader(cfg, patch_size=P, dp_rank=rank, dp_size=dp)


# ----------------------------------------------------------------------------- grouping


def _grouper_run(budgets_stream, group_size, window, patience=1):
    """Feed a stream of per-sample budgets window by window; returns the emitted batches as
    (budget, items, window serial at emission) and the grouper."""
    g = BudgetGrouper(group_size, PATCH_BUDGETS, patience)
    out = []
    for w0 in range(0, len(budgets_stream), window):
        chunk = budgets_stream[w0 : w0 + window]
        ids = list(range(w0, w0 + len(chunk)))
        g.add_window(ids, [0] * len(chunk), chunk)
        while (batch := g.pop()) is not None:
            out.append((*batch, g.serial - 1))
        for b in PATCH_BUDGETS:  # the carry stays bounded: no bucket holds a full batch
            assert len(g.buckets[b]) < group_size
    return out, g


@pytest.mark.parametrize("seed, patience", [(0, 1), (1, 1), (2, 3)])
def test_grouper_keeps_every_sample_once_with_a_bounded_wait(seed, patience):
    rng = np.random.default_rng(seed)
    # Skewed: a rare budget (1024) would wait forever in its own bucket without the merges.
    stream = list(rng.choice(PATCH_BUDGETS, 3000, p=[0.5, 0.25, 0.15, 0.09, 0.01]))
    out, g = _grouper_run(stream, group_size=16, window=40, patience=patience)
    emitted = [sid for _, items, _ in out for sid, _, _ in items]
    assert len(emitted) == len(set(emitted))  # nothing twice
    assert sorted(emitted + [sid for b in PATCH_BUDGETS for sid, _, _ in g.buckets[b]]) == list(
        range(3000)
    )  # nothing dropped
    for budget, items, serial in out:
        assert len(items) == 16
        for sid, _, got in items:
            assert stream[sid] <= budget  # an image is never shrunk below its own budget
            assert serial - got <= patience + len(PATCH_BUDGETS), (sid, got, serial)


@pytest.mark.parametrize(
    "windows, waiting, due",
    [
        # A lone 1024 image while every later window fills whole 128 batches: the next window's
        # first samples complete its batch (without that it would wait forever).
        ([[1024], [128] * 4, [128] * 4, [128] * 4], [0], 2),
        # Held-over 1024 plus enough lower samples waiting: completed at the window's end.
        ([[1024, 128, 128, 128], [128] * 4, [128] * 4], [0], 1),
        # Three small images among windows of whole 1024 batches climb one budget per window,
        # then complete a 1024 batch (within len(budgets) + 1 windows of their arrival).
        ([[128] * 3] + [[1024] * 4] * 8, [0, 1, 2], 6),
    ],
)
def test_grouper_never_lets_a_bucket_wait_forever(windows, waiting, due):
    g = BudgetGrouper(4, PATCH_BUDGETS)
    emitted_at, start = {}, 0
    for w in windows:
        g.add_window(list(range(start, start + len(w))), [0] * len(w), w)
        start += len(w)
        while (batch := g.pop()) is not None:
            for sid, _, _ in batch[1]:
                emitted_at[sid] = g.serial - 1
    assert all(sid in emitted_at and emitted_at[sid] <= due for sid in waiting), emitted_at


def test_grouper_state_round_trip_and_regroup():
    rng = np.random.default_rng(5)
    stream = list(rng.choice(PATCH_BUDGETS, 400))
    g = BudgetGrouper(8, PATCH_BUDGETS)
    g.add_window(list(range(0, 40)), [0] * 40, stream[:40])
    state = json.loads(json.dumps(g.state_dict()))
    same = BudgetGrouper.from_state(state, 8)
    assert same.state_dict() == g.state_dict()
    wider = BudgetGrouper.from_state(state, 12)  # e.g. dp 2 -> 3
    ids = lambda gr: sorted(  # noqa: E731
        [s for _, it in gr.ready for s, _, _ in it]
        + [s for b in PATCH_BUDGETS for s, _, _ in gr.buckets[b]]
    )
    assert ids(wider) == ids(g) and all(len(it) == 12 for _, it in wider.ready)


# ----------------------------------------------------------------------------- batches


def _reference(dataset):
    root, tok_dir = dataset
    from transformers import PreTrainedTokenizerFast

    samples = {}
    for path in open_shard_set(root).paths:
        for s in ShardReader(path).samples():
            samples[s.key] = s
    ref_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"),
                                      pad_token="<pad>")  # fmt: skip

    def tokens(texts, length):
        if not texts:
            return torch.zeros(0, length, dtype=torch.int64)
        ids = ref_tok([t.lower() for t in texts], max_length=length, padding="max_length",
                      truncation=True).input_ids  # fmt: skip
        return torch.tensor(ids, dtype=torch.int64)

    return samples, tokens


def test_batches_match_pil_hf_processor_and_tokenizer(dataset):
    from PIL import Image
    from transformers import Siglip2ImageProcessor

    samples, tokens = _reference(dataset)
    processor = Siglip2ImageProcessor(patch_size=P)
    seed, m = 7, 2
    with _loader(dataset, micro=3) as loader:
        budgets = set()
        for _ in range(10):
            batch = next(loader)
            recs = [samples[k] for k in batch.keys]
            budgets.add(batch.budget)
            own = [batch_budget([native_patches(s.height, s.width, P)]) for s in recs]
            assert batch.budget in PATCH_BUDGETS and max(own) <= batch.budget
            pils = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in recs]
            ref = processor(images=pils, max_num_patches=batch.budget, return_tensors="pt")
            torch.testing.assert_close(batch.pixels, ref["pixel_values"].float(), rtol=0,
                                       atol=1e-6)  # fmt: skip
            assert torch.equal(batch.valid, ref["pixel_attention_mask"].bool())
            assert batch.grids == [tuple(g) for g in ref["spatial_shapes"].tolist()]
            assert torch.equal(batch.long_tokens, tokens([s.caption for s in recs], 196))
            short = tokens(["a photo of " + s.short_caption for s in recs], 64)
            assert torch.equal(batch.short_tokens, short)
            rois, phrases, hard_rows, hard = [], [], [], []
            for i, (s, sid, ep) in enumerate(
                zip(recs, batch.sample_ids.tolist(), batch.sample_epochs.tolist(), strict=True)
            ):
                coins = region_coins(seed, ep, np.array([sid]), m)[0]
                for j in range(min(len(s.boxes), m)):
                    if s.neg_flags[j]:
                        hard_rows.append(len(rois))
                        hard.append(tokens([s.short_exprs[j], *s.negs[j]], 64))
                    rois.append([i, *s.boxes[j].tolist()])
                    phrases.append(s.long_exprs[j] if coins[j] else s.short_exprs[j])
            torch.testing.assert_close(batch.region_rois, torch.tensor(rois).reshape(-1, 5))
            assert torch.equal(batch.region_tokens, tokens(phrases, 64))
            assert batch.hard_rows.tolist() == hard_rows
            want = torch.stack(hard) if hard else torch.zeros(0, 1 + K, 64, dtype=torch.int64)
            assert torch.equal(batch.hardneg_tokens, want)
        assert len(budgets) >= 3  # the fixture really mixes budgets


def test_grouping_costs_fewer_patches_than_upstreams_ungrouped_batches(dataset):
    """Same samples, same stream order: upstream cuts the stream into consecutive micro-batches
    and packs each at its largest image's budget (NaFlex upsamples the smaller images to fill
    it); grouped batches process fewer patches. Padding proper (rounding of each grid below its
    budget) is a few percent either way."""
    root, _ = dataset
    shards = open_shard_set(root)
    sizes = np.concatenate([np.asarray(ShardReader(p)._a("image_sizes")[:]) for p in shards.paths])
    with _loader(dataset, micro=3) as loader:
        ids, grouped = [], []
        order = loader.order.plan(0).ids
        while len(ids) < 36:
            loader._group_next_window()
            while (b := loader.grouper.pop()) is not None:
                ids += [s for s, _, _ in b[1]]
                grouped += [b[0]] * len(b[1])
    own = [sample_budget(*sizes[i], P, PATCH_BUDGETS) for i in order[: len(ids)]]
    ungrouped = [max(own[i : i + 3]) for i in range(0, len(own), 3) for _ in range(3)]
    pad_g, total_g = padding_fraction(sizes[ids], grouped, P)
    pad_u, total_u = padding_fraction(sizes[order[: len(ids)]], ungrouped[: len(ids)], P)
    ideal = sum(own)  # every image at its own budget
    assert ideal <= total_g < total_u, (ideal, total_g, total_u)
    assert (total_g - ideal) < 0.5 * (total_u - ideal), (ideal, total_g, total_u)
    assert pad_g < total_g * 0.1 and pad_u < total_u * 0.1


# ----------------------------------------------------------------------------- resume, DP


def _summary(batch):
    return (batch.budget, batch.sample_ids.tolist(), batch.pixels.sum().item(),
            batch.short_tokens.sum().item(), batch.region_tokens.sum().item())  # fmt: skip


def test_resume_is_exact(dataset):
    with _loader(dataset) as loader:
        straight = [_summary(next(loader)) for _ in range(30)]  # > 1 epoch (46 samples)
    with _loader(dataset) as loader:
        first = [_summary(next(loader)) for _ in range(11)]
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    assert state["global_samples"] == 11 * 2 and state["epoch"] == 0  # what the trainer logs
    # The resume point holds carried samples (waiting buckets and/or grouped, unread batches).
    assert any(items for _, items in state["grouper"]["buckets"]) or state["grouper"]["ready"]
    with _loader(dataset) as loader:
        loader.load_state_dict(state)
        rest = [_summary(next(loader)) for _ in range(19)]
    assert first + rest == straight


def _epoch0_ids(batches_per_rank):
    return [
        sid
        for batches in batches_per_rank
        for b in batches
        for sid, ep in zip(b.sample_ids.tolist(), b.sample_epochs.tolist(), strict=True)
        if ep == 0
    ]


def test_dp2_ranks_share_budgets_and_read_each_sample_once(dataset):
    steps = 20  # 20 x 2 x 2 = 80 samples: epoch 0 (46) is read completely
    ranks = [_loader(dataset, rank=r, dp=2) for r in range(2)]
    batches = [[next(ld) for _ in range(steps)] for ld in ranks]
    for b0, b1 in zip(*batches, strict=True):
        assert b0.budget == b1.budget and b0.pixels.shape == b1.pixels.shape
        assert len(b0.keys) == len(b1.keys) == 2
    ids = _epoch0_ids(batches)
    assert sorted(ids) == list(range(46))  # every sample of epoch 0 once across ranks
    # Resume both ranks from rank 0's state after 7 steps: the same batches follow.
    fresh = [_loader(dataset, rank=r, dp=2) for r in range(2)]
    for ld in fresh:
        for _ in range(7):
            next(ld)
    state = json.loads(json.dumps(fresh[0].state_dict()))
    resumed = [_loader(dataset, rank=r, dp=2) for r in range(2)]
    for r, ld in enumerate(resumed):
        ld.load_state_dict(state)
        assert [_summary(next(ld)) for _ in range(5)] == [_summary(b) for b in batches[r][7:12]]
    # Resume at dp_size=1: epoch 0 is still read exactly once overall.
    single = _loader(dataset, dp=1)
    single.load_state_dict(state)
    later = [next(single) for _ in range(2 * steps)]
    ids = _epoch0_ids([b[:7] for b in batches] + [later])
    assert sorted(ids) == list(range(46))
    for ld in ranks + fresh + resumed + [single]:
        ld.close()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_named(dataset, tmp_path):
    root, tok = dataset
    with pytest.raises(NaFlexError, match="patch budget 500 is not one of"):
        NaFlexLoader(_cfg(root), tok, patch_size=P, max_budget=500)
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        NaFlexLoader(_cfg(root), tmp_path / "missing", patch_size=P)
    with pytest.raises(ValueError, match="data.tokenizer is empty"):
        NaFlexLoader(_cfg(root), patch_size=P)
    cfg = Config(data=_cfg(root, max_patch_budget=500))
    with pytest.raises(ConfigError, match=r"data.max_patch_budget: one of \(128, 256"):
        cfg.validate()
    for budget in PATCH_BUDGETS:  # the config's list is naflex.PATCH_BUDGETS
        Config(data=_cfg(root, max_patch_budget=budget)).validate()
    cfg = Config(data=_cfg(root, budget_patience=-1))
    with pytest.raises(ConfigError, match="data.budget_patience: must be >= 0"):
        cfg.validate()
    with _loader(dataset) as loader:
        state = loader.state_dict()
    with _loader(dataset, seed=8) as other, pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(state)
    # An image smaller than one patch: named by shard, row and key when the window is grouped.
    write_shard(tmp_path / "shard-000000.zarr", [_sample(0, 40, 40), _sample(1, 5, 40)], K)
    write_index(tmp_path, [{"path": "shard-000000.zarr", "num_samples": 2}], {})
    with NaFlexLoader(_cfg(tmp_path, micro=1), tok, patch_size=P) as loader:
        with pytest.raises(
            NaFlexError, match=r"shard-000000.zarr row 1 \(img001.jpg\): image of 5x40 px"
        ):
            for _ in range(2):
                next(loader)
    # A stored size that is not the JPEG's: the budget would be wrong, so it is an error.
    liar = _sample(2, 40, 40)
    liar.width = 200
    write_shard(tmp_path / "shard-000000.zarr", [liar], K)
    write_index(tmp_path, [{"path": "shard-000000.zarr", "num_samples": 1}], {})
    with NaFlexLoader(_cfg(tmp_path, micro=1), tok, patch_size=P) as loader:
        with pytest.raises(NaFlexError, match=r"row 0 \(img002.jpg\): the JPEG is 40x40 px, the"):
            next(loader)


def test_loader_batches_train_the_fgclip2_model(dataset, world):
    """The path a user takes: loader batch -> FG-CLIP 2 forward -> both stages' objectives."""
    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.models.fgclip2 import FGCLIP2Model
    from fgclip_mega.objective import Objective
    from fgclip_mega.objective.forward_fgclip2 import encode_naflex_batch
    from fgclip_mega.presets import fgclip2_tiny

    cfg = fgclip2_tiny()
    assert cfg.model.vision.patch_size == P
    torch.manual_seed(0)
    model = FGCLIP2Model(cfg.model, ParallelConfig())
    with _loader(dataset, micro=4) as loader:
        batch = next(b for b in loader if len(b.hard_rows) > 0)
    for regional in (False, True):
        objective = Objective(cfg.loss, regional=regional, impl="naive")
        out = objective(encode_naflex_batch(model, batch, regional), model.temperatures())
        out.total.backward()
        names = ["long", "short"] + (["region", "tic", "fgt"] if regional else [])
        assert all(torch.isfinite(out.parts[n]) for n in names), out.parts


def test_texts_are_padded_to_the_models_contexts(dataset, world):
    # model.text.short_context / long_context set the rows' lengths through the family's
    # loaders and codec (the tower pools the last position: a row must be exactly its
    # context long); the model refuses rows of another length by name.
    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.family import family
    from fgclip_mega.models.fgclip2 import FGCLIP2Model
    from fgclip_mega.objective import Objective
    from fgclip_mega.objective.forward_fgclip2 import encode_naflex_batch
    from fgclip_mega.presets import fgclip2_tiny

    root, tok = dataset
    cfg = fgclip2_tiny()
    cfg.data = _cfg(root, micro=4, tokenizer=str(tok))
    cfg.model.text.short_context, cfg.model.text.long_context = 24, 72  # 20 kept + 4 x 13
    fam = family(cfg)
    with fam.build_loader(cfg, 0, 1, "cpu") as loader:
        batch = next(b for b in loader if len(b.hard_rows) > 0)
    with _loader(dataset, micro=4) as loader:  # upstream's 64 / 196
        full = next(b for b in loader if len(b.hard_rows) > 0)
    assert batch.keys == full.keys
    for name, length in (("long_tokens", 72), ("short_tokens", 24), ("region_tokens", 24),
                         ("hardneg_tokens", 24)):  # fmt: skip
        rows, ref = getattr(batch, name), getattr(full, name)
        assert rows.shape == (*ref.shape[:-1], length), name
        fits = (ref != 0).sum(-1) <= length  # texts that fit are the same tokens
        assert fits.any() and torch.equal(rows[fits], ref[..., :length][fits]), name
        # A longer text is cut as upstream's tokenizer call cuts it: its <eos> (1) kept last.
        cut = rows[~fits]
        assert torch.equal(cut[:, :-1], ref[~fits][:, : length - 1]) and (cut[:, -1] == 1).all()
    assert (~((full.long_tokens != 0).sum(-1) <= 72)).any()  # some long captions are cut
    torch.manual_seed(0)
    model = FGCLIP2Model(cfg.model, ParallelConfig())
    out = Objective(cfg.loss, regional=True, impl="naive")(
        encode_naflex_batch(model, batch, True), model.temperatures()
    )
    assert torch.isfinite(out.total)
    with pytest.raises(ValueError, match="padded to 196 tokens"):
        encode_naflex_batch(FGCLIP2Model(fgclip2_tiny().model, ParallelConfig()), batch, True)
    # Evaluation reads texts the same way: its loader's rows and the codec's prompts.
    eval_loader, _ = fam.eval_loader(cfg, 0, 1, "cpu")
    with eval_loader:
        assert next(iter(eval_loader)).long_tokens.shape[1] == 72
    codec = fam.text_codec(model, eval_loader)
    assert codec.tokenize(["a red circle"], "box").shape == (1, 24)
    assert codec.tokenize(["a red circle"], "long").shape == (1, 72)


def _dp_rank_body(root: str, tok: str, steps: int, resume_at: int) -> dict:
    """One DP rank (spawned, gloo): all-gathers its pixels every step (the global losses'
    gather needs equal shapes on every rank); after `resume_at` steps a second loader resumes
    from rank 0's state (as a checkpoint restores it) and reads 5 batches."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _cfg(root, tokenizer=tok)
    got, resumed_batches = [], []
    with NaFlexLoader(cfg, patch_size=P, dp_rank=rank, dp_size=world) as loader:
        for step in range(steps):
            batch = next(loader)
            parts = [torch.empty_like(batch.pixels) for _ in range(world)]
            dist.all_gather(parts, batch.pixels)  # fails on unequal shapes
            got.append((_summary(batch), batch.sample_epochs.tolist()))
            if step + 1 == resume_at:
                state = [loader.state_dict() if rank == 0 else None]
                dist.broadcast_object_list(state, src=0)
                with NaFlexLoader(cfg, patch_size=P, dp_rank=rank, dp_size=world) as resumed:
                    resumed.load_state_dict(state[0])
                    resumed_batches = [_summary(next(resumed)) for _ in range(5)]
    dist.destroy_process_group()
    return {"batches": got, "resumed": resumed_batches}


@pytest.mark.slow
def test_dp2_spawned_ranks_gather_equal_shapes_and_resume(dataset):
    from tests.distributed import run_distributed

    root, tok = dataset
    steps, cut = 24, 7  # 24 x 2 x 2 = 96 samples >= 46 + the bounded carry
    ranks = run_distributed(_dp_rank_body, 2, str(root), str(tok), steps, cut)
    ids = [
        sid
        for r in ranks
        for summary, epochs in r["batches"]
        for sid, ep in zip(summary[1], epochs, strict=True)
        if ep == 0
    ]
    assert sorted(ids) == list(range(46))  # every sample of epoch 0 once across the ranks
    for (s0, _), (s1, _) in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        assert s0[0] == s1[0]  # one budget per step
    for r in ranks:
        assert r["resumed"] == [s for s, _ in r["batches"][cut : cut + 5]]


def test_auto_patience_holds_about_eight_global_batches():
    from fgclip_mega.data.naflex_loader import auto_patience

    cfg = DataConfig(read_block_size=256, shuffle_window_blocks=8)  # 2048-sample windows
    assert [auto_patience(g, cfg) for g in (32, 256, 1024, 4096)] == [1, 1, 4, 16]
