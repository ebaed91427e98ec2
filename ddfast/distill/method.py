"""Pieces every distillation method shares: the synthetic set, real-image sampling, the method
interface and its registry.

A method is a class registered under a name; the runner (``ddfast.distill.run``) owns everything
else: data, seeding, checkpoints, validation, evaluation and outputs. A new method subclasses
``Method``, implements ``step`` and its presets, and calls ``register``. Regularisers (CMI, MIM4DD)
plug into any method through ``Method.regularize`` and ``Method.update_images``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .config import DistillConfig
from .distributed import World
from .settings import from_dict
from .training.augment import DSA, DSAConfig
from .training.data import RealData, class_indices, random_per_class
from .training.speed import FastNetwork

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``METHODS[cls.name]``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


class SyntheticSet:
    """The learnable images (N, C, H, W) float32, class-major: class c is rows [c * ipc, (c + 1) * ipc)."""

    def __init__(self, images: torch.Tensor, num_classes: int):
        if images.shape[0] % num_classes:
            raise ValueError(f"{images.shape[0]} synthetic images do not split evenly into {num_classes} classes")
        self.images = nn.Parameter(images.detach().clone())
        self.num_classes = num_classes
        self.ipc = images.shape[0] // num_classes
        self.labels = torch.arange(num_classes, device=images.device).repeat_interleave(self.ipc)

    @classmethod
    def initial(cls, data: RealData, ipc: int, init: str, generator: torch.Generator) -> SyntheticSet:
        """Random real training images of each class (``init="real"``) or standard Gaussian noise."""
        info = data.info
        if init == "real":
            index = random_per_class(data.train.labels, info.num_classes, ipc, generator).to(data.train.images.device)
            images = data.train.images[index]
        else:
            images = torch.randn(info.num_classes * ipc, info.channels, info.image_size, info.image_size, generator=generator)
        return cls(images.to(data.train.images.device), info.num_classes)

    def of_class(self, c: int) -> torch.Tensor:
        return self.images[c * self.ipc : (c + 1) * self.ipc]


class RealSampler:
    """Random real training images of one class (global RNG)."""

    def __init__(self, data: RealData):
        self.images = data.train.images
        self.index = [i.to(self.images.device) for i in class_indices(data.train.labels.cpu(), data.info.num_classes)]

    def draw(self, c: int, n: int) -> torch.Tensor:
        """Indices into ``images`` of min(n, class size) random images of class c."""
        index = self.index[c]
        return index[torch.randperm(len(index))[:n].to(index.device)]

    def sample(self, c: int, n: int) -> torch.Tensor:
        return self.images[self.draw(c, n)]


class Regularizer(Protocol):
    """A term added to a method's loss on the un-augmented synthetic set (``CMIRegularizer``, ``MIMRegularizer``).

    ``reg(images, labels, iteration)`` -> (weighted term, values to log). ``parameters()`` are its own
    learnable tensors, updated by ``step()`` after each backward pass; ``state_dict`` is what a
    resumed run needs. Under torchrun every process calls it on the whole synthetic set and gets the
    whole term; its gradients, summed over the processes, must be the one-process gradients.
    """

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, iteration: int) -> tuple[torch.Tensor, dict[str, float]]: ...
    def parameters(self) -> list[torch.Tensor]: ...
    def step(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Context:
    """What a method works with; built by the runner."""

    config: DistillConfig
    data: RealData
    synthetic: SyntheticSet
    sampler: RealSampler
    regularizers: list[Regularizer] = field(default_factory=list)
    data_key: dict = field(default_factory=dict)  # what identifies the real training split (for caches)
    cache_dir: str | os.PathLike | None = None  # pre-trained networks and expert buffers
    quiet: bool = False
    world: World = field(default_factory=World)  # the processes sharing the work (torchrun); one by default

    def fresh_model(self) -> nn.Module:
        """A newly initialised network of ``config.model`` on the data's device (global RNG)."""
        info = self.data.info
        return self.config.model.build(info.channels, info.num_classes, info.image_size).to(self.data.train.images.device)


@dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own."""


class Method:
    """One distillation method. ``step`` runs one iteration and updates the synthetic images.

    The runner seeds the global RNG before each ``step``, so a method draws its randomness (fresh
    networks, real batches, augmentation) from it. ``state_dict`` holds what a resumed run needs
    beyond the images (optimizer states, the regularisers' states); a method with learnable extras
    (MTT's learning rate) adds their optimizer to ``self.optimizers`` and their values to its state.
    Under torchrun, a method with ``distributed = True`` computes its share of the loss on each
    process (``ctx.world``) while drawing every random value of the whole iteration, so that the
    split changes no draw; ``update_images`` sums the gradients over the processes.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    distributed: ClassVar[bool] = False  # runs split over processes (torchrun): each computes its share, gradients are summed

    def __init__(self, ctx: Context):
        self.ctx = ctx
        config = ctx.config
        self.check_config(config)
        self.options = self.read_options(config.options)
        self.dsa = DSA(DSAConfig(pairing=config.dsa_pairing)) if config.dsa else None
        self.optimizers = [torch.optim.SGD([ctx.synthetic.images], lr=config.image_lr, momentum=config.image_momentum)]
        self._fast: FastNetwork | None = None

    def fast(self, network: nn.Module) -> FastNetwork:
        """The network calls under ``config.speed``, for networks built like ``network`` (the first one given)."""
        if self._fast is None:
            self._fast = FastNetwork(network, self.ctx.config.speed, self.ctx.synthetic.images.device)
        return self._fast

    @property
    def compile_seconds(self) -> float:
        """Seconds this process spent in first calls of compiled network programs (compilation, mostly)."""
        return 0.0 if self._fast is None else self._fast.compile_seconds

    @classmethod
    def read_options(cls, options) -> Any:
        """The method's Options from a config value: an instance, a dict of settings, or None (defaults)."""
        if options is None:
            return cls.Options()
        if isinstance(options, dict):
            return from_dict(cls.Options, options, "options.")
        if not isinstance(options, cls.Options):
            raise TypeError(f"options for method {cls.name!r} must be {cls.Options.__name__}, got {type(options).__name__}")
        return options

    @classmethod
    def check_config(cls, config: DistillConfig) -> None:
        """Refuse settings this method cannot run (``ValueError``), before any work; the default accepts all."""

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        """DistillConfig fields of preset ``name`` ("upstream" or "quick") for this method."""
        raise NotImplementedError

    @classmethod
    def initial_synthetic(cls, config: DistillConfig, data: RealData, generator: torch.Generator) -> SyntheticSet:
        """The synthetic set a run starts from (``SyntheticSet.initial``; a method storing images otherwise overrides it)."""
        return SyntheticSet.initial(data, config.ipc, config.init, generator)

    def decode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training set (images, labels) that stored ``images`` (N, C, H, W) stand for: what networks are
        validated and evaluated on, and what the regularisers see. Here the images themselves."""
        return images, self.ctx.synthetic.labels.to(images.device)

    def step(self, iteration: int) -> dict[str, float]:
        """One iteration; returns the values to log (at least ``loss``)."""
        raise NotImplementedError

    def eval_lr(self) -> float | None:
        """A learning rate the evaluation must use (learned by the method), or None to choose one."""
        return None

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers], "regularizers": [r.state_dict() for r in self.ctx.regularizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for reg, saved in zip(self.ctx.regularizers, state["regularizers"], strict=True):
            reg.load_state_dict(saved)

    def regularize(self, iteration: int, images: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor | float, dict[str, float]]:
        """The regularisers' terms (0 without any) and their logs, on (images, labels): by default the
        un-augmented training set the synthetic images decode to."""
        if images is None:
            images, labels = self.decode(self.ctx.synthetic.images)
        total, logs = 0.0, {}
        for reg in self.ctx.regularizers:
            term, values = reg(images, labels, iteration)
            total, logs = total + term, {**logs, **values}
        return total, logs

    def update_images(self, loss: torch.Tensor) -> None:
        """One step of every optimizer (images and the method's extras) and of the regularisers' own parameters."""
        regs = self.ctx.regularizers
        params = [p for o in self.optimizers for group in o.param_groups for p in group["params"]]
        params += [p for reg in regs for p in reg.parameters()]
        for p in params:
            p.grad = None
        loss.backward(inputs=params)
        for p in params:  # each process's loss is its share of the whole (distributed methods only)
            self.ctx.world.sum_(p.grad, "summing the gradients")
        for optimizer in self.optimizers:
            optimizer.step()
        for reg in regs:
            reg.step()
