import dataclasses

import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)

from ddfast.distill.training import evaluate as evaluation
from ddfast.distill.training.data import DatasetInfo, RealData, Split
from ddfast.distill.training.evaluate import EvalProtocol, evaluate, evaluate_architectures, evaluate_with_baseline, random_real
from ddfast.distill.training.loop import accuracy, train_network
from ddfast.distill.training.models import ModelSpec

INFO = DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), "MNIST")
TINY = EvalProtocol(model=ModelSpec(width=8, depth=2), epochs=30, models=2)


def blobs(per_class: int, seed: int) -> Split:
    """Ten classes told apart by which 7x7 patch of a 28x28 image is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    images = 0.3 * torch.randn(len(labels), 1, 28, 28, generator=g)
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 4)
        images[i, 0, 7 * r : 7 * r + 7, 7 * q : 7 * q + 7] += 2.0
    return Split(images, labels)


@pytest.fixture(scope="module")
def data():
    return RealData(INFO, blobs(12, 0), blobs(5, 1), blobs(6, 2))


def test_train_network_fits_and_decays(data):
    torch.manual_seed(0)
    model = TINY.model.build(1, 10, 28)
    lrs = []
    train_network(model, data.train.images, data.train.labels, epochs=8, lr=0.05, batch_size=32,
                  on_epoch=lambda e, m: lrs.append(e))
    assert lrs == list(range(8))
    assert accuracy(model, data.test) == 1.0


def test_evaluate_reports_every_network_and_is_seeded(data):
    result = evaluate(data.train.images[::4], data.train.labels[::4], data, TINY, seed=3)
    assert len(result.val) == len(result.test) == 2 and result.lr == 0.01 and result.lr_search == {}
    assert result.test_mean == pytest.approx(sum(result.test) / 2)
    again = evaluate(data.train.images[::4], data.train.labels[::4], data, TINY, seed=3)
    assert again.test == result.test and again.val == result.val
    val_only = evaluate(data.train.images[::4], data.train.labels[::4], data, TINY, seed=3, test=False, models=1)
    assert val_only.test == [] and val_only.val == result.val[:1]


def test_learning_rate_is_chosen_on_validation(data):
    protocol = dataclasses.replace(TINY, lrs=(1e-6, 0.05), models=1)
    result = evaluate(data.train.images, data.train.labels, data, protocol)
    assert set(result.lr_search) == {"1e-06", "0.05"}
    assert result.lr_search["0.05"] > result.lr_search["1e-06"] and result.lr == 0.05
    fixed = evaluate(data.train.images, data.train.labels, data, protocol, lr=1e-6)
    assert fixed.lr == 1e-6 and fixed.lr_search == {}


def test_baseline_is_a_random_real_subset_evaluated_identically(data):
    subset = random_real(data, 2, seed=0)
    assert torch.equal(torch.bincount(subset.labels), torch.full((10,), 2))
    train_rows = {row.numpy().tobytes() for row in data.train.images}
    assert all(row.numpy().tobytes() in train_rows for row in subset.images)
    syn = blobs(2, 7)
    out = evaluate_with_baseline(syn.images, syn.labels, data, TINY, seed=0)
    assert out["improvement"] == pytest.approx(out["synthetic"]["test_mean"] - out["random_real"]["test_mean"])
    direct = evaluate(subset.images, subset.labels, data, TINY, seed=0)
    assert out["random_real"]["test"] == direct.test
    with pytest.raises(ValueError, match="same number of images per class"):
        evaluate_with_baseline(syn.images[1:], syn.labels[1:], data, TINY)


def test_each_architecture_is_evaluated_with_its_baseline_under_the_protocol(data):
    syn = blobs(2, 7)
    protocol = dataclasses.replace(TINY, epochs=3)
    out = evaluate_architectures(syn.images, syn.labels, data, protocol, ["convnet-bn", "convnet"], seed=1, lr=0.02)
    assert list(out) == ["convnet-bn", "convnet"]
    batchnorm = ModelSpec(width=8, depth=2, norm="batchnorm")
    assert out["convnet"]["model"] == dataclasses.asdict(TINY.model) and out["convnet-bn"]["model"] == dataclasses.asdict(batchnorm)
    direct = evaluate_with_baseline(syn.images, syn.labels, data, dataclasses.replace(protocol, model=batchnorm), seed=1, lr=0.02)
    assert {key: out["convnet-bn"][key] for key in direct} == direct
    assert direct["synthetic"]["lr"] == 0.02 and direct["random_real"]["lr"] == 0.01
    assert out["convnet-bn"]["synthetic"]["test"] != out["convnet"]["synthetic"]["test"] and out["convnet"]["seconds"] > 0


def test_architecture_names_are_checked_before_any_training(data, monkeypatch):
    monkeypatch.setattr(evaluation, "train_network", lambda *a, **k: pytest.fail("trained before refusing"))
    syn = blobs(1, 7)
    with pytest.raises(ValueError, match=r"arch must be one of \[.*\], got 'vgg'"):
        evaluate_architectures(syn.images, syn.labels, data, TINY, ["convnet", "vgg"])
    with pytest.raises(ValueError, match=r"each architecture once, got \['convnet'\]"):
        evaluate_architectures(syn.images, syn.labels, data, TINY, ["convnet", "alexnet", "convnet"])
    with pytest.raises(ValueError, match="at least one architecture"):
        evaluate_architectures(syn.images, syn.labels, data, TINY, [])


def test_protocol_validation():
    with pytest.raises(ValueError, match="lrs"):
        EvalProtocol(lrs=())
    with pytest.raises(ValueError, match="epochs"):
        EvalProtocol(epochs=0)
