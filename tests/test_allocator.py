import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: after keep_freed_memory, a freed 48 MiB block (above glibc's largest automatic
# mmap threshold, 32 MiB) is reused without faulting its 12288 pages in again.
PROBE = """
import resource, sys, torch
from ddfast.distill.allocator import keep_freed_memory
tuned = sys.argv[1] == "tuned"
if tuned:
    assert keep_freed_memory()
size = 48 << 20
for _ in range(20):  # the heap grows to its working size
    torch.empty(size, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(size, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_are_reused_without_page_faults():
    pages = (48 << 20) // 4096
    assert page_faults("default") >= 5 * pages  # glibc's own behaviour: every block is mapped afresh
    assert page_faults("tuned") < pages // 10
