"""What a run leaves behind: the synthetic set (``synthetic.pt``) and a picture of it (``synthetic.png``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import checkpoint
from ..data import DatasetInfo, dataset_info, denormalize


def save_synthetic(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, settings: dict, **extra) -> None:
    """images (N, C, H, W) float32 normalised as the dataset; labels (N,) int64; ``settings`` of the run."""
    state = {"images": images.detach().cpu(), "labels": labels.cpu(), "dataset": info.name, "mean": list(info.mean), "std": list(info.std),
             "settings": settings, **extra}
    checkpoint.save(state, path)


def load_synthetic(path: str | os.PathLike) -> dict:
    """The dict ``save_synthetic`` wrote; a clear error when ``path`` is missing or is not one."""
    state = checkpoint.load(path)
    if state is None:
        raise FileNotFoundError(f"no synthetic set at {Path(path).resolve()}")
    missing = {"images", "labels", "dataset", "settings"} - set(state)
    if missing:
        raise ValueError(f"{path} is not a ddfast synthetic set (missing {sorted(missing)})")
    return state


def save_grid(path: str | os.PathLike, images: torch.Tensor, info: DatasetInfo | str, per_row: int) -> None:
    """PNG of ``images`` (class-major), ``per_row`` images per row, in pixel space."""
    from torchvision.utils import save_image

    info = dataset_info(info) if isinstance(info, str) else info
    with checkpoint.atomic_path(path) as tmp:
        save_image(denormalize(images.detach().cpu().float(), info), tmp, nrow=per_row, padding=1, format="png")
