"""The command line: ``python -m ddfast`` in a subprocess once (one thread, tiny settings), the rest in process."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loops_support import mnist_root, one_thread  # noqa: F401  (one_thread: autouse)

from ddfast.distill.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--method", "dm", "--dataset", "mnist", "--ipc", "2", "--preset", "quick", "--iterations", "3",
    "--set", "model.width=16", "--set", "evaluation.model.width=16", "--set", "evaluation.epochs=10",
    "--set", "train_per_class=30", "--set", "val_per_class=10", "--set", "test_per_class=20", "--set", "real_per_class=16",
]


def ddfast(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "ddfast", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"ddfast {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_distill_stops_resumes_and_evaluates(tmp_path):
    mnist_root()
    out = tmp_path / "run"
    first = ddfast("distill", *TINY, "--out", str(out), "--stop-after", "2")
    assert "stopped after iteration 2" in first.stdout
    assert not (out / "results.json").exists()
    second = ddfast("distill", *TINY, "--out", str(out))
    assert "resuming from" in second.stderr and "improvement" in second.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["iterations"] == 3 and len(results["loss"]["history"]) == 3
    assert {"synthetic.pt", "synthetic.png", "checkpoint.pt", "results.json"} <= {p.name for p in out.iterdir()}
    third = ddfast("evaluate", str(out / "synthetic.pt"), "--models", "1", "--quiet")
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["protocol"]["models"] == 1 and len(evaluation["evaluation"]["synthetic"]["test"]) == 1
    assert "random real test accuracy" in third.stdout
    synthetic = torch.load(out / "synthetic.pt", weights_only=True)
    assert synthetic["images"].shape == (20, 1, 28, 28)


def test_print_config_applies_overrides(capsys):
    assert main(["distill", "--method", "dsa", "--dataset", "cifar10", "--ipc", "10", "--cmi", "--set", "options.inner_loop=7",
                 "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["options"] == {"outer_loop": 10, "inner_loop": 7, "net_lr": 0.01, "train_batch": 256}
    assert config["cmi"]["weight"] == 50000 and config["evaluation"]["epochs"] == 1000


@pytest.mark.parametrize("args, message", [
    (["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "10", "--set", "bogus=1"], "unknown setting 'bogus'"),
    (["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "10", "--cmi"], "pass cmi_weight / --cmi-weight"),
    (["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "10", "--data-root", "/nonexistent/data"], "/nonexistent/data/MNIST"),
    (["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "10", "--sweep", "cmi.weight"], "--sweep takes KEY=V1,V2"),
    (["evaluate", "/nonexistent/synthetic.pt"], "no synthetic set at /nonexistent/synthetic.pt"),
    (["distill", "--method", "mtt", "--dataset", "cifar10", "--ipc", "10", "--reg", "mim"], "pass mim_weight / --mim-weight"),
    (["buffer", "--dataset", "mnist", "--shard", "3/2"], "shard must be i/n"),
    (["buffer", "--dataset", "mnist", "--method", "dm"], "expert buffers are for --method mtt"),
])
def test_errors_are_clear(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_pretrain_caches_the_pool(tmp_path, capsys):
    mnist_root()
    args = ["pretrain", "--dataset", "mnist", "--preset", "quick", "--cache-dir", str(tmp_path), "--set", "train_per_class=30",
            "--set", "val_per_class=10", "--set", "cmi.pretrain.model.width=16", "--set", "cmi.pretrain.train_per_class=30"]
    assert main(args) == 0
    assert "pretrained network 1/1: validation accuracy" in capsys.readouterr().err
    assert main(args) == 0
    assert "loaded from" in capsys.readouterr().err
    assert len(list((tmp_path / "pretrained").iterdir())) == 1


def test_mtt_with_mim_prints_its_config(capsys):
    assert main(["distill", "--method", "mtt", "--dataset", "mnist", "--ipc", "10", "--preset", "quick", "--reg", "mim", "--mim-weight", "0.5",
                 "--set", "options.memory=constant", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["mim"]["weight"] == 0.5 and config["options"]["memory"] == "constant" and config["cmi"] is None


def test_buffer_trains_shards_into_the_cache(tmp_path, capsys):
    mnist_root()
    args = ["buffer", "--dataset", "mnist", "--preset", "quick", "--cache-dir", str(tmp_path), "--quiet", "--set", "train_per_class=30",
            "--set", "val_per_class=10", "--set", "model.width=8", "--set", "options.experts.experts=2", "--set", "options.max_start_epoch=1",
            "--set", "options.experts.epochs=3", "--set", "options.experts.train_per_class=20"]
    assert main([*args, "--shard", "1/2"]) == 0
    [folder] = (tmp_path / "buffers").iterdir()
    assert f"experts of shard 1/2 are in {folder}" in capsys.readouterr().out
    assert sorted(p.name for p in folder.glob("expert-*.pt")) == ["expert-0001.pt"]
    assert main([*args, "--shard", "0/2"]) == 0
    assert sorted(p.name for p in folder.glob("expert-*.pt")) == ["expert-0000.pt", "expert-0001.pt"]


def no_work(monkeypatch):
    """Make any data loading fail the test: the commands below must refuse before it."""
    import ddfast.distill
    import ddfast.distill.runner

    def load_data(*args, **kwargs):
        raise AssertionError("started working (loaded data) before refusing")

    monkeypatch.setattr(ddfast.distill.runner, "load_data", load_data)
    monkeypatch.setattr(ddfast.distill, "load_data", load_data)


def refused(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def tiny_settings(capsys) -> dict:
    assert main(["distill", *TINY, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def saved_checkpoint(settings: dict, path: Path, **changes) -> bytes:
    from ddfast.distill import checkpoint
    from ddfast.distill.preflight import FORMAT

    state = {"format": FORMAT, "settings": settings, "images": torch.zeros(20, 1, 28, 28), "method": {"optimizers": [], "regularizers": []},
             "progress": {"iteration": 1, "history": [{"loss": 1.0}], "selection": [], "best": None, "seconds": {}}, **changes}
    checkpoint.save(state, path)
    return path.read_bytes()


@pytest.mark.parametrize("corrupt, message", [
    (lambda real, settings: bytes(range(256)) * 8, "not a file ddfast wrote"),
    (lambda real, settings: b"", "corrupt, truncated or not a torch file"),
    (lambda real, settings: real[: len(real) // 2], "corrupt, truncated or not a torch file"),
    (lambda real, settings: torch.zeros(3), "holds a Tensor"),
    (lambda real, settings: {"images": torch.zeros(3)}, "lacks"),
    (lambda real, settings: {**torch.load(io.BytesIO(real), weights_only=True), "format": "other/1"}, "is not a ddfast distillation checkpoint"),
    (lambda real, settings: {**torch.load(io.BytesIO(real), weights_only=True), "settings": {**settings, "method": "dc"}},
     "written with other settings (method: 'dc' -> 'dm'"),
    (lambda real, settings: {**torch.load(io.BytesIO(real), weights_only=True), "images": torch.full((20, 1, 28, 28), float("nan"))},
     "holds images that are not finite"),
])
def test_a_bad_checkpoint_is_named_and_kept(tmp_path, monkeypatch, capsys, corrupt, message):
    settings = tiny_settings(capsys)
    out = tmp_path / "run"
    real = saved_checkpoint(settings, out / "checkpoint.pt")
    content = corrupt(real, settings)
    if isinstance(content, bytes):
        (out / "checkpoint.pt").write_bytes(content)
    else:
        torch.save(content, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    no_work(monkeypatch)
    err = refused(["distill", *TINY, "--out", str(out)], capsys)
    assert f"{out / 'checkpoint.pt'}" in err and message in err.replace("\n", " ") and "--restart" in err
    assert (out / "checkpoint.pt").read_bytes() == before and [p.name for p in out.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("extra, message", [
    (["--device", "foo"], "device must be cpu, cuda or cuda:<index>, got 'foo'"),
    (["--device", "cuda:7"], "device cuda:7 asked for"),
    (["--set", "image_lr=nan"], "image_lr must be a finite number > 0, got nan"),
    (["--set", "image_lr=-1"], "image_lr must be a finite number > 0, got -1.0"),
    (["--set", "evaluation.models=0"], "evaluation.models must be an integer >= 1, got 0"),
    (["--set", "ipc=0"], "ipc must be an integer >= 1, got 0"),
    (["--iterations", "0"], "iterations must be an integer >= 1, got 0"),
    (["--cmi-weight", "nan"], "cmi.weight must be a finite number >= 0, got nan"),
    (["--set", "ipc=31"], "ipc=31 asks for more training images per class than the 30 of train_per_class"),
    (["--set", "model.width=0"], "model: width and depth must be >= 1"),
    (["--set", "options.inner_loop=2"], "cannot set 'options.inner_loop': options is None"),
    (["--set", "evaluation.epochz=2"], "unknown setting 'evaluation.epochz'"),
    (["--set", "evaluation.epochs=two"], "evaluation.epochs: expected int, got 'two'"),
    (["--stop-after", "0"], "--stop-after must be >= 1, got 0"),
    (["--sweep", "image_lr=1.0,0.1,nan"], "sweep value image_lr=nan: image_lr must be a finite number > 0, got nan"),
    (["--sweep", "evaluation.models=2,0"], "evaluation.models must be an integer >= 1, got 0"),
])
def test_bad_starts_are_refused_before_any_work(tmp_path, monkeypatch, capsys, extra, message):
    if extra[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    no_work(monkeypatch)
    err = refused(["distill", *TINY, "--out", str(tmp_path / "run"), *extra], capsys)
    assert message in err
    assert not (tmp_path / "run").exists()


def test_overrides_may_rely_on_later_ones(capsys):
    args = ["distill", "--method", "mtt", "--dataset", "mnist", "--ipc", "2", "--preset", "quick", "--print-config"]
    assert main([*args, "--set", "options.max_start_epoch=8", "--set", "options.experts.epochs=10"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["max_start_epoch"] == 8
    for order in (["options.max_start_epoch=8", "options.experts.epochs=5"], ["options.experts.epochs=5", "options.max_start_epoch=8"]):
        assert "beyond the experts' 5 epochs" in refused([*args, "--set", order[0], "--set", order[1]], capsys)


def test_a_refused_start_keeps_an_existing_run(tmp_path, monkeypatch, capsys):
    no_work(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"done": true}')
    (out / "synthetic.pt").write_bytes(b"the set")
    err = refused(["distill", *TINY, "--out", str(out)], capsys)
    assert "holds a run's outputs (synthetic.pt, results.json) but no checkpoint.pt" in err and "--restart" in err
    refused(["distill", *TINY, "--out", str(out), "--restart", "--set", "image_lr=inf"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "synthetic.pt"] and (out / "synthetic.pt").read_bytes() == b"the set"
    (tmp_path / "file").write_text("mine")
    assert f"{tmp_path / 'file'} is a file, not a folder" in refused(["distill", *TINY, "--out", str(tmp_path / "file")], capsys)
    assert "is a file" in refused(["distill", *TINY, "--out", str(tmp_path / "file" / "run")], capsys)
    assert (tmp_path / "file").read_text() == "mine"


def synthetic_set(path: Path, settings: dict) -> None:
    from ddfast.distill.outputs import save_synthetic
    from ddfast.distill.training.data import dataset_info

    save_synthetic(path, torch.zeros(20, 1, 28, 28), torch.arange(10).repeat_interleave(2), dataset_info("mnist"), settings,
                   iteration=3, eval_lr=None)


def test_evaluate_names_what_is_not_a_synthetic_set(tmp_path, monkeypatch, capsys):
    settings = tiny_settings(capsys)
    no_work(monkeypatch)
    saved_checkpoint(settings, tmp_path / "checkpoint.pt")
    (tmp_path / "results.json").write_text(json.dumps({"status": "done"}))
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"images": torch.zeros(20, 1, 28, 28), "labels": torch.zeros(20, dtype=torch.int64), "dataset": "mnist", "settings": {"ipc": 2}},
               tmp_path / "other.pt")
    for name, message in (("missing.pt", "no synthetic set at"), ("checkpoint.pt", "is a distillation checkpoint, not a synthetic set"),
                          ("results.json", "not a ddfast synthetic set"), ("random.pt", "not a ddfast synthetic set"),
                          ("tensor.pt", "holds a Tensor"), ("other.pt", "is not a readable ddfast synthetic set")):
        err = refused(["evaluate", str(tmp_path / name)], capsys)
        assert str(tmp_path / name) in err and message in err, err
    synthetic_set(tmp_path / "synthetic.pt", settings)
    before = (tmp_path / "synthetic.pt").read_bytes()
    assert "is the synthetic set itself" in refused(["evaluate", str(tmp_path / "synthetic.pt"), "--out", str(tmp_path / "synthetic.pt")], capsys)
    assert "is not an evaluation written by ddfast evaluate" in refused(
        ["evaluate", str(tmp_path / "synthetic.pt"), "--out", str(tmp_path / "results.json")], capsys)
    assert "evaluation.models must be an integer >= 1, got 0" in refused(["evaluate", str(tmp_path / "synthetic.pt"), "--models", "0"], capsys)
    assert "evaluation.lrs must be" in refused(["evaluate", str(tmp_path / "synthetic.pt"), "--lrs", "0.01,inf"], capsys)
    assert "device must be" in refused(["evaluate", str(tmp_path / "synthetic.pt"), "--device", "gpu"], capsys)
    assert (tmp_path / "synthetic.pt").read_bytes() == before and json.loads((tmp_path / "results.json").read_text()) == {"status": "done"}


def test_evaluate_across_architectures_prints_the_table_with_baselines(tmp_path, capsys):
    mnist_root()
    synthetic_set(tmp_path / "synthetic.pt", {**tiny_settings(capsys), "val_per_class": 4, "test_per_class": 5})
    assert main(["evaluate", str(tmp_path / "synthetic.pt"), "--arch", "convnet", "vgg11", "alexnet-bn", "--models", "2", "--epochs", "2",
                 "--set", "evaluation.batch_size=8", "--quiet"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| architecture | distilled (%) | random real (%) | gain (points) | lr |"
    assert [row.split(" | ")[0] for row in rows[2:5]] == ["| convnet", "| vgg11", "| alexnet-bn"]
    saved = json.loads((tmp_path / "cross-architecture.json").read_text())
    assert saved["architectures"] == ["convnet", "vgg11", "alexnet-bn"] and saved["protocol"]["epochs"] == 2 and saved["protocol"]["batch_size"] == 8
    for name, row in zip(saved["architectures"], rows[2:5]):
        result = saved["evaluation"][name]
        assert len(result["synthetic"]["test"]) == len(result["random_real"]["test"]) == 2
        assert f"{100 * result['random_real']['test_mean']:.2f} +- {100 * result['random_real']['test_std']:.2f}" in row
    assert saved["evaluation"]["convnet"]["model"]["width"] == 16 and saved["evaluation"]["alexnet-bn"]["model"]["norm"] == "batchnorm"
    assert (tmp_path / "cross-architecture.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_an_unknown_architecture(tmp_path, monkeypatch, capsys):
    no_work(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        main(["evaluate", str(tmp_path / "synthetic.pt"), "--arch", "convnet", "vgg"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "argument --arch: invalid choice: 'vgg'" in err and "alexnet-bn" in err
    synthetic_set(tmp_path / "synthetic.pt", tiny_settings(capsys))
    assert "would put the plot over the synthetic set's picture" in refused(
        ["evaluate", str(tmp_path / "synthetic.pt"), "--arch", "convnet", "--out", str(tmp_path / "synthetic.json")], capsys)


def test_pretrain_and_buffer_refuse_before_loading_data(monkeypatch, capsys):
    no_work(monkeypatch)
    assert "device must be" in refused(["pretrain", "--dataset", "mnist", "--preset", "quick", "--device", "foo"], capsys)
    assert "cmi.pretrain.epochs must be an integer >= 1, got 0" in refused(
        ["pretrain", "--dataset", "mnist", "--preset", "quick", "--set", "cmi.pretrain.epochs=0"], capsys)
    assert "options.experts.lr must be a finite number > 0, got nan" in refused(
        ["buffer", "--dataset", "mnist", "--preset", "quick", "--set", "options.experts.lr=nan"], capsys)


def test_an_interrupt_says_how_to_resume(monkeypatch, capsys):
    import ddfast.distill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddfast.distill, "run", interrupted)
    with pytest.raises(SystemExit) as exit:
        main(["distill", *TINY])
    assert exit.value.code == 130 and "rerunning the same command resumes" in capsys.readouterr().err
