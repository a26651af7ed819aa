from fgclip_mega.profiling.flops import FlopReport, Flops, training_flops
from fgclip_mega.profiling.peak import (
    device_peak_flops,
    gpu_peak_flops,
    measured_cpu_peak_flops,
    mfu,
)
from fgclip_mega.profiling.phases import PhaseTimer
from fgclip_mega.profiling.trace import maybe_torch_profiler

__all__ = [
    "FlopReport",
    "Flops",
    "PhaseTimer",
    "device_peak_flops",
    "gpu_peak_flops",
    "maybe_torch_profiler",
    "measured_cpu_peak_flops",
    "mfu",
    "training_flops",
]
