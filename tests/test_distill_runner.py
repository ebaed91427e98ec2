"""Each loop end to end on a few hundred MNIST images: it runs, lowers its loss, writes its outputs,
and a run stopped after k iterations resumes to exactly the uninterrupted result."""

import dataclasses
import json

import pytest
import torch
from loops_support import assert_resumes_identically, mnist_root, one_thread, tiny_config  # noqa: F401  (one_thread: autouse)
from PIL import Image

from ddfast.distill import METHODS, Method, checkpoint, load_data, run
from ddfast.distill.dc import matching_loss
from ddfast.distill.dm import mean_embedding_distance
from ddfast.distill.outputs import load_synthetic
from ddfast.distill.training.seeding import seeded

LOOPS = ["dm", "dc", "dsa"]


def objective(method: str, images: torch.Tensor, config) -> float:
    """The method's matching loss for fixed networks and all real training images (no augmentation)."""
    data = load_data(config)
    real = [data.train.images[data.train.labels == c] for c in range(10)]
    syn = list(images.view(10, config.ipc, 1, 28, 28))
    total = 0.0
    for seed in range(3):
        with seeded(seed):
            net = config.model.build(1, 10, 28)
        if method == "dm":
            total += sum(mean_embedding_distance(net.embed(r), net.embed(s)).item() for r, s in zip(real, syn))
        else:
            total += matching_loss(net, real, syn).item()
    return total


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run per method (noise init and image lr 1, so the loss has room to fall fast)."""
    mnist_root()
    runs = {}
    for method in LOOPS:
        config = tiny_config(method, init="noise", image_lr=1.0)
        out = tmp_path_factory.mktemp(method)
        with torch.random.fork_rng():
            torch.set_num_threads(1)
            runs[method] = (config, out, run(config, out, quiet=True))
    return runs


@pytest.mark.parametrize("method", LOOPS)
def test_loop_writes_its_outputs(finished, method):
    config, out, results = finished[method]
    assert results["status"] == "done" and results["iterations"] == 4
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["method"] == method and saved["settings"]["ipc"] == 2
    assert [s["iteration"] for s in saved["selection"]] == [2, 4]
    best = max(saved["selection"], key=lambda s: s["val_accuracy"])
    assert saved["chosen_iteration"] == best["iteration"]
    ev = saved["evaluation"]
    for name in ("synthetic", "random_real"):
        assert len(ev[name]["test"]) == len(ev[name]["val"]) == 2
    assert ev["improvement"] == pytest.approx(ev["synthetic"]["test_mean"] - ev["random_real"]["test_mean"])
    synthetic = load_synthetic(out / "synthetic.pt")
    assert synthetic["images"].shape == (20, 1, 28, 28) and synthetic["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert synthetic["iteration"] == best["iteration"]
    state = checkpoint.load(out / "checkpoint.pt")
    chosen = state["progress"]["best"]["images"]
    assert torch.equal(synthetic["images"], chosen)
    with Image.open(out / "synthetic.png") as png:
        assert png.size == (2 * 29 + 1, 10 * 29 + 1)  # 2 per row, 10 rows, 1-pixel padding


@pytest.mark.parametrize("method", LOOPS)
def test_loop_lowers_its_loss(finished, method):
    config, out, _ = finished[method]
    state = checkpoint.load(out / "checkpoint.pt")
    first = run_initial_images(config)
    assert objective(method, state["images"], config) < 0.8 * objective(method, first, config)


def run_initial_images(config):
    from ddfast.distill.method import SyntheticSet
    from ddfast.distill.training.seeding import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(config.seed, "init"))
    return SyntheticSet.initial(load_data(config), config.ipc, config.init, generator).images.detach()


@pytest.mark.parametrize("method", LOOPS)
def test_stopped_run_resumes_to_the_same_result(finished, method, tmp_path):
    config, out, _ = finished[method]
    assert_resumes_identically(config, out, tmp_path)


def test_resume_refuses_other_settings_unless_restarted(finished, tmp_path):
    config, out, _ = finished["dm"]
    run(config, tmp_path, quiet=True, stop_after=1)
    changed = dataclasses.replace(config, image_lr=0.5)
    with pytest.raises(ValueError, match=r"image_lr: 1.0 -> 0.5.*--restart"):
        run(changed, tmp_path, quiet=True)
    stopped = run(changed, tmp_path, quiet=True, restart=True, stop_after=1)
    assert stopped["iteration"] == 1


class Diverging(Method):
    """A method added from outside the package: its second step blows up."""

    name = "diverging"

    @classmethod
    def preset(cls, name, dataset, ipc):
        return {"iterations": 4, "image_lr": 1.0}

    def step(self, iteration):
        loss = self.ctx.synthetic.images.square().mean() * (float("nan") if iteration == 1 else 1.0)
        self.update_images(loss)
        return {"loss": loss.item()}


def test_registered_method_runs_and_a_nan_keeps_the_last_checkpoint(monkeypatch, tmp_path):
    mnist_root()
    monkeypatch.setitem(METHODS, "diverging", Diverging)
    config = tiny_config("diverging")
    assert config.iterations == 4 and config.image_lr == 1.0
    with pytest.raises(FloatingPointError, match="iteration 1"):
        run(config, tmp_path, quiet=True)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["progress"]["iteration"] == 1 and torch.isfinite(state["images"]).all()


def test_run_checks_its_arguments_before_any_work(tmp_path, monkeypatch):
    from ddfast.distill import runner

    def load_data(*args, **kwargs):
        raise AssertionError("started working before refusing")

    monkeypatch.setattr(runner, "load_data", load_data)
    config = tiny_config("dm")
    for stop_after in (0, -1, 1.5):
        with pytest.raises(ValueError, match="stop_after"):
            run(config, tmp_path, quiet=True, stop_after=stop_after)
    for device in ("foo", "tpu", "cuda:99"):
        with pytest.raises(ValueError, match="device"):
            run(config, tmp_path, quiet=True, device=device)
    with pytest.raises(ValueError, match="options.experts.train_per_class=500 asks for more training images per class than the 30"):
        run(tiny_config("mtt"), tmp_path, quiet=True)
    with pytest.raises(ValueError, match="'bptt' trains a student without running statistics"):
        run(tiny_config("bptt", model=dataclasses.replace(config.model, norm="batchnorm")), tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_a_training_split_too_small_for_the_draws_is_refused_before_pretraining(tmp_path, monkeypatch):
    mnist_root()
    from ddfast.distill import runner

    def regularizers(*args, **kwargs):
        raise AssertionError("pre-trained before refusing")

    monkeypatch.setattr(runner, "regularizers", regularizers)
    config = tiny_config("dm", train_per_class=None, val_per_class=10, ipc=6000)
    with pytest.raises(ValueError, match="ipc=6000 asks for more training images per class than the .* of mnist's training split"):
        run(config, tmp_path, quiet=True)
