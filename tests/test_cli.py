"""The command line: ``python -m ddfast`` in a subprocess once (one thread, tiny settings), the rest in process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddfast.cli import main
from loops_support import mnist_root, one_thread  # noqa: F401  (one_thread: autouse)

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
    assert main(["distill", "--method", "dsa", "--dataset", "cifar10", "--ipc", "10", "--cmi", "--set", "options.inner_loop=7", "--print-config"]) == 0
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
            "--set", "val_per_class=10", "--set", "model.width=8", "--set", "options.experts.experts=2", "--set", "options.max_start_epoch=1", "--set", "options.experts.epochs=3",
            "--set", "options.experts.train_per_class=20"]
    assert main([*args, "--shard", "1/2"]) == 0
    [folder] = (tmp_path / "buffers").iterdir()
    assert f"experts of shard 1/2 are in {folder}" in capsys.readouterr().out
    assert sorted(p.name for p in folder.glob("expert-*.pt")) == ["expert-0001.pt"]
    assert main([*args, "--shard", "0/2"]) == 0
    assert sorted(p.name for p in folder.glob("expert-*.pt")) == ["expert-0000.pt", "expert-0001.pt"]
