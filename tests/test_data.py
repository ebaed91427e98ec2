import numpy as np
import pytest
import torch
from loops_support import mnist_root, one_thread  # noqa: F401  (one_thread: autouse)

from ddfast.distill.training import data


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ROOT_ENV, str(tmp_path / "env"))
    assert data.data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data.data_root() == tmp_path / "env"
    monkeypatch.delenv(data.ROOT_ENV)
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "cache"))
    assert data.data_root() == tmp_path / "cache" / "data"  # a user's cache folder, never the checkout's neighbours


def test_missing_dataset_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "MNIST")):
        data.load("mnist", tmp_path, val_per_class=5)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*--download"):
        data.load("cifar10", tmp_path, val_per_class=5)


def test_unknown_dataset_and_bad_sizes():
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.dataset_info("imagenet")
    with pytest.raises(ValueError, match="val_per_class"):
        data.load("mnist", val_per_class=0)
    with pytest.raises(ValueError, match="train_per_class"):
        data.load("mnist", val_per_class=5, train_per_class=0)


def test_mnist_split_is_stratified_disjoint_and_seeded():
    root = mnist_root()
    d = data.load("fmnist", root, val_per_class=7, train_per_class=20, test_per_class=3, seed=1)
    assert d.info.name == "fashion-mnist"
    assert d.train.images.shape == (200, 1, 28, 28) and d.train.images.dtype == torch.float32
    assert torch.equal(torch.bincount(d.train.labels), torch.full((10,), 20))
    assert torch.equal(torch.bincount(d.val.labels), torch.full((10,), 7))
    assert torch.equal(torch.bincount(d.test.labels), torch.full((10,), 3))
    train_rows = {row.numpy().tobytes() for row in d.train.images}
    assert not any(row.numpy().tobytes() in train_rows for row in d.val.images)
    again = data.load("fashion-mnist", root, val_per_class=7, train_per_class=20, test_per_class=3, seed=1)
    assert torch.equal(again.val.images, d.val.images)
    other = data.load("fashion-mnist", root, val_per_class=7, train_per_class=20, test_per_class=3, seed=2)
    assert not torch.equal(other.val.images, d.val.images)
    # normalised with the dataset's statistics: background pixels map to -mean / std
    assert d.train.images.min().item() == pytest.approx(-0.2861 / 0.3530, abs=1e-5)


def test_full_mnist_sizes():
    d = data.load("mnist", mnist_root(), val_per_class=100)
    assert (len(d.train), len(d.val), len(d.test)) == (59000, 1000, 10000)
    pixels = data.denormalize(d.test.images[:100], d.info)
    assert 0 <= pixels.min() and pixels.max() <= 1 and pixels.max() == 1


class _FakeColour:
    """Stands in for torchvision's CIFAR (HWC uint8 array, list targets) and SVHN (CHW array, labels)."""

    def __init__(self, layout):
        rng = np.random.default_rng(0)
        self.pixels = rng.integers(0, 256, size=(30, 3, 32, 32), dtype=np.uint8)
        if layout == "hwc":
            self.data, self.targets = self.pixels.transpose(0, 2, 3, 1), [i % 10 for i in range(30)]
        else:
            self.data, self.labels = self.pixels, np.arange(30) % 10


@pytest.mark.parametrize("name, cls, layout", [("cifar10", "CIFAR10", "hwc"), ("svhn", "SVHN", "chw")])
def test_colour_datasets_become_nchw(monkeypatch, tmp_path, name, cls, layout):
    import torchvision.datasets as tvd

    fake = _FakeColour(layout)
    monkeypatch.setattr(tvd, cls, lambda *args, **kwargs: fake)
    d = data.load(name, tmp_path, val_per_class=1)
    info = data.dataset_info(name)
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (30, 3, 32, 32)
    expected = data.normalize(torch.from_numpy(fake.pixels), info)
    assert torch.equal(d.test.images, expected)
    assert torch.equal(d.test.labels, torch.arange(30) % 10)
