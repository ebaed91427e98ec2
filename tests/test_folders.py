"""Image-folder datasets: ImageFolder trees and Tiny-ImageNet's layout, made of real image files in tmp_path."""

import json

import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)
from PIL import Image

from ddfast.distill.cli import main
from ddfast.distill.training import data, folders

CLASSES = ("cat", "dog", "eel")
COLOURS = {"cat": (200, 30, 60), "dog": (10, 220, 90), "eel": (120, 120, 5)}
SIZES = [(37, 23), (16, 50), (64, 64), (23, 23), (90, 31), (17, 40)]  # odd sizes and aspect ratios (width, height)
MODES = ["RGB", "L", "RGBA", "LA"]  # each becomes RGB


def solid(colour, size, mode):
    """A one-colour image; grey ("L") images are written in the colour's red value."""
    image = Image.new("RGB", size, colour)
    return image.convert(mode)


def image_tree(root, train=6, val=2, classes=CLASSES):
    """root/{train,val}/<class>/<i>.png: solid images of the class's colour, of odd sizes and modes."""
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                mode = MODES[i % len(MODES)] if split == "train" else "RGB"
                solid(COLOURS.get(name, (0, 0, 0)), SIZES[i % len(SIZES)], mode).save(folder / f"{i}.png")
    return root


def expected_pixel(colour, mode, info):
    """What a solid image of ``colour`` saved in ``mode`` becomes: RGB, normalised with ImageNet's statistics."""
    rgb = solid(colour, (1, 1), mode).convert("RGB").getpixel((0, 0))
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, info.mean, info.std)])


def test_an_image_folder_loads_with_its_classes_shapes_and_statistics(tmp_path):
    tree = image_tree(tmp_path / "tree")
    d = data.load(f"imagefolder:{tree}", val_per_class=1, image_size=20, cache=tmp_path / "cache")
    info = d.info
    assert info.name == f"imagefolder:{tree.resolve()}" and info.label == "imagefolder-tree"
    assert info.classes == CLASSES and info.num_classes == 3 and info.channels == 3 and info.image_size == 20
    assert (info.mean, info.std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert d.train.images.shape == (15, 3, 20, 20) and d.val.images.shape == (3, 3, 20, 20) and d.test.images.shape == (6, 3, 20, 20)
    assert d.train.images.dtype == torch.float32
    assert torch.equal(torch.bincount(d.train.labels), torch.full((3,), 5)) and torch.equal(d.test.labels, torch.tensor([0, 0, 1, 1, 2, 2]))
    # every image is its class's solid colour, converted to RGB and normalised, whatever its size and mode
    everything = torch.cat([d.train.images, d.val.images])
    labels = torch.cat([d.train.labels, d.val.labels])
    for image, label in zip(everything, labels):
        colour = COLOURS[CLASSES[label]]
        candidates = [expected_pixel(colour, mode, info) for mode in MODES]
        pixel = image[:, 10, 10]
        assert any(torch.allclose(pixel, c, atol=1e-6) for c in candidates), (pixel, candidates)
        assert torch.allclose(image, pixel.view(3, 1, 1).expand_as(image), atol=1e-6)
    for image, label in zip(d.test.images, d.test.labels):
        torch.testing.assert_close(image[:, 0, 0], expected_pixel(COLOURS[CLASSES[label]], "RGB", info), atol=1e-6, rtol=0)


def test_images_are_resized_by_the_shorter_side_and_centre_cropped(tmp_path):
    tree = tmp_path / "stripes"
    for split in ("train", "val"):
        (tree / split / "a").mkdir(parents=True)
        image = Image.new("RGB", (90, 30), (255, 0, 0))  # left third red, middle green, right third blue
        image.paste((0, 255, 0), (30, 0, 60, 30))
        image.paste((0, 0, 255), (60, 0, 90, 30))
        image.save(tree / split / "a" / "0.png")
    images, labels, classes = folders.read_split(tree, "imagefolder", train=True, size=12, label="stripes", cache=tmp_path / "cache")
    assert images.shape == (1, 3, 12, 12) and images.dtype == torch.uint8 and classes == ("a",) and labels.tolist() == [0]
    # 90 x 30 -> 36 x 12, crop columns 12..23: the green third, blended only at its edges
    assert images[0, :, :, 2:10].tolist() == [[[0] * 8] * 12, [[255] * 8] * 12, [[0] * 8] * 12]


def test_decoded_splits_are_cached_and_redecoded_when_a_file_changes(tmp_path, monkeypatch):
    tree = image_tree(tmp_path / "tree", train=2, val=1)
    first = folders.read_split(tree, "imagefolder", train=True, size=8, label="tree", cache=tmp_path / "cache")
    [cached] = (tmp_path / "cache" / "images").iterdir()
    assert cached.name.startswith("tree-train-8px-")

    def refuse(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folders, "_decode", refuse)
    again = folders.read_split(tree, "imagefolder", train=True, size=8, label="tree", cache=tmp_path / "cache")
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1]) and again[2] == first[2]
    monkeypatch.undo()
    solid((1, 2, 3), (5, 7), "RGB").save(tree / "train" / "cat" / "0.png")
    changed = folders.read_split(tree, "imagefolder", train=True, size=8, label="tree", cache=tmp_path / "cache")
    assert changed[0][0, :, 0, 0].tolist() == [1, 2, 3]
    assert len(list((tmp_path / "cache" / "images").iterdir())) == 2


