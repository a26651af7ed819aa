from fgclip_mega.profiling.phases import PhaseTimer
from fgclip_mega.profiling.trace import maybe_torch_profiler

__all__ = ["PhaseTimer", "maybe_torch_profiler"]
