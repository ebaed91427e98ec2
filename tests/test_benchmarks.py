"""Smoke test of ``python benchmarks/run.py``: a tiny run of every operation writes its table, JSON,
CSV and plots."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from loops_support import mnist_root

from benchmarks import case, ops

ROOT = Path(__file__).resolve().parents[1]


def test_run_writes_table_json_csv_and_plots(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "benchmarks/run.py", "--device", "cpu", "--preset", "tiny", "--sizes", "256",
                           "--impls", "reference,cpu,triton", "--skip-static", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| N=64 M=256 D=32 | float32 | reference |" in done.stdout
    assert "Not run for infonce: triton" in done.stdout
    assert "### infonce across processes: bytes per rank and call" in done.stdout
    [json_path] = tmp_path.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["static_sm90"] == {"skipped": "--skip-static"}
    assert "Static sm_90 report not made: --skip-static" in done.stdout
    expected = [(op, impl) for op in ops.OPS for impl in ("reference", "cpu")]
    assert [(r["op"], r["impl"]) for r in doc["results"]] == expected
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["forward_backward"]["median_ms"] > 0 and r["forward_backward"]["peak_bytes"] is not None
        assert r["forward_backward"]["throughput"] > 0
    assert {(row["M"], row["R"]) for row in doc["distributed_bytes"]} == {(50_000, 2), (50_000, 8), (1_000_000, 2), (1_000_000, 8)}
    assert doc["git"]["commit"] and doc["software"]["torch"] and doc["hardware"]["cpu_count"]
    assert set(doc["loops"]) == {"dm", "mtt"}  # the tiny preset's
    for entry in doc["loops"].values():
        assert all(entry[path]["s_per_iteration"] > 0 for path in ("reference", "ddfast", "bfloat16"))
        assert set(entry["ratio"]) == {"ddfast", "bfloat16"} and all(r > 0 for r in entry["ratio"].values())
    with json_path.with_suffix(".csv").open() as f:
        assert [(row["op"], row["impl"]) for row in csv.DictReader(f)] == expected
    for op in ops.OPS:
        [png] = tmp_path.glob(f"*-{op}-float32.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_memory_and_failures_are_results(monkeypatch):
    def allocator_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")

    def breaks(*args, **kwargs):
        raise ValueError("a bug")

    c = case.Case("infonce", "reference", {"N": 4, "M": 8, "D": 2}, "float32", "cpu")
    monkeypatch.setattr(ops, "implementation", lambda op, name: allocator_fails)
    assert case.run(c)["status"] == case.OUT_OF_MEMORY
    monkeypatch.setattr(ops, "implementation", lambda op, name: breaks)
    assert (case.run(c)["status"], case.run(c)["note"]) == (case.ERROR, "ValueError: a bug")


def test_a_case_over_its_time_is_stopped_and_recorded():
    c = case.Case("infonce", "reference", {"N": 64, "M": 1024, "D": 32}, "float32", "cpu")
    assert case.isolated(c, timeout_s=0.01, memory_cap_bytes=None)["status"] == case.TIMEOUT


def test_unroll_memory_writes_json_and_plot(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/unroll_memory.py", "--device", "cpu", "--steps", "1", "3", "--ipc", "1",
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [json_path] = tmp_path.glob("*-unroll-memory.json")
    rows = json.loads(json_path.read_text())["results"]
    assert [(r["mode"], r["syn_steps"]) for r in rows] == [("standard", 1), ("standard", 3), ("constant", 1), ("constant", 3)]
    assert all(r["peak_mib"] > 0 for r in rows)
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loops_writes_json_and_plot(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/loops.py", "--device", "cpu", "--ipc", "1", "--real", "3", "--steps", "1",
                           "--methods", "dm", "mtt", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "mtt    bfloat16" in done.stdout and "x reference" in done.stdout
    [json_path] = tmp_path.glob("*-loops.json")
    loops = json.loads(json_path.read_text())["loops"]
    assert set(loops) == {"dm", "mtt"} and loops["dm"]["settings"]["real_per_class"] == 3
    for entry in loops.values():
        assert set(entry) == {"reference", "ddfast", "bfloat16", "ratio", "settings", "allocator"}
        assert all(entry[path]["s_per_iteration"] > 0 and entry[path]["first_iteration_s"] > 0 for path in ("reference", "ddfast", "bfloat16"))
        assert entry["allocator"] == {"reference": "glibc defaults", "ddfast": "keep_freed_memory", "bfloat16": "keep_freed_memory"}
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cmi_centroids_writes_json(tmp_path):
    mnist_root()
    done = subprocess.run([sys.executable, "benchmarks/cmi_centroids.py", "--device", "cpu", "--limit", "200", "--chunk", "64",
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [json_path] = tmp_path.glob("*-cmi-centroids.json")
    rows = json.loads(json_path.read_text())["results"]
    assert [(r["features"], r["images"], r["columns"]) for r in rows] == [("embed", 200, 128 * 4 * 4), ("logits", 200, 10)]
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in rows)
