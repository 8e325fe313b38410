"""CPU runs fix glibc's mmap threshold, so the pages of a freed tensor go back to the OS (what peak RSS sees)."""

import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from gradspace.train.allocator import return_freed_memory
if sys.argv[1] == "fixed":
    assert return_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(6 << 20)   # 24 MiB: mmapped either way; freeing it raises glibc's default threshold to 24 MiB
del x
base = rss()
ys, keep = [], []
for _ in range(8):   # 8 x 12 MiB from the heap once the threshold was raised, each pinned by a small live tensor
    ys.append(torch.ones(3 << 20))
    keep.append(torch.ones(64 << 10))
del ys
print((rss() - base) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_process_with_the_fixed_threshold():
    held = {}
    for mode in ("default", "fixed"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        held[mode] = int(out.stdout.strip().splitlines()[-1])
    assert held["fixed"] < 8, held  # MiB still resident after the 96 MiB were freed
    assert held["default"] > held["fixed"], held  # and without it glibc keeps part of them
