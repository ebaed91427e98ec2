"""Checks a run makes before any work (data loading, pre-training, expert buffers, iterations):
its device, its settings against the dataset and method, its output folder and the checkpoint there.

Each raises ``ValueError`` naming the setting, folder or file and what would be accepted, so that a
refused start costs nothing and writes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import checkpoint
from .config import DistillConfig
from .distributed import World
from .method import METHODS, method_class
from .settings import describe_differences
from .training.data import dataset_info

CHECKPOINT = "checkpoint.pt"
FORMAT = "ddfast-distill-checkpoint/1"
OUTPUTS = ("synthetic.pt", "synthetic.png", "results.json")
RESTART = "pass restart=True (--restart) to start over, or use another output folder"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (cpu, cuda or cuda:<index>), or cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {str(device)!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {resolved} asked for, but CUDA is not available here")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {resolved} asked for, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return resolved


def check_settings(config: DistillConfig) -> None:
    """What the settings alone can tell: the method accepts them and every network fits the dataset's images."""
    info = dataset_info(config.dataset, config.image_size)
    method = method_class(config.method)
    method.read_options(config.options)
    method.check_config(config)
    for key, spec in model_specs(config).items():
        try:
            with torch.device("meta"):
                spec.build(info.channels, info.num_classes, info.image_size)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    if config.train_per_class is not None:
        check_draws(config, config.train_per_class, "train_per_class")


def check_distributed(config: DistillConfig, world: World) -> None:
    """Under torchrun (WORLD_SIZE > 1), the settings split over the processes: a method that shares its
    work (``Method.distributed``, with any regulariser) and at least one class per process."""
    if not world.distributed:
        return
    supported = ", ".join(sorted(name for name, cls in METHODS.items() if cls.distributed))
    if not method_class(config.method).distributed:
        raise ValueError(f"under torchrun (WORLD_SIZE={world.size}) ddfast distill runs --method {supported} (with --cmi / --reg mim); "
                         f"--method {config.method} runs in one process only: start it without torchrun, or with --nproc-per-node 1")
    classes = dataset_info(config.dataset).num_classes
    if world.size > classes:
        raise ValueError(f"WORLD_SIZE={world.size} is more processes than the {classes} classes of {config.dataset}: "
                         f"each process computes whole classes, so start at most {classes}")


def model_specs(config: DistillConfig) -> dict:
    """Every ModelSpec of the settings by its dotted key."""
    specs = {"model": config.model, "evaluation.model": config.evaluation.model}
    for name in ("cmi", "mim"):
        reg = getattr(config, name)
        if reg is not None:
            specs[f"{name}.pretrain.model"] = reg.pretrain.model
    return specs


def check_draws(config: DistillConfig, available: int, source: str) -> None:
    """Every per-class draw from the training split (the initial set, expert and pre-training subsets,
    MIM4DD's bank) fits in ``available`` images per class (``source`` says where that number comes from)."""
    options = method_class(config.method).read_options(config.options)
    draws = {"ipc": config.ipc, **_nested_draws(options, "options.")}  # ipc: the initial set and the random-real baseline
    for name in ("cmi", "mim"):
        draws.update(_nested_draws(getattr(config, name), f"{name}."))
    for key, count in draws.items():
        if count is not None and count > available:
            raise ValueError(f"{key}={count} asks for more training images per class than the {available} of {source}")


def _nested_draws(settings, prefix: str) -> dict:
    """(dotted key, count) of the fields drawing images per class from the training split, at any depth."""
    if settings is None or not dataclasses.is_dataclass(settings):
        return {}
    draws = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name in ("train_per_class", "bank_per_class"):
            draws[prefix + field.name] = value
        else:
            draws.update(_nested_draws(value, f"{prefix}{field.name}."))
    return draws


def check_out(out: Path, settings: dict, image_shape: tuple[int, ...], *, restart: bool) -> dict | None:
    """The checkpoint in output folder ``out`` to resume from (None: start afresh), after checking
    that the folder can be written and that starting there loses nothing."""
    checkpoint.check_writable_folder(out)
    for name in (CHECKPOINT, *OUTPUTS):
        if (out / name).exists() and not (out / name).is_file():
            raise ValueError(f"{out / name} is not a file: remove it or use another output folder")
    if restart:
        return None
    path = out / CHECKPOINT
    try:
        state = checkpoint.load(path, keys=("format", "settings", "images", "method", "progress"))
    except checkpoint.UnreadableFile as exc:
        raise ValueError(f"cannot resume: {exc}; {RESTART}") from None
    if state is None:
        existing = [name for name in OUTPUTS if (out / name).exists()]
        if existing:
            raise ValueError(f"{out} holds a run's outputs ({', '.join(existing)}) but no {CHECKPOINT} to resume; "
                             f"{RESTART.replace('start over', 'replace them')}")
        return None
    _check_resumable(state, settings, image_shape, path)
    return state


def _check_resumable(state: dict, settings: dict, image_shape: tuple[int, ...], path: Path) -> None:
    if state["format"] != FORMAT:
        raise ValueError(f"{path} is not a ddfast distillation checkpoint (format {state['format']!r}); {RESTART}")
    if state["settings"] != settings:
        other = describe_differences(state["settings"], settings) if isinstance(state["settings"], dict) else "unreadable"
        raise ValueError(f"{path} was written with other settings ({other}); {RESTART}")
    progress = state["progress"]
    candidates = [state["images"]]
    if isinstance(progress, dict) and isinstance(progress.get("best"), dict):
        candidates.append(progress["best"].get("images"))
    if not (isinstance(progress, dict) and isinstance(progress.get("iteration"), int) and {"history", "selection", "best"} <= set(progress)):
        raise ValueError(f"{path} holds no readable progress; {RESTART}")
    for images in candidates:
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.float32 and tuple(images.shape) == image_shape
                and bool(torch.isfinite(images).all())):
            raise ValueError(f"{path} holds images that are not finite float32 of shape {image_shape}: it is corrupt; {RESTART}")
