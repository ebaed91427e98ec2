import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)

from ddfast.distill import preset
from ddfast.distill.dm import mean_embedding_distance


def test_mean_embedding_distance():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    syn = torch.tensor([[0.0, 1.0], [2.0, 1.0]], requires_grad=True)
    loss = mean_embedding_distance(real, syn)
    assert loss.item() == pytest.approx((3 - 1) ** 2 + (2 - 1) ** 2)
    (grad,) = torch.autograd.grad(loss, syn)
    # d/d syn_i = -2 (mean_real - mean_syn) / M
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -1.0], [-2.0, -1.0]]))


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
