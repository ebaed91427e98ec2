"""The machine and software a device check runs on, as one JSON document on stdout.

    python -m benchmarks.environment cuda|cpu

Run in its own process, so that a device that fails or hangs at start costs the caller a time limit,
not its own run.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import device as machine

ROOT = Path(__file__).resolve().parents[1]


def _output(argv: list[str]) -> str | None:
    """First line of a command's stdout, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def describe(device: torch.device) -> dict:
    """Date, device (GPU name, driver, compute capability, SMs, memory), versions and commit."""
    software = machine.software()
    commit = _output(["git", "rev-parse", "--short", "HEAD"])
    doc = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "slug": machine.slug(device),
        "python": software["python"],
        "torch": software["torch"],
        "triton": software["triton"],
        "cuda_runtime": software["cuda"],
        "commit": commit,
        "dirty": machine.git(ROOT)["dirty"] if commit else None,
        "hardware": machine.hardware(device),
        "software": software,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        doc.update(gpu=props.name, driver=_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                   compute_capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_bytes=props.total_memory)
    return doc


if __name__ == "__main__":
    print(json.dumps(describe(torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")), indent=1))
