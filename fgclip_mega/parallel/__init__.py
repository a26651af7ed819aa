from fgclip_mega.parallel.bootstrap import (
    ParallelState,
    destroy_parallel,
    init_distributed,
    init_parallel,
)

__all__ = ["ParallelState", "destroy_parallel", "init_distributed", "init_parallel"]
