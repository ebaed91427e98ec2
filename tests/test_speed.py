"""The loops' speed settings change no value beyond rounding: every fast path against the eager, contiguous one in float64."""

import dataclasses

import pytest
import torch
from loops_support import assert_resumes_identically, mnist_root, one_thread, tiny_config  # noqa: F401  (one_thread: autouse)
from torch import nn

from ddfast.distill import run
from ddfast.distill.dc import matching_loss
from ddfast.distill.dm import class_mean_distances
from ddfast.distill.mtt import MTTOptions
from ddfast.distill.settings import SettingError
from ddfast.distill.training import winograd
from ddfast.distill.training.augment import DSA
from ddfast.distill.training.buffers import ExpertSpec
from ddfast.distill.training.loop import train_network
from ddfast.distill.training.models import ConvNet
from ddfast.distill.training.speed import FastNetwork, SpeedConfig
from ddfast.distill.unroll import Student

CPU = torch.device("cpu")


def network(seed: int, dtype=torch.float64, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet(1, 3, 28, width=width).to(dtype)


def class_batches(sizes, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(sum(sizes), 1, 28, 28, generator=generator, dtype=dtype).requires_grad_(True)
    return images, list(images.split(sizes))


def dm_loss_and_grad(net, fast, *, batched=False, dtype=torch.float64):
    _, reals = class_batches([7, 5, 1], 1, dtype)  # odd sizes, one single-image class
    syn, syns = class_batches([2, 3, 1], 2, dtype)
    loss = class_mean_distances(net, [r.detach() for r in reals], syns, batched=batched, fast=fast)
    return loss, torch.autograd.grad(loss, syn)[0]


@pytest.mark.parametrize("speed", [SpeedConfig(), SpeedConfig(channels_last=True, compile=False), SpeedConfig(channels_last=False)],
                         ids=["compiled-channels-last", "eager-channels-last", "compiled-contiguous"])
@pytest.mark.parametrize("batched", [False, True], ids=["per-class", "batched"])
def test_dm_fast_paths_equal_the_eager_one_in_float64(speed, batched):
    net = network(0).requires_grad_(False)
    expected = dm_loss_and_grad(net, None)
    got = dm_loss_and_grad(net, FastNetwork(net, speed, CPU), batched=batched)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-14)


@pytest.mark.skipif(not winograd.available(), reason="the Winograd transform kernels cannot be built here (no C++ compiler)")
def test_winograd_convolutions_of_the_cpu_paths_equal_the_eager_one_in_float64(monkeypatch):
    """A network wide enough for Winograd convolutions (DM's real side, gradient matching's real gradients) and batches of
    MIN_TILES tiles at the second block: the transform kernels run and the values stay."""
    calls = []
    kernels = winograd._kernels
    monkeypatch.setattr(winograd, "_kernels", lambda: calls.append(1) or kernels())
    net = network(0, width=winograd.MIN_CHANNELS)
    generator = torch.Generator().manual_seed(1)
    reals = list(torch.randn(2, 16, 1, 28, 28, generator=generator, dtype=torch.float64))  # 16 images: 16 x 4 x 4 tiles at 16 x 16

    def dm(fast):
        syn, syns = class_batches([2, 3], 2)
        loss = class_mean_distances(net.requires_grad_(False), reals, syns, batched=False, fast=fast)
        return loss, torch.autograd.grad(loss, syn)[0]

    def matching(fast):
        syn, syns = class_batches([2, 3], 2)
        loss = matching_loss(net.requires_grad_(True), reals, syns, fast=fast)
        return loss, torch.autograd.grad(loss, syn)[0]

    for values in (dm, matching):
        expected = values(None)
        calls.clear()
        got = values(FastNetwork(net, SpeedConfig(), CPU))
        assert calls, f"{values.__name__}: no Winograd convolution ran"
        torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-14)


def test_one_compiled_program_serves_every_fresh_network():
    fast = FastNetwork(network(0).requires_grad_(False), SpeedConfig(), CPU)
    dm_loss_and_grad(network(1).requires_grad_(False), fast)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed in (2, 3):  # new networks, new values: the same programs, the right values
        net = network(seed).requires_grad_(False)
        torch.testing.assert_close(dm_loss_and_grad(net, fast)[0], dm_loss_and_grad(net, None)[0], rtol=1e-12, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert fast.compile_seconds > 0


def test_gradient_matching_fast_path_equals_the_eager_one_in_float64():
    net = network(0)
    _, reals = class_batches([6, 3, 1], 1)
    reals = [r.detach() for r in reals]

    def loss_and_grad(fast, params=None):
        syn, syns = class_batches([2, 1, 2], 2)
        loss = matching_loss(net, reals, syns, fast=fast, params=params)
        return loss, torch.autograd.grad(loss, syn)[0]

    fast = FastNetwork(net, SpeedConfig(), CPU)
    for params in (None, [p for p in net.parameters() if p.dim() > 2]):  # every parameter; the convolutions only (IDC)
        expected, got = loss_and_grad(None, params), loss_and_grad(fast, params)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-14)


