"""The settings of one distillation run, as one frozen dataclass (recorded in checkpoints and results)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..evaluate import EvalProtocol
from ..models import ModelSpec
from .cmi import CMIConfig
from .mim import MIMConfig

INITS = ("real", "noise")


@dataclass(frozen=True)
class DistillConfig:
    method: str  # a name in ddfast.distill.METHODS
    dataset: str
    ipc: int  # synthetic images per class
    iterations: int
    image_lr: float
    image_momentum: float = 0.5
    real_per_class: int = 256  # real images per class drawn each iteration
    dsa: bool = True  # differentiable Siamese augmentation inside the matching loss
    init: str = "real"  # synthetic set starts from random real images, or from Gaussian noise
    zca: float | None = None  # ZCA-whiten all the data with this regularisation (MTT on CIFAR: 0.1); off when None
    model: ModelSpec = field(default_factory=ModelSpec)  # the network the method matches through
    options: Any = None  # the method's own settings (its Options dataclass)
    cmi: CMIConfig | None = None  # the CMI regulariser, off when None
    mim: MIMConfig | None = None  # the MIM4DD regulariser, off when None
    evaluation: EvalProtocol = field(default_factory=EvalProtocol)
    select_every: int = 0  # validate the synthetic set every this many iterations (0: only at the end)
    select_models: int = 1  # networks per validation of a candidate set
    checkpoint_every: int = 100
    val_per_class: int = 500  # training images per class held out as the validation split
    train_per_class: int | None = None  # keep only this many training images per class (smoke tests)
    test_per_class: int | None = None  # keep only this many test images per class (smoke tests)
    seed: int = 0

    def __post_init__(self):
        for name in ("ipc", "iterations", "real_per_class", "select_models", "checkpoint_every", "val_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.select_every < 0:
            raise ValueError(f"select_every must be >= 0, got {self.select_every}")
        if not self.image_lr > 0:
            raise ValueError(f"image_lr must be > 0, got {self.image_lr}")
        if self.zca is not None and not self.zca > 0:
            raise ValueError(f"zca must be None (off) or a regularisation > 0, got {self.zca}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
