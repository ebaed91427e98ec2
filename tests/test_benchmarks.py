"""Smoke test of ``python benchmarks/run.py``: a tiny run of every operation writes its table, JSON,
CSV and plots."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import ops

ROOT = Path(__file__).resolve().parents[1]


def test_run_writes_table_json_csv_and_plots(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "benchmarks/run.py", "--device", "cpu", "--preset", "tiny", "--sizes", "256",
                           "--impls", "reference,cpu,triton", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| N=64 M=256 D=32 | float32 | reference |" in done.stdout
    assert "Not run for infonce: triton" in done.stdout
    [json_path] = tmp_path.glob("*.json")
    doc = json.loads(json_path.read_text())
    expected = [(op, impl) for op in ops.OPS for impl in ("reference", "cpu")]
    assert [(r["op"], r["impl"]) for r in doc["results"]] == expected
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["forward_backward"]["median_ms"] > 0 and r["forward_backward"]["peak_bytes"] is not None
        assert r["forward_backward"]["throughput"] > 0
    assert doc["git"]["commit"] and doc["software"]["torch"] and doc["hardware"]["cpu_count"]
    with json_path.with_suffix(".csv").open() as f:
        assert [(row["op"], row["impl"]) for row in csv.DictReader(f)] == expected
    for op in ops.OPS:
        [png] = tmp_path.glob(f"*-{op}-float32.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
