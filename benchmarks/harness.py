"""Timing and peak-memory probes for one callable on one device.

Time: CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls); the CPU uses
repeated wall-clock (``time.perf_counter``) after the caller's warm-up. Memory: CUDA reports
``max_memory_allocated`` above what was allocated before the call; the CPU reports the process's
peak resident set (``VmHWM``) above its resident set at the start of the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import statistics
import time
from collections.abc import Callable

import torch

CPU_TIME = ("median wall-clock time (time.perf_counter) of repeated calls after a warm-up call, at least {min_reps} "
            "calls and {min_time} s (20th and 80th percentiles in the JSON and CSV)")
CUDA_TIME = ("median of triton.testing.do_bench (CUDA events, L2 cache flushed, about {min_time} s of calls; 20th and "
             "80th percentiles in the JSON and CSV)")
CPU_MEMORY = ("peak resident set size (VmHWM) during the first timed call minus the resident set size right before it, "
              "in a fresh process per case after the inputs are built and one warm-up call; before that call glibc's free "
              "heap is returned to the system (malloc_trim) and VmHWM is reset (/proc/self/clear_refs)")
CUDA_MEMORY = "torch.cuda.max_memory_allocated during the call minus torch.cuda.memory_allocated before it (inputs excluded)"

MIN_REPS = 3
MIN_TIME_S = 0.5
MAX_REPS = 100


def describe(device: torch.device) -> dict[str, str]:
    """What ``measure`` reports for ``device``, in words for the report."""
    if device.type == "cuda":
        return {"time": CUDA_TIME.format(min_time=MIN_TIME_S), "memory": CUDA_MEMORY}
    return {"time": CPU_TIME.format(min_reps=MIN_REPS, min_time=MIN_TIME_S), "memory": CPU_MEMORY}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device) -> dict:
    """``peak_bytes`` of one call and ``time_ms`` of repeated calls; on the CPU the call measured for
    memory is also the first timed call."""
    if device.type == "cuda":
        return {"peak_bytes": peak_bytes(fn, device), **time_ms(fn, device)}
    first: list[float] = []
    peak = peak_bytes(lambda: first.append(_wall_ms(fn)), device)
    return {"peak_bytes": peak, **time_ms(fn, device, first)}


def time_ms(fn: Callable[[], object], device: torch.device, samples: list[float] | None = None) -> dict:
    """Median, 20th and 80th percentile of ``fn``'s duration in milliseconds, and the number of calls
    (CPU: counting the earlier ``samples``)."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, rep=int(MIN_TIME_S * 1000), quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": None}
    samples = list(samples or [])
    while len(samples) < MIN_REPS or (sum(samples) < MIN_TIME_S * 1000 and len(samples) < MAX_REPS):
        samples.append(_wall_ms(fn))
    return _summary(samples)


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, min_reps: int = MIN_REPS,
                   samples: dict[str, list[float]] | None = None) -> dict[str, dict]:
    """``time_ms``'s figures for each of ``fns`` (warmed up by the caller), called in turn, round after round, so that
    a machine's drift (other jobs, clocks) reaches every callable alike; wall-clock, synchronised on CUDA. ``samples``:
    earlier milliseconds per name, counted as the first round."""
    samples = {name: list((samples or {}).get(name, [])) for name in fns}
    while min(map(len, samples.values())) < min_reps or (
            min(map(sum, samples.values())) < MIN_TIME_S * 1000 and min(map(len, samples.values())) < MAX_REPS):
        for name, fn in fns.items():
            samples[name].append(wall_ms(fn, device))
    return {name: _summary(times) for name, times in samples.items()}


def _summary(samples: list[float]) -> dict:
    p20, _, _, p80 = statistics.quantiles(samples, n=5, method="inclusive")
    return {"median_ms": statistics.median(samples), "p20_ms": p20, "p80_ms": p80, "reps": len(samples)}


def wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, synchronised on CUDA before and after."""
    synchronize(device)
    return _wall_ms(lambda: (fn(), synchronize(device)))


def _wall_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory of one call of ``fn`` above the memory in use before it (see the module docstring);
    ``None`` on a CPU without Linux's ``/proc/self/clear_refs``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set size
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024


def _trim_heap() -> None:
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)
