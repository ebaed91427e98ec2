"""Real datasets for the distillation loops: one interface over torchvision's loaders.

``load("mnist")`` returns the whole dataset as normalised float32 tensors, with a validation split
carved from the training set (stratified, seeded), so every selection (checkpoints, learning rates,
regulariser weights) is made without looking at the test set.

The data root is ``root`` when given, else ``$DDFAST_DATA_ROOT``, else ``data/`` in ddfast's cache
folder (``~/.cache/ddfast/data``, see ``ddfast._cache``), where ``download=True`` fetches torchvision's datasets.

Besides torchvision's datasets, trees of image files (``folders``): Tiny-ImageNet
(``<root>/tiny-imagenet-200``), the ImageNet subsets ``imagenette`` and ``imagewoof``
(``<root>/<name>/{train,val}/<class>/*``) and any such tree as ``imagefolder:<path>``. Their images
are resized and centre-cropped to the dataset's size (``image_size`` chooses another) and normalised
with ImageNet's statistics, as the reference code does for Tiny-ImageNet and the ImageNet subsets.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..._cache import cache_dir
from . import folders
from .zca import ZCA

ROOT_ENV = "DDFAST_DATA_ROOT"


@dataclass(frozen=True)
class DatasetInfo:
    """What the loops need to know about a dataset: shape, classes and normalisation."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folder: str  # its folder under the data root (torchvision's), or the absolute path of an image folder
    layout: str = "torchvision"  # how it is read: "torchvision", or one of folders.LAYOUTS (resized to image_size)
    classes: tuple[str, ...] = ()  # class names, known once loaded

    @property
    def label(self) -> str:
        return label(self.name)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FOLDER_PREFIX = "imagefolder:"  # --dataset imagefolder:<path>: any tree <path>/{train,val}/<class>/<image>
FOLDER_SIZE = 128  # image folders' default size (MTT's for the ImageNet subsets)
_LAYOUT_HELP = {"imagefolder": "train/<class>/<image> and val/<class>/<image>",
                "tiny-imagenet": "tiny-imagenet-200's train/<wnid>/images/, val/images/ and val/val_annotations.txt"}

# Per-channel statistics of the training sets, as used by the public reference code (ImageNet's for
# Tiny-ImageNet and the ImageNet subsets).
DATASETS = {
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), "MNIST"),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2861,), (0.3530,), "FashionMNIST"),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar-10-batches-py"),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python"),
    "svhn": DatasetInfo("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "."),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 3, 64, 200, IMAGENET_MEAN, IMAGENET_STD, "tiny-imagenet-200", "tiny-imagenet"),
    "imagenette": DatasetInfo("imagenette", 3, FOLDER_SIZE, 10, IMAGENET_MEAN, IMAGENET_STD, "imagenette", "imagefolder"),
    "imagewoof": DatasetInfo("imagewoof", 3, FOLDER_SIZE, 10, IMAGENET_MEAN, IMAGENET_STD, "imagewoof", "imagefolder"),
}
ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "cifar-10": "cifar10",
           "cifar-100": "cifar100", "tinyimagenet": "tiny-imagenet", "tiny_imagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet"}


