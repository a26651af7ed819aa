"""Offline data preparation: FineHARD JSON(L) + images -> zarr shards, and synthetic data.

Depends on `fgclip_mega.data` (tokenizer, ingest, shard format, synthetic scenes) only; the
library never imports this package.
"""
