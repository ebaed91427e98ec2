"""Atomic files: a crash or a kill mid-write never leaves a truncated checkpoint, JSON or picture.

Each writer writes a temporary file beside the target, flushes it to disk, then renames it over the
target (``os.replace`` is atomic on one file system). ``load`` reads only tensors and plain
containers, and says which file is unreadable (``UnreadableFile``) instead of failing deep in torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
from pathlib import Path

import torch

# What torch.load raises on a file that is truncated, corrupt or not a torch file at all.
_LOAD_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, LookupError, ValueError)


class UnreadableFile(ValueError):
    """``path`` cannot be what ddfast wrote there: unreadable, truncated, or holding other content."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path} {reason}")
        self.path, self.reason = Path(path), reason


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


def check_writable_folder(folder: str | os.PathLike) -> None:
    """``folder`` is (or can be created as) a folder this process can write; a ``ValueError`` naming it if not."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder: choose another output folder")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {existing} (for {folder}): permission denied")


def save(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` ``state`` to ``path`` atomically; equal states give byte-identical files."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # through a file object: the archive is not named after the temporary file


def load(path: str | os.PathLike, *, mmap: bool = False, keys: tuple[str, ...] = ()) -> dict | None:
    """The dict saved at ``path`` (tensors on the CPU), or ``None`` when there is no file.

    Only tensors and plain containers load (``weights_only``): a checkpoint cannot run code.
    ``mmap`` maps the tensors' storage from the file instead of reading it (large, randomly accessed data).
    Raises ``UnreadableFile`` when the file cannot be read, or is not a dict holding ``keys``.
    """
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        raise UnreadableFile(path, "is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise UnreadableFile(path, f"is corrupt or not a torch file ({_first_line(exc)})") from None
        raise UnreadableFile(path, "is not a file ddfast wrote: a weights only load refuses its contents "
                                   "(objects other than tensors and plain containers, which could run code)") from None
    except _LOAD_ERRORS as exc:
        raise UnreadableFile(path, f"is corrupt, truncated or not a torch file ({_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise UnreadableFile(path, f"holds a {type(state).__name__}, not the dict ddfast writes")
    missing = [key for key in keys if key not in state]
    if missing:
        raise UnreadableFile(path, f"lacks {missing}: it holds other content than expected")
    return state


def warn_unreadable(error: UnreadableFile, action: str) -> None:
    """One line on stderr: ``ddfast: warning: <the error>; <action>``."""
    print(f"ddfast: warning: {error}; {action}", file=sys.stderr, flush=True)


def save_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
