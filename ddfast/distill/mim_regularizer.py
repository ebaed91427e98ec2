"""The MIM4DD regulariser (Shang et al., NeurIPS 2023): maximise the mutual information between the
synthetic and the real set with a contrastive (InfoNCE) bound on each layer's feature maps.

    term = weight * sum_l beta^l * infonce(g_l(syn_l), g_l(bank_l), syn labels, bank labels)

syn_l are the block-l feature maps (l = 1 .. depth, from the input side) of the un-augmented synthetic
images, bank_l those of real training images, both average-pooled to ``pool`` x ``pool`` and
flattened; positives are pairs with the same label, every other bank entry is a negative. The
embedding heads g_l (0, 1 or 2 linear layers; 1 was the paper's best) learn with the images, by Adam.

No public code exists, so what the paper leaves open is ours, chosen to keep the bank meaningful:
the features come from one network trained on the real data (drawn from a cached pre-trained pool of
ConvNets) that stays fixed between bank refreshes; the bank (``bank_per_class`` images per class, or
the whole training split) is recomputed every ``refresh_every`` iterations, with a new draw of the
network and the images. ``ddfast.infonce`` streams over the bank, so 50K negatives cost no N x M memory.

Under torchrun each process holds and refreshes a shard of the bank (rows i with i % WORLD_SIZE ==
RANK of the one-process bank) and ``infonce`` runs with ``group=`` and the synthetic queries
replicated, so every process gets the whole value and the synthetic side's whole gradient. The
processes' gradients are summed (``Method.update_images``), so that side's gradient is kept on rank 0
only; the bank side's (into the heads) is each shard's share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.ops.infonce import infonce

from .distributed import World
from .settings import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, Range, check
from .training.data import RealData, random_per_class
from .training.models import ModelSpec
from .training.pretrain import PretrainSpec
from .training.seeding import derive_seed, seeded


@dataclass(frozen=True)
class MIMConfig:
    weight: float  # lambda: the total loss is L_DD + weight * sum_l beta^l NCE_l
    beta: float = 0.8  # layer l's NCE is weighted beta^l
    temperature: float = 0.1  # of the critic exp(<g(a), g(b)> / temperature), on normalised embeddings
    head_layers: int = 1  # linear layers of each embedding head g_l: 0 (identity), 1, or 2 (with a ReLU between)
    head_dim: int = 128  # output size of the heads (and the hidden size of 2-layer heads)
    head_lr: float = 1e-3  # Adam on the heads
    pool: int = 2  # feature maps are average-pooled to pool x pool before the heads
    bank_per_class: int | None = None  # real images per class in the negative bank; None: the whole training split
    refresh_every: int = 100  # iterations between bank refreshes (new network, new images)
    pretrain: PretrainSpec = field(default_factory=lambda: PretrainSpec(model=ModelSpec(), pool=5, epochs=20, weight_decay=5e-4))

    def __post_init__(self):
        check(self, weight=NON_NEGATIVE, beta=POSITIVE, temperature=POSITIVE, head_layers=Range(0, 2, integer=True), head_dim=COUNT,
              head_lr=POSITIVE, pool=COUNT, bank_per_class=OPTIONAL_COUNT, refresh_every=COUNT)
        if self.pretrain.model.arch != "convnet":
            raise ValueError(f"mim needs ConvNet feature networks (layer-wise features), got mim.pretrain.model.arch={self.pretrain.model.arch!r}")


def head(inputs: int, config: MIMConfig) -> nn.Module:
    """The embedding head g_l of ``config.head_layers`` linear layers."""
    if config.head_layers == 0:
        return nn.Identity()
    if config.head_layers == 1:
        return nn.Linear(inputs, config.head_dim)
    return nn.Sequential(nn.Linear(inputs, config.head_dim), nn.ReLU(), nn.Linear(config.head_dim, config.head_dim))


class MIMRegularizer:
    """``reg(images, labels, iteration)`` -> (weight * sum_l beta^l NCE_l, {"mim": sum_l beta^l NCE_l}).

    ``networks`` are frozen ConvNets trained on ``data.train``; see ``method.Regularizer`` for the protocol.
    In a distributed ``world`` this process holds its shard of the bank.
    """

    def __init__(self, networks: list[nn.Module], config: MIMConfig, data: RealData, *, seed: int = 0, chunk: int = 1024,
                 world: World = World()):
        if not networks:
            raise ValueError("the MIM regulariser needs at least one pre-trained network")
        self.networks, self.config, self.data, self.seed, self.chunk, self.world = networks, config, data, seed, chunk, world
        device = data.train.images.device
        with torch.no_grad():
            dims = [f.shape[1] for f in self.features(networks[0], data.train.images[:1])]
        with seeded(derive_seed(seed, "mim-heads"), device):
            self.heads = nn.ModuleList(head(d, config) for d in dims).to(device)
        params = list(self.heads.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.head_lr) if params else None
        self.refresh = None  # index of the current bank (iteration // refresh_every)

    def features(self, network: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """Each block's feature map, average-pooled to pool x pool and flattened: (N, width * pool^2) per layer."""
        return [F.adaptive_avg_pool2d(f, self.config.pool).flatten(1) for f in network.block_features(images)]

    def _refresh(self, iteration: int) -> None:
        refresh = iteration // self.config.refresh_every
        if refresh == self.refresh:
            return
        train, info = self.data.train, self.data.info
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "mim-bank", refresh))
        self.network = self.networks[int(torch.randint(len(self.networks), (1,), generator=generator))]
        if self.config.bank_per_class is None:
            index = torch.arange(len(train.labels))
        else:
            index = random_per_class(train.labels, info.num_classes, self.config.bank_per_class, generator)
        index = index[self.world.rank :: self.world.size].to(train.images.device)
        with torch.no_grad():
            parts = [self.features(self.network, train.images[index[i : i + self.chunk]]) for i in range(0, len(index), self.chunk)]
        self.bank = [torch.cat(layer) for layer in zip(*parts)]
        self.bank_labels = train.labels[index]
        self.refresh = refresh

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        self._refresh(iteration)
        total = images.new_zeros(())
        for level, (g, syn, bank) in enumerate(zip(self.heads, self.features(self.network, images), self.bank), start=1):
            query = g(syn)
            if not self.world.leads:  # the synthetic side's gradient counts once in the processes' sum
                query = query.detach().requires_grad_(query.requires_grad)
            nce = infonce(query, g(bank), labels, self.bank_labels, temperature=self.config.temperature, normalize=True,
                          group=self.world.process_group)
            total = total + self.config.beta**level * nce
        return self.config.weight * total, {"mim": total.item()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.heads.parameters())

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