def tiny_imagenet_tree(root):
    """root/tiny-imagenet-200 with 200 classes (wnids in a non-sorted order), 2 train images each and a
    validation set labelled by val_annotations.txt in shuffled class order; class c's images are grey c."""
    base = root / "tiny-imagenet-200"
    wnids = [f"n{(c * 7919) % 100_000:08d}" for c in range(200)]
    (base).mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        grey = sorted(wnids).index(wnid)
        (base / "train" / wnid / "images").mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(2):
            Image.new("RGB", (64, 64), (grey, grey, grey)).save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()
    lines = []
    for i, c in enumerate(order):
        wnid = wnids[c]
        grey = sorted(wnids).index(wnid)
        Image.new("RGB", (64, 64), (grey, grey, grey)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base, [sorted(wnids).index(wnids[c]) for c in order]


def test_tiny_imagenet_layout(tmp_path):
    base, val_labels = tiny_imagenet_tree(tmp_path / "data")
    d = data.load("tinyimagenet", tmp_path / "data", val_per_class=1, cache=tmp_path / "cache")
    assert d.info.name == "tiny-imagenet" and d.info.image_size == 64 and d.info.num_classes == 200
    assert d.info.classes == tuple(sorted(p.name for p in (base / "train").iterdir()))
    assert d.train.images.shape == (200, 3, 64, 64) and d.val.images.shape == (200, 3, 64, 64) and d.test.images.shape == (200, 3, 64, 64)
    assert d.test.labels.tolist() == val_labels
    for split in (d.train, d.val, d.test):  # each image is its label's grey, up to JPEG's rounding
        grey = data.denormalize(split.images, d.info).mean(dim=(1, 2, 3)) * 255
        assert torch.allclose(grey, split.labels.float(), atol=1.5)
    small = data.load("tiny-imagenet", tmp_path / "data", val_per_class=1, image_size=32, cache=tmp_path / "cache")
    assert small.train.images.shape == (200, 3, 32, 32) and small.test.images.shape == (200, 3, 32, 32)


def test_tiny_imagenet_without_annotations_is_named(tmp_path):
    base, _ = tiny_imagenet_tree(tmp_path / "data")
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(FileNotFoundError, match="dataset tiny-imagenet: no .*val_annotations.txt"):
        data.load("tiny-imagenet", tmp_path / "data", val_per_class=1, cache=tmp_path / "cache")


def test_missing_or_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset 'imagefolder:{tmp_path / 'absent'}': no folder"):
        data.dataset_info(f"imagefolder:{tmp_path / 'absent'}")
    with pytest.raises(ValueError, match="imagefolder: takes the path"):
        data.dataset_info("imagefolder:")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no folder {tmp_path / 'bare' / 'train'}"):
        data.load(f"imagefolder:{tmp_path / 'bare'}", val_per_class=1, cache=tmp_path / "cache")
    (tmp_path / "bare" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="find any class folder"):
        data.dataset_info(f"imagefolder:{tmp_path / 'bare'}")
    tree = image_tree(tmp_path / "tree", train=2, val=1)
    (tree / "train" / "fox").mkdir()
    (tree / "train" / "fox" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"dataset imagefolder:.*tree: .*train: Found no valid file for the classes fox"):
        data.load(f"imagefolder:{tree}", val_per_class=1, cache=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"dataset tiny-imagenet: no folder .*tiny-imagenet-200.*--data-root"):
        data.load("tiny-imagenet", tmp_path, val_per_class=1, cache=tmp_path / "cache")


def test_splits_with_other_classes_are_refused(tmp_path):
    tree = image_tree(tmp_path / "tree", train=2, val=1)
    image_tree(tmp_path / "other", train=0, val=1, classes=("cat", "dog", "fox"))
    (tree / "val").rename(tmp_path / "old-val")
    (tmp_path / "other" / "val").rename(tree / "test")  # test/ stands in for a missing val/
    with pytest.raises(ValueError, match=r"same class folders; only in test: \['fox'\], only in train: \['eel'\]"):
        data.load(f"imagefolder:{tree}", val_per_class=1, cache=tmp_path / "cache")


def test_image_size_applies_to_image_folders_only():
    assert data.dataset_info("imagenette").image_size == 128 and data.dataset_info("imagewoof", 64).image_size == 64
    assert data.dataset_info("mnist", 28).image_size == 28
    with pytest.raises(ValueError, match="image_size=32: mnist's images are 28 x 28"):
        data.dataset_info("mnist", 32)
    with pytest.raises(ValueError, match="image_size must be an integer >= 1"):
        data.dataset_info("tiny-imagenet", 0)


def test_distill_evaluate_and_buffer_on_an_image_folder(tmp_path, monkeypatch, capsys):
    tree = image_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", f"imagefolder:{tree}", "--preset", "quick", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--set", "image_size=16",
              "--set", "val_per_class=1", "--set", "model.width=8"]
    assert main(["distill", "--method", "dm", "--ipc", "1", *common, "--iterations", "2", "--set", "real_per_class=2",
                 "--set", "evaluation.model.width=8", "--set", "evaluation.epochs=2", "--set", "evaluation.models=1"]) == 0
    out = tmp_path / "runs" / "dm-imagefolder-tree-ipc1-quick"
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["dataset"] == f"imagefolder:{tree.resolve()}" and results["settings"]["image_size"] == 16
    synthetic = torch.load(out / "synthetic.pt", weights_only=True)
    assert synthetic["images"].shape == (3, 3, 16, 16) and synthetic["classes"] == list(CLASSES)
    assert main(["evaluate", str(out / "synthetic.pt"), "--models", "1", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    assert "random real test accuracy" in capsys.readouterr().out
    experts = ["options.experts.experts=1", "options.experts.epochs=2", "options.max_start_epoch=1", "options.expert_epochs=1",
               "options.experts.train_per_class=None"]
    assert main(["buffer", "--ipc", "1", *common, *(arg for setting in experts for arg in ("--set", setting))]) == 0
    [buffer] = (tmp_path / "cache" / "buffers").iterdir()
    assert buffer.name.startswith("imagefolder-tree-convnet-") and (buffer / "expert-0000.pt").is_file()
