"""Matching training trajectories (MTT, Cazenavette et al. 2022).

Each iteration draws an expert and a start epoch e < max_start_epoch from the expert buffer; a
student starts at the expert's snapshot after e epochs, takes ``syn_steps`` SGD steps on synthetic
batches (DSA-augmented) with the learned learning rate, and the loss is ``ddfast.trajectory_mse``
between where it ends and the expert's snapshot ``expert_epochs`` later, normalised by how far the
expert moved. The experts are trained (and cached) before the first iteration when the buffer lacks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddfast.ops.trajectory_mse import trajectory_mse

from .config import DistillConfig
from .method import register
from .settings import COUNT, check
from .training.buffers import ExpertBuffer, ExpertSpec, buffer_meta, default_folder, train_experts
from .training.data import RealData
from .unroll import StudentOptions, UnrolledMethod


@dataclass(frozen=True)
class MTTOptions(StudentOptions):
    syn_steps: int = 20  # student steps per iteration
    expert_epochs: int = 2  # the target is the expert this many epochs after the start
    max_start_epoch: int = 20  # start epochs are drawn from [0, max_start_epoch)
    experts: ExpertSpec = field(default_factory=ExpertSpec)

    def __post_init__(self):
        super().__post_init__()
        check(self, syn_steps=COUNT, expert_epochs=COUNT, max_start_epoch=COUNT)
        if self.max_start_epoch - 1 + self.expert_epochs > self.experts.epochs:
            raise ValueError(f"options.max_start_epoch - 1 + options.expert_epochs = {self.max_start_epoch - 1 + self.expert_epochs} "
                             f"is beyond the experts' {self.experts.epochs} epochs (options.experts.epochs)")


# The reference settings per (dataset, ipc), as the MTT authors list them for their paper's table:
# (syn_steps, expert_epochs, max_start_epoch, image lr, lr_lr, lr_init, ZCA, batch_syn).
UPSTREAM = {
    ("cifar10", 1): (50, 2, 2, 100.0, 1e-7, 0.01, True, None),
    ("cifar10", 10): (30, 2, 20, 100.0, 1e-5, 0.001, True, None),
    ("cifar10", 50): (30, 2, 40, 1000.0, 1e-5, 0.001, False, None),
    ("cifar100", 1): (20, 3, 20, 1000.0, 1e-5, 0.01, True, None),
    ("cifar100", 10): (20, 2, 20, 1000.0, 1e-5, 0.01, False, None),
    ("cifar100", 50): (80, 2, 40, 1000.0, 1e-5, 0.01, True, 125),
}
ZCA_EPS = 0.1  # the regularisation of MTT's ZCA whitening

# quick: MNIST IPC 10 on a 2-core CPU in about 15 minutes end to end, experts included.
QUICK_EXPERTS = ExpertSpec(experts=3, epochs=4, lr=0.01, train_per_class=500)


def expert_buffer(options: MTTOptions, config: DistillConfig, data: RealData, data_key: dict, *, cache_dir: str | os.PathLike | None = None,
                  shard: tuple[int, int] = (0, 1), quiet: bool = False) -> tuple[Path, dict]:
    """Train the experts of ``shard`` that the cached buffer for ``options.experts``, ``config``'s model and
    the data lacks; returns the buffer's folder and metadata."""
    meta = buffer_meta(options.experts, config.model, data_key, data)
    folder = default_folder(meta, cache_dir)
    train_experts(meta, data, folder, shard=shard, quiet=quiet)
    return folder, meta


@register
class MTT(UnrolledMethod):
    name = "mtt"
    Options = MTTOptions

    def __init__(self, ctx):
        super().__init__(ctx)
        self.buffer = ExpertBuffer(*expert_buffer(self.options, ctx.config, ctx.data, ctx.data_key, cache_dir=ctx.cache_dir, quiet=ctx.quiet))

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        if name == "quick":
            return {"iterations": 40, "image_lr": 100.0, "real_per_class": 1, "dsa": True,
                    "options": MTTOptions(syn_steps=10, expert_epochs=2, max_start_epoch=3, lr_init=0.01, lr_lr=1e-5, experts=QUICK_EXPERTS)}
        # Other datasets (MNIST, Fashion-MNIST, SVHN, the image folders) take CIFAR-10's for the IPC, without ZCA.
        zca_dataset = dataset in ("cifar10", "cifar100")
        key = (dataset, ipc) if zca_dataset else ("cifar10", ipc)
        if key not in UPSTREAM:
            known = sorted({i for _, i in UPSTREAM})
            raise ValueError(f"the upstream MTT settings exist for ipc in {known}, got {ipc}; use preset quick with --set options.syn_steps=... etc.")
        steps, expert_epochs, max_start, image_lr, lr_lr, lr_init, zca, batch_syn = UPSTREAM[key]
        options = MTTOptions(syn_steps=steps, expert_epochs=expert_epochs, max_start_epoch=max_start, lr_lr=lr_lr, lr_init=lr_init,
                             batch_syn=batch_syn)
        return {"iterations": 5000, "image_lr": image_lr, "image_momentum": 0.5, "real_per_class": 1, "dsa": True,
                "zca": ZCA_EPS if zca and zca_dataset else None, "options": options}

    def step(self, iteration: int) -> dict[str, float]:
        options, device = self.options, self.ctx.synthetic.images.device
        expert = int(torch.randint(len(self.buffer), (1,)))
        epoch = int(torch.randint(options.max_start_epoch, (1,)))
        start = self.buffer.snapshot(expert, epoch, device)
        target = self.buffer.snapshot(expert, epoch + options.expert_epochs, device)
        match = trajectory_mse(self.unroll(start, options.syn_steps), start, target)
        reg, logs = self.regularize(iteration)
        loss = match + reg
        self.update_images(loss)
        return {"loss": loss.item(), "match": match.item(), "lr": self.syn_lr.item(), **logs}
