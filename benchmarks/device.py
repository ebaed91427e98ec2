"""The machine a run measures: its description, and its own matmul rate and memory bandwidth.

The rates are measured in the same run as the cases, with the same timer, so that each case's
throughput can be read as a share of what this device does on plain torch work.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from . import harness

MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
COPY_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
METHOD = ("matmul: torch.mm of two {n} x {n} matrices in the case's dtype with torch's default settings "
          "(TF32 off for float32), 2 n^3 flops per call; bandwidth: Tensor.copy_ of {mib} MiB, counted as "
          "read + write (2 x {mib} MiB per call); both timed as the cases are")


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.machine()


def slug(device: torch.device) -> str:
    """A file-name-safe name of the device, e.g. ``cpu-amd-epyc-2c`` or ``cuda-nvidia-h200``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {cpu_model()} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def hardware(device: torch.device) -> dict:
    info = {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_bytes": _memory_bytes(),
            "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_count=torch.cuda.device_count())
    return info


def software() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "numpy", "ddfast"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return versions


def git(root: Path) -> dict:
    def out(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    try:
        return {"commit": out("rev-parse", "HEAD") or None, "dirty": bool(out("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"commit": None, "dirty": None}


def rates(device: torch.device, dtypes: list[torch.dtype]) -> dict:
    """Measured matmul TFLOP/s per dtype and copy bandwidth in GB/s (10^9 bytes)."""
    n, size = MATMUL_SIZE[device.type], COPY_BYTES[device.type]
    matmul = {}
    for dtype in dtypes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        matmul[str(dtype).removeprefix("torch.")] = 2 * n**3 / harness.time_ms(lambda: a @ b, device)["median_ms"] / 1e9
    src = torch.ones(size // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    bandwidth = 2 * size / harness.time_ms(lambda: dst.copy_(src), device)["median_ms"] / 1e6
    return {"matmul_tflops": matmul, "bandwidth_gbs": bandwidth, "method": METHOD.format(n=n, mib=size >> 20)}


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
