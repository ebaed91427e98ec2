"""Runs under torchrun: 2 processes (gloo, CPU) give what one process gives; what cannot split refuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loops_support import mnist_root, one_thread  # noqa: F401  (one_thread: autouse)

from ddfast.distill.cli import main
from ddfast.distill.distributed import World, world

ROOT = Path(__file__).resolve().parents[1]
DM = [
    "--method", "dm", "--dataset", "mnist", "--ipc", "2", "--preset", "quick", "--iterations", "4", "--quiet",
    "--set", "model.width=16", "--set", "evaluation.model.width=16", "--set", "evaluation.epochs=5", "--set", "evaluation.models=1",
    "--set", "train_per_class=30", "--set", "val_per_class=10", "--set", "test_per_class=20", "--set", "real_per_class=16",
]
PRETRAIN = ["pretrain.model.width=16", "pretrain.train_per_class=30", "pretrain.epochs=1"]
CMI = ["--cmi-weight", "100", "--set", "cmi.features=embed", *(f"--set=cmi.{s}" for s in PRETRAIN)]
MIM = ["--reg", "mim", "--mim-weight", "10", "--set", "mim.bank_per_class=11", "--set", "mim.refresh_every=2", "--set", "mim.head_dim=16",
       *(f"--set=mim.{s}" for s in PRETRAIN)]  # the bank of 110 rows is refreshed at iteration 2, where the 2-process run resumes
BUFFER = [
    "--dataset", "mnist", "--preset", "quick", "--set", "train_per_class=30", "--set", "val_per_class=10",
    "--set", "model.width=8", "--set", "options.experts.experts=3", "--set", "options.max_start_epoch=1",
    "--set", "options.experts.epochs=3", "--set", "options.experts.train_per_class=20",
]
TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port; one thread per process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_world_reads_the_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world() == World(0, 1, 0) and not world().distributed
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="RANK is not"):
        world()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(2, 3, 1) and world().shard() == (2, 3) and list(world().classes(10)) == [2, 5, 8]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 must be below WORLD_SIZE=3"):
        world()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer >= 1, got 'two'"):
        world()


@pytest.mark.parametrize("args, message", [
    (["distill", "--method", "dc", "--dataset", "mnist", "--ipc", "1"], "--method dc runs in one process only"),
    (["distill", "--method", "mtt", "--dataset", "mnist", "--ipc", "1", "--preset", "quick"], "--method mtt runs in one process only"),
    (["distill", "--method", "bptt", "--dataset", "mnist", "--ipc", "1", "--preset", "quick"], "--method bptt runs in one process only"),
    (["distill", "--method", "dsa", "--dataset", "mnist", "--ipc", "1", "--cmi-weight", "10"], "--method dsa runs in one process only"),
    (["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "1", "--sweep", "seed=0,1"], "distill --sweep runs in one process only"),
    (["pretrain", "--dataset", "mnist", "--preset", "quick"], "pretrain runs in one process only"),
    (["buffer", "--dataset", "mnist", "--preset", "quick", "--shard", "0/2"], "--shard cannot be combined with torchrun"),
])
def test_what_does_not_split_refuses_under_torchrun(args, message, monkeypatch, capsys):
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    if args[0] == "distill" and "--sweep" not in args:
        assert "ddfast distill runs --method dm (with --cmi / --reg mim)" in err


def test_more_processes_than_classes_refuse(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "11")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        main(["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "1"])
    assert "WORLD_SIZE=11 is more processes than the 10 classes of mnist" in capsys.readouterr().err


def test_a_failing_rank_stops_the_other_with_a_clear_error(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import torch\nfrom ddfast.distill.distributed import world\nw = world()\nwith w.group(torch.device('cpu')):\n"
                      "    if w.rank == 1:\n        raise SystemExit('rank 1 fails')\n    w.sum_(torch.ones(3), 'summing the gradients')\n")
    result = torchrun(str(script), check=False)
    assert result.returncode != 0
    assert "rank 0 of 2: summing the gradients failed" in result.stderr and "another process failed" in result.stderr


def test_buffer_from_two_processes_equals_one_process(tmp_path, capsys):
    mnist_root()
    assert main(["buffer", *BUFFER, "--quiet", "--cache-dir", str(tmp_path / "one")]) == 0
    [one] = (tmp_path / "one" / "buffers").iterdir()
    result = torchrun("-m", "ddfast", "buffer", *BUFFER, "--cache-dir", str(tmp_path / "two"))
    [two] = (tmp_path / "two" / "buffers").iterdir()
    assert result.stdout.count("experts of shards 0/2 to 1/2 are in") == 1 and str(two) in result.stdout
    trained = [f"expert {k}: 3 epochs" in result.stderr for k in range(3)]
    assert trained == [True, False, True]  # rank 0 (the one that speaks) trained shard 0/2 only
    assert one.name == two.name
    expected = files(one)
    assert sorted(expected) == ["expert-0000.pt", "expert-0001.pt", "expert-0002.pt", "meta.json"]
    assert files(two) == expected


def assert_two_processes_equal_one(tmp_path: Path, args: list[str]) -> dict:
    """``distill ARGS`` in one process, then on 2 (stopped after iteration 2, then resumed): the same
    synthetic set and losses; returns the 2-process results."""
    mnist_root()
    assert main(["distill", *args, "--out", str(tmp_path / "one")]) == 0
    two = tmp_path / "two"
    first = torchrun("-m", "ddfast", "distill", *args, "--out", str(two), "--stop-after", "2")
    assert first.stdout.count("stopped after iteration 2") == 1  # rank 0 speaks for both
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt"]
    assert torch.load(two / "checkpoint.pt", weights_only=True)["progress"]["iteration"] == 2
    torchrun("-m", "ddfast", "distill", *args, "--out", str(two))
    expected, got = (torch.load(tmp_path / run / "synthetic.pt", weights_only=True) for run in ("one", "two"))
    torch.testing.assert_close(got["images"], expected["images"], rtol=1e-6, atol=1e-6)
    assert got["iteration"] == expected["iteration"]
    expected, got = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert len(got["loss"]["history"]) == 4
    for mine, theirs in zip(got["loss"]["history"], expected["loss"]["history"], strict=True):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert mine[name] == pytest.approx(theirs[name], rel=1e-6), name
    assert got["selection"] == expected["selection"]
    return got


def test_dm_from_two_processes_equals_one_process_and_resumes(tmp_path, capsys):
    assert_two_processes_equal_one(tmp_path, DM)


def test_dm_with_cmi_from_two_processes_equals_one_process_and_resumes(tmp_path, capsys):
    got = assert_two_processes_equal_one(tmp_path, [*DM, *CMI, "--cache-dir", str(tmp_path / "cache")])
    assert all(h["cmi"] > 0 and h["loss"] > h["match"] for h in got["loss"]["history"])


def test_dm_with_mim_from_two_processes_equals_one_process_and_resumes(tmp_path, capsys):
    got = assert_two_processes_equal_one(tmp_path, [*DM, *MIM, "--cache-dir", str(tmp_path / "cache")])
    assert all(h["mim"] > 0 and h["loss"] > h["match"] for h in got["loss"]["history"])
