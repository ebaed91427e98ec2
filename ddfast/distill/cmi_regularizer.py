"""The CMI regulariser: class-conditional mutual information of the synthetic set, measured in the
feature space of networks pre-trained on the real data (one picked at random each iteration).

Computed on the un-augmented synthetic images with ``ddfast.cmi_loss``. Under torchrun each process
takes the rows of the classes c with c % WORLD_SIZE == RANK (DM's split) and ``cmi_loss`` merges the
centroids over the processes (``group=``), so the value is the whole set's and each process's
gradient is its rows' share of the one-process gradient. Its weight must be chosen
on the validation split (``ddfast distill --sweep cmi.weight=...``): the authors' CIFAR weights
(thousands) do not carry over to other datasets and feature spaces.

Centroids: ``batch`` (the authors' choice) takes each class's mean softmax over the synthetic images
themselves; ``real`` measures the synthetic softmaxes against each class's mean softmax over the real
training split, in the same network, features and temperature (``ClassCentroids``: one batched pass,
memory O(C K)). Real centroids are computed for a pool member when it is first drawn and kept; with
``refresh`` = R > 0 they are computed again at its first draw in each new window of R iterations
[kR, (k + 1)R) (with one network: exactly at iterations 0, R, 2R, ...). R = 0 (the default): never,
since the pool's networks are frozen and a refresh reproduces the same centroids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ddfast.ops.cmi import ClassCentroids, cmi_loss

from .distributed import World
from .settings import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SettingError, check
from .training.data import Split
from .training.pretrain import PretrainSpec

FEATURES = ("embed", "logits")
CENTROIDS = ("batch", "real")


@dataclass(frozen=True)
class CMIConfig:
    weight: float  # lambda: the total loss is L_DD + weight * CMI
    features: str = "embed"  # "embed": penultimate features (the authors' choice); "logits"
    temperature: float = 1.0
    centroids: str = "batch"  # "batch": the synthetic set's own class means (the authors' choice); "real": the training split's
    refresh: int = 0  # with real centroids: a network's centroids are recomputed every this many iterations (0: never)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)

    def __post_init__(self):
        check(self, weight=NON_NEGATIVE, temperature=POSITIVE, refresh=NON_NEGATIVE_INT)
        if self.features not in FEATURES:
            raise SettingError("features", f"one of {FEATURES}", self.features)
        if self.centroids not in CENTROIDS:
            raise SettingError("centroids", f"one of {CENTROIDS}", self.centroids)
        if self.centroids == "batch" and self.refresh:
            raise SettingError("refresh", "0 with centroids='batch' (batch centroids are never stored)", self.refresh)


class CMIRegularizer:
    """``reg(images, labels, iteration)`` -> (weight * CMI, {"cmi": CMI}) with a network drawn from ``networks`` (global RNG).

    ``real``: the real training split, needed for ``centroids="real"`` (read in batches of ``chunk``
    images). No learnable parameters; the state (see ``method.Regularizer``) is the real centroids
    kept per pool member and when they were computed. In a distributed ``world`` each process
    computes its classes' rows (the networks must treat samples independently: eval mode).
    """

    def __init__(self, networks: list[nn.Module], config: CMIConfig, num_classes: int, real: Split | None = None, *, chunk: int = 1024,
                 world: World = World()):
        if not networks:
            raise ValueError("the CMI regulariser needs at least one pre-trained network")
        if config.centroids == "real" and real is None:
            raise ValueError("cmi.centroids='real' needs the real training split (real=)")
        self.networks, self.config, self.num_classes, self.real, self.chunk = networks, config, num_classes, real, chunk
        self.world = world
        self.kept: dict[int, tuple[int, torch.Tensor]] = {}  # pool member -> (refresh period, its real centroids (C, K))

    def features(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return network.embed(images) if self.config.features == "embed" else network(images)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, iteration: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        member = int(torch.randint(len(self.networks), (1,)))
        if self.world.distributed:
            own = labels % self.world.size == self.world.rank
            images, labels = images[own], labels[own]
        features = self.features(self.networks[member], images)
        centroids = None if self.config.centroids == "batch" else self.centroids(member, iteration)
        cmi = cmi_loss(features, labels, self.num_classes, temperature=self.config.temperature, centroids=centroids,
                       group=self.world.process_group)
        return self.config.weight * cmi, {"cmi": cmi.item()}

    def centroids(self, member: int, iteration: int) -> torch.Tensor:
        """(C, K) real centroids of pool member ``member`` at ``iteration``: kept, or computed when missing or due."""
        period = iteration // self.config.refresh if self.config.refresh else 0
        if member not in self.kept or self.kept[member][0] != period:
            self.kept[member] = (period, self.real_centroids(self.networks[member]))
        return self.kept[member][1]

    def real_centroids(self, network: nn.Module) -> torch.Tensor:
        """(C, K) each class's mean softmax over the real training split: one pass in batches, no gradient."""
        images, labels = self.real.images, self.real.labels
        sums = ClassCentroids(self.num_classes, temperature=self.config.temperature)
        with torch.no_grad():
            for start in range(0, len(labels), self.chunk):
                sums.add(self.features(network, images[start : start + self.chunk]), labels[start : start + self.chunk])
        try:
            return sums.centroids()
        except ValueError as exc:
            raise ValueError(f"cmi.centroids='real': {exc} (the real training split lacks these classes)") from None

    def parameters(self) -> list[torch.Tensor]:
        return []

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"centroids": [(member, period, q.cpu()) for member, (period, q) in sorted(self.kept.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.kept = {member: (period, q.to(self.real.images.device)) for member, period, q in state["centroids"]}
