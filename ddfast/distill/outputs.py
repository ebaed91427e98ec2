"""What a run leaves behind: the synthetic set (``synthetic.pt``) and a picture of it (``synthetic.png``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from . import checkpoint
from .preflight import FORMAT as CHECKPOINT_FORMAT
from .training.data import DatasetInfo, dataset_info, denormalize


def save_synthetic(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, settings: dict, **extra) -> None:
    """images (N, C, H, W) float32 normalised as the dataset; labels (N,) int64; ``settings`` of the run."""
    state = {"images": images.detach().cpu(), "labels": labels.cpu(), "dataset": info.name, "classes": list(info.classes),
             "mean": list(info.mean), "std": list(info.std), "settings": settings, **extra}
    checkpoint.save(state, path)


def load_synthetic(path: str | os.PathLike) -> dict:
    """The dict ``save_synthetic`` wrote; a clear error naming ``path`` when it is missing or is not one."""
    path = Path(path)
    try:
        state = checkpoint.load(path)
    except checkpoint.UnreadableFile as exc:
        raise ValueError(f"{exc}: it is not a ddfast synthetic set") from None
    if state is None:
        raise FileNotFoundError(f"no synthetic set at {path.resolve()}")
    if state.get("format") == CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a distillation checkpoint, not a synthetic set: evaluate the synthetic.pt a finished run writes beside it")
    missing = {"images", "labels", "dataset", "settings"} - set(state)
    if missing:
        raise ValueError(f"{path} is not a ddfast synthetic set (missing {sorted(missing)})")
    _check_synthetic(state, path)
    return state


def _check_synthetic(state: dict, path: Path) -> None:
    from .config import DistillConfig
    from .settings import from_dict

    try:
        config = from_dict(DistillConfig, state["settings"])
        info = dataset_info(state["dataset"], config.image_size)
        settings_dataset = dataset_info(config.dataset).name
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable ddfast synthetic set: {exc}") from None
    images, labels, lr = state["images"], state["labels"], state.get("eval_lr")
    expected = (info.channels, info.image_size, info.image_size)
    if info.name != settings_dataset:
        raise ValueError(f"{path} is not a consistent synthetic set: its images are of {info.name}, its settings of {config.dataset}")
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.dim() == 4 and tuple(images.shape[1:]) == expected
            and len(images) > 0 and bool(torch.isfinite(images).all())):
        raise ValueError(f"{path} is not a ddfast synthetic set: images must be finite float32 (N, {', '.join(map(str, expected))}) tensors")
    if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == images.shape[:1]
            and bool(((labels >= 0) & (labels < info.num_classes)).all())):
        raise ValueError(f"{path} is not a ddfast synthetic set: labels must be int64 ({len(images)},) in [0, {info.num_classes})")
    if lr is not None and not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"{path} is not a ddfast synthetic set: eval_lr must be a finite number > 0 or None, got {lr!r}")


def check_evaluation_out(out: Path, synthetic: Path) -> None:
    """``out`` can take an evaluation of ``synthetic`` without destroying anything: new, or an evaluation written before."""
    checkpoint.check_writable_folder(out.parent)
    if not out.exists():
        return
    if out.resolve() == synthetic.resolve():
        raise ValueError(f"--out {out} is the synthetic set itself: choose another file for the results")
    if not out.is_file():
        raise ValueError(f"--out {out} is not a file: choose a file for the results")
    try:
        previous = json.loads(out.read_text())
    except (OSError, ValueError):
        previous = None
    if not (isinstance(previous, dict) and {"synthetic", "protocol", "evaluation"} <= set(previous)):
        raise ValueError(f"--out {out} exists and is not an evaluation written by ddfast evaluate: choose another file, or remove it")


def save_grid(path: str | os.PathLike, images: torch.Tensor, info: DatasetInfo | str, per_row: int) -> None:
    """PNG of ``images`` (class-major), ``per_row`` images per row, in pixel space."""
    from torchvision.utils import save_image

    info = dataset_info(info) if isinstance(info, str) else info
    with checkpoint.atomic_path(path) as tmp:
        save_image(denormalize(images.detach().cpu().float(), info), tmp, nrow=per_row, padding=1, format="png")
