import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)
from torch import nn

from ddfast.distill.training.models import ConvNet, ModelSpec, ResNet18, convnet_depth


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_convnet_shapes_match_the_reference(channels, size):
    net = ConvNet(channels, 10, size)
    x = torch.randn(2, channels, size, size)
    assert net.embed(x).shape == (2, 128 * 4 * 4)
    assert net(x).shape == (2, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(3, 3) if size == 28 else (1, 1), (1, 1), (1, 1)]
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 3


def test_convnet_width_depth_norm():
    net = ConvNet(3, 100, 32, width=32, depth=4, norm="batchnorm")
    assert net.embed(torch.randn(2, 3, 32, 32)).shape == (2, 32 * 2 * 2)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 4
    bare = ConvNet(1, 10, 28, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in bare.modules())
    with pytest.raises(ValueError, match="below one pixel"):
        ConvNet(1, 10, 28, depth=6)
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvNet(1, 10, 28, norm="layer")


def test_instance_norm_resnet18():
    net = ResNet18(1, 10)
    x = torch.randn(2, 1, 28, 28)
    assert net.embed(x).shape == (2, 512) and net(x).shape == (2, 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 20  # 17 3x3 + 3 shortcuts
    # instance norm: a sample's output does not depend on the rest of the batch
    assert torch.allclose(net.embed(x[:1]), net.embed(x)[:1], atol=1e-5)


def test_model_spec_builds_and_validates():
    assert isinstance(ModelSpec(arch="resnet18").build(3, 10, 32), ResNet18)
    net = ModelSpec(width=8, depth=2).build(1, 10, 28)
    assert net.embed(torch.randn(1, 1, 28, 28)).shape == (1, 8 * 8 * 8)
    with pytest.raises(ValueError, match="arch must be one of"):
        ModelSpec(arch="vgg")


def test_convnet_depth_follows_the_image_size_unless_set():
    assert [convnet_depth(s) for s in (16, 28, 32, 33, 64, 100, 128, 256)] == [3, 3, 3, 4, 4, 5, 5, 6]
    for size, depth in ((28, 3), (64, 4), (128, 5)):  # ConvNet, ConvNetD4, ConvNetD5 of the reference code
        net = ModelSpec(width=8).build(3, 10, size)
        assert net.depth == depth and sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == depth
        assert net.embed(torch.randn(1, 3, size, size)).shape == (1, 8 * 4 * 4)
    assert ModelSpec(width=8, depth=3).build(3, 10, 64).embed(torch.randn(1, 3, 64, 64)).shape == (1, 8 * 8 * 8)
