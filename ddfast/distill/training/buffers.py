"""Expert trajectories for trajectory matching (MTT): networks trained on the real training split,
with a snapshot of their parameters before training and after every epoch.

A buffer is a folder:

    meta.json                    what the experts are: training settings, data, model, parameter shapes
    expert-0007.pt               a finished expert: ``snapshots`` (epochs + 1, P) float32, validation accuracy
    expert-0007/epoch-0012.pt    an expert in progress, one file per snapshot (with the model and optimizer
                                 state after that epoch); a rerun resumes after the last one

Expert k draws everything (initialisation, shuffling, augmentation, subset) from seeds derived from
(seed, k, epoch), so a resumed expert is exactly the one an uninterrupted run makes, and any number
of processes can train disjoint shards at once (``shard=(i, n)``: the experts k with k % n == i).
Every file carries the metadata, and loading refuses a buffer made for other settings.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..progress import bar, logger
from ..settings import COUNT, MOMENTUM, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, check, describe_differences, to_dict
from .augment import DSA
from .data import RealData, random_per_class
from .loop import accuracy, train_epoch
from .models import ModelSpec
from .seeding import derive_seed, seeded

FORMAT = "ddfast-expert-buffer/1"


@dataclass(frozen=True)
class ExpertSpec:
    """How the experts train. Defaults: MTT's buffer.py (SGD without momentum or weight decay, DSA)."""

    experts: int = 100
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    dsa: bool = True
    train_per_class: int | None = None  # ours (quick presets): each expert sees its own random subset of this many images per class
    seed: int = 0

    def __post_init__(self):
        check(self, experts=COUNT, epochs=COUNT, lr=POSITIVE, momentum=MOMENTUM, weight_decay=NON_NEGATIVE, batch_size=COUNT,
              train_per_class=OPTIONAL_COUNT)


def parameter_layout(model: nn.Module) -> list[list]:
    """[name, shape] of each parameter, in the order snapshots are flattened."""
    return [[name, list(p.shape)] for name, p in model.named_parameters()]


def buffer_meta(spec: ExpertSpec, model: ModelSpec, data_key: dict, data: RealData) -> dict:
    """The metadata that identifies a buffer: what a loader checks against its own settings."""
    info = data.info
    net = model.build(info.channels, info.num_classes, info.image_size)
    return {"format": FORMAT, "experts": to_dict(spec), "model": to_dict(model), "data": data_key, "params": parameter_layout(net)}


def default_folder(meta: dict, cache: str | os.PathLike | None = None) -> Path:
    """Where a buffer with ``meta`` lives in the cache (``$DDFAST_CACHE_DIR``, else ~/.cache/ddfast)."""
    from .data import label
    from .pretrain import cache_dir

    key = derive_seed("buffer", {k: v for k, v in meta.items() if k != "params"})
    return cache_dir(cache) / "buffers" / f"{label(meta['data']['dataset'])}-{meta['model']['arch']}-{key:016x}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return shard


def train_experts(meta: dict, data: RealData, folder: str | os.PathLike, *, shard: tuple[int, int] = (0, 1), quiet: bool = False) -> None:
    """Train the experts of ``shard`` that ``folder`` lacks (resuming any in progress) on ``data.train``."""
    folder = Path(folder)
    _claim(folder, meta)
    spec = ExpertSpec(**meta["experts"])
    index, count = shard
    log = logger(quiet)
    for k in range(index, spec.experts, count):
        try:
            finished = _load_finished(folder, k, meta) is not None
        except checkpoint.UnreadableFile as exc:
            checkpoint.warn_unreadable(exc, f"training expert {k} again")
            finished = False
        if not finished:
            _train_expert(meta, spec, data, folder, k, log, quiet)


