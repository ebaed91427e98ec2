"""IDC (Kim et al. 2022, "Dataset Condensation via Efficient Synthetic-Data Parameterization").

Multi-formation: each stored image holds factor^2 smaller images (``multiformation``), so the
networks train on factor^2 times as many images as are stored; the set starts from real images
downsampled into the grids. Each iteration (the reference's outer iteration) clips the stored images
to the pixel range, then ``inner_loop`` times: the decoded images of each class (at most
``max_syn_per_class``, un-augmented for the regularisers) and a real batch of that class pass
through the same DSA transforms, the network's gradients on them are matched layer by layer (conv
layers; ``metric`` mse or l1 as the reference per dataset) and the images take one step; then the
network trains on ``net_samples`` real images. A fresh network starts every ``fix_iter`` iterations.

Departures from the reference: one image step per inner iteration for all classes (the reference
steps after each class), and no CutMix in the network updates or the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import DistillConfig
from .dc import METRICS, matching_loss
from .method import Method, SyntheticSet, register
from .multiformation import check_factor, decode, encode
from .settings import COUNT, MOMENTUM, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SettingError, check
from .training.augment import OPERATIONS, DSAChain
from .training.data import RealData, dataset_info, random_per_class
from .training.loop import train_epoch

MATCH_AUGMENT = ("color", "crop", "cutout")  # composed, as the reference's "color_crop_cutout"
NET_AUGMENT = ("color", "crop")  # per sample on the network's real batches


@dataclass(frozen=True)
class IDCOptions:
    factor: int = 2  # each stored image holds factor^2 images
    inner_loop: int = 100  # image steps per iteration, each followed by a network update on real data
    fix_iter: int = 1  # iterations a network is kept before a fresh one starts (the reference's --fix_iter)
    metric: str = "mse"  # gradient distance: "mse", "l1" or "cos" (DC's)
    match_linear: bool = False  # also match the classifier's weight gradient (the reference's --fc)
    max_syn_per_class: int = 128  # decoded images per class matched at once (a random subset beyond)
    net_lr: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    net_batch: int = 64
    net_samples: int = 500  # real training images per network update (0: the network is not trained)
    augment: tuple[str, ...] = MATCH_AUGMENT  # DSA operations composed on matched batches (with dsa=True)
    net_augment: tuple[str, ...] = NET_AUGMENT  # the same per sample on the network's batches (with dsa=True)
    clamp: bool = True  # clip the stored images to the pixel range [0, 1] at the start of each iteration

    def __post_init__(self):
        check(self, factor=COUNT, inner_loop=COUNT, fix_iter=COUNT, max_syn_per_class=COUNT, net_lr=POSITIVE, net_momentum=MOMENTUM,
              net_weight_decay=NON_NEGATIVE, net_batch=COUNT, net_samples=NON_NEGATIVE_INT)
        if self.metric not in METRICS:
            raise SettingError("metric", f"one of {METRICS}", self.metric)
        for name in ("augment", "net_augment"):
            if any(op not in OPERATIONS for op in getattr(self, name)):
                raise SettingError(name, f"a list of DSA operations from {OPERATIONS}", getattr(self, name))


# The reference's per-dataset settings (its misc/reproduce.py, as the CMI authors run it):
# gradient metric, image lr for IPC 10 in pixel units, real images per network update, augmentations.
UPSTREAM = {
    "cifar10": ("mse", 5e-3, 2000, MATCH_AUGMENT),
    "cifar100": ("mse", 5e-3, 2000, MATCH_AUGMENT),
    "svhn": ("mse", 5e-3, 500, MATCH_AUGMENT),
    "mnist": ("l1", 1e-4, 500, ("color", "crop")),
    "fashion-mnist": ("l1", 1e-4, 500, MATCH_AUGMENT),
}


@register
class IDC(Method):
    name = "idc"
    Options = IDCOptions

    def __init__(self, ctx):
        super().__init__(ctx)
        options, config, info = self.options, ctx.config, ctx.data.info
        self.dsa = DSAChain(options.augment, config.dsa_pairing) if config.dsa and options.augment else None
        self.net_dsa = DSAChain(options.net_augment) if config.dsa and options.net_augment else None
        device = ctx.synthetic.images.device
        mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (info.mean, info.std))
        self.pixel_range = (-mean / std, (1 - mean) / std)  # [0, 1] in the normalised space of the data
        self.network = self.net_optimizer = None

    @classmethod
    def check_config(cls, config: DistillConfig) -> None:
        if config.model.norm == "batchnorm":
            raise ValueError("method 'idc' matches per-class gradients and does not support model.norm=batchnorm; use instancenorm or none")
        options = cls.read_options(config.options)
        size = dataset_info(config.dataset).image_size
        check_factor(options.factor, size, size)
        if options.clamp and config.zca is not None:
            raise ValueError("options.clamp clips images to the pixel range, which ZCA-whitened data does not have; "
                             "set options.clamp=false or zca=none")

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        metric, pixel_lr, net_samples, augment = UPSTREAM.get(dataset, UPSTREAM["cifar10"])
        std = dataset_info(dataset).std
        # the reference steps images in pixel units, with its lr scaled by ipc / 10; ours are normalised (x / std)
        image_lr = pixel_lr * ipc / 10 / (sum(std) / len(std)) ** 2
        if name == "quick":  # the reference's settings with 8 image steps in all, for a 2-core CPU
            return {"iterations": 2, "image_lr": image_lr, "image_momentum": 0.5, "real_per_class": 16, "dsa": True,
                    "options": IDCOptions(inner_loop=4, metric=metric, net_samples=256, augment=augment)}
        return {"iterations": 2000, "image_lr": image_lr, "image_momentum": 0.5, "real_per_class": 64, "dsa": True,
                "options": IDCOptions(inner_loop=100, metric=metric, net_samples=net_samples, augment=augment)}

    @classmethod
    def initial_synthetic(cls, config: DistillConfig, data: RealData, generator: torch.Generator) -> SyntheticSet:
        """From real images (``init="real"``): factor^2 random real images of its class in every stored image."""
        if config.init != "real":
            return super().initial_synthetic(config, data, generator)
        factor, num_classes = cls.read_options(config.options).factor, data.info.num_classes
        index = random_per_class(data.train.labels, num_classes, config.ipc * factor * factor, generator).to(data.train.images.device)
        return SyntheticSet(encode(data.train.images[index], factor), num_classes)

    def decode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (N, C, H, W) -> decoded (N * factor^2, C, H, W) with their labels, class-major."""
        factor = self.options.factor
        return decode(images, factor), self.ctx.synthetic.labels.to(images.device).repeat_interleave(factor * factor)

    def step(self, iteration: int) -> dict[str, float]:
        options, images = self.options, self.ctx.synthetic.images
        if self.network is None or iteration % options.fix_iter == 0:
            self._fresh_network()
        if options.clamp:
            with torch.no_grad():
                images.clamp_(*self.pixel_range)
        totals: dict[str, float] = {}
        for _ in range(options.inner_loop):
            for key, value in self._match(iteration).items():
                totals[key] = totals.get(key, 0.0) + value / options.inner_loop
            if options.net_samples:
                self._train_on_real()
        return totals

    def _match(self, iteration: int) -> dict[str, float]:
        """One image step on the gradient-matching loss of every class (plus the regularisers, per class as the CMI authors do)."""
        ctx, config, options = self.ctx, self.ctx.config, self.options
        images, labels = self.decode(ctx.synthetic.images)
        num_classes = ctx.data.info.num_classes
        per_class = len(images) // num_classes
        real, fake, reg, logs = [], [], 0.0, {}
        for c in range(num_classes):
            syn_c, labels_c = images[c * per_class : (c + 1) * per_class], labels[c * per_class : (c + 1) * per_class]
            if per_class > options.max_syn_per_class:
                keep = torch.randperm(per_class)[: options.max_syn_per_class].to(images.device)
                syn_c, labels_c = syn_c[keep], labels_c[keep]
            term, values = self.regularize(iteration, syn_c, labels_c)
            reg = reg + term
            for key, value in values.items():
                logs[key] = logs.get(key, 0.0) + value / num_classes
            real_c = ctx.sampler.sample(c, config.real_per_class)
            if self.dsa is not None:
                real_c, syn_c = self.dsa.match(real_c, syn_c)
            real.append(real_c)
            fake.append(syn_c)
        matched = [p for p in self.network.parameters() if p.dim() > 2 or (options.match_linear and p.dim() == 2)]
        match = matching_loss(self.network, real, fake, metric=options.metric, params=matched, fast=self.fast(self.network))
        loss = match + reg
        self.update_images(loss)
        return {"loss": loss.item(), "match": match.item(), **logs}

    def _train_on_real(self) -> None:
        """One pass of the network over ``net_samples`` random real training images (global RNG)."""
        train = self.ctx.data.train
        index = torch.randperm(len(train))[: self.options.net_samples].to(train.labels.device)
        train_epoch(self.network, self.net_optimizer, train.images[index], train.labels[index], batch_size=self.options.net_batch,
                    dsa=self.net_dsa)

    def _fresh_network(self) -> None:
        options = self.options
        self.network = self.ctx.fresh_model()
        self.net_optimizer = torch.optim.SGD(self.network.parameters(), lr=options.net_lr, momentum=options.net_momentum,
                                             weight_decay=options.net_weight_decay)

    def state_dict(self) -> dict:
        network = None if self.network is None else {"weights": self.network.state_dict(), "optimizer": self.net_optimizer.state_dict()}
        return {**super().state_dict(), "network": network}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state["network"] is not None:
            self._fresh_network()
            self.network.load_state_dict(state["network"]["weights"])
            self.net_optimizer.load_state_dict(state["network"]["optimizer"])
