import json

from loops_support import mnist_root, one_thread, tiny_config  # noqa: F401  (one_thread: autouse)

from ddfast.distill import sweep
from ddfast.distill.dm import DM


def test_sweep_chooses_on_validation_and_tests_only_the_winner(tmp_path, monkeypatch):
    mnist_root()
    steps = []
    step = DM.step
    monkeypatch.setattr(DM, "step", lambda self, iteration: steps.append(iteration) or step(self, iteration))
    config = tiny_config("dm", iterations=2, select_every=0)
    summary = sweep(config, "image_lr", ["0.001", "1.0"], tmp_path, quiet=True, restart=True)
    candidates = summary["candidates"]
    assert [c["value"] for c in candidates] == ["0.001", "1.0"]
    assert summary["chosen"] == max(candidates, key=lambda c: c["val_accuracy"])
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["chosen"]["value"] == summary["chosen"]["value"]
    for c in candidates:
        results = json.loads((tmp_path / f"image_lr={c['value']}" / "results.json").read_text())
        assert results["settings"]["image_lr"] == float(c["value"])
        assert ("evaluation" in results) == (c is summary["chosen"])  # the test set is used once
    assert len(summary["evaluation"]["synthetic"]["test"]) == len(summary["evaluation"]["random_real"]["test"]) == 2
    assert len(steps) == 2 * 2  # two iterations per candidate; the winner resumed at its end, not distilled again


def test_sweep_checks_every_value_before_the_first_run(tmp_path, monkeypatch):
    import pytest

    import ddfast.distill.runner as runner

    def load_data(*args, **kwargs):
        raise AssertionError("a candidate started before every value was checked")

    monkeypatch.setattr(runner, "load_data", load_data)
    config = tiny_config("dm", iterations=2, select_every=0)
    with pytest.raises(ValueError, match="sweep value image_lr=nan: image_lr must be a finite number > 0, got nan"):
        sweep(config, "image_lr", ["1.0", "0.1", "nan"], tmp_path, quiet=True)
    with pytest.raises(ValueError, match="lists a value twice"):
        sweep(config, "image_lr", ["1.0", "1.0"], tmp_path, quiet=True)
    (tmp_path / "image_lr=0.1").mkdir()
    (tmp_path / "image_lr=0.1" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"image_lr=0.1/checkpoint.pt is corrupt.*--restart"):
        sweep(config, "image_lr", ["1.0", "0.1"], tmp_path, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_lr=0.1"]
