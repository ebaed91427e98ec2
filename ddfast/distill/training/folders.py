"""Datasets stored as trees of image files, decoded once into uint8 tensors and cached on disk.

Two layouts:

- ``imagefolder``: ``<folder>/train/<class>/<image>`` and ``<folder>/val/<class>/<image>`` (``test/``
  when there is no ``val/``), each split read by torchvision's ``datasets.ImageFolder``: the classes
  are the folder names, sorted, and both splits must have the same ones;
- ``tiny-imagenet``: ``tiny-imagenet-200/train/<wnid>/images/*.JPEG`` (an ImageFolder), and
  ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (its test images have no labels, so the
  validation images are the test set, as in the reference code).

Every image is converted to RGB, resized (shorter side) to ``size`` and centre-cropped to size x size
(torchvision transforms). A decoded split is cached as ``<cache>/images/<label>-<split>-<size>px-<key>.pt``,
keyed by its files (paths, sizes, modification times) and the size: the loops index real images per
class over and over, so they read tensors, and a rerun decodes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import checkpoint
from ..progress import logger
from .seeding import derive_seed

LAYOUTS = ("imagefolder", "tiny-imagenet")
CACHE_FORMAT = "ddfast-decoded-images/1"
_PARALLEL_FROM = 2048  # images; fewer decode in this process


def read_split(folder: Path, layout: str, *, train: bool, size: int, label: str, cache: str | os.PathLike | None = None,
               quiet: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """One split of the tree at ``folder``: images uint8 (N, 3, size, size), labels int64 (N,), class names.

    ``label`` names the dataset in cache files. Raises ``FileNotFoundError`` naming the
    folder when a split or its images are missing, ``ValueError`` when the splits disagree.
    """
    from .pretrain import cache_dir

    split, samples, classes = _tiny_samples(folder, train) if layout == "tiny-imagenet" else _folder_samples(folder, train)
    stats = [(os.path.relpath(path, folder), *_stat(path)) for path, _ in samples]
    key = derive_seed(CACHE_FORMAT, layout, size, str(folder), split, classes, stats, [c for _, c in samples])
    path = cache_dir(cache) / "images" / f"{label}-{split}-{size}px-{key:016x}.pt"
    try:
        state = checkpoint.load(path, keys=("format", "images", "labels", "classes"))
    except checkpoint.UnreadableFile as exc:
        checkpoint.warn_unreadable(exc, "decoding the images again")
        state = None
    if state is not None and state["format"] == CACHE_FORMAT and state["images"].shape == (len(samples), 3, size, size):
        return state["images"], state["labels"], tuple(state["classes"])
    log = logger(quiet)
    log(f"decoding {len(samples)} images of {folder / split} at {size} x {size}")
    images = _decode(samples, size)
    labels = torch.tensor([c for _, c in samples], dtype=torch.int64)
    checkpoint.save({"format": CACHE_FORMAT, "images": images, "labels": labels, "classes": list(classes)}, path)
    log(f"cached at {path}")
    return images, labels, classes


def _folder_samples(folder: Path, train: bool) -> tuple[str, list[tuple[str, int]], tuple[str, ...]]:
    """(split folder name, (path, class index) per image, class names) of an ImageFolder tree."""
    if train:
        split = "train"
    else:
        split = next((name for name in ("val", "test") if (folder / name).is_dir()), "val")
    samples, classes = _image_folder(folder / split)
    if not train:
        train_classes = class_names(folder / "train")
        if classes != train_classes:
            raise ValueError(f"{folder / split} and {folder / 'train'} must hold the same class folders; "
                             f"only in {split}: {sorted(set(classes) - set(train_classes))}, "
                             f"only in train: {sorted(set(train_classes) - set(classes))}")
    return split, samples, classes


def _tiny_samples(folder: Path, train: bool) -> tuple[str, list[tuple[str, int]], tuple[str, ...]]:
    """(split folder name, (path, class index) per image, wnids) of a Tiny-ImageNet tree."""
    if train:
        samples, classes = _image_folder(folder / "train")
        return "train", samples, classes
    classes = class_names(folder / "train")
    index = {wnid: c for c, wnid in enumerate(classes)}
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"no {annotations}: a Tiny-ImageNet tree labels val/images/ with it (tiny-imagenet-200's layout)")
    samples = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(f"{annotations}, line {number}: expected <file>\\t<wnid of a train/ class>..., got {line!r}")
        image = folder / "val" / "images" / fields[0]
        if not image.is_file():
            raise FileNotFoundError(f"{annotations}, line {number}: no image {image}")
        samples.append((str(image), index[fields[1]]))
    if not samples:
        raise FileNotFoundError(f"{annotations} labels no images")
    return "val", samples, classes


def _image_folder(split: Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """torchvision's ImageFolder of ``split``: ((path, class index) per image, class names)."""
    from torchvision.datasets import ImageFolder

    _check_folder(split)
    try:
        dataset = ImageFolder(str(split))
    except FileNotFoundError as exc:  # no class folder, or a class folder without images
        raise FileNotFoundError(f"{split}: {exc}") from None
    return dataset.samples, tuple(dataset.classes)


def class_names(split: Path) -> tuple[str, ...]:
    """The class folders of ``split``, sorted as ImageFolder sorts them."""
    from torchvision.datasets.folder import find_classes

    _check_folder(split)
    try:
        return tuple(find_classes(str(split))[0])
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{split}: {exc}") from None


def _check_folder(split: Path) -> None:
    if not split.is_dir():
        raise FileNotFoundError(f"no folder {split} (expected <class>/<image> inside)")


def _stat(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


class _Decoded(torch.utils.data.Dataset):
    """The images of ``samples`` as uint8 (3, size, size): RGB, shorter side resized to ``size``, centre crop."""

    def __init__(self, samples: list[tuple[str, int]], size: int):
        from torchvision import transforms
        from torchvision.datasets.folder import default_loader

        self.paths = [path for path, _ in samples]
        self.loader = default_loader
        self.transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.loader(self.paths[i]))


def _decode(samples: list[tuple[str, int]], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size), decoded by worker processes when there are many."""
    workers = min(8, (os.cpu_count() or 1) - 1) if len(samples) >= _PARALLEL_FROM else 0
    loader = torch.utils.data.DataLoader(_Decoded(samples, size), batch_size=256, num_workers=max(workers, 0))
    return torch.cat(list(loader))
