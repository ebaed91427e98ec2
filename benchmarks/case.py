"""One benchmark case: one implementation of one operation at one shape and dtype.

``run`` measures it in this process: a warm-up forward+backward (compilation, extension loading),
then for the forward (autograd recording, as in training) and for forward+backward: peak memory
of one call, then the time. ``isolated`` runs it in a fresh process
(``python -m benchmarks.case '<case as JSON>'``), as the CPU's resident-memory figure needs, under
a memory cap and a time limit; running out of either is a result, not a crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import harness, ops

ROOT = Path(__file__).resolve().parents[1]

OK, OUT_OF_MEMORY, TIMEOUT, ERROR, SKIPPED = "ok", "out of memory", "timeout", "error", "skipped"


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    shape: dict
    dtype: str
    device: str

    def label(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op} {dims} {self.dtype} {self.impl}"


def result(case: Case, status: str, note: str = "", **phases) -> dict:
    return {**dataclasses.asdict(case), "status": status, "note": note, **phases}


def run(case: Case) -> dict:
    """Measure ``case`` in this process (see the module docstring)."""
    device, dtype = torch.device(case.device), getattr(torch, case.dtype)
    op = ops.load(case.op)
    try:
        impl = ops.implementation(op, case.impl)
        calls = ops.calls(impl, op.inputs(case.shape, dtype, device))
        calls["forward_backward"]()  # warm-up: compilation, extension loading, lazy initialisation
        harness.synchronize(device)
        # memory first: one call each, then the timed calls
        figures = {phase: {"peak_bytes": harness.peak_bytes(fn, device), **harness.time_ms(fn, device)}
                   for phase, fn in calls.items()}
        return result(case, OK, **figures)
    except Exception as exc:  # a failing implementation is a result; the sweep goes on
        # the CPU allocator raises a plain RuntimeError under the memory cap
        if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc):
            return result(case, OUT_OF_MEMORY, _first_line(exc))
        return result(case, ERROR, f"{type(exc).__name__}: {_first_line(exc)}")


def isolated(case: Case, timeout_s: float, memory_cap_bytes: int | None) -> dict:
    """``run(case)`` in a fresh Python process, its data segment capped at ``memory_cap_bytes``."""
    command = [sys.executable, "-m", "benchmarks.case", json.dumps(dataclasses.asdict(case))]
    if memory_cap_bytes:
        command.append(str(memory_cap_bytes))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return result(case, TIMEOUT, f"over the {timeout_s:g} s limit per case")
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode == -9:
        return result(case, OUT_OF_MEMORY, "killed by SIGKILL (the system's out-of-memory killer?)")
    last_lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
    return result(case, ERROR, last_lines[-1][:300])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def main(argv: list[str]) -> None:
    case = Case(**json.loads(argv[0]))
    if len(argv) > 1:
        cap = int(argv[1])
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    print(json.dumps(run(case)))


if __name__ == "__main__":
    main(sys.argv[1:])
