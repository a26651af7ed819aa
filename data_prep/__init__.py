"""Offline data preparation: thin command lines over the library's builders.

FineHARD JSON(L) + images -> zarr shards (`build_shards`) and synthetic FineHARD data
(`synthetic`). Imports only `fgclip_mega.data.shards` (the shard format and its builders) and the
tokenizer (tests/test_schema.py checks it); the library never imports this package.
"""
