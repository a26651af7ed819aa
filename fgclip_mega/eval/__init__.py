"""Held-out evaluation of FG-CLIP models: metrics (metrics.py), phrase attributes (phrases.py),
the gathered embedding set (collect.py), the suite (suite.py) and `python -m fgclip_mega.eval`."""

from fgclip_mega.eval.collect import EvalSet, collect
from fgclip_mega.eval.suite import evaluate, flat, run_suite, summary_of

__all__ = ["EvalSet", "collect", "evaluate", "flat", "run_suite", "summary_of"]
