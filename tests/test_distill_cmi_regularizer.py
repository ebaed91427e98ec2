import dataclasses

import pytest
import torch
from loops_support import mnist_root, one_thread, tiny_config, tiny_pretrain  # noqa: F401  (one_thread: autouse)

from ddfast.distill import CMIConfig, CMIRegularizer, checkpoint, cmi_regularizer, preset, run
from ddfast.distill.distributed import World
from ddfast.distill.training.models import ConvNet


def test_config_validation():
    with pytest.raises(ValueError, match="weight"):
        CMIConfig(weight=-1.0)
    with pytest.raises(ValueError, match="features"):
        CMIConfig(weight=1.0, features="pixels")
    with pytest.raises(ValueError, match="temperature"):
        CMIConfig(weight=1.0, temperature=0.0)


def test_regulariser_feeds_cmi_loss_and_draws_from_the_pool(monkeypatch):
    calls = []

    def fake_cmi_loss(features, labels, num_classes=None, *, temperature=1.0, centroids=None, reduction="mean", backend="auto", group=None):
        calls.append((features, labels, num_classes, temperature))
        return features.sum() * 0 + float(len(calls))

    monkeypatch.setattr(cmi_regularizer, "cmi_loss", fake_cmi_loss)
    torch.manual_seed(0)
    pool = [ConvNet(1, 10, 28, width=4, depth=2).eval() for _ in range(2)]
    images, labels = torch.randn(6, 1, 28, 28, requires_grad=True), torch.arange(3).repeat_interleave(2)
    reg = CMIRegularizer(pool, CMIConfig(weight=5.0, features="embed", temperature=2.0), 10)
    weighted, logs = reg(images, labels, 0)
    assert weighted.item() == 5.0 and logs == {"cmi": 1.0}
    features, got_labels, classes, temperature = calls[0]
    assert features.shape == (6, 4 * 8 * 8) and torch.equal(got_labels, labels) and classes == 10 and temperature == 2.0
    assert any(torch.equal(features, net.embed(images)) for net in pool)
    logits = CMIRegularizer(pool, CMIConfig(weight=1.0, features="logits"), 10)
    picked = set()
    for seed in range(12):
        torch.manual_seed(seed)
        logits(images, labels, seed)
        picked.add(next(i for i, net in enumerate(pool) if torch.equal(calls[-1][0], net(images))))
    assert picked == {0, 1}


def test_each_process_feeds_its_classes_rows(monkeypatch):
    seen = []

    def fake_cmi_loss(features, labels, num_classes=None, *, temperature=1.0, centroids=None, reduction="mean", backend="auto", group=None):
        seen.append((features, labels, num_classes))
        return features.sum() * 0

    monkeypatch.setattr(cmi_regularizer, "cmi_loss", fake_cmi_loss)
    net = ConvNet(1, 10, 28, width=4, depth=2).eval()
    images, labels = torch.randn(10, 1, 28, 28), torch.arange(5).repeat_interleave(2)
    for rank, own in ((0, [0, 1, 4, 5, 8, 9]), (1, [2, 3, 6, 7])):
        CMIRegularizer([net], CMIConfig(weight=1.0, features="embed"), 10, world=World(rank, 2))(images, labels)
        features, got_labels, classes = seen[-1]
        assert torch.equal(got_labels, labels[own]) and classes == 10
        torch.testing.assert_close(features, net.embed(images[own]))


def test_presets_need_a_weight_chosen_for_the_data():
    assert preset("dm", "mnist", 10, "quick", cmi=True).cmi.weight > 0
    assert preset("dm", "mnist", 10, "quick", cmi_weight=3.0).cmi.weight == 3.0
    upstream = preset("dsa", "cifar10", 10, cmi=True).cmi
    assert upstream.weight == 50000 and upstream.features == "embed" and upstream.temperature == 1.0
    spec = upstream.pretrain
    assert (spec.model.arch, spec.model.norm, spec.epochs, spec.lr, spec.momentum, spec.weight_decay, spec.batch_size) == (
        "resnet18", "instancenorm", 40, 0.01, 0.9, 1e-3, 256)
    with pytest.raises(ValueError, match="no upstream CMI weight for dm on mnist"):
        preset("dm", "mnist", 10, cmi=True)


def test_dm_with_cmi_lowers_the_synthetic_sets_cmi(tmp_path):
    mnist_root()
    cmi = CMIConfig(weight=0.0, features="logits", pretrain=tiny_pretrain())
    base = tiny_config("dm", cmi=cmi, iterations=6, select_every=0)
    plain = run(base, tmp_path / "plain", quiet=True, cache_dir=tmp_path / "cache", final=False)
    strong = dataclasses.replace(base, cmi=dataclasses.replace(cmi, weight=300.0))
    regularised = run(strong, tmp_path / "cmi", quiet=True, cache_dir=tmp_path / "cache", final=False)
    assert len(list((tmp_path / "cache" / "pretrained").iterdir())) == 2  # the pool was trained once for both runs
    cmi_plain = [h["cmi"] for h in plain["loss"]["history"]]
    cmi_reg = [h["cmi"] for h in regularised["loss"]["history"]]
    assert cmi_reg[0] == pytest.approx(cmi_plain[0])  # same start, same network drawn
    assert cmi_reg[-1] < 0.7 * cmi_plain[-1]
    assert (tmp_path / "cmi" / "synthetic.png").is_file()
    assert checkpoint.load(tmp_path / "cmi" / "checkpoint.pt")["progress"]["iteration"] == 6