@dataclass
class Split:
    """Images (N, C, H, W) float32, normalised; labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class RealData:
    """A dataset ready for distillation: training part, validation part carved from it, test set.

    ``zca`` is the whitening applied to all three when they are ZCA-whitened (``whiten``), else None.
    """

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    zca: ZCA | None = None

    def to(self, device: torch.device | str) -> RealData:
        zca = self.zca.to(device) if self.zca is not None else None
        return RealData(self.info, self.train.to(device), self.val.to(device), self.test.to(device), zca)


def whiten(data: RealData, eps: float) -> RealData:
    """``data`` ZCA-whitened with a whitening fitted on its training split (regularisation ``eps``)."""
    if data.zca is not None:
        raise ValueError("the data are already ZCA-whitened")
    zca = ZCA.fit(data.train.images, eps)
    return RealData(data.info, *(Split(zca(s.images), s.labels) for s in (data.train, data.val, data.test)), zca=zca)


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """What dataset ``name`` is: a key of ``DATASETS`` (or ``ALIASES``), or ``imagefolder:<path>``.

    ``image_size`` resizes an image-folder dataset (None: its default); other datasets keep their size.
    """
    if name.lower().startswith(FOLDER_PREFIX):
        info = _folder_info(name)
    else:
        key = ALIASES.get(name.lower(), name.lower())
        if key not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)} or {FOLDER_PREFIX}<path>, got {name!r}")
        info = DATASETS[key]
    if image_size is None or image_size == info.image_size:
        return info
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1 or None, got {image_size!r}")
    if info.layout == "torchvision":
        raise ValueError(f"image_size={image_size}: {info.name}'s images are {info.image_size} x {info.image_size} and are not resized; "
                         "image_size applies to image-folder datasets (tiny-imagenet, imagenette, imagewoof, imagefolder:<path>)")
    return dataclasses.replace(info, image_size=image_size)


def label(name: str) -> str:
    """Dataset ``name`` as part of a file name: an image folder is ``imagefolder-<its last component>``."""
    if name.lower().startswith(FOLDER_PREFIX):
        return "imagefolder-" + Path(name[len(FOLDER_PREFIX):]).name
    return name


def _folder_info(name: str) -> DatasetInfo:
    """``imagefolder:<path>``: 3 channels, FOLDER_SIZE, as many classes as <path>/train/ has folders."""
    text = name[len(FOLDER_PREFIX):]
    if not text:
        raise ValueError(f"dataset {name!r}: {FOLDER_PREFIX} takes the path of a folder holding train/<class>/* and val/<class>/*")
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {name!r}: no folder {folder}")
    try:
        classes = folders.class_names(folder / "train")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"dataset {name!r}: {exc}") from None
    return DatasetInfo(f"{FOLDER_PREFIX}{folder}", 3, FOLDER_SIZE, len(classes), IMAGENET_MEAN, IMAGENET_STD, str(folder), "imagefolder")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the datasets: ``root``, else ``$DDFAST_DATA_ROOT``, else ``<cache>/data``."""
    if root is not None:
        return Path(root)
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    return cache_dir() / "data"


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_per_class: int,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    download: bool = False,
    image_size: int | None = None,
    cache: str | os.PathLike | None = None,
    quiet: bool = True,
) -> RealData:
    """Load dataset ``name`` with ``val_per_class`` training images per class held out for validation.

    ``train_per_class`` / ``test_per_class`` keep only that many images per class (smoke tests and
    quick runs); the default keeps everything. The subsets and the split are drawn with ``seed``.
    Image folders are resized to ``image_size`` (None: the dataset's default) and their decoded
    images cached in ``cache`` (default: ``$DDFAST_CACHE_DIR``, else ~/.cache/ddfast); ``quiet``
    silences the message while they decode. The returned ``info`` holds the class names.
    """
    info = dataset_info(name, image_size)
    if val_per_class < 1:
        raise ValueError(f"val_per_class must be >= 1, got {val_per_class}")
    for arg, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be >= 1 or None, got {value}")
    if info.layout == "torchvision":
        folder = data_root(root)
        (train, classes), (test, _) = (_read(info, folder, train=split, download=download) for split in (True, False))
    else:
        (train, classes), (test, _) = (_read_folder(info, root, train=split, cache=cache, quiet=quiet) for split in (True, False))
    info = dataclasses.replace(info, classes=classes)
    generator = torch.Generator().manual_seed(seed)
    val_index, train_index = _stratified_split(train.labels, info.num_classes, val_per_class, train_per_class, generator)
    test_index = _stratified_split(test.labels, info.num_classes, test_per_class, None, generator)[0] if test_per_class else None
    return RealData(info, train.subset(train_index), train.subset(val_index), test.subset(test_index) if test_index is not None else test)


