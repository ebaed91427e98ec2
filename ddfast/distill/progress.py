"""Progress bars (tqdm) on stderr, shown only when asked for and stderr is a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, *, enabled: bool = True, initial: int = 0, leave: bool = True) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True, disable=not enabled or not sys.stderr.isatty())


def logger(quiet: bool):
    """A ``log(message)`` that writes ``ddfast: message`` to stderr (beside any bar) unless ``quiet``."""

    def log(message: str) -> None:
        if not quiet:
            tqdm.write(f"ddfast: {message}", file=sys.stderr)

    return log
