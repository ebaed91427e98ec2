import platform
import resource

import pytest
import torch

from ddfast.allocator import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_are_reused_without_page_faults():
    assert keep_freed_memory()
    size = 48 << 20  # above glibc's largest automatic mmap threshold (32 MiB)
    for _ in range(5):  # the heap grows to its working size
        torch.empty(size, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(size, dtype=torch.uint8).fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < (size // 4096) // 10  # without it, every block faults in all its 12288 pages again
