"""Running a device check's steps: commands under a time limit, each one's output in a log file.

A command over its limit is interrupted (SIGINT, so that pytest and ``run.py`` write what they have),
then killed with its whole process group after a short grace. ``Budget`` hands each step its share
of the total time plus whatever the steps before it left unused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PASSED, FAILED, TIMED_OUT, SKIPPED = "passed", "failed", "timed out", "skipped"
GRACE_S = 15.0  # at most this much of a command's limit is left for it to wind down once interrupted


@dataclass(frozen=True)
class Command:
    argv: list[str]
    log: Path


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background job inherits SIGINT ignored


def run(commands: list[Command], limit_s: float, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """Runs ``commands`` side by side within ``limit_s`` seconds; (status, note) of them together."""
    grace = min(GRACE_S, limit_s / 4)
    deadline = time.monotonic() + limit_s
    running = []
    for command in commands:
        with command.log.open("w") as log:
            running.append((command, subprocess.Popen(command.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_interruptible)))
    failed, timed_out = [], []
    for command, process in running:
        try:
            code = process.wait(timeout=max(0.0, deadline - grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out.append(command.log.name)
            code = _stop(process, grace)
        if code != 0 and command.log.name not in timed_out:
            failed.append(f"exit code {code} ({command.log.name})")
    if timed_out:
        return TIMED_OUT, f"stopped at the limit of {limit_s:.0f} s ({', '.join(timed_out)})"
    return (FAILED, "; ".join(failed)) if failed else (PASSED, "")


def _stop(process: subprocess.Popen, grace: float) -> int:
    """SIGINT to the process group, SIGKILL after ``grace`` seconds; the exit code."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


class Budget:
    """Time limits of steps run in order: each step's share (scaled to ``total_s``) plus what is unused."""

    def __init__(self, total_s: float, shares_s: dict[str, float], clock: Callable[[], float] = time.monotonic):
        scale = total_s / sum(shares_s.values()) if shares_s else 1.0
        self.later = {name: share * scale for name, share in shares_s.items()}
        self.clock = clock
        self.deadline = clock() + total_s

    def limit(self, name: str) -> float:
        """Seconds step ``name`` may take: the time left less the shares of the steps still to come."""
        self.later.pop(name)
        return max(0.0, self.deadline - self.clock() - sum(self.later.values()))
