"""Data: CLIP tokenizer, zarr shard format, synthetic fine-grained scenes, DALI and PIL loaders.

Kept import-light on purpose: DALI's spawned reader processes import `fgclip_mega.data.source`,
which must not pull in torch or DALI. Import from the submodules:

    from fgclip_mega.data.loader import build_loader, Batch
"""
