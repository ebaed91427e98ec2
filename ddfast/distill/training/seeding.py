"""Reproducible randomness: seeds derived from names, and scopes that leave the caller's RNG alone.

The loops seed every iteration from (run seed, iteration), so a run resumed from a checkpoint draws
exactly what the uninterrupted run would have drawn, without saving generator states.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed determined by ``parts`` (numbers and strings), stable across runs and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """Run the block with the global RNGs seeded by ``seed``; restore their states afterwards."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
