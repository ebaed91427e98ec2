"""The evaluation protocol: train fresh networks on a small training set, test them on real data.

``evaluate`` trains ``models`` fresh networks (SGD, momentum 0.9, weight decay 5e-4, batch 256,
learning rate x0.1 at half the epochs, DSA optional) and reports accuracy mean +- std on the real
validation and test sets. When several learning rates are offered, one network per rate is trained
first and the rate is chosen on the validation split; the test set never takes part in a choice.
``evaluate_with_baseline`` does the same for a random subset of real training images with as many
images per class, with the same network seeds, so every result shows its improvement over random.
``evaluate_architectures`` repeats that on several architectures, as DD papers' cross-architecture tables.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..progress import bar
from ..settings import COUNT, MOMENTUM, NON_NEGATIVE, POSITIVE, check
from .augment import DSA
from .data import RealData, Split, random_per_class
from .loop import accuracy, train_network
from .models import ModelSpec, named_model
from .seeding import derive_seed, seeded


@dataclass(frozen=True)
class EvalProtocol:
    model: ModelSpec = field(default_factory=ModelSpec)
    epochs: int = 300
    lrs: tuple[float, ...] = (0.01,)  # candidates, chosen on the validation split
    models: int = 5
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = False  # augment every training batch with DSA

    def __post_init__(self):
        check(self, epochs=COUNT, models=COUNT, batch_size=COUNT, lrs=POSITIVE, momentum=MOMENTUM, weight_decay=NON_NEGATIVE)


@dataclass
class Accuracy:
    """Per-network accuracies (fractions in [0, 1]) of one evaluation, with their mean and std."""

    lr: float
    val: list[float]
    test: list[float]
    lr_search: dict[str, float] = field(default_factory=dict)  # candidate lr -> validation accuracy

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val)

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test) if self.test else float("nan")

    @property
    def test_std(self) -> float:
        return statistics.pstdev(self.test) if self.test else float("nan")

    def summary(self) -> dict:
        return {**asdict(self), "val_mean": self.val_mean, "test_mean": self.test_mean, "test_std": self.test_std}


def evaluate(
    images: torch.Tensor,
    labels: torch.Tensor,
    data: RealData,
    protocol: EvalProtocol,
    *,
    seed: int = 0,
    lr: float | None = None,
    test: bool = True,
    models: int | None = None,
    progress: bool = False,
) -> Accuracy:
    """Train ``protocol.models`` (or ``models``) fresh networks on (images, labels); validation and test accuracy.

    ``lr`` fixes the learning rate (e.g. one learned by MTT) instead of choosing among ``protocol.lrs``.
    ``test=False`` measures the validation split only (for choices during distillation).
    Network k is initialised and shuffled with a seed derived from (seed, k), whatever the images.
    ``progress`` shows a bar over the networks' epochs (on a terminal).
    """
    device = data.train.images.device
    images, labels = images.detach().to(device), labels.to(device)
    dsa = DSA() if protocol.dsa else None
    info = data.info

    search_lrs = protocol.lrs if lr is None and len(protocol.lrs) > 1 else ()
    count = models or protocol.models
    progress_bar = bar((len(search_lrs) + count) * protocol.epochs, "evaluating", enabled=progress, leave=False)

    def train(k: int, rate: float, purpose: str) -> nn.Module:
        with seeded(derive_seed(seed, purpose, k), device):
            model = protocol.model.build(info.channels, info.num_classes, info.image_size).to(device)
            return train_network(
                model, images, labels, epochs=protocol.epochs, lr=rate, batch_size=protocol.batch_size,
                momentum=protocol.momentum, weight_decay=protocol.weight_decay, dsa=dsa, on_epoch=lambda *_: progress_bar.update(1),
            )

    with progress_bar:
        search = {repr(rate): accuracy(train(0, rate, "lr-search"), data.val) for rate in search_lrs}
        if lr is None:
            lr = float(max(search_lrs, key=lambda r: search[repr(r)])) if search_lrs else protocol.lrs[0]
        result = Accuracy(lr=lr, val=[], test=[], lr_search=search)
        for k in range(count):
            model = train(k, lr, "eval")
            result.val.append(accuracy(model, data.val))
            if test:
                result.test.append(accuracy(model, data.test))
    return result


def random_real(data: RealData, per_class: int, seed: int) -> Split:
    """``per_class`` random real training images of every class (the baseline a distilled set must beat)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "random-real"))
    index = random_per_class(data.train.labels, data.info.num_classes, per_class, generator)
    return data.train.subset(index.to(data.train.labels.device))


def evaluate_with_baseline(
    images: torch.Tensor, labels: torch.Tensor, data: RealData, protocol: EvalProtocol, *, seed: int = 0, lr: float | None = None,
    baseline_per_class: int | None = None, progress: bool = False,
) -> dict:
    """Evaluate a synthetic set and, identically, a random real subset of ``baseline_per_class`` images
    per class (default: as many as the synthetic set has; a set decoded from fewer stored images,
    as IDC's, is compared at its stored number).

    Returns {"synthetic": ..., "random_real": ..., "improvement": test mean difference} (fractions).
    ``lr`` (e.g. MTT's learned rate) applies to the synthetic set only; the baseline chooses its own.
    """
    counts = torch.bincount(labels.cpu(), minlength=data.info.num_classes)
    if int(counts.min()) != int(counts.max()):
        raise ValueError(f"labels must have the same number of images per class for the baseline, got counts {counts.tolist()}")
    if baseline_per_class is not None and (isinstance(baseline_per_class, bool) or not isinstance(baseline_per_class, int)
                                           or baseline_per_class < 1):
        raise ValueError(f"baseline_per_class must be an integer >= 1, got {baseline_per_class!r}")
    synthetic = evaluate(images, labels, data, protocol, seed=seed, lr=lr, progress=progress)
    baseline_set = random_real(data, baseline_per_class or int(counts[0]), seed)
    baseline = evaluate(baseline_set.images, baseline_set.labels, data, protocol, seed=seed, progress=progress)
    return {
        "synthetic": synthetic.summary(),
        "random_real": baseline.summary(),
        "improvement": synthetic.test_mean - baseline.test_mean,
    }


def evaluate_architectures(
    images: torch.Tensor, labels: torch.Tensor, data: RealData, protocol: EvalProtocol, archs: list[str] | tuple[str, ...], *,
    seed: int = 0, lr: float | None = None, baseline_per_class: int | None = None, progress: bool = False,
) -> dict:
    """``evaluate_with_baseline`` on each architecture of ``archs`` (names of ``models.ARCH_NAMES``), in order.

    Every architecture trains under ``protocol`` (epochs, learning rates, DSA, networks), as the reference
    code evaluates all of its architectures; only the network changes. ConvNets keep the protocol's width and
    depth. Returns {name: {"model": its ModelSpec as a dict, "seconds": wall time, **evaluate_with_baseline}}.
    """
    if not archs:
        raise ValueError("archs must name at least one architecture")
    repeated = sorted({name for name in archs if list(archs).count(name) > 1})
    if repeated:
        raise ValueError(f"archs must name each architecture once, got {repeated} more than once")
    specs = {name: named_model(name, protocol.model) for name in archs}  # every name checked before any training
    results = {}
    for name, spec in specs.items():
        start = time.perf_counter()
        evaluation = evaluate_with_baseline(images, labels, data, replace(protocol, model=spec), seed=seed, lr=lr,
                                            baseline_per_class=baseline_per_class, progress=progress)
        results[name] = {"model": asdict(spec), "seconds": time.perf_counter() - start, **evaluation}
    return results
