"""The benchmarks' model, tokenizer and encoder for the checkpoint's family (cfg.model.family,
which model_config read from config.json or a training checkpoint's saved config)."""

from __future__ import annotations

from pathlib import Path


def tokenizer_for(cfg, checkpoint: str, explicit: str = ""):
    """FG-CLIP 2: the SigLIP 2 tokenizer from `explicit` (--tokenizer), else data.tokenizer of a
    training checkpoint's config, else the checkpoint's own folder (released checkpoints ship
    tokenizer.json beside the weights). A missing or wrong file raises TokenizerError naming
    it; the vocabulary must fit the model's. v1: None (the built-in CLIP BPE)."""
    from fgclip_mega.data.siglip2_tokenizer import Siglip2Tokenizer, TokenizerError

    if cfg.model.family != "fgclip2":
        return None
    where = Path(checkpoint)
    path = explicit or cfg.data.tokenizer or (where if where.is_dir() else where.parent)
    try:
        tokenizer = Siglip2Tokenizer(path)
    except TokenizerError as e:
        hint = "" if explicit else " (pass --tokenizer PATH)"
        raise TokenizerError(f"{e}{hint}") from e
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise TokenizerError(
            f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than the model's "
            f"model.text.vocab_size={cfg.model.text.vocab_size}: not this checkpoint's tokenizer"
        )
    return tokenizer


def load_model(cfg, step_dir: Path | None, checkpoint: str, state, log):
    """FGCLIPModel or FGCLIP2Model with the checkpoint's weights, in eval mode."""
    if cfg.model.family != "fgclip2":
        from fgclip_mega.eval.__main__ import _load

        return _load(cfg, step_dir, checkpoint, state, log)
    from fgclip_mega.checkpoint.hf_fgclip2 import import_fgclip2_state_dict
    from fgclip_mega.models.fgclip2 import FGCLIP2Model

    model = FGCLIP2Model.from_runtime(cfg.model, cfg.parallel, state.runtime, state.tp_group)
    if step_dir is not None:
        from fgclip_mega.checkpoint.weights import load_training_weights

        info = load_training_weights(model, step_dir)
        log.info("%s: step %d, saved %s", step_dir, info["step"], info["saved_layout"])
    else:
        derived = import_fgclip2_state_dict(model, checkpoint)["derived"]
        if derived:
            # A plain SigLIP 2 checkpoint: the extra heads start as copies (upstream's init).
            log.info("%s: derived %d FG-CLIP 2 extras from SigLIP 2 weights", checkpoint,
                     len(derived))  # fmt: skip
    return model.eval()


def make_encoder(model, runtime, protocol, tokenizer=None):
    if getattr(model.cfg, "family", "fgclip") == "fgclip2":
        from fgclip_mega.eval.benchmarks.naflex_encoder import NaFlexEncoder

        return NaFlexEncoder(model, tokenizer, runtime, protocol)
    from fgclip_mega.eval.benchmarks.engine import ModelEncoder

    return ModelEncoder(model, runtime, protocol)
