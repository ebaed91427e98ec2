"""Runs under torchrun: this process's place among R processes, read from the environment (RANK,
WORLD_SIZE, LOCAL_RANK), and the few collectives the loops use (gloo on CPU, nccl on CUDA).

Without WORLD_SIZE (a plain ``python -m ddfast``), or with WORLD_SIZE=1, ``world()`` is a single
process and every collective is a no-op. A collective that fails or waits longer than the timeout
(``$DDFAST_DIST_TIMEOUT`` seconds, default 1800) raises ``PeerFailure`` instead of hanging, so the
process exits and torchrun stops the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_ENV = "DDFAST_DIST_TIMEOUT"
TIMEOUT_SECONDS = 1800


class PeerFailure(RuntimeError):
    """A collective failed: another process died, stalled past the timeout, or could not be reached."""


@dataclass(frozen=True)
class World:
    """Process ``rank`` of ``size``; ``local_rank`` picks its GPU on a machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leads(self) -> bool:
        """Rank 0: the process that writes outputs and checkpoints and speaks to the user."""
        return self.rank == 0

    @property
    def process_group(self):
        """The ops' ``group=`` for these processes: ``torch.distributed.group.WORLD``, or None in one process."""
        return dist.group.WORLD if self.distributed else None

    def shard(self) -> tuple[int, int]:
        """(rank, size): this process's share of work split as ``k % size == rank``."""
        return self.rank, self.size

    def classes(self, num_classes: int) -> range:
        """The classes c with c % size == rank: this process's share of a per-class loss."""
        return range(self.rank, num_classes, self.size)

    def device(self, device: torch.device) -> torch.device:
        """``device`` for this process: an unnumbered ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if device.type != "cuda" or device.index is not None or not self.distributed:
            return device
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(f"LOCAL_RANK={self.local_rank} but this machine has {count} CUDA device(s): "
                             f"start at most {count} processes per machine (--nproc-per-node), or pass --device cpu")
        return torch.device("cuda", self.local_rank)

    @contextlib.contextmanager
    def group(self, device: torch.device):
        """Join the process group for the block (unless one is already up): nccl for CUDA ``device``, else gloo."""
        if not self.distributed or dist.is_initialized():
            yield
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        seconds = timeout_seconds()
        try:
            dist.init_process_group(backend, rank=self.rank, world_size=self.size, timeout=datetime.timedelta(seconds=seconds),
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise PeerFailure(f"rank {self.rank} of {self.size}: could not join the other processes within {seconds} s "
                              f"({_first_line(exc)}); start every rank with torchrun") from None
        try:
            yield
            self.barrier("finishing")  # all leave together: none tears its connections down while another still uses them
        finally:
            dist.destroy_process_group()

    def sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; ``what`` names it in an error."""
        if self.distributed:
            self._collective(what, dist.all_reduce, tensor)
        return tensor

    def broadcast(self, obj, what: str):
        """Rank 0's ``obj`` (any picklable value, tensors included) on every process."""
        if not self.distributed:
            return obj
        box = [obj if self.leads else None]
        self._collective(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self, what: str) -> None:
        """Wait until every process gets here."""
        if self.distributed:
            self._collective(what, dist.barrier)

    def _collective(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as exc:
            raise PeerFailure(f"rank {self.rank} of {self.size}: {what} failed ({_first_line(exc)}); another process failed "
                              f"or did not answer within {timeout_seconds()} s (${TIMEOUT_ENV}): see its output") from None


def world() -> World:
    """This process's World from RANK, WORLD_SIZE and LOCAL_RANK (torchrun sets them); one process without them."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not rank < size:
        raise ValueError(f"RANK={rank} must be below WORLD_SIZE={size}")
    return World(rank, size, local_rank)


def timeout_seconds() -> int:
    """The collectives' timeout: ``$DDFAST_DIST_TIMEOUT`` seconds, default 1800."""
    return _env_int(TIMEOUT_ENV, 1) if TIMEOUT_ENV in os.environ else TIMEOUT_SECONDS


def _env_int(name: str, low: int) -> int:
    text = os.environ.get(name)
    if text is None:
        raise ValueError(f"WORLD_SIZE is set but {name} is not: start the processes with torchrun, which sets both")
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise ValueError(f"environment variable {name} must be an integer >= {low}, got {text!r}")
    return value


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
