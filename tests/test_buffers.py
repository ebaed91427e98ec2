"""Expert buffers: snapshots per epoch, resume after a kill, shards, and metadata checked on load."""

import dataclasses

import pytest
import torch
from loops_support import mnist_root, one_thread, tiny_config  # noqa: F401  (one_thread: autouse)

import ddfast.distill.training.buffers as buffers
from ddfast.distill import load_data
from ddfast.distill.runner import data_key
from ddfast.distill.training.buffers import ExpertBuffer, ExpertSpec, buffer_meta, parse_shard, train_experts
from ddfast.distill.training.models import ModelSpec

MODEL = ModelSpec(width=8, depth=2)
SPEC = ExpertSpec(experts=2, epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def data():
    mnist_root()
    config = tiny_config("mtt")
    return load_data(config), data_key(config)


def kill_in_the_second_epoch(meta, real, folder, monkeypatch):
    """Train experts into ``folder`` and interrupt the second epoch, as a kill would."""
    original, calls = buffers.train_epoch, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(buffers, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_experts(meta, real, folder, quiet=True)
    monkeypatch.setattr(buffers, "train_epoch", original)


def test_experts_snapshot_every_epoch_and_load_as_parameters(data, tmp_path):
    real, key = data
    meta = buffer_meta(SPEC, MODEL, key, real)
    train_experts(meta, real, tmp_path, quiet=True)
    buffer = ExpertBuffer(tmp_path, meta)
    assert len(buffer) == 2 and buffer.trajectories[0].shape[0] == 3  # before training and after each epoch
    net = MODEL.build(1, 10, 28)
    for k in range(2):
        start, end = buffer.snapshot(k, 0), buffer.snapshot(k, 2)
        assert [p.shape for p in start] == [p.shape for p in net.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(start, end))  # the expert trained
    assert not torch.equal(buffer.snapshot(0, 0)[0], buffer.snapshot(1, 0)[0])  # experts differ
    with pytest.raises(ValueError, match=r"epoch must be in \[0, 2\]"):
        buffer.snapshot(0, 3)


def test_killed_expert_resumes_to_the_same_trajectory_and_shards_split_the_work(data, tmp_path, monkeypatch):
    real, key = data
    meta = buffer_meta(SPEC, MODEL, key, real)
    whole = tmp_path / "whole"
    train_experts(meta, real, whole, quiet=True)
    reference = ExpertBuffer(whole, meta).trajectories

    killed = tmp_path / "killed"
    kill_in_the_second_epoch(meta, real, killed, monkeypatch)
    assert sorted(p.name for p in (killed / "expert-0000").iterdir()) == ["epoch-0000.pt", "epoch-0001.pt"]
    train_experts(meta, real, killed, shard=(1, 2), quiet=True)  # another process's shard
    assert (killed / "expert-0001.pt").is_file() and not (killed / "expert-0000.pt").exists()
    train_experts(meta, real, killed, shard=(0, 2), quiet=True)  # resumes expert 0 after epoch 1
    resumed = ExpertBuffer(killed, meta).trajectories
    for a, b in zip(resumed, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not (killed / "expert-0000").exists()


def test_a_buffer_made_for_other_settings_is_refused(data, tmp_path):
    real, key = data
    meta = buffer_meta(SPEC, MODEL, key, real)
    train_experts(meta, real, tmp_path, quiet=True)
    other = buffer_meta(dataclasses.replace(SPEC, lr=0.02), MODEL, key, real)
    with pytest.raises(ValueError, match=r"made for other settings \(experts.lr: 0.01 -> 0.02\)"):
        ExpertBuffer(tmp_path, other)
    with pytest.raises(ValueError, match="made for other settings"):
        train_experts(other, real, tmp_path, quiet=True)
    with pytest.raises(FileNotFoundError, match="no expert buffer at"):
        ExpertBuffer(tmp_path / "missing", meta)


def test_shard_and_spec_errors():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard must be i/n"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        ExpertSpec(epochs=0)


def test_corrupt_buffer_files_are_named_and_trained_again(data, tmp_path, capsys):
    real, key = data
    meta = buffer_meta(SPEC, MODEL, key, real)
    train_experts(meta, real, tmp_path, quiet=True)
    reference = [t.clone() for t in ExpertBuffer(tmp_path, meta).trajectories]
    finished = tmp_path / "expert-0001.pt"
    finished.write_bytes(finished.read_bytes()[:1000])
    (tmp_path / "meta.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=f"{tmp_path / 'meta.json'} is not readable JSON"):
        ExpertBuffer(tmp_path, meta)
    capsys.readouterr()
    train_experts(meta, real, tmp_path, quiet=True)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("ddfast: warning: ") for w in warnings)
    assert str(tmp_path / "meta.json") in warnings[0] and str(finished) in warnings[1] and warnings[1].endswith("training expert 1 again")
    for a, b in zip(ExpertBuffer(tmp_path, meta).trajectories, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.save(torch.zeros(3), finished)  # a torch file of other content
    with pytest.raises(ValueError, match=f"{finished} holds a Tensor"):
        ExpertBuffer(tmp_path, meta)


def test_a_corrupt_epoch_of_an_expert_in_progress_is_trained_again(data, tmp_path, monkeypatch, capsys):
    real, key = data
    meta = buffer_meta(dataclasses.replace(SPEC, experts=1), MODEL, key, real)
    train_experts(meta, real, tmp_path / "whole", quiet=True)
    reference = ExpertBuffer(tmp_path / "whole", meta).trajectories
    kill_in_the_second_epoch(meta, real, tmp_path / "killed", monkeypatch)
    epoch = tmp_path / "killed" / "expert-0000" / "epoch-0001.pt"
    epoch.write_bytes(b"")
    capsys.readouterr()
    train_experts(meta, real, tmp_path / "killed", quiet=True)
    [warning] = capsys.readouterr().err.splitlines()
    assert str(epoch) in warning and warning.endswith("training the expert again from epoch 1")
    torch.testing.assert_close(ExpertBuffer(tmp_path / "killed", meta).trajectories[0], reference[0], rtol=0, atol=0)


def test_a_snapshot_of_non_finite_parameters_names_its_file(data, tmp_path):
    real, key = data
    meta = buffer_meta(dataclasses.replace(SPEC, experts=1, epochs=1), MODEL, key, real)
    train_experts(meta, real, tmp_path, quiet=True)
    state = torch.load(tmp_path / "expert-0000.pt", weights_only=True)
    state["snapshots"][1, 0] = float("nan")
    torch.save(state, tmp_path / "expert-0000.pt")
    buffer = ExpertBuffer(tmp_path, meta)
    assert len(buffer.snapshot(0, 0)) == len(meta["params"])
    with pytest.raises(ValueError, match=f"{tmp_path / 'expert-0000.pt'} holds non-finite parameters after epoch 1"):
        buffer.snapshot(0, 1)
