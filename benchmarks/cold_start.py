"""Cold and warm cost of each op's default backend against the reference, as ratios.

Cold: a fresh Python process imports ddfast and makes the first forward+backward call (what a user's
script pays once); the backend's and the reference's processes alternate, ``COLD_REPEATS`` of each,
and the medians are compared (``import torch`` alone varies by tenths of a second between processes).
Warm: the same call repeated in one process, timed by ``harness.time_ms``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
COLD_REPEATS = 5
CALLS = {  # small inputs: the fixed costs are what this measures
    "infonce": "ddfast.infonce(x, x.detach() + 1, temperature=0.5, backend=BACKEND)",
    "cmi": "ddfast.cmi_loss(x, torch.arange(64, device=x.device) % 8, num_classes=8, backend=BACKEND)",
    "trajectory_mse": "ddfast.trajectory_mse([x], [x.detach() + 1], [x.detach() - 1], backend=BACKEND)",
}
SCRIPT = """
import sys, time
started = time.perf_counter()
import torch, ddfast
BACKEND, device = sys.argv[1], sys.argv[2]
x = torch.randn(64, 32, device=device, requires_grad=True)
({call}).backward()
if device == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - started)
"""


def cold_s(op: str, backend: str, device: torch.device) -> float:
    """Seconds from a fresh process's ``import ddfast`` to the end of its first forward+backward."""
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(call=CALLS[op]), backend, device.type],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
    return float(out.stdout.split()[-1])


def warm_ms(op: str, backend: str, device: torch.device) -> float:
    import ddfast  # noqa: F401 (used by the evaluated call)

    x = torch.randn(64, 32, device=device, requires_grad=True)
    call = compile(CALLS[op], "<call>", "eval")
    return harness.time_ms(lambda: eval(call, {"ddfast": ddfast, "torch": torch, "x": x, "BACKEND": backend}).backward(),
                           device)["median_ms"]


def measure(op: str, device: torch.device, backend: str = "auto") -> dict:
    """``backend``'s cold (median of ``COLD_REPEATS`` fresh processes) and warm times and their ratios to the reference's."""
    samples = {backend: [], "reference": []}
    for _ in range(COLD_REPEATS):
        for name, times in samples.items():
            times.append(cold_s(op, name, device))
    cold = {name: statistics.median(times) for name, times in samples.items()}
    warm = {name: warm_ms(op, name, device) for name in (backend, "reference")}
    return {"backend": backend, "cold_repeats": COLD_REPEATS, "cold_s": cold[backend], "reference_cold_s": cold["reference"],
            "cold_ratio": cold[backend] / cold["reference"], "warm_ms": warm[backend],
            "reference_warm_ms": warm["reference"], "warm_ratio": warm[backend] / warm["reference"]}


if __name__ == "__main__":
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({op: measure(op, where) for op in CALLS}, indent=1))
