"""Back-propagation through time (BPTT): a fresh network trained on the synthetic set by unrolled SGD
with the learned learning rate, and the loss is its cross-entropy on a batch of real images (DSA-
augmented), differentiated through every inner step back to the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .method import register
from .settings import COUNT, check
from .unroll import StudentOptions, UnrolledMethod


@dataclass(frozen=True)
class BPTTOptions(StudentOptions):
    inner_steps: int = 20  # student steps per iteration, from a fresh initialisation

    def __post_init__(self):
        super().__post_init__()
        check(self, inner_steps=COUNT)


@register
class BPTT(UnrolledMethod):
    name = "bptt"
    Options = BPTTOptions

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        if name == "quick":
            return {"iterations": 40, "image_lr": 0.1, "real_per_class": 32, "dsa": True,
                    "options": BPTTOptions(inner_steps=10, lr_init=0.01, lr_lr=1e-4)}
        raise ValueError("BPTT has no published settings for these loops; use --preset quick and adjust with --set "
                         "(iterations, image_lr, real_per_class, options.inner_steps, options.lr_init, ...)")

    def step(self, iteration: int) -> dict[str, float]:
        ctx, config = self.ctx, self.ctx.config
        start = [p.detach() for p in ctx.fresh_model().parameters()]
        final = self.unroll(start, self.options.inner_steps)
        classes = ctx.data.info.num_classes
        real = torch.cat([ctx.sampler.sample(c, config.real_per_class) for c in range(classes)])
        labels = torch.arange(classes, device=real.device).repeat_interleave(config.real_per_class)
        if self.dsa is not None:
            real = self.dsa(real)
        outer = F.cross_entropy(self.student.logits(final, real), labels)
        reg, logs = self.regularize(iteration)
        loss = outer + reg
        self.update_images(loss)
        return {"loss": loss.item(), "outer": outer.item(), "lr": self.syn_lr.item(), **logs}
