"""NaFlex loader decoding: DALI (CPU, libjpeg-turbo) vs the PIL reference, in the same run.

On the embedded mixed-size synthetic set (patch 8, budgets 128/256) this prints JSON lines:
  - `dali_start`: seconds to import nvidia.dali (once per process) and to build the decode
    pipeline (the loader builds it at its first batch and again after a decode error);
  - `decode`: JPEGs/s of each decoder alone (reading its samples' JPEG bytes from the shards and
    decoding them, as in the loader) on the same micro-batches,
    and `dali_vs_pil` = DALI rate / PIL rate (medians of --repeats alternated runs);
  - `loader`: whole NaFlex batches/s (read, decode, pack to the budget, tokenize) per kind, and
    the ratio; the first batch (pipeline build, first reads) is left out.

    .venv/bin/python run/bench_naflex_decode.py [--samples 96] [--micro 8] [--batches 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs; medians printed")
    args = ap.parse_args()

    t0 = time.perf_counter()
    import nvidia.dali  # noqa: F401

    import_s = time.perf_counter() - t0

    from fgclip_mega.config import DataConfig
    from fgclip_mega.data.embedded_naflex import ensure_synthetic_naflex_shards
    from fgclip_mega.data.naflex_loader import NaFlexLoader
    from fgclip_mega.data.synthetic import MixedSizes

    sizes = MixedSizes()
    with tempfile.TemporaryDirectory() as tmp:
        index, tok = ensure_synthetic_naflex_shards(tmp, args.samples, shard_size=32)
        cfg = DataConfig(shards=str(index.parent), micro_batch_size=args.micro, max_boxes=4,
                         num_hard_negatives=10, read_block_size=16, shuffle_window_blocks=2,
                         num_threads=args.threads, tokenizer=str(tok.parent))  # fmt: skip

        def loader(kind: str) -> NaFlexLoader:
            return NaFlexLoader(cfg, patch_size=sizes.patch_size, max_budget=sizes.max_budget,
                                kind=kind)  # fmt: skip

        # Decoders alone, on the same samples.
        with loader("dali") as ld, loader("pil") as pil:
            groups = []
            while len(groups) < args.batches:
                while not ld.grouper.ready:
                    ld._group_next_window()
                _, items = ld.grouper.pop()
                groups.append([ld._sample(sid, epoch) for sid, epoch, _ in items[: args.micro]])
            dec = ld.decoder
            t0 = time.perf_counter()
            dec._pipe = dec._build()
            build_s = time.perf_counter() - t0
            print(json.dumps({"bench": "dali_start", "import_s": round(import_s, 3),
                              "pipeline_build_s": round(build_s, 4),
                              "threads": args.threads}), flush=True)  # fmt: skip
            decoders = {"dali": dec, "pil": pil.decoder}
            rates = {"dali": [], "pil": []}
            for _ in range(args.repeats):  # alternated: the machine's load drifts
                for kind, decoder in decoders.items():
                    decoder(groups[0])  # warm
                    n, t0 = 0, time.perf_counter()
                    for samples in groups:
                        n += len(decoder(samples))
                    rates[kind].append(n / (time.perf_counter() - t0))
            rates = {k: statistics.median(v) for k, v in rates.items()}
            print(json.dumps({"bench": "decode", "images": n,
                              **{f"{k}_img_per_s": round(v, 1) for k, v in rates.items()},
                              "dali_vs_pil": round(rates["dali"] / rates["pil"], 3)}),
                  flush=True)  # fmt: skip

        rates = {"dali": [], "pil": []}
        for _ in range(args.repeats):
            for kind in rates:
                with loader(kind) as ld:
                    next(ld)
                    t0 = time.perf_counter()
                    for _ in range(args.batches):
                        next(ld)
                    rates[kind].append(args.batches / (time.perf_counter() - t0))
        rates = {k: statistics.median(v) for k, v in rates.items()}
        print(json.dumps({"bench": "loader", "micro_batch": args.micro, "batches": args.batches,
                          **{f"{k}_batches_per_s": round(v, 2) for k, v in rates.items()},
                          "dali_vs_pil": round(rates["dali"] / rates["pil"], 3),
                          "torch_threads": torch.get_num_threads(),
                          "load_avg_1min": os.getloadavg()[0]}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
