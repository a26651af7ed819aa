"""Held-out evaluation of FG-CLIP models: metrics (metrics.py), phrase attributes (phrases.py),
the gathered embedding set (collect.py), the suite (suite.py) and `python -m fgclip_mega.eval`.

The public names load lazily (PEP 562), so the command line checks its arguments and sets up
logging before the model code (and megatron-core) is imported.
"""

from fgclip_mega.lazy import lazy_exports

_LAZY = {
    "EvalSet": "fgclip_mega.eval.collect",
    "collect": "fgclip_mega.eval.collect",
    "evaluate": "fgclip_mega.eval.suite",
    "flat": "fgclip_mega.eval.suite",
    "run_suite": "fgclip_mega.eval.suite",
    "summary_of": "fgclip_mega.eval.suite",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
