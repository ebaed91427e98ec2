"""Shared set-up of the loop tests: the real-data root (or a skip) and tiny run settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddfast.distill import DistillConfig, checkpoint, preset, run
from ddfast.distill.training.data import data_root
from ddfast.distill.training.evaluate import EvalProtocol
from ddfast.distill.training.models import ModelSpec
from ddfast.distill.training.pretrain import PretrainSpec
from ddfast.distill.training.speed import SpeedConfig

TINY_MODEL = ModelSpec(width=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and far faster than two on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mnist_root():
    """The data root holding MNIST, or skip the test saying where it looked."""
    try:
        root = data_root()
    except FileNotFoundError as exc:
        pytest.skip(f"real data unavailable: {exc}")
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST is not under {root}")
    return root


def tiny_config(method: str = "dm", **changes) -> DistillConfig:
    """A few hundred MNIST images, 2 images per class, narrow networks, a handful of iterations; eager network calls
    (compiling each tiny shape would outlast the run: ``tests/test_speed.py`` runs the compiled paths)."""
    config = dataclasses.replace(
        preset(method, "mnist", 2, "quick"),
        iterations=4,
        real_per_class=16,
        model=TINY_MODEL,
        evaluation=EvalProtocol(model=TINY_MODEL, epochs=10, models=2),
        select_every=2,
        checkpoint_every=1,
        val_per_class=10,
        train_per_class=30,
        test_per_class=20,
        speed=SpeedConfig(compile=False),
    )
    return dataclasses.replace(config, **changes)


def tiny_pretrain() -> PretrainSpec:
    return PretrainSpec(model=TINY_MODEL, pool=2, epochs=3, batch_size=32, train_per_class=30)


def assert_resumes_identically(config: DistillConfig, full_out, tmp_path, cache_dir=None) -> None:
    """A run of ``config`` stopped after one iteration and resumed ends exactly as the uninterrupted run in ``full_out``.

    ``cache_dir``: the uninterrupted run's (its expert buffers: another cache may hold another torch's).
    """
    stopped = run(config, tmp_path, cache_dir=cache_dir, quiet=True, stop_after=1, final=False)
    assert stopped == {"status": "stopped", "iteration": 1, "checkpoint": str(tmp_path / "checkpoint.pt")}
    assert not (tmp_path / "synthetic.pt").exists()
    resumed = run(config, tmp_path, cache_dir=cache_dir, quiet=True, final=False)
    assert "evaluation" not in resumed
    full, again = checkpoint.load(full_out / "checkpoint.pt"), checkpoint.load(tmp_path / "checkpoint.pt")
    assert torch.equal(again["images"], full["images"])
    assert again["progress"]["history"] == full["progress"]["history"]
    assert again["progress"]["selection"] == full["progress"]["selection"]
