"""The objective layer: a micro-batch to `Embeddings` (forward.py), and the FG-CLIP loss as a
list of terms over them (terms.py). Training and evaluation both go through here."""

from fgclip_mega.objective.embeddings import Embeddings
from fgclip_mega.objective.forward import encode_batch
from fgclip_mega.objective.terms import TERMS, LossTerm, Objective, ObjectiveOutput, log_name

__all__ = [
    "TERMS",
    "Embeddings",
    "LossTerm",
    "Objective",
    "ObjectiveOutput",
    "encode_batch",
    "log_name",
]
