"""The MIM4DD regulariser: its value is the layer-weighted InfoNCE of the paper, its gradient reaches
the images and the heads, and its bank is refreshed on schedule, reproducibly."""

import pytest
import torch
import torch.nn.functional as F
from loops_support import one_thread  # noqa: F401  (autouse)

from ddfast.distill import MIMConfig, MIMRegularizer
from ddfast.distill.distributed import World
from ddfast.distill.training.data import RealData, Split, dataset_info
from ddfast.distill.training.models import ConvNet


def fake_data(n_per_class=6, classes=10):
    torch.manual_seed(1)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    train = Split(torch.randn(len(labels), 1, 28, 28), labels)
    return RealData(dataset_info("mnist"), train, train, train)


def reference_nce(query, key, query_labels, key_labels, temperature):
    """Supervised InfoNCE written out: mean over queries of logsumexp over all keys minus the mean positive logit."""
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    positive = (query_labels[:, None] == key_labels[None, :]).float()
    return (torch.logsumexp(logits, 1) - (logits * positive).sum(1) / positive.sum(1)).mean()


@pytest.mark.parametrize("head_layers", [0, 1, 2])
def test_value_is_the_weighted_layer_sum_and_gradients_reach_images_and_heads(head_layers):
    data = fake_data()
    nets = [ConvNet(1, 10, 28, width=4, depth=3).requires_grad_(False) for _ in range(2)]
    config = MIMConfig(weight=0.5, beta=0.8, temperature=0.2, head_layers=head_layers, head_dim=8, pool=2)
    reg = MIMRegularizer(nets, config, data, seed=3)
    images = torch.randn(20, 1, 28, 28, requires_grad=True)
    labels = torch.arange(10).repeat_interleave(2)
    term, logs = reg(images, labels, 0)
    expected = 0.0
    syn = reg.features(reg.network, images)
    bank = reg.features(reg.network, data.train.images)
    for level, (g, s, b) in enumerate(zip(reg.heads, syn, bank), start=1):
        expected = expected + 0.8**level * reference_nce(g(s), g(b), labels, data.train.labels, 0.2)
    assert logs["mim"] == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(term, 0.5 * expected)
    params = reg.parameters()
    assert len(params) == 3 * {0: 0, 1: 2, 2: 4}[head_layers]
    grads = torch.autograd.grad(term, [images, *params])
    assert all(g.abs().sum() > 0 for g in grads)
    (expected_image_grad,) = torch.autograd.grad(0.5 * expected, images)
    torch.testing.assert_close(grads[0], expected_image_grad, rtol=1e-4, atol=1e-7)


def test_bank_refreshes_on_schedule_and_reproducibly():
    data = fake_data()
    nets = [ConvNet(1, 10, 28, width=4, depth=2).requires_grad_(False) for _ in range(4)]
    config = MIMConfig(weight=1.0, bank_per_class=3, refresh_every=5)
    reg = MIMRegularizer(nets, config, data, seed=0)
    images, labels = torch.randn(10, 1, 28, 28), torch.arange(10)
    reg(images, labels, 0)
    first = [b.clone() for b in reg.bank]
    assert first[0].shape == (30, 4 * 2 * 2) and sorted(reg.bank_labels.tolist()) == sorted(list(range(10)) * 3)
    reg(images, labels, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, reg.bank))  # same refresh period
    banks = set()
    for iteration in range(0, 40, 5):
        reg(images, labels, iteration)
        banks.add(tuple(reg.bank[0].flatten()[:4].tolist()))
    assert len(banks) > 1  # refreshes draw new networks / images
    again = MIMRegularizer(nets, config, data, seed=0)
    again(images, labels, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again.bank))  # a resumed run rebuilds the same bank


def test_processes_hold_shards_whose_union_is_the_bank():
    data = fake_data()
    nets = [ConvNet(1, 10, 28, width=4, depth=2).requires_grad_(False) for _ in range(3)]
    config = MIMConfig(weight=1.0, bank_per_class=3, refresh_every=5)
    whole = MIMRegularizer(nets, config, data, seed=2)
    whole._refresh(5)
    shards = [MIMRegularizer(nets, config, data, seed=2, world=World(rank, 3)) for rank in range(3)]
    for shard in shards:
        shard._refresh(5)
        assert shard.network is whole.network
    assert [len(s.bank_labels) for s in shards] == [10, 10, 10]
    for level, bank in enumerate(whole.bank):
        torch.testing.assert_close(torch.cat([s.bank[level] for s in shards]), bank[torch.cat([torch.arange(r, 30, 3) for r in range(3)])])
    assert torch.equal(torch.cat([s.bank_labels for s in shards]), whole.bank_labels[torch.cat([torch.arange(r, 30, 3) for r in range(3)])])


def test_state_round_trips():
    data = fake_data()
    nets = [ConvNet(1, 10, 28, width=4, depth=2).requires_grad_(False)]
    reg = MIMRegularizer(nets, MIMConfig(weight=1.0), data)
    term, _ = reg(torch.randn(10, 1, 28, 28), torch.arange(10), 0)
    term.backward()
    reg.step()
    other = MIMRegularizer(nets, MIMConfig(weight=1.0), data)
    other.load_state_dict(reg.state_dict())
    for a, b in zip(reg.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_config_errors():
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got -1"):
        MIMConfig(weight=-1)
    with pytest.raises(ValueError, match="bank_per_class"):
        MIMConfig(weight=1, bank_per_class=0)
    from ddfast.distill.training.models import ModelSpec
    from ddfast.distill.training.pretrain import PretrainSpec

    with pytest.raises(ValueError, match="ConvNet feature networks"):
        MIMConfig(weight=1, pretrain=PretrainSpec(model=ModelSpec(arch="resnet18")))
