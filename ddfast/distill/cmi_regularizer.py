"""The CMI regulariser: class-conditional mutual information of the synthetic set, measured in the
feature space of networks pre-trained on the real data (one picked at random each iteration).

Computed on the un-augmented synthetic images with ``ddfast.cmi_loss``. Under torchrun each process
takes the rows of the classes c with c % WORLD_SIZE == RANK (DM's split) and ``cmi_loss`` merges the
centroids over the processes (``group=``), so the value is the whole set's and each process's
gradient is its rows' share of the one-process gradient. Its weight must be chosen
on the validation split (``ddfast distill --sweep cmi.weight=...``): the authors' CIFAR weights
(thousands) do not carry over to other datasets and feature spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ddfast.ops.cmi import cmi_loss

from .distributed import World
from .settings import NON_NEGATIVE, POSITIVE, SettingError, check
from .training.pretrain import PretrainSpec

FEATURES = ("embed", "logits")


@dataclass(frozen=True)
class CMIConfig:
    weight: float  # lambda: the total loss is L_DD + weight * CMI
    features: str = "embed"  # "embed": penultimate features (the authors' choice); "logits"
    temperature: float = 1.0
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)

    def __post_init__(self):
        check(self, weight=NON_NEGATIVE, temperature=POSITIVE)
        if self.features not in FEATURES:
            raise SettingError("features", f"one of {FEATURES}", self.features)


class CMIRegularizer:
    """``reg(images, labels, iteration)`` -> (weight * CMI, {"cmi": CMI}) with a network drawn from ``networks`` (global RNG).

    Stateless and without learnable parameters of its own (see ``method.Regularizer``). In a
    distributed ``world`` each process computes its classes' rows (the networks must treat samples
    independently: eval mode).
    """

    def __init__(self, networks: list[nn.Module], config: CMIConfig, num_classes: int, *, world: World = World()):
        if not networks:
            raise ValueError("the CMI regulariser needs at least one pre-trained network")
        self.networks, self.config, self.num_classes, self.world = networks, config, num_classes, world

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, iteration: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        network = self.networks[int(torch.randint(len(self.networks), (1,)))]
        if self.world.distributed:
            own = labels % self.world.size == self.world.rank
            images, labels = images[own], labels[own]
        features = network.embed(images) if self.config.features == "embed" else network(images)
        cmi = cmi_loss(features, labels, self.num_classes, temperature=self.config.temperature, group=self.world.process_group)
        return self.config.weight * cmi, {"cmi": cmi.item()}

    def parameters(self) -> list[torch.Tensor]:
        return []

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
