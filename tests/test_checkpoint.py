import json
import pathlib

import pytest
import torch

from ddfast.distill import checkpoint


def test_save_load_round_trip_and_missing(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    assert checkpoint.load(path) is None
    checkpoint.save({"x": torch.arange(3), "meta": {"it": 4, "name": "dm", "none": None}}, path)
    state = checkpoint.load(path)
    assert torch.equal(state["x"], torch.arange(3)) and state["meta"] == {"it": 4, "name": "dm", "none": None}
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary left behind


def test_equal_states_give_identical_files(tmp_path):
    state = {"images": torch.linspace(0, 1, 12).reshape(3, 4), "meta": {"it": 7}}
    checkpoint.save(state, tmp_path / "a.pt")
    checkpoint.save(state, tmp_path / "other" / "synthetic.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other" / "synthetic.pt").read_bytes()


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    checkpoint.save_json({"good": 1}, path)
    with pytest.raises(RuntimeError, match="killed"):
        with checkpoint.atomic_path(path) as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


class _RunsCodeWhenLoaded:
    """Unpickling calls ``marker.write_text("ran")``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "ran"))


def test_checkpoints_cannot_run_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran.txt"
    torch.save({"obj": _RunsCodeWhenLoaded(marker)}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.load(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is real: an unrestricted unpickler runs it
        torch.load(f, weights_only=False)
    assert marker.read_text() == "ran"


def _real_file(path):
    checkpoint.save({"images": torch.randn(20, 1, 28, 28), "progress": {"iteration": 3}}, path)
    return path.read_bytes()


@pytest.mark.parametrize("content, reason", [
    (lambda real: bytes(range(256)) * 4, "weights only load refuses|corrupt, truncated or not a torch file"),
    (lambda real: b"", "corrupt, truncated or not a torch file"),
    (lambda real: real[: len(real) // 2], "corrupt, truncated or not a torch file"),
])
def test_unreadable_files_are_named(tmp_path, content, reason):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content(_real_file(tmp_path / "real.pt")))
    for mmap in (False, True):
        with pytest.raises(checkpoint.UnreadableFile, match=reason) as error:
            checkpoint.load(path, mmap=mmap)
        assert str(path) in str(error.value) and "\n" not in str(error.value) and error.value.path == path


def test_foreign_content_is_named(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(checkpoint.UnreadableFile, match=f"{path} holds a Tensor"):
        checkpoint.load(path)
    torch.save({"x": 1}, path)
    with pytest.raises(checkpoint.UnreadableFile, match=r"lacks \['images'\]"):
        checkpoint.load(path, keys=("x", "images"))
    path.unlink()
    path.mkdir()
    with pytest.raises(checkpoint.UnreadableFile, match="is not a file"):
        checkpoint.load(path)


def test_writable_folder(tmp_path):
    checkpoint.check_writable_folder(tmp_path / "new" / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        checkpoint.check_writable_folder(tmp_path / "file")
    with pytest.raises(ValueError, match=f"{tmp_path / 'file'} is a file"):
        checkpoint.check_writable_folder(tmp_path / "file" / "run")
    assert not (tmp_path / "new").exists()  # checking creates nothing
