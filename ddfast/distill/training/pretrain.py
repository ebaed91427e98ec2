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

from ..._cache import cache_dir
from .. import checkpoint
from ..progress import bar, logger
from ..settings import COUNT, MOMENTUM, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, check, to_dict
from .data import RealData, random_per_class
from .loop import accuracy, train_network
from .models import ModelSpec
from .seeding import derive_seed, seeded


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
        check(self, pool=COUNT, epochs=COUNT, lr=POSITIVE, momentum=MOMENTUM, weight_decay=NON_NEGATIVE, batch_size=COUNT,
              train_per_class=OPTIONAL_COUNT)


def pretrained_pool(
    spec: PretrainSpec, data: RealData, data_key: dict, *, seed: int = 0, cache: str | os.PathLike | None = None, quiet: bool = False,
    cached_only: bool = False,
) -> list[nn.Module]:
    """``spec.pool`` frozen networks (eval mode, on the data's device) trained on ``data.train``.

    ``data_key`` names the data they are trained on (dataset and split settings) for the cache key.
    Messages and a progress bar go to stderr unless ``quiet``. ``cached_only``: a network missing
    from the cache is a ``FileNotFoundError`` instead of being trained.
    """
    log = logger(quiet)
    device = data.train.images.device
    folder = cache_dir(cache) / "pretrained"
    training = {**to_dict(spec), "pool": None}
    networks = []
    for k in range(spec.pool):
        key = derive_seed("pretrain", training, data_key, seed, k)
        path = folder / f"{data.info.label}-{spec.model.arch}-{key:016x}.pt"
        model = spec.model.build(data.info.channels, data.info.num_classes, data.info.image_size).to(device)
        state = _cached(path, model, training, data_key)
        if state is None and cached_only:
            raise FileNotFoundError(f"pre-trained network {k + 1}/{spec.pool} is not in the cache at {path}: "
                                    "under torchrun every process must see rank 0's --cache-dir (one machine or a shared folder)")
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
            model.load_state_dict(state["state_dict"])  # checked by _cached to fit
            log(f"pretrained network {k + 1}/{spec.pool}: loaded from {path} (validation accuracy {state['val_accuracy']:.4f})")
        networks.append(model.eval().requires_grad_(False))
    return networks


def _cached(path: Path, model: nn.Module, training: dict, data_key: dict) -> dict | None:
    """The network cached at ``path`` if it is one made with these settings that fits ``model``; None
    (after a one-line warning, so that it is trained again) when the file is missing, corrupt or foreign."""
    try:
        state = checkpoint.load(path, keys=("state_dict", "settings", "data", "val_accuracy"))
        if state is not None:
            _check_network(state, path, model, training, data_key)
    except checkpoint.UnreadableFile as exc:
        checkpoint.warn_unreadable(exc, "training it again")
        return None
    return state


def _check_network(state: dict, path: Path, model: nn.Module, training: dict, data_key: dict) -> None:
    if state["settings"] != training or state["data"] != data_key:
        raise checkpoint.UnreadableFile(path, "holds a network pre-trained with other settings")
    saved, expected = state["state_dict"], model.state_dict()
    fits = isinstance(saved, dict) and saved.keys() == expected.keys() and all(
        isinstance(saved[k], torch.Tensor) and saved[k].shape == v.shape and saved[k].dtype == v.dtype for k, v in expected.items())
    if not fits or not all(bool(torch.isfinite(t).all()) for t in saved.values() if t.is_floating_point()):
        raise checkpoint.UnreadableFile(path, "holds parameters that do not fit the network or are not finite")
    if not isinstance(state["val_accuracy"], float):
        raise checkpoint.UnreadableFile(path, f"holds a validation accuracy of {state['val_accuracy']!r}")
