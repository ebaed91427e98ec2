"""ddfast's cache folder: ``$DDFAST_CACHE_DIR``, else ``~/.cache/ddfast``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DDFAST_CACHE_DIR"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path`` when given, else ``$DDFAST_CACHE_DIR``, else ``~/.cache/ddfast``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddfast")
