"""Atomic files: a crash or a kill mid-write never leaves a truncated checkpoint, JSON or picture.

Each writer writes a temporary file beside the target, flushes it to disk, then renames it over the
target (``os.replace`` is atomic on one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | os.PathLike, *, mmap: bool = False) -> dict | None:
    """The state saved at ``path`` (tensors on the CPU), or ``None`` when there is none.

    Only tensors and plain containers load (``weights_only``): a checkpoint cannot run code.
    ``mmap`` maps the tensors' storage from the file instead of reading it (large, randomly accessed data).
    """
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def save_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
