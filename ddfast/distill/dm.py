"""Distribution matching (DM, Zhao & Bilen 2023): match per-class mean embeddings of real and
synthetic images under a fresh, randomly initialised network each iteration.

loss = sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2, with DSA (the same parameters for
the real and the synthetic batch of a class), plus the CMI regulariser when configured. Under
torchrun each process computes the classes c with c % WORLD_SIZE == RANK and the gradients are summed.
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
    distributed = True

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        if name == "upstream":
            return {"iterations": 20000, "image_lr": 1.0, "image_momentum": 0.5, "real_per_class": 256, "dsa": True}
        return {"iterations": 100, "image_lr": 1.0, "image_momentum": 0.5, "real_per_class": 64, "dsa": True}

    def step(self, iteration: int) -> dict[str, float]:
        ctx, config = self.ctx, self.ctx.config
        network = ctx.fresh_model().requires_grad_(False)
        images = ctx.synthetic.images
        own = set(ctx.world.classes(ctx.data.info.num_classes))
        match = torch.zeros((), device=images.device)
        for c in range(ctx.data.info.num_classes):
            # every process draws every class's batch and transform, in class order, and keeps its own classes'
            index = ctx.sampler.draw(c, config.real_per_class)
            draw = self.dsa.match_draw(max(len(index), ctx.synthetic.ipc), *images.shape[2:]) if self.dsa is not None else None
            if c not in own:
                continue
            real, syn = ctx.sampler.images[index], ctx.synthetic.of_class(c)
            if draw is not None:
                real, syn = self.dsa.apply(real, draw), self.dsa.apply(syn, draw)
            with torch.no_grad():
                real_features = network.embed(real)
            match = match + mean_embedding_distance(real_features, network.embed(syn))
        reg, logs = self.regularize(iteration)
        loss = match + reg
        self.update_images(loss)
        if ctx.world.distributed:  # the whole loss, for the log (regularisers run in one process only)
            match = loss = ctx.world.sum_(match.detach().clone(), "summing the loss")
        return {"loss": loss.item(), "match": match.item(), **logs}