class ExpertBuffer:
    """The finished experts in a folder whose metadata equals ``meta``; snapshots are memory-mapped.

    ``snapshot(k, epoch)`` is expert k's parameters after ``epoch`` epochs as a list of tensors shaped
    like the model's parameters (views of one flat vector).
    """

    def __init__(self, folder: str | os.PathLike, meta: dict):
        self.folder = Path(folder)
        stored = _read_meta(self.folder)
        if stored is None:
            raise FileNotFoundError(f"no expert buffer at {self.folder} (no meta.json): train one with `ddfast buffer`")
        _check_meta(stored, meta, self.folder / "meta.json")
        self.shapes = [tuple(shape) for _, shape in meta["params"]]
        self.epochs = meta["experts"]["epochs"]
        self.trajectories, self.paths = [], []
        for k in range(meta["experts"]["experts"]):
            state = _load_finished(self.folder, k, meta)
            if state is not None:
                self.trajectories.append(state["snapshots"])
                self.paths.append(_finished(self.folder, k))
        if not self.trajectories:
            raise FileNotFoundError(f"no finished experts in {self.folder}: train them with `ddfast buffer` (or let `ddfast distill` do it)")

    def __len__(self) -> int:
        return len(self.trajectories)

    def snapshot(self, k: int, epoch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        if not 0 <= epoch <= self.epochs:
            raise ValueError(f"epoch must be in [0, {self.epochs}], got {epoch}")
        flat = self.trajectories[k][epoch].to(device)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"{self.paths[k]} holds non-finite parameters after epoch {epoch}: the file is corrupt; "
                             "delete it and rerun to train the expert again")
        return [t.view(shape) for t, shape in zip(flat.split([_numel(s) for s in self.shapes]), self.shapes)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _finished(folder: Path, k: int) -> Path:
    return folder / f"expert-{k:04d}.pt"


def _load_finished(folder: Path, k: int, meta: dict) -> dict | None:
    """Expert k's finished file (snapshots memory-mapped), None when there is none; ``UnreadableFile``
    when it is corrupt or not this buffer's."""
    path = _finished(folder, k)
    state = checkpoint.load(path, mmap=True, keys=("meta", "snapshots"))
    if state is None:
        return None
    if state["meta"] != meta:
        raise checkpoint.UnreadableFile(path, "holds an expert made for other settings than its folder's meta.json")
    snapshots, size = state["snapshots"], sum(_numel(shape) for _, shape in meta["params"])
    if not (isinstance(snapshots, torch.Tensor) and snapshots.dtype == torch.float32
            and tuple(snapshots.shape) == (meta["experts"]["epochs"] + 1, size)):
        raise checkpoint.UnreadableFile(path, f"holds snapshots that are not float32 ({meta['experts']['epochs'] + 1}, {size})")
    return state


def _epochs_done(partial: Path, meta: dict) -> list[dict]:
    """The saved epochs of an expert in progress, from epoch 0 up to the first missing or unreadable
    one; that one and any after it are removed (after a one-line warning) to be trained again."""
    size = sum(_numel(shape) for _, shape in meta["params"])
    files = sorted(partial.glob("epoch-*.pt"))
    done = []
    for epoch, path in enumerate(files):
        try:
            if path.name != f"epoch-{epoch:04d}.pt":
                raise checkpoint.UnreadableFile(partial / f"epoch-{epoch:04d}.pt", "is missing")
            state = checkpoint.load(path, keys=("meta", "snapshot", "model", "optimizer"))
            if state["meta"] != meta or not (isinstance(state["snapshot"], torch.Tensor) and tuple(state["snapshot"].shape) == (size,)):
                raise checkpoint.UnreadableFile(path, "holds another expert's epoch")
        except checkpoint.UnreadableFile as exc:
            checkpoint.warn_unreadable(exc, f"training the expert again from epoch {epoch}")
            for later in files[epoch:]:
                later.unlink()
            break
        done.append(state)
    return done


def _read_meta(folder: Path) -> dict | None:
    path = folder / "meta.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise checkpoint.UnreadableFile(path, f"is not readable JSON ({exc})") from None
    if not isinstance(stored, dict):
        raise checkpoint.UnreadableFile(path, "holds no buffer metadata")
    return stored


def _check_meta(stored: dict, expected: dict, where: Path) -> None:
    if stored.get("format") != FORMAT:
        raise ValueError(f"{where} is not a ddfast expert buffer (format {stored.get('format')!r})")
    if stored != expected:
        raise ValueError(f"the expert buffer {where} was made for other settings ({describe_differences(stored, expected)}); "
                         "use a buffer folder made with these settings, or another folder to train one")


def _claim(folder: Path, meta: dict) -> None:
    """Write ``meta.json`` in a new buffer folder (or over an unreadable one), or check the one there."""
    try:
        stored = _read_meta(folder)
    except checkpoint.UnreadableFile as exc:
        checkpoint.warn_unreadable(exc, "writing it again")
        stored = None
    if stored is None:
        checkpoint.save_json(meta, folder / "meta.json")
    else:
        _check_meta(stored, meta, folder / "meta.json")


def _train_expert(meta: dict, spec: ExpertSpec, data: RealData, folder: Path, k: int, log, quiet: bool) -> None:
    device = data.train.images.device
    info = data.info
    model_spec = ModelSpec(**meta["model"])
    with seeded(derive_seed(spec.seed, "expert", k, "init"), device):
        model = model_spec.build(info.channels, info.num_classes, info.image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    train = data.train
    if spec.train_per_class is not None:
        generator = torch.Generator().manual_seed(derive_seed(spec.seed, "expert", k, "subset"))
        train = train.subset(random_per_class(train.labels, info.num_classes, spec.train_per_class, generator).to(device))
    dsa = DSA() if spec.dsa else None
    partial = folder / f"expert-{k:04d}"
    done = _epochs_done(partial, meta)
    snapshots = [state["snapshot"] for state in done]
    if done:
        model.load_state_dict(done[-1]["model"])
        optimizer.load_state_dict(done[-1]["optimizer"])
        log(f"expert {k}: resuming after epoch {len(done) - 1}")

    def save_epoch(epoch: int) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        snapshots.append(flat)
        checkpoint.save({"meta": meta, "snapshot": flat, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                        partial / f"epoch-{epoch:04d}.pt")

    if not done:
        save_epoch(0)
    with bar(spec.epochs, f"expert {k + 1}/{spec.experts}", enabled=not quiet, initial=len(snapshots) - 1, leave=False) as progress:
        for epoch in range(len(snapshots), spec.epochs + 1):
            with seeded(derive_seed(spec.seed, "expert", k, epoch), device):
                train_epoch(model, optimizer, train.images, train.labels, batch_size=spec.batch_size, dsa=dsa)
            save_epoch(epoch)
            progress.update(1)
    val = accuracy(model, data.val)
    checkpoint.save({"meta": meta, "snapshots": torch.stack(snapshots), "val_accuracy": val}, _finished(folder, k))
    shutil.rmtree(partial)
    log(f"expert {k}: {spec.epochs} epochs, validation accuracy {val:.4f}, saved in {_finished(folder, k)}")
