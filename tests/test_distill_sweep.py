import json

from ddfast.distill import sweep
from ddfast.distill.dm import DM
from loops_support import mnist_root, one_thread, tiny_config  # noqa: F401  (one_thread: autouse)


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
