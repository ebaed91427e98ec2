import dataclasses

import pytest
import torch
from loops_support import mnist_root, one_thread, tiny_config, tiny_pretrain  # noqa: F401  (one_thread: autouse)

from ddfast.distill import CMIConfig, CMIRegularizer, checkpoint, cmi_regularizer, preset, run
from ddfast.distill.distributed import World
from ddfast.distill.settings import SettingError, override, override_all
from ddfast.distill.training.data import Split
from ddfast.distill.training.models import ConvNet
from ddfast.ops.cmi.reference import cmi_reference


def test_config_validation():
    with pytest.raises(ValueError, match="weight"):
        CMIConfig(weight=-1.0)
    with pytest.raises(ValueError, match="features"):
        CMIConfig(weight=1.0, features="pixels")
    with pytest.raises(ValueError, match="temperature"):
        CMIConfig(weight=1.0, temperature=0.0)
    config = preset("dm", "mnist", 10, "quick", cmi=True)
    for key, value, match in [("cmi.centroids", "median", r"cmi.centroids must be one of \('batch', 'real'\), got 'median'"),
                              ("cmi.refresh", "-1", r"cmi.refresh must be an integer >= 0, got -1"),
                              ("cmi.refresh", "5", r"cmi.refresh must be 0 with centroids='batch'.*got 5")]:
        with pytest.raises(SettingError, match=match) as raised:
            override(config, key, value)
        assert raised.value.key == key
    assert override_all(config, [("cmi.refresh", "5"), ("cmi.centroids", "real")]).cmi.refresh == 5  # checked once all are in
    with pytest.raises(ValueError, match=r"cmi.centroids='real' needs the real training split"):
        CMIRegularizer([ConvNet(1, 10, 28, width=4, depth=2)], CMIConfig(weight=1.0, centroids="real"), 10)


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


def real_split(per_class=7, classes=4, seed=2):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(per_class)[torch.randperm(classes * per_class, generator=gen)]
    return Split(torch.randn(len(labels), 1, 28, 28, generator=gen, dtype=torch.float64), labels)


def tiny_pool(size, seed=0):
    torch.manual_seed(seed)
    return [ConvNet(1, 4, 28, width=4, depth=2).double().eval().requires_grad_(False) for _ in range(size)]


@pytest.mark.parametrize("features", ["embed", "logits"])
def test_real_centroids_are_the_real_splits_class_means_and_the_loss_measures_against_them(features):
    real, pool = real_split(), tiny_pool(1)
    config = CMIConfig(weight=3.0, features=features, temperature=1.5, centroids="real")
    reg = CMIRegularizer(pool, config, 4, real, chunk=5)  # 28 images in batches of 5
    net = pool[0]
    real_out = net.embed(real.images) if features == "embed" else net(real.images)
    p = torch.softmax(real_out / 1.5, dim=1)
    expected = torch.stack([p[real.labels == c].mean(dim=0) for c in range(4)])
    images = torch.randn(8, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2)
    term, logs = reg(images, labels, 0)
    torch.testing.assert_close(reg.kept[0][1], expected, rtol=1e-12, atol=0)
    syn_out = net.embed(images) if features == "embed" else net(images)
    cmi = cmi_reference(syn_out, labels, 4, temperature=1.5, centroids=expected)
    torch.testing.assert_close(term, 3.0 * cmi, rtol=1e-10, atol=0)
    assert logs["cmi"] == pytest.approx(cmi.item(), rel=1e-10)
    (grad,) = torch.autograd.grad(term, images)
    (expected_grad,) = torch.autograd.grad(3.0 * cmi, images)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
    batch_term, _ = CMIRegularizer(pool, dataclasses.replace(config, centroids="batch"), 4)(images, labels, 0)
    assert abs(batch_term.item() - term.item()) > 1e-3 * abs(term.item())  # not the batch centroids


def test_a_class_missing_from_the_real_split_is_named():
    real = real_split()
    keep = real.labels != 2
    reg = CMIRegularizer(tiny_pool(1), CMIConfig(weight=1.0, centroids="real"), 4, Split(real.images[keep], real.labels[keep]))
    with pytest.raises(ValueError, match=r"cmi.centroids='real': class\(es\) \[2\] have no rows among the 21 added.*lacks these classes"):
        reg(torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.arange(4), 0)


