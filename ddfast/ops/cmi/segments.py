"""Rows grouped by class: the layout of the per-class (segmented) reductions.

The compiled backends reduce over the rows of each class in a fixed order, so their results do not
depend on thread counts or scheduling. Rows are sorted by label (stable), each class's run is cut
into chunks of at most ``rows`` rows, a kernel reduces each chunk, and a second kernel combines the
chunks of each class in order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunks:
    """Chunks of at most ``rows`` rows of one class each, in class order (M chunks in all).

    ``start`` / ``end`` (M,) int64: the chunk's rows are ``order[start:end]``; ``cls`` (M,) int64: its
    class; ``first`` (C + 1,) int64: class c owns chunks ``first[c]:first[c + 1]`` (none if absent).
    """

    rows: int
    start: torch.Tensor
    end: torch.Tensor
    cls: torch.Tensor
    first: torch.Tensor


class Segments:
    """The class structure of ``labels`` (N,) int64 with values in [0, num_classes)."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.labels = labels
        self.num_classes = num_classes
        self._chunks: dict[int, Chunks] = {}

    @functools.cached_property
    def counts(self) -> torch.Tensor:
        """(C,) int64: rows per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    @functools.cached_property
    def order(self) -> torch.Tensor:
        """(N,) int64: row indices sorted by label, rows of one class in increasing index order."""
        return torch.argsort(self.labels, stable=True)

    def chunks(self, rows: int) -> Chunks:
        """The chunks of at most ``rows`` rows (built once per ``rows``)."""
        if rows not in self._chunks:
            self._chunks[rows] = self._cut(rows)
        return self._chunks[rows]

    def _cut(self, rows: int) -> Chunks:
        counts = self.counts
        class_end = torch.cumsum(counts, 0)
        class_start = class_end - counts
        per_class = (counts + rows - 1) // rows
        first = torch.nn.functional.pad(torch.cumsum(per_class, 0), (1, 0))
        total = int(first[-1])
        cls = torch.repeat_interleave(torch.arange(self.num_classes, device=counts.device), per_class, output_size=total)
        start = class_start[cls] + (torch.arange(total, device=counts.device) - first[cls]) * rows
        end = torch.minimum(start + rows, class_end[cls])
        return Chunks(rows, start, end, cls, first)
