"""Pools of networks pre-trained on the real training split, trained once and cached on disk.

The CMI regulariser measures the synthetic set in the feature space of such networks. A cached
network is keyed by everything that shaped it (dataset, split, training settings, its index in the
pool), so changing any of them trains a new one and a repeated run loads instead of training.
The cache folder is ``cache_dir``, else ``$DDFAST_CACHE_DIR``, else ``~/.cache/ddfast``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .data import RealData, random_per_class
from .evaluate import accuracy, train_network
from .models import ModelSpec
from .progress import bar, logger
from .seeding import derive_seed, seeded
from .settings import to_dict

CACHE_ENV = "DDFAST_CACHE_DIR"


@dataclass(frozen=True)
class PretrainSpec:
    """How the pool is trained (defaults: the CMI authors' settings; the pool size is ours)."""

    model: ModelSpec = field(default_factory=lambda: ModelSpec(arch="resnet18"))
    pool: int = 5
    epochs: int = 40
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 256
    train_per_class: int | None = None  # train on a random subset of this many images per class

    def __post_init__(self):
        if self.pool < 1 or self.epochs < 1:
            raise ValueError(f"pool and epochs must be >= 1, got pool={self.pool}, epochs={self.epochs}")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddfast")


def pretrained_pool(
    spec: PretrainSpec, data: RealData, data_key: dict, *, seed: int = 0, cache: str | os.PathLike | None = None, quiet: bool = False
) -> list[nn.Module]:
    """``spec.pool`` frozen networks (eval mode, on the data's device) trained on ``data.train``.

    ``data_key`` names the data they are trained on (dataset and split settings) for the cache key.
    Messages and a progress bar go to stderr unless ``quiet``.
    """
    log = logger(quiet)
    device = data.train.images.device
    folder = cache_dir(cache) / "pretrained"
    training = {**to_dict(spec), "pool": None}
    networks = []
    for k in range(spec.pool):
        key = derive_seed("pretrain", training, data_key, seed, k)
        path = folder / f"{data.info.name}-{spec.model.arch}-{key:016x}.pt"
        state = checkpoint.load(path)
        model = spec.model.build(data.info.channels, data.info.num_classes, data.info.image_size).to(device)
        if state is None:
            with seeded(derive_seed(key), device):
                train = data.train
                if spec.train_per_class is not None:
                    generator = torch.Generator().manual_seed(derive_seed(key, "subset"))
                    train = train.subset(random_per_class(train.labels, data.info.num_classes, spec.train_per_class, generator).to(device))
                with bar(spec.epochs, f"pre-training {k + 1}/{spec.pool}", enabled=not quiet, leave=False) as progress:
                    train_network(model, train.images, train.labels, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                                  momentum=spec.momentum, weight_decay=spec.weight_decay, decay_at_half=False,
                                  on_epoch=lambda *_: progress.update(1))
            state = {"state_dict": model.state_dict(), "settings": training, "data": data_key, "val_accuracy": accuracy(model, data.val)}
            checkpoint.save(state, path)
            log(f"pretrained network {k + 1}/{spec.pool}: validation accuracy {state['val_accuracy']:.4f}, cached at {path}")
        else:
            model.load_state_dict(state["state_dict"])
            log(f"pretrained network {k + 1}/{spec.pool}: loaded from {path} (validation accuracy {state['val_accuracy']:.4f})")
        networks.append(model.eval().requires_grad_(False))
    return networks
