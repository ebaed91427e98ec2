import math

import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)

from ddfast.distill.training.augment import DSA, OPERATIONS, DSAConfig


def only(op: str, **settings) -> DSA:
    return DSA(DSAConfig(operations=(op,), **settings))


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize("call", ["train", "match_by_sample"])
def test_per_sample_draws_pair_sample_i_of_each_batch(op, call):
    torch.manual_seed(0)
    real = torch.randn(9, 3, 12, 12)
    syn = real[:4].clone()
    dsa = only(op, flip=1.0 if op == "flip" else 0.5, pairing="sample")
    aug_real, aug_syn = dsa(real, syn) if call == "train" else dsa.match(real, syn)
    assert aug_real.shape == real.shape and aug_syn.shape == syn.shape
    torch.testing.assert_close(aug_syn, aug_real[:4], rtol=0, atol=1e-6)
    assert not torch.allclose(aug_real, real)  # it did transform


@pytest.mark.parametrize("op", OPERATIONS)
def test_matched_batches_get_one_transform(op):
    """The reference's Siamese mode: every sample of the real and the synthetic batch gets the same transform."""
    image = torch.randn(1, 3, 12, 12)
    real, syn = image.expand(9, -1, -1, -1), image.expand(4, -1, -1, -1)
    dsa = only(op, flip=1.0 if op == "flip" else 0.5)
    aug_real, aug_syn = dsa.match(real, syn, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(aug_real[0], image[0])  # it did transform
    for out in (aug_real, aug_syn):
        torch.testing.assert_close(out, aug_real[:1].expand_as(out), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "scale", "rotate"])
def test_training_batches_get_one_transform_per_sample(op):
    image = torch.randn(1, 3, 12, 12)
    out = only(op)(image.expand(9, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1


def test_matched_transform_is_the_first_samples_draw():
    """match draws one sample's parameters and applies them to every sample of every batch."""
    real, syn = torch.randn(7, 1, 10, 10), torch.randn(3, 1, 10, 10)
    dsa = DSA()
    aug_real, aug_syn = dsa.match(real, syn, generator=torch.Generator().manual_seed(5))
    draw = dsa.draw(1, 10, 10, generator=torch.Generator().manual_seed(5))
    for x, out in ((real, aug_real), (syn, aug_syn)):
        expected = torch.cat([dsa.apply(sample[None], draw) for sample in x])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_matching_losses_use_the_configured_pairing():
    from ddfast.distill.config import DistillConfig
    from ddfast.distill.settings import SettingError

    assert DistillConfig(method="dm", dataset="mnist", ipc=1, iterations=1, image_lr=1.0).dsa_pairing == "batch"
    with pytest.raises(SettingError, match="dsa_pairing"):
        DistillConfig(method="dm", dataset="mnist", ipc=1, iterations=1, image_lr=1.0, dsa_pairing="pairs")


@pytest.mark.parametrize("op", OPERATIONS)
def test_differentiable(op):
    dsa = only(op, flip=1.0 if op == "flip" else 0.5)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    draw = dsa.draw(3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, draw), (x,))
    grad = torch.autograd.grad(dsa.apply(x, draw).square().sum(), x)[0]
    assert grad.abs().sum() > 0


def test_each_call_draws_new_parameters():
    x = torch.randn(4, 1, 10, 10)
    dsa = DSA()
    outputs = [dsa(x, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert len({tuple(o.flatten()[:50].tolist()) for o in outputs}) == 6
    again = dsa(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, outputs[3])


def test_parameter_ranges():
    g = torch.Generator().manual_seed(0)
    color = only("color").draw(4000, 28, 28, generator=g).values
    assert -0.5 <= color["brightness"].min() < -0.45 and 0.45 < color["brightness"].max() <= 0.5
    assert 0 <= color["saturation"].min() < 0.05 and 1.95 < color["saturation"].max() <= 2
    assert 0.5 <= color["contrast"].min() < 0.55 and 1.45 < color["contrast"].max() <= 1.5
    angle = only("rotate").draw(4000, 28, 28, generator=g).values["angle"]
    assert angle.abs().max() <= math.radians(15) and angle.abs().max() > math.radians(14.5)
    scale = only("scale").draw(4000, 28, 28, generator=g).values
    assert 1 / 1.2 <= scale["sx"].min() < 0.85 and 1.18 < scale["sy"].max() <= 1.2
    crop = only("crop").draw(4000, 32, 32, generator=g).values
    assert crop["dx"].min() == -4 and crop["dx"].max() == 4  # 1/8 of 32
    flips = only("flip").draw(4000, 28, 28, generator=g).values["flip"].float().mean()
    assert 0.45 < flips < 0.55


def test_crop_translates_with_zero_fill():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 5] = 1.0
    dsa = only("crop")
    draw = dsa.draw(1, 8, 8)
    draw.values = {"dy": torch.tensor([1]), "dx": torch.tensor([-1])}
    out = dsa.apply(x, draw)
    assert out[0, 0, 3, 4] == 1 and out.sum() == 1
    draw.values = {"dy": torch.tensor([0]), "dx": torch.tensor([3])}
    assert dsa.apply(x, draw).sum() == 0  # shifted out of the image


def test_cutout_zeroes_half_the_side():
    x = torch.ones(1, 2, 10, 10)
    dsa = only("cutout")
    draw = dsa.draw(1, 10, 10)
    draw.values["top"], draw.values["left"] = torch.tensor([2]), torch.tensor([3])
    out = dsa.apply(x, draw)
    assert (out == 0).sum() == 2 * 5 * 5 and out[0, :, 2:7, 3:8].sum() == 0
    draw.values["top"] = torch.tensor([-2])  # clipped at the border
    assert (dsa.apply(x, draw) == 0).sum() == 2 * 3 * 5


def test_scale_and_rotate_keep_the_centre():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    for op in ("scale", "rotate"):
        out = only(op)(x)
        assert out[0, 0, 4, 4] == pytest.approx(1.0, abs=1e-5)


def test_bad_batches_and_config():
    with pytest.raises(ValueError, match="batch 1"):
        DSA()(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 9, 9))
    with pytest.raises(ValueError, match="operations"):
        DSAConfig(operations=("blur",))
    with pytest.raises(ValueError, match="pairing"):
        DSAConfig(pairing="pairs")
    dsa = DSA()
    with pytest.raises(ValueError, match="parameters for 2 samples"):
        dsa.apply(torch.randn(3, 1, 8, 8), dsa.draw(2, 8, 8))
