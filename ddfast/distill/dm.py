"""Distribution matching (DM, Zhao & Bilen 2023): match per-class mean embeddings of real and
synthetic images under a fresh, randomly initialised network each iteration.

loss = sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2, with DSA (the same parameters for
the real and the synthetic batch of a class), plus the CMI regulariser when configured.
"""

from __future__ import annotations

from typing import Any

import torch

from .method import Method, register


def mean_embedding_distance(real_features: torch.Tensor, syn_features: torch.Tensor) -> torch.Tensor:
    """||mean of real_features (N, F) - mean of syn_features (M, F)||^2, a scalar."""
    return (real_features.mean(0) - syn_features.mean(0)).pow(2).sum()


@register
class DM(Method):
    name = "dm"

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        if name == "upstream":
            return {"iterations": 20000, "image_lr": 1.0, "image_momentum": 0.5, "real_per_class": 256, "dsa": True}
        return {"iterations": 100, "image_lr": 1.0, "image_momentum": 0.5, "real_per_class": 64, "dsa": True}

    def step(self, iteration: int) -> dict[str, float]:
        ctx, config = self.ctx, self.ctx.config
        network = ctx.fresh_model().requires_grad_(False)
        match = torch.zeros((), device=ctx.synthetic.images.device)
        for c in range(ctx.data.info.num_classes):
            real = ctx.sampler.sample(c, config.real_per_class)
            syn = ctx.synthetic.of_class(c)
            if self.dsa is not None:
                real, syn = self.dsa.match(real, syn)
            with torch.no_grad():
                real_features = network.embed(real)
            match = match + mean_embedding_distance(real_features, network.embed(syn))
        reg, logs = self.regularize(iteration)
        loss = match + reg
        self.update_images(loss)
        return {"loss": loss.item(), "match": match.item(), **logs}
