"""MTT, BPTT and the MIM4DD regulariser end to end on a few hundred MNIST images: each loop runs,
lowers its loss, writes its outputs and resumes; the learned learning rate reaches the evaluation."""

import dataclasses
import json

import pytest
import torch
from loops_support import mnist_root, one_thread, tiny_config, tiny_pretrain  # noqa: F401  (one_thread: autouse)

from ddfast.distill import MIMConfig, checkpoint, preset, run
from ddfast.distill.bptt import BPTTOptions
from ddfast.distill.mtt import UPSTREAM, MTTOptions
from ddfast.distill.outputs import load_synthetic
from ddfast.distill.training.buffers import ExpertSpec

# One expert and one start epoch, every synthetic image in each step, no augmentation: the MTT loss is
# then a function of the images alone, so its history shows whether the images improve.
DETERMINISTIC_MTT = MTTOptions(syn_steps=3, expert_epochs=1, max_start_epoch=1, lr_lr=1e-4, experts=ExpertSpec(experts=1, epochs=2, batch_size=32))
LOOPS = {
    "mtt": tiny_config("mtt", dsa=False, image_lr=1000.0, options=DETERMINISTIC_MTT),
    "mtt-constant": tiny_config("mtt", dsa=False, image_lr=1000.0, options=dataclasses.replace(DETERMINISTIC_MTT, memory="constant")),
    "mtt-mim": tiny_config("mtt", image_lr=1000.0, options=dataclasses.replace(DETERMINISTIC_MTT, batch_syn=7),
                           mim=MIMConfig(weight=0.1, bank_per_class=10, refresh_every=2, pretrain=tiny_pretrain())),
    "bptt": tiny_config("bptt", init="noise", image_lr=100.0, options=BPTTOptions(inner_steps=3, lr_init=0.1, lr_lr=1e-3)),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    mnist_root()
    cache = tmp_path_factory.mktemp("cache")
    runs = {}
    for name, config in LOOPS.items():
        out = tmp_path_factory.mktemp(name)
        with torch.random.fork_rng():
            torch.set_num_threads(1)  # as in the tests that resume these runs (one_thread is function-scoped)
            runs[name] = (config, out, run(config, out, cache_dir=cache, quiet=True), cache)
    return runs


@pytest.mark.parametrize("name", LOOPS)
def test_loop_writes_its_outputs_and_evaluates_with_the_learned_lr(finished, name):
    config, out, results, _ = finished[name]
    assert results["status"] == "done" and results["iterations"] == 4
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["method"] == config.method
    synthetic = load_synthetic(out / "synthetic.pt")
    assert synthetic["images"].shape == (20, 1, 28, 28)
    learned = [h["lr"] for h in saved["loss"]["history"]]
    assert learned[-1] != config.options.lr_init  # the lr is learned
    chosen = saved["selection"][[s["iteration"] for s in saved["selection"]].index(saved["chosen_iteration"])]
    assert synthetic["eval_lr"] == saved["evaluation"]["synthetic"]["lr"] == chosen["lr"] != config.options.lr_init
    assert (out / "synthetic.png").is_file()


@pytest.mark.parametrize("name", ["mtt", "mtt-constant"])
def test_mtt_lowers_its_loss_and_both_memory_modes_agree(finished, name):
    history = [h["match"] for h in finished[name][2]["loss"]["history"]]
    assert history[-1] < 0.9 * history[0]
    other = finished["mtt-constant" if name == "mtt" else "mtt"][2]["loss"]["history"]
    assert [h["match"] for h in other] == pytest.approx(history, rel=1e-4)


def test_bptt_lowers_its_outer_loss(finished):
    config, out, _, _ = finished["bptt"]
    from ddfast.distill import load_data
    from ddfast.distill.method import SyntheticSet
    from ddfast.distill.training.seeding import derive_seed, seeded
    from ddfast.distill.unroll import Student

    data = load_data(config)

    def outer(images):  # fixed initialisation and steps, every real training image
        with seeded(0):
            net = config.model.build(1, 10, 28)
        student = Student(net, torch.arange(10).repeat_interleave(config.ipc))
        start = [p.detach() for p in net.parameters()]
        final = student.train(start, images, torch.tensor(config.options.lr_init), student.plan(3, images.shape))
        return torch.nn.functional.cross_entropy(student.logits(final, data.train.images), data.train.labels).item()

    generator = torch.Generator().manual_seed(derive_seed(config.seed, "init"))
    first = SyntheticSet.initial(data, config.ipc, config.init, generator).images.detach()
    last = checkpoint.load(out / "checkpoint.pt")["images"]
    assert outer(last) < outer(first) - 0.02


def test_mim_term_is_logged_and_its_heads_learn(finished):
    config, out, results, _ = finished["mtt-mim"]
    history = results["loss"]["history"]
    assert all(h["mim"] > 0 and h["loss"] == pytest.approx(h["match"] + 0.1 * h["mim"], rel=1e-5) for h in history)
    heads = checkpoint.load(out / "checkpoint.pt")["method"]["regularizers"][0]["heads"]
    assert len(heads) == 2 * 3  # weight and bias of one linear head per block of the 3-block feature ConvNet


@pytest.mark.parametrize("name", ["mtt-constant", "mtt-mim", "bptt"])
def test_stopped_run_resumes_to_the_same_result(finished, name, tmp_path):
    config, out, _, cache = finished[name]
    assert run(config, tmp_path, cache_dir=cache, quiet=True, stop_after=2, final=False)["status"] == "stopped"
    run(config, tmp_path, cache_dir=cache, quiet=True, final=False)
    full, again = checkpoint.load(out / "checkpoint.pt"), checkpoint.load(tmp_path / "checkpoint.pt")
    torch.testing.assert_close(again["images"], full["images"], rtol=1e-5, atol=1e-6)
    assert [h["loss"] for h in again["progress"]["history"]] == pytest.approx([h["loss"] for h in full["progress"]["history"]], rel=1e-5)
    torch.testing.assert_close(again["method"]["syn_lr"], full["method"]["syn_lr"])


def test_presets():
    quick = preset("mtt", "mnist", 10, "quick", mim=True)
    assert quick.mim.weight > 0 and quick.options.experts.train_per_class == 500
    up = preset("mtt", "cifar10", 1)
    assert (up.iterations, up.image_lr, up.zca, up.options.syn_steps, up.options.expert_epochs, up.options.max_start_epoch, up.options.lr_lr) == (
        5000, 100.0, 0.1, 50, 2, 2, 1e-7)
    assert up.options.experts == ExpertSpec() and (up.evaluation.epochs, up.evaluation.dsa) == (1000, True)
    assert preset("mtt", "cifar100", 50).options.batch_syn == 125 and preset("mtt", "cifar100", 10).zca is None
    mnist = preset("mtt", "mnist", 10)
    assert mnist.zca is None and mnist.options.syn_steps == UPSTREAM[("cifar10", 10)][0]
    with pytest.raises(ValueError, match="ipc in"):
        preset("mtt", "cifar10", 7)
    with pytest.raises(ValueError, match="weight is not published"):
        preset("mtt", "cifar10", 10, mim=True)
    assert preset("mtt", "cifar10", 10, mim_weight=0.5).mim.beta == 0.8
    with pytest.raises(ValueError, match="no published settings"):
        preset("bptt", "mnist", 10)
    with pytest.raises(ValueError, match="beyond the experts' 50 epochs"):
        MTTOptions(max_start_epoch=50)
    with pytest.raises(ValueError, match="head_layers"):
        MIMConfig(weight=1.0, head_layers=3)
