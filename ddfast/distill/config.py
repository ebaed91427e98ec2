"""The settings of one distillation run, as one frozen dataclass (recorded in checkpoints and results)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cmi_regularizer import CMIConfig
from .mim_regularizer import MIMConfig
from .settings import COUNT, MOMENTUM, NON_NEGATIVE_INT, OPTIONAL_COUNT, POSITIVE, Range, SettingError, check
from .training.augment import PAIRINGS
from .training.evaluate import EvalProtocol
from .training.models import ModelSpec
from .training.speed import SpeedConfig

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
    dsa_pairing: str = "batch"  # DSA on matched batches: one transform for all ("batch", the reference) or per sample ("sample")
    init: str = "real"  # synthetic set starts from random real images, or from Gaussian noise
    image_size: int | None = None  # image folders: resized and centre-cropped to this size (None: the dataset's default)
    zca: float | None = None  # ZCA-whiten all the data with this regularisation (MTT on CIFAR: 0.1); off when None
    model: ModelSpec = field(default_factory=ModelSpec)  # the network the method matches through
    options: Any = None  # the method's own settings (its Options dataclass)
    cmi: CMIConfig | None = None  # the CMI regulariser, off when None
    mim: MIMConfig | None = None  # the MIM4DD regulariser, off when None
    evaluation: EvalProtocol = field(default_factory=EvalProtocol)
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # how the loops run their networks (layout, compilation, precision)
    select_every: int = 0  # validate the synthetic set every this many iterations (0: only at the end)
    select_models: int = 1  # networks per validation of a candidate set
    checkpoint_every: int = 100
    val_per_class: int = 500  # training images per class held out as the validation split
    train_per_class: int | None = None  # keep only this many training images per class (smoke tests)
    test_per_class: int | None = None  # keep only this many test images per class (smoke tests)
    seed: int = 0

    def __post_init__(self):
        check(self, ipc=COUNT, iterations=COUNT, real_per_class=COUNT, select_models=COUNT, checkpoint_every=COUNT, val_per_class=COUNT,
              select_every=NON_NEGATIVE_INT, image_lr=POSITIVE, image_momentum=MOMENTUM, zca=Range(0, open_low=True, optional=True),
              train_per_class=OPTIONAL_COUNT, test_per_class=OPTIONAL_COUNT, image_size=OPTIONAL_COUNT)
        if self.init not in INITS:
            raise SettingError("init", f"one of {INITS}", self.init)
        if self.dsa_pairing not in PAIRINGS:
            raise SettingError("dsa_pairing", f"one of {PAIRINGS}", self.dsa_pairing)
