"""Loading the compiled extensions: a recorded build is loaded directly by later processes."""

import json
import os
import subprocess
import sys

import pytest

from ddfast import _extension

NAME = "infonce_cpu"


def test_a_recorded_build_loads_in_a_fresh_process_without_cpp_extension(tmp_path):
    env = {**os.environ, "DDFAST_CACHE_DIR": str(tmp_path)}
    load = f"import sys, ddfast._extension as e; ops = e.load({NAME!r}); print(ops is not None, 'torch.utils.cpp_extension' in sys.modules)"
    first = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr
    if first.stdout.split() != ["True", "True"]:
        pytest.skip(f"the extension does not build here: {first.stderr[-500:]}")
    record = json.loads((tmp_path / "extensions" / f"{NAME}.json").read_text())
    assert record["key"] == _extension.build_key(NAME) and os.path.isfile(record["library"])
    again = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["True", "False"]


def test_a_record_is_ignored_when_its_library_changed_its_key_differs_or_it_is_unreadable(tmp_path, monkeypatch):
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path))
    library = tmp_path / "lib.so"
    library.write_bytes(b"\x7fELF one")
    _extension._remember(NAME, str(library))
    assert _extension._recorded_library(NAME) == str(library)
    library.write_bytes(b"\x7fELF two, rebuilt")
    assert _extension._recorded_library(NAME) is None
    _extension._remember(NAME, str(library))
    record = tmp_path / "extensions" / f"{NAME}.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "key": "0" * 64}))
    assert _extension._recorded_library(NAME) is None
    record.write_text("{not json")
    assert _extension._recorded_library(NAME) is None
    library.unlink()
    _extension._remember(NAME, str(library))  # a library that vanished is not recorded, and nothing raises
    assert _extension._recorded_library(NAME) is None


def test_the_key_follows_the_sources_and_the_flags(tmp_path, monkeypatch):
    key = _extension.build_key(NAME)
    assert key == _extension.build_key(NAME) and key != _extension.build_key("cmi_cpu")
    monkeypatch.setattr(_extension, "CPU_FLAGS", [*_extension.CPU_FLAGS, "-DANOTHER"])
    assert _extension.build_key(NAME) != key
    monkeypatch.undo()
    for name in ("common", "infonce"):
        (tmp_path / name).mkdir()
    (tmp_path / "infonce" / "infonce_cpu.cpp").write_text("one")
    monkeypatch.setattr(_extension, "csrc_dir", lambda: tmp_path)
    before = _extension.build_key(NAME)
    (tmp_path / "common" / "header.h").write_text("a header")
    assert _extension.build_key(NAME) != before


def test_each_torch_version_builds_in_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = _extension.build_directory(NAME)
    assert here.is_dir() and here.parent == tmp_path / f"ddfast_{NAME}"
    monkeypatch.setattr(_extension.torch, "__version__", "0.0.1+another")
    other = _extension.build_directory(NAME)
    assert other.is_dir() and other != here and "0.0.1+another" in other.name
