"""Give freed tensors' memory back to the operating system on Linux CPU runs.

glibc serves an allocation below its mmap threshold from its heap, and raises that threshold (up to 32 MiB) each
time a larger mmapped block is freed. A training step frees and allocates tensors of many sizes, so after the
first step most of them come from the heap, whose freed pages stay with the process: LLaMA-1B layer-wise held
2.3 GiB that no tensor used (docs/benchmarks.md). A fixed threshold (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, which
also stops the raising) maps every tensor of 1 MiB or more on its own, so freeing it returns its pages at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc (macOS, musl, Windows): nothing to change."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
