import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)

from ddfast.distill import dm, preset
from ddfast.distill.dm import class_mean_distances, mean_embedding_distance, samples_independent
from ddfast.distill.training.models import ConvNet


def test_mean_embedding_distance():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    syn = torch.tensor([[0.0, 1.0], [2.0, 1.0]], requires_grad=True)
    loss = mean_embedding_distance(real, syn)
    assert loss.item() == pytest.approx((3 - 1) ** 2 + (2 - 1) ** 2)
    (grad,) = torch.autograd.grad(loss, syn)
    # d/d syn_i = -2 (mean_real - mean_syn) / M
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -1.0], [-2.0, -1.0]]))


@pytest.mark.parametrize("norm", ["instancenorm", "none"])
def test_batched_classes_equal_one_pass_per_class_and_side(norm, monkeypatch):
    torch.manual_seed(0)
    network = ConvNet(1, 4, 28, width=8, depth=2, norm=norm).double().requires_grad_(False)
    sizes, ipc = [5, 3, 7, 1], [2, 3, 1, 2]  # odd sizes; chunks of whole classes: [5], [3], [7], [1]
    monkeypatch.setattr(dm, "REAL_CHUNK", 6)
    reals = [torch.randn(n, 1, 28, 28, dtype=torch.float64) for n in sizes]
    images = torch.randn(sum(ipc), 1, 28, 28, dtype=torch.float64, requires_grad=True)
    syns = list(images.split(ipc))
    assert samples_independent(network)
    batched = class_mean_distances(network, reals, syns, batched=True)
    (batched_grad,) = torch.autograd.grad(batched, images)
    per_class = class_mean_distances(network, reals, syns, batched=False)
    (per_class_grad,) = torch.autograd.grad(per_class, images)
    expected = sum(mean_embedding_distance(network.embed(r), network.embed(s)) for r, s in zip(reals, syns))
    torch.testing.assert_close(per_class, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(batched, per_class, rtol=1e-12, atol=0)
    torch.testing.assert_close(batched_grad, per_class_grad, rtol=1e-10, atol=1e-14)
    assert batched_grad.abs().min() > 0  # every synthetic image receives a gradient


def test_batch_norm_keeps_one_pass_per_class():
    assert not samples_independent(ConvNet(1, 4, 28, width=8, depth=2, norm="batchnorm"))


def test_upstream_preset():
    config = preset("dm", "cifar10", 10)
    assert (config.iterations, config.image_lr, config.image_momentum, config.real_per_class, config.dsa, config.init) == (
        20000, 1.0, 0.5, 256, True, "real")
    assert config.model.arch == "convnet" and (config.model.width, config.model.depth, config.model.norm) == (128, None, "instancenorm")
    assert config.model.build(3, 10, 32).depth == 3  # depth None: the image size's (convnet_depth)
    ev = config.evaluation
    assert (ev.epochs, ev.lrs, ev.models, ev.momentum, ev.weight_decay, ev.batch_size, ev.dsa) == (1000, (0.01,), 5, 0.9, 5e-4, 256, True)
    assert config.cmi is None
    assert preset("dm", "cifar10", 10, cmi=True).cmi.weight == 8000
    assert preset("dm", "cifar10", 50, cmi=True).cmi.weight == 2000
