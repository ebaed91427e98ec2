"""IDC: multi-formation decoding and its initialisation, the gradient metrics, the presets and their
CMI weights, clear errors, and the loop end to end (outputs, evaluation on the decoded set, resume)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from loops_support import TINY_MODEL, assert_resumes_identically, mnist_root, one_thread, tiny_config, tiny_pretrain  # noqa: F401

from ddfast.distill import CMIConfig, checkpoint, preset, run
from ddfast.distill.dc import gradient_distance
from ddfast.distill.idc import IDCOptions
from ddfast.distill.multiformation import decode, encode
from ddfast.distill.outputs import load_synthetic
from ddfast.distill.training.augment import DSA, DSAChain, DSAConfig


def test_decode_splits_the_grid_and_upsamples_each_cell_bilinearly():
    torch.manual_seed(0)
    stored = torch.randn(3, 2, 6, 8, dtype=torch.float64)
    decoded = decode(stored, 2)
    assert decoded.shape == (12, 2, 6, 8)
    for n in range(3):
        for i in range(2):
            for j in range(2):
                cell = stored[n : n + 1, :, 3 * i : 3 * i + 3, 4 * j : 4 * j + 4]
                expected = F.interpolate(cell, size=(6, 8), mode="bilinear", align_corners=False)
                assert torch.equal(decoded[4 * n + 2 * i + j], expected[0])
    # a known image: constant cells decode to constant images of their value
    cells = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4)
    assert decode(cells, 2)[:, 0].tolist() == [[[v] * 4] * 4 for v in (1.0, 2.0, 3.0, 4.0)]
    assert torch.equal(decode(stored, 1), stored)


def test_decode_passes_gradients_to_every_stored_pixel():
    stored = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (decode(x, 2) * weights).sum(), (stored,))
    (grad,) = torch.autograd.grad(decode(stored, 2).sum(), stored)
    assert bool((grad > 0).all())


def test_encode_downsamples_real_images_into_the_grid_that_decode_reads():
    torch.manual_seed(0)
    real = torch.randn(8, 1, 6, 6)
    stored = encode(real, 2)
    assert stored.shape == (2, 1, 6, 6)
    small = F.interpolate(real, size=(3, 3), mode="nearest")
    assert torch.equal(stored[1, :, :3, 3:], small[5])  # image 5 = cell (0, 1) of stored image 1
    assert torch.equal(stored[0, :, 3:, 3:], small[3])


@pytest.mark.parametrize("call, message", [
    (lambda: decode(torch.zeros(1, 1, 5, 6), 2), "factor .*2 must divide the image size, got 5 x 6"),
    (lambda: decode(torch.zeros(1, 1, 4, 4), 0), "factor .*must be an integer >= 1, got 0"),
    (lambda: decode(torch.zeros(1, 4, 4), 2), r"images must be \(N, C, H, W\)"),
    (lambda: encode(torch.zeros(3, 1, 4, 4), 2), "3 images do not fill whole grids of factor\\^2 = 4"),
    (lambda: IDCOptions(metric="cosine"), "metric must be one of"),
    (lambda: IDCOptions(augment=("color", "blur")), "augment must be a list of DSA operations"),
    (lambda: IDCOptions(fix_iter=0), "fix_iter"),
])
def test_bad_settings_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_factor_that_does_not_divide_the_image_is_refused_before_any_work(tmp_path):
    config = dataclasses.replace(tiny_config("idc"), options=IDCOptions(factor=3))
    with pytest.raises(ValueError, match="factor .*3 must divide the image size, got 28 x 28"):
        run(config, tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())


def test_mse_and_l1_gradient_distances_sum_over_layers_and_skip_1d():
    torch.manual_seed(0)
    syn = [torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)]
    real = [torch.randn_like(g) for g in syn]
    pairs = [(syn[0], real[0]), (syn[2], real[2])]
    assert gradient_distance(syn, real, metric="mse").item() == pytest.approx(sum(((a - b) ** 2).sum().item() for a, b in pairs), rel=1e-12)
    assert gradient_distance(syn, real, metric="l1").item() == pytest.approx(sum((a - b).abs().sum().item() for a, b in pairs), rel=1e-12)
    with pytest.raises(ValueError, match="metric must be one of"):
        gradient_distance(syn, real, metric="l2")


def test_dsa_chain_applies_each_operation_with_the_same_draw_to_matched_batches():
    torch.manual_seed(0)
    real, syn = torch.randn(3, 1, 8, 8), torch.randn(2, 1, 8, 8)
    chain = DSAChain(("color", "crop"))
    a, b = chain.match(real, syn, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    expected = DSA(DSAConfig(operations=("crop",))).match(*DSA(DSAConfig(operations=("color",))).match(real, syn, generator=generator),
                                                           generator=generator)
    assert torch.equal(a, expected[0]) and torch.equal(b, expected[1])
    assert chain(real).shape == real.shape


def test_presets_follow_the_reference_and_carry_the_cmi_authors_weights():
    mnist = preset("idc", "mnist", 10)
    assert (mnist.iterations, mnist.real_per_class, mnist.image_momentum, mnist.dsa) == (2000, 64, 0.5, True)
    assert mnist.options == IDCOptions(factor=2, inner_loop=100, fix_iter=1, metric="l1", net_samples=500, augment=("color", "crop"))
    assert mnist.image_lr == pytest.approx(1e-4 / 0.3081**2)
    cifar = preset("idc", "cifar10", 50)
    assert (cifar.options.metric, cifar.options.net_samples, cifar.options.augment) == ("mse", 2000, ("color", "crop", "cutout"))
    assert cifar.image_lr == pytest.approx(5e-3 * 5 / (sum((0.2023, 0.1994, 0.2010)) / 3) ** 2)
    weights = {(d, i): preset("idc", d, i, cmi=True).cmi.weight for d in ("cifar10", "cifar100", "svhn") for i in (10, 50)}
    assert weights == {("cifar10", 10): 100, ("cifar10", 50): 50, ("cifar100", 10): 100, ("cifar100", 50): 50,
                       ("svhn", 10): 50, ("svhn", 50): 50}
    with pytest.raises(ValueError, match="no upstream CMI weight for idc on mnist ipc 10"):
        preset("idc", "mnist", 10, cmi=True)
    assert preset("idc", "mnist", 10, "quick", cmi=True).cmi.weight > 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted tiny IDC run, the network kept for 2 iterations so that resuming must restore it."""
    mnist_root()
    config = tiny_config("idc", options=IDCOptions(inner_loop=2, fix_iter=2, net_samples=40, net_batch=16), real_per_class=8)
    out = tmp_path_factory.mktemp("idc")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return config, out, run(config, out, quiet=True)


