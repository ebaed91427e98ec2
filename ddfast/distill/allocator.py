"""Keep freed memory in the process on glibc, so CPU training does not page-fault on every step.

glibc returns large freed blocks (above a threshold of at most 32 MiB) to the system at once, so
the next step's activations of the same size are mapped and zeroed again: on a 2-core machine that
cost a third of the CPU time of ConvNet training (page faults in system time). The command line
and ``run`` raise both thresholds at start; a library user may call ``keep_freed_memory()`` themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold`` freed.

    Returns whether it took effect (glibc on Linux only; elsewhere it does nothing).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
