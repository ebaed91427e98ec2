"""The shared training loop: SGD over a small training set in shuffled batches, and accuracy on a split.

The evaluation protocol, the pre-trained networks, the expert trajectories and gradient matching's
inner loop all train through ``train_network`` / ``train_epoch``; every draw comes from the global RNG,
so a caller seeds it (``seeding.seeded``) to make a network reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import DSA
from .data import Split
from .speed import FastNetwork, network_state


def train_network(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    dsa: DSA | None = None,
    decay_at_half: bool = True,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    fast: FastNetwork | None = None,
) -> nn.Module:
    """SGD on (images (N, C, H, W), labels (N,)) in shuffled batches; lr x0.1 after half the epochs.

    ``on_epoch(epoch, model)`` is called after each epoch (snapshots, logging). ``fast`` computes the
    gradients under a run's speed settings (``FastNetwork.gradients``: compiled; models without batch
    norm). Uses the global RNG.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for epoch in range(epochs):
        if decay_at_half and epoch == epochs // 2 and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.1
        train_epoch(model, optimizer, images, labels, batch_size=batch_size, dsa=dsa, fast=fast)
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                dsa: DSA | None = None, fast: FastNetwork | None = None) -> None:
    """One pass over (images, labels) in shuffled batches (global RNG), each augmented by ``dsa`` when given; ``fast``
    as in ``train_network``."""
    model.train()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    order = torch.randperm(len(labels)).to(labels.device)
    for start in range(0, len(labels), batch_size):
        batch = order[start : start + batch_size]
        x = images[batch]
        if dsa is not None:
            x = dsa(x)
        optimizer.zero_grad(set_to_none=True)
        if fast is None:
            F.cross_entropy(model(x), labels[batch]).backward()
        else:
            grads = fast.gradients(network_state(model), list(trained), x, labels[batch], create_graph=False)
            for p, grad in zip(trained.values(), grads, strict=True):
                p.grad = grad
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Fraction of ``split`` that ``model`` classifies correctly."""
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        logits = model(split.images[start : start + batch_size])
        correct += int((logits.argmax(1) == split.labels[start : start + batch_size]).sum())
    model.train()
    return correct / len(split)
