"""``benchmarks/device_check.py``: a CPU run at the smallest sizes records every step, failures and
timeouts included, without stopping; the tests step reads pytest's counts."""

import json
import sys
import time

from benchmarks import check_runner, device_check
from benchmarks.check_runner import Budget, Command
from ddfast.distill.training.data import data_root


def failing(ctx):
    return [Command([sys.executable, "-c", "raise SystemExit(3)"], ctx.out / "unroll-memory.log")]


def test_cpu_tiny_run_records_every_step_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    try:
        monkeypatch.setenv("DDFAST_DATA_ROOT", str(data_root()))
        has_mnist = (data_root() / "MNIST" / "raw").is_dir()
    except FileNotFoundError:
        has_mnist = False
    monkeypatch.setitem(device_check.COMMANDS, "unroll-memory", failing)
    out = tmp_path / "check"
    assert device_check.main(["--device", "cpu", "--tiny", "--skip", "build", "--out", str(out)]) == 0
    env = json.loads((out / "environment.json").read_text())
    assert env["device"] == "cpu" and env["torch"] and env["python"] and env["slug"].startswith("cpu-")
    steps = {step["name"]: step for step in json.loads((out / "summary.json").read_text())["steps"]}
    assert list(steps) == list(device_check.STEPS)
    assert steps["environment"]["status"] == "passed"
    assert (steps["build"]["status"], steps["build"]["note"]) == ("skipped", "left out with --skip")
    for name in device_check.CPU_TINY_SKIPS:
        assert (steps[name]["status"], steps[name]["note"]) == ("skipped", device_check.CPU_TINY_SKIPS[name])
    assert steps["unroll-memory"]["status"] == "failed" and "exit code 3" in steps["unroll-memory"]["note"]
    assert steps["unroll-memory"]["figures"]["headline"].startswith("no figures")
    dm = steps["dm-mnist"]
    if has_mnist:
        assert dm["status"] == "passed", (out / "dm-mnist.log").read_text()
        assert 0 < dm["figures"]["test_accuracy"] <= 1 and dm["figures"]["iterations"] == 2 and dm["figures"]["seconds_per_iteration"] > 0
    else:
        assert dm["status"] == "skipped" and dm["note"]
    summary = (out / "SUMMARY.md").read_text()
    for name, step in steps.items():
        assert f"| {name} | {step['status']} |" in summary


def test_the_tests_step_reports_failures_with_counts_and_ids(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n\ndef test_a(): pass\n\ndef test_b(): pass\n\n"
                     "def test_c(): assert 1 == 2\n\n@pytest.mark.skip(reason='no')\ndef test_d(): pass\n")
    ctx = device_check.Context(tmp_path, "cpu", False, None)
    status, note = check_runner.run(device_check.suite_commands(ctx, (str(tests),)), 120, device_check.child_env("cpu"), tmp_path)
    assert (status, note) == ("failed", "exit code 1 (tests.log)")
    figures = device_check.suite_figures(tmp_path)
    assert (figures["passed"], figures["failed"], figures["errors"], figures["skipped"]) == (2, 1, 0, 1)
    assert figures["failed_tests"] == ["test_sample::test_c"]
    assert figures["summary_line"].startswith("1 failed, 2 passed, 1 skipped in")
    (tmp_path / "tests.xml").unlink()  # pytest stopped before writing it: the counts come from the log
    assert device_check.suite_figures(tmp_path)["failed_tests"] == ["test_sample.py::test_c"]
    assert device_check.suite_figures(tmp_path)["passed"] == 2


def test_a_command_over_its_limit_is_interrupted_then_recorded(tmp_path):
    code = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('wrote what it had')\n    raise SystemExit(130)\n"
    started = time.monotonic()
    status, note = check_runner.run([Command([sys.executable, "-c", code], tmp_path / "slow.log")], 4, device_check.child_env("cpu"), tmp_path)
    assert time.monotonic() - started < 30
    assert (status, note) == ("timed out", "stopped at the limit of 4 s (slow.log)")
    assert "wrote what it had" in (tmp_path / "slow.log").read_text()


def test_budget_gives_each_step_its_share_plus_what_earlier_steps_left():
    now = [0.0]
    budget = Budget(100, {"a": 10, "b": 30, "c": 10}, clock=lambda: now[0])
    assert budget.limit("a") == 20  # shares scaled by 2: 20, 60, 20
    now[0] = 5.0  # a used 5 of its 20 s
    assert budget.limit("b") == 75
    now[0] = 50.0  # b used 45 of its 75 s
    assert budget.limit("c") == 50
