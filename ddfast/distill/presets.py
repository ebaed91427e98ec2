"""Named presets: ``upstream`` (the public reference code's hyperparameters per dataset and IPC) and
``quick`` (scaled down for a 2-core CPU, tuned on MNIST IPC 10).

What is ours rather than upstream's: the validation split (500 training images per class, 50 for
CIFAR-100), checkpoint choice on it every tenth of the run, and the pool of 5 pre-trained networks.
"""

from __future__ import annotations

from .cmi_regularizer import CMIConfig
from .config import DistillConfig
from .method import method_class
from .mim_regularizer import MIMConfig
from .settings import prefixed
from .training.data import dataset_info
from .training.evaluate import EvalProtocol
from .training.models import ModelSpec
from .training.pretrain import PretrainSpec

PRESETS = ("upstream", "quick")

# The CMI authors' weights (lambda) in their public code. IDC's weigh a per-class CMI, summed over classes.
UPSTREAM_CMI_WEIGHTS = {
    ("dm", "cifar10", 10): 8000.0, ("dm", "cifar10", 50): 2000.0, ("dc", "cifar10", 10): 50000.0, ("dsa", "cifar10", 10): 50000.0,
    ("idc", "cifar10", 10): 100.0, ("idc", "cifar10", 50): 50.0, ("idc", "cifar100", 10): 100.0, ("idc", "cifar100", 50): 50.0,
    ("idc", "svhn", 10): 50.0, ("idc", "svhn", 50): 50.0,
}

# quick: chosen on MNIST IPC 10's validation split with `--sweep cmi.weight=...` (validation accuracy
# of the chosen checkpoint, one network): logits 10 / 100 / 1000 -> 92.5 / 91.5 / 89.4 %, penultimate
# features ("embed") 1000 / 10000 -> 91.8 / 86.4 %; plain DM 93.0 %. CMI did not help on MNIST.
QUICK_CMI = {"weight": 10.0, "features": "logits"}
QUICK_PRETRAIN = PretrainSpec(model=ModelSpec(), pool=1, epochs=1, train_per_class=500)

# MIM4DD's weight (lambda) is not published. quick: a bank of 200 real images per class, refreshed
# every 10 iterations, features of the same 1-epoch ConvNet as CMI's quick pool.
QUICK_MIM = {"weight": 0.1, "bank_per_class": 200, "refresh_every": 10}


def preset(method: str, dataset: str, ipc: int, name: str = "upstream", *, cmi: bool = False, cmi_weight: float | None = None,
           mim: bool = False, mim_weight: float | None = None) -> DistillConfig:
    """The DistillConfig of preset ``name`` for ``method`` on ``dataset`` with ``ipc`` images per class.

    ``cmi=True`` adds the CMI regulariser with the preset's weight; ``cmi_weight`` sets the weight
    (and implies ``cmi``). Upstream weights exist for the settings in ``UPSTREAM_CMI_WEIGHTS`` only:
    elsewhere pass ``cmi_weight``.
    ``mim`` / ``mim_weight`` do the same for MIM4DD, whose upstream weight is not published.
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    info = dataset_info(dataset)
    fields = method_class(method).preset(name, info.name, ipc)
    iterations = fields["iterations"]
    if name == "upstream":
        common = {
            "evaluation": EvalProtocol(epochs=1000 if fields["dsa"] else 300, models=5, dsa=fields["dsa"]),
            "val_per_class": 50 if info.num_classes > 10 else 500,
            "select_every": max(1, iterations // 10),
            "checkpoint_every": max(1, iterations // 100),
        }
    else:
        common = {
            "evaluation": EvalProtocol(epochs=150, models=2, dsa=False),
            "val_per_class": 100,
            "select_every": max(1, iterations // 2),
            "checkpoint_every": max(1, iterations // 10),
        }
    if cmi or cmi_weight is not None:
        common["cmi"] = _cmi(method, info.name, ipc, name, cmi_weight)
    if mim or mim_weight is not None:
        common["mim"] = _mim(name, mim_weight)
    return DistillConfig(method=method, dataset=info.name, ipc=ipc, **fields, **common)


def _cmi(method: str, dataset: str, ipc: int, name: str, weight: float | None) -> CMIConfig:
    if name == "quick":
        with prefixed("cmi."):
            return CMIConfig(**{**QUICK_CMI, **({"weight": weight} if weight is not None else {})}, pretrain=QUICK_PRETRAIN)
    if weight is None:
        if (method, dataset, ipc) not in UPSTREAM_CMI_WEIGHTS:
            known = ", ".join(f"{m} {d} ipc {i}" for m, d, i in UPSTREAM_CMI_WEIGHTS)
            raise ValueError(f"no upstream CMI weight for {method} on {dataset} ipc {ipc} (known: {known}); "
                             "pass cmi_weight / --cmi-weight, chosen on the validation split")
        weight = UPSTREAM_CMI_WEIGHTS[(method, dataset, ipc)]
    with prefixed("cmi."):
        return CMIConfig(weight=weight)


def _mim(name: str, weight: float | None) -> MIMConfig:
    if name == "quick":
        with prefixed("mim."):
            return MIMConfig(**{**QUICK_MIM, **({"weight": weight} if weight is not None else {})}, pretrain=QUICK_PRETRAIN)
    if weight is None:
        raise ValueError("MIM4DD's weight is not published; pass mim_weight / --mim-weight, chosen on the validation split (--sweep mim.weight=...)")
    with prefixed("mim."):
        return MIMConfig(weight=weight)