def counting(reg):
    """The pool members of every computation of real centroids by ``reg``, in order."""
    members, plain = [], reg.real_centroids

    def real_centroids(network):
        members.append(next(i for i, n in enumerate(reg.networks) if n is network))
        return plain(network)

    reg.real_centroids = real_centroids
    return members


def drive(reg, iterations):
    """Call ``reg`` at ``iterations`` with the global RNG seeded per iteration, as the runner does;
    returns (iteration, member) of each computation of real centroids."""
    members = counting(reg)
    images, labels = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.arange(4)
    computed = []
    for iteration in iterations:
        torch.manual_seed(iteration)
        before = len(members)
        reg(images, labels, iteration)
        computed += [(iteration, m) for m in members[before:]]
    return computed


@pytest.mark.parametrize("refresh", [0, 3])
def test_real_centroids_are_computed_lazily_per_member_and_refreshed_on_schedule(refresh):
    reg = CMIRegularizer(tiny_pool(3), CMIConfig(weight=1.0, centroids="real", refresh=refresh), 4, real_split())
    computed = drive(reg, range(10))
    expected, seen = [], set()
    for iteration in range(10):
        torch.manual_seed(iteration)
        member = int(torch.randint(3, (1,)))  # the regulariser's draw
        if (member, iteration // refresh if refresh else 0) not in seen:
            seen.add((member, iteration // refresh if refresh else 0))
            expected.append((iteration, member))
    assert computed == expected and {m for _, m in computed} == {0, 1, 2}
    assert len(computed) == (3 if not refresh else len(seen)) and (not refresh or len(computed) > 3)


def test_single_network_refreshes_exactly_every_refresh_iterations_and_resume_restores_the_state(tmp_path):
    real, config = real_split(), CMIConfig(weight=1.0, centroids="real", refresh=4)
    reg = CMIRegularizer(tiny_pool(1), config, 4, real)
    assert drive(reg, range(6)) == [(0, 0), (4, 0)]
    checkpoint.save(reg.state_dict(), tmp_path / "state.pt")
    resumed = CMIRegularizer(tiny_pool(1), config, 4, real)
    resumed.load_state_dict(checkpoint.load(tmp_path / "state.pt"))
    assert resumed.kept.keys() == reg.kept.keys() == {0}
    assert resumed.kept[0][0] == reg.kept[0][0] == 1 and torch.equal(resumed.kept[0][1], reg.kept[0][1])
    assert drive(resumed, range(6, 13)) == drive(reg, range(6, 13)) == [(8, 0), (12, 0)]
    assert torch.equal(resumed.kept[0][1], reg.kept[0][1])


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


def test_dm_with_real_centroids_resumes_bit_for_bit(tmp_path):
    mnist_root()
    cmi = CMIConfig(weight=300.0, features="logits", centroids="real", refresh=2, pretrain=tiny_pretrain())
    config = tiny_config("dm", cmi=cmi, iterations=5, select_every=0)
    full = run(config, tmp_path / "full", quiet=True, cache_dir=tmp_path / "cache", final=False)
    stopped = run(config, tmp_path / "resumed", quiet=True, cache_dir=tmp_path / "cache", stop_after=3, final=False)
    assert stopped["status"] == "stopped"
    resumed = run(config, tmp_path / "resumed", quiet=True, cache_dir=tmp_path / "cache", final=False)
    assert resumed["loss"]["history"] == full["loss"]["history"]
    a, b = checkpoint.load(tmp_path / "full" / "checkpoint.pt"), checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert torch.equal(a["images"], b["images"])
    kept, kept_again = a["method"]["regularizers"][0]["centroids"], b["method"]["regularizers"][0]["centroids"]
    assert [(m, p) for m, p, _ in kept] == [(m, p) for m, p, _ in kept_again] and max(p for _, p, _ in kept) == 2
    assert all(torch.equal(q, r) for (_, _, q), (_, _, r) in zip(kept, kept_again, strict=True))