def class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """For each class, the positions of its rows in ``labels``."""
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def random_per_class(labels: torch.Tensor, num_classes: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random positions of each class, class by class (num_classes * count,)."""
    picks = []
    for c, index in enumerate(class_indices(labels.cpu(), num_classes)):
        if len(index) < count:
            raise ValueError(f"class {c} has {len(index)} images, fewer than the {count} asked for")
        picks.append(index[torch.randperm(len(index), generator=generator)[:count]])
    return torch.cat(picks)


def _stratified_split(labels, num_classes, first_per_class, rest_per_class, generator):
    """Disjoint per-class random draws: (first part, rest); the rest is everything left when None."""
    first, rest = [], []
    for c, index in enumerate(class_indices(labels, num_classes)):
        if len(index) <= first_per_class:
            raise ValueError(f"class {c} has {len(index)} images, too few to hold out {first_per_class} per class")
        index = index[torch.randperm(len(index), generator=generator)]
        first.append(index[:first_per_class])
        rest.append(index[first_per_class:][:rest_per_class])
    return torch.cat(first), torch.cat(rest)


def _read(info: DatasetInfo, root: Path, *, train: bool, download: bool) -> tuple[Split, tuple[str, ...]]:
    """One torchvision split as normalised tensors, and the class names; a clear error when the files are missing."""
    import torchvision.datasets as tvd

    split = "train" if train else "test"
    constructors = {
        "mnist": lambda: tvd.MNIST(str(root), train=train, download=download),
        "fashion-mnist": lambda: tvd.FashionMNIST(str(root), train=train, download=download),
        "cifar10": lambda: tvd.CIFAR10(str(root), train=train, download=download),
        "cifar100": lambda: tvd.CIFAR100(str(root), train=train, download=download),
        "svhn": lambda: tvd.SVHN(str(root), split=split, download=download),
    }
    try:
        dataset = constructors[info.name]()
    except (RuntimeError, OSError, ValueError) as exc:  # torchvision: "Dataset not found ...", a failed download, a corrupt file
        fix = ("The download failed: check the connection, or" if download else "Pass --download (download=True) to fetch it, or")
        raise FileNotFoundError(
            f"{info.name} ({split}) not found or unreadable under {(root / info.folder).resolve()}: {str(exc).strip()} "
            f"{fix} point --data-root / ${ROOT_ENV} at a folder holding it."
        ) from None
    images = torch.as_tensor(np.asarray(dataset.data))
    if images.dim() == 3:  # (N, H, W): one channel
        images = images.unsqueeze(1)
    elif images.shape[-1] == info.channels:  # (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(dataset.targets if hasattr(dataset, "targets") else dataset.labels), dtype=torch.int64)
    classes = tuple(getattr(dataset, "classes", None) or (str(c) for c in range(info.num_classes)))
    return Split(normalize(images, info), labels), classes


def _read_folder(info: DatasetInfo, root, *, train: bool, cache, quiet: bool) -> tuple[Split, tuple[str, ...]]:
    """One split of an image-folder dataset as normalised tensors, and the class names."""
    folder = Path(info.folder) if info.name.startswith(FOLDER_PREFIX) else data_root(root) / info.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {info.name}: no folder {folder.resolve()}; ddfast does not download it: put the tree there "
                                f"({_LAYOUT_HELP[info.layout]}), or point --data-root / ${ROOT_ENV} at the folder holding {info.folder}/")
    try:
        images, labels, classes = folders.read_split(folder, info.layout, train=train, size=info.image_size, label=info.label,
                                                     cache=cache, quiet=quiet)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"dataset {info.name}: {exc}") from None
    if len(classes) != info.num_classes:
        raise ValueError(f"dataset {info.name}: {folder / 'train'} holds {len(classes)} class folders, expected {info.num_classes}")
    return Split(normalize(images, info), labels), classes


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 standardised per channel."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return ((images.float() / 255 - mean) / std).contiguous()


def denormalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Back to [0, 1] pixel values (clamped), for pictures."""
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)
