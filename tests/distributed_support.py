"""Processes joined by a gloo process group on this machine, running test functions within a deadline.

``Ranks(size)`` starts ``size`` processes once (gloo over a free local port, a collective timeout);
``ranks.run(fn, *args)`` makes each call ``fn(rank, size, *args)`` and returns when all have. A rank
that raises (an assertion included) becomes ``RankFailed`` in the caller with that rank's traceback,
and every rank is stopped (a peer left waiting in a collective would never return); so is a run past
``deadline`` seconds, which raises ``TimeoutError``. A stopped ``Ranks`` is ``closed``: start another.
``fn`` must be importable by name (a module-level function of a test module).
"""

from __future__ import annotations

import datetime
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 20
DEADLINE_S = 60  # a run's deadline, including the processes' start on a first run


class RankFailed(AssertionError):
    """A rank raised or died; the message holds its rank and traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, size: int, port: int, tasks, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            fn(rank, size, *args)
            results.put((rank, None))
        except BaseException:
            results.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """``size`` processes of one gloo group, each running the functions it is given."""

    def __init__(self, size: int):
        context = mp.get_context("spawn")
        self.size, self.closed = size, False
        self.tasks = [context.Queue() for _ in range(size)]
        self.results = context.Queue()
        port = free_port()
        self.processes = [context.Process(target=_serve, args=(rank, size, port, self.tasks[rank], self.results), daemon=True)
                          for rank in range(size)]
        for process in self.processes:
            process.start()

    def run(self, fn, *args, deadline: float = DEADLINE_S) -> None:
        """``fn(rank, size, *args)`` on every rank; ``RankFailed`` / ``TimeoutError`` stop them all."""
        assert not self.closed, "these ranks were stopped: start new ones"
        for tasks in self.tasks:
            tasks.put((fn, args))
        pending, stop = set(range(self.size)), time.monotonic() + deadline
        while pending:
            try:
                rank, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [rank for rank in pending if not self.processes[rank].is_alive()]
                if dead:
                    self.close()
                    raise RankFailed(f"rank {dead[0]} of {self.size} exited (code {self.processes[dead[0]].exitcode}) "
                                     f"during {fn.__name__}") from None
                if time.monotonic() > stop:
                    self.close()
                    raise TimeoutError(f"{fn.__name__} on {self.size} ranks did not finish within {deadline:g} s") from None
                continue
            if error is not None:
                self.close()
                raise RankFailed(f"rank {rank} of {self.size} raised in {fn.__name__}:\n{error}")
            pending.discard(rank)

    def close(self) -> None:
        """Stop every rank (at once: some may be waiting in a collective)."""
        self.closed = True
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
