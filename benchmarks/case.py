"""One benchmark case: one implementation of one operation at one shape and dtype.

``run`` measures it in this process: a warm-up forward+backward (compilation, extension loading),
then for the forward (autograd recording, as in training) and for forward+backward: peak memory
and time (``harness.measure``). ``isolated`` runs it in a fresh process, as the CPU's resident-memory
figure needs, under a memory cap and a time limit; running out of either is a result, not a crash.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import resource
import signal
import tempfile
from dataclasses import dataclass

import torch

from . import harness, ops

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
        figures = {phase: harness.measure(fn, device) for phase, fn in calls.items()}
        return result(case, OK, **figures)
    except Exception as exc:  # a failing implementation is a result; the sweep goes on
        # the CPU allocator raises a plain RuntimeError under the memory cap
        if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc):
            request = re.search(r"tried to allocate [\d.]+ ?\w*", str(exc), re.IGNORECASE)
            return result(case, OUT_OF_MEMORY, request.group(0).strip() if request else _first_line(exc))
        return result(case, ERROR, f"{type(exc).__name__}: {_first_line(exc)}")


def isolated(case: Case, timeout_s: float, memory_cap_bytes: int | None) -> dict:
    """``run(case)`` in a fresh process, its data segment capped at ``memory_cap_bytes``.

    Processes are forked from a server that has imported torch and the benchmark modules but run
    nothing (``multiprocessing``'s forkserver), so that a case does not pay torch's import.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["benchmarks.case", *(f"benchmarks.{op}" for op in ops.OPS)])
    receive, send = context.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile("r", prefix="ddfast-bench-", suffix=".log") as log:
        process = context.Process(target=_child, args=(case, memory_cap_bytes, send, log.name), daemon=True)
        process.start()
        send.close()
        try:
            if receive.poll(timeout_s):
                return receive.recv()
            process.kill()
            return result(case, TIMEOUT, f"over the {timeout_s:g} s limit per case")
        except EOFError:  # the process died without an answer
            process.join()
            if process.exitcode == -signal.SIGKILL:
                return result(case, OUT_OF_MEMORY, "killed by SIGKILL (the system's out-of-memory killer?)")
            last = log.read().strip().splitlines() or [f"exit code {process.exitcode}"]
            return result(case, ERROR, last[-1][:300])
        finally:
            process.join()
            receive.close()


def _child(case: Case, memory_cap_bytes: int | None, send, log_path: str) -> None:
    with open(log_path, "w") as log:  # the case's own output (warnings) stays out of the table
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    if memory_cap_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_cap_bytes, memory_cap_bytes))
    send.send(run(case))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