def test_run_evaluates_the_decoded_set_against_random_real_at_the_stored_ipc(finished):
    config, out, results = finished
    assert results["status"] == "done" and results["iterations"] == 4
    synthetic = load_synthetic(out / "synthetic.pt")
    assert synthetic["images"].shape == (80, 1, 28, 28)  # 10 classes x 2 stored x 4 decoded
    assert synthetic["labels"].tolist() == [c for c in range(10) for _ in range(8)]
    stored = checkpoint.load(out / "checkpoint.pt")["progress"]["best"]["images"]
    assert stored.shape == (20, 1, 28, 28)
    assert torch.equal(synthetic["images"], decode(stored, 2))
    assert results["evaluation"]["random_real"]["lr"] == results["evaluation"]["synthetic"]["lr"]
    first, last = results["loss"]["first"], results["loss"]["last"]
    assert set(first) == {"loss", "match"} and last["match"] != first["match"]


def test_stopped_run_resumes_to_the_same_result(finished, tmp_path):
    config, out, _ = finished
    assert_resumes_identically(config, out, tmp_path)


def test_cmi_regulariser_plugs_into_idc_per_class(tmp_path):
    mnist_root()
    cmi = CMIConfig(weight=50.0, features="logits", pretrain=tiny_pretrain())
    config = tiny_config("idc", cmi=cmi, iterations=2, select_every=0, real_per_class=8,
                         options=IDCOptions(inner_loop=2, net_samples=0), model=TINY_MODEL)
    results = run(config, tmp_path / "run", quiet=True, cache_dir=tmp_path / "cache", final=False)
    history = results["loss"]["history"]
    assert all(h["cmi"] > 0 and h["loss"] == pytest.approx(h["match"] + 50.0 * 10 * h["cmi"], rel=1e-4) for h in history)