def test_network_training_with_compiled_gradients_equals_the_eager_one_in_float64():
    """Gradient matching's inner loop: SGD on the synthetic set (DSA-augmented, two batches, the last one short)."""
    images, _ = class_batches([4, 3, 2], 3)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])

    def trained(fast):
        net = network(4)
        torch.manual_seed(5)  # the same shuffles and augmentations
        train_network(net, images.detach(), labels, epochs=2, lr=0.05, batch_size=5, dsa=DSA(), fast=fast and fast(net))
        return [p.detach() for p in net.parameters()]

    for got, expected in zip(trained(lambda net: FastNetwork(net, SpeedConfig(), CPU)), trained(None), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def unrolled_final_and_grads(template, start, fast, mode="standard"):
    student = Student(template, torch.tensor([0, 0, 1, 1, 2]), batch_size=3, dsa=DSA(), fast=fast)
    images, _ = class_batches([5], 3)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    final = student.train(start, images, lr, student.plan(3, images.shape), mode)
    loss = sum(p.pow(2).sum() for p in final)
    return (loss, *torch.autograd.grad(loss, [images, lr]))


@pytest.mark.parametrize("speed, mode", [(SpeedConfig(), "standard"), (SpeedConfig(), "constant"), (SpeedConfig(channels_last=True), "standard")],
                         ids=["compiled", "compiled-constant-memory", "compiled-channels-last"])
def test_unrolled_student_with_speed_settings_equals_the_plain_one_in_float64(speed, mode):
    template = network(0)
    start = [p.detach() for p in network(1).parameters()]
    expected = unrolled_final_and_grads(template, start, None)
    got = unrolled_final_and_grads(template, start, FastNetwork(template, speed, CPU), mode)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)


def test_one_gradient_program_serves_every_start():
    template = network(0)
    fast = FastNetwork(template, SpeedConfig(), CPU)
    unrolled_final_and_grads(template, [p.detach() for p in network(1).parameters()], fast)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed in (2, 3):
        start = [p.detach() for p in network(seed).parameters()]
        torch.testing.assert_close(unrolled_final_and_grads(template, start, fast)[1], unrolled_final_and_grads(template, start, None)[1],
                                   rtol=1e-10, atol=1e-14)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_bfloat16_precision_is_opt_in_and_close():
    net = network(0, torch.float32).requires_grad_(False)
    expected = dm_loss_and_grad(net, None, dtype=torch.float32)
    got = dm_loss_and_grad(net, FastNetwork(net, SpeedConfig(precision="bfloat16", compile=False), CPU), dtype=torch.float32)
    assert got[0].dtype == torch.float32
    relative = ((got[0] - expected[0]).abs() / expected[0]).item()
    assert 0 < relative < 0.05  # bfloat16 rounding: different, close
    assert torch.nn.functional.cosine_similarity(got[1].flatten(), expected[1].flatten(), dim=0) > 0.99


def test_a_failing_compiler_warns_and_runs_eagerly(monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(nn.Module, "compile", fails)
    monkeypatch.setattr(torch, "compile", fails)
    net = network(0, width=5).requires_grad_(False)  # an architecture not compiled before in this process
    fast = FastNetwork(net, SpeedConfig(), CPU)
    with pytest.warns(RuntimeWarning, match="torch.compile of the network failed .*no C\\+\\+ compiler found.*speed.compile=false"):
        got = dm_loss_and_grad(net, fast)
    torch.testing.assert_close(got[0], dm_loss_and_grad(net, None)[0], rtol=1e-12, atol=0)
    template, start = network(0, width=5), [p.detach() for p in network(1, width=5).parameters()]
    fast = FastNetwork(template, SpeedConfig(), CPU)
    with pytest.warns(RuntimeWarning, match="torch.compile of the network failed"):
        got = unrolled_final_and_grads(template, start, fast)
    torch.testing.assert_close(got[1], unrolled_final_and_grads(template, start, None)[1], rtol=1e-12, atol=0)


def test_architectures_with_equal_parameter_shapes_get_their_own_programs():
    # 28 px and 32 px ConvNets have the same parameter shapes; the first pads by 3, the second by 1
    small, large = ConvNet(1, 3, 28, width=4).double(), ConvNet(1, 3, 32, width=4).double()
    large.load_state_dict(small.state_dict())
    fast = FastNetwork(small, SpeedConfig(), CPU)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(fast.forward(small, x), small(x), rtol=1e-12, atol=1e-14)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(FastNetwork(large, SpeedConfig(), CPU).forward(large, x), large(x), rtol=1e-12, atol=1e-14)


def test_unknown_precision_is_refused_by_name():
    with pytest.raises(SettingError, match="precision must be one of"):
        SpeedConfig(precision="float16")


def test_a_compiled_mtt_run_resumes_bit_for_bit_and_equals_the_eager_run(tmp_path):
    mnist_root()
    options = MTTOptions(syn_steps=2, expert_epochs=1, max_start_epoch=1, experts=ExpertSpec(experts=1, epochs=2, batch_size=32))
    eager = tiny_config("mtt", iterations=3, select_every=0, options=options)  # DSA on: augmented student steps
    compiled = dataclasses.replace(eager, speed=SpeedConfig())
    cache = tmp_path / "cache"
    expected = run(eager, tmp_path / "eager", cache_dir=cache, quiet=True, final=False)
    full = run(compiled, tmp_path / "full", cache_dir=cache, quiet=True, final=False)
    assert full["compile_seconds"] > 0 and expected["compile_seconds"] == 0
    assert [h["loss"] for h in full["loss"]["history"]] == pytest.approx([h["loss"] for h in expected["loss"]["history"]], rel=1e-4)
    assert_resumes_identically(compiled, tmp_path / "full", tmp_path / "resumed", cache_dir=cache)
