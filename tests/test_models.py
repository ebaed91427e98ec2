import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)
from torch import nn

from ddfast.distill.training.models import ARCH_NAMES, VGG11, AlexNet, ConvNet, ModelSpec, ResNet18, convnet_depth, named_model


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


def conv_params(inputs: int, outputs: int, kernel: int) -> int:
    return inputs * outputs * kernel * kernel + outputs


# Parameters of each evaluation network for (channels, classes=10), counted layer by layer from the reference
# code's definitions; ResNet-18 and VGG-11 on 3 x 32 x 32 are the well-known 11,173,962 and 9,231,114.
VGG11_CONVS = [(64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
ALEXNET_CONVS = [(128, 192, 5), (192, 256, 3), (256, 192, 3), (192, 192, 3)]


def expected_params(name: str, channels: int) -> int:
    arch, norm = ARCH_NAMES[name]
    affine = 0 if norm == "none" else 2
    if arch == "convnet":
        return conv_params(channels, 128, 3) + 2 * conv_params(128, 128, 3) + 3 * affine * 128 + 128 * 16 * 10 + 10
    if arch == "resnet18":
        return 11_173_962 - 3 * 64 * 9 + channels * 64 * 9
    if arch == "vgg11":
        convs = conv_params(channels, 64, 3) + sum(conv_params(i, o, 3) for i, o in VGG11_CONVS)
        return convs + affine * (64 + 128 + 256 * 2 + 512 * 4) + 512 * 10 + 10
    convs = conv_params(channels, 128, 5) + sum(conv_params(i, o, k) for i, o, k in ALEXNET_CONVS)
    return convs + affine * (128 + 192 + 256 + 192 + 192) + 192 * 16 * 10 + 10


@pytest.mark.parametrize("name", list(ARCH_NAMES))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_evaluation_architectures_on_small_images(name, channels, size):
    spec = named_model(name)
    net = spec.build(channels, 10, size)
    x = torch.randn(3, channels, size, size)
    assert net(x).shape == (3, 10)
    features = {"convnet": 128 * 4 * 4, "resnet18": 512, "vgg11": 512, "alexnet": 192 * 4 * 4}[spec.arch]
    assert net.embed(x).shape == (3, features)
    assert sum(p.numel() for p in net.parameters()) == expected_params(name, channels)
    kinds = {type(m) for m in net.modules()}
    assert (nn.BatchNorm2d in kinds) == name.endswith("-bn") and (nn.GroupNorm in kinds) == (spec.norm == "instancenorm")


@pytest.mark.parametrize("network, name", [(VGG11, "vgg11"), (AlexNet, "alexnet")])
def test_vgg11_and_alexnet_pad_28_pixels_to_32(network, name):
    first = next(m for m in network(1, 10, 28).modules() if isinstance(m, nn.Conv2d))
    assert first.padding == ((3, 3) if name == "vgg11" else (4, 4))
    first = next(m for m in network(3, 10, 32).modules() if isinstance(m, nn.Conv2d))
    assert first.padding == ((1, 1) if name == "vgg11" else (2, 2))


@pytest.mark.parametrize("name, features", [("resnet18", 512), ("vgg11", 512 * 2 * 2), ("alexnet", 192 * 8 * 8), ("convnet", 128 * 4 * 4)])
def test_evaluation_architectures_on_larger_images(name, features):
    net = named_model(name).build(3, 200, 64)
    x = torch.randn(2, 3, 64, 64)
    assert net.embed(x).shape == (2, features) and net(x).shape == (2, 200)
    assert named_model(name).build(3, 5, 128)(torch.randn(1, 3, 128, 128)).shape == (1, 5)


def test_named_models_keep_the_convnet_shape_and_refuse_unknown_names():
    assert named_model("convnet-bn", ModelSpec(width=32, depth=4)) == ModelSpec(width=32, depth=4, norm="batchnorm")
    assert named_model("resnet18", ModelSpec(width=32)) == ModelSpec(arch="resnet18")
    assert named_model("alexnet") == ModelSpec(arch="alexnet", norm="none")
    with pytest.raises(ValueError, match=r"arch must be one of \['convnet', 'convnet-bn', .*'alexnet-bn'\], got 'vgg16'"):
        named_model("vgg16")
    with pytest.raises(ValueError, match="vgg11 needs images of at least 32 pixels"):
        VGG11(3, 10, 16)
    with pytest.raises(ValueError, match="alexnet needs images of at least 8 pixels"):
        AlexNet(3, 10, 4)


def test_convnet_depth_follows_the_image_size_unless_set():
    assert [convnet_depth(s) for s in (16, 28, 32, 33, 64, 100, 128, 256)] == [3, 3, 3, 4, 4, 5, 5, 6]
    for size, depth in ((28, 3), (64, 4), (128, 5)):  # ConvNet, ConvNetD4, ConvNetD5 of the reference code
        net = ModelSpec(width=8).build(3, 10, size)
        assert net.depth == depth and sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == depth
        assert net.embed(torch.randn(1, 3, size, size)).shape == (1, 8 * 4 * 4)
    assert ModelSpec(width=8, depth=3).build(3, 10, 64).embed(torch.randn(1, 3, 64, 64)).shape == (1, 8 * 8 * 8)
