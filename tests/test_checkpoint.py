import json

import pytest
import torch

from ddfast import checkpoint


def test_save_load_round_trip_and_missing(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    assert checkpoint.load(path) is None
    checkpoint.save({"x": torch.arange(3), "meta": {"it": 4, "name": "dm", "none": None}}, path)
    state = checkpoint.load(path)
    assert torch.equal(state["x"], torch.arange(3)) and state["meta"] == {"it": 4, "name": "dm", "none": None}
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary left behind


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    checkpoint.save_json({"good": 1}, path)
    with pytest.raises(RuntimeError, match="killed"):
        with checkpoint.atomic_path(path) as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_checkpoints_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Exception("not a tensor")}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.load(path)
