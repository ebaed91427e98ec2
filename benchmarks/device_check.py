"""One command for a lent GPU: environment, tests, benchmarks, unroll memory and a short DM run.

    PYTHONPATH=. python benchmarks/device_check.py [--tiny] [--skip STEP] [--out DIR] [--data-root DIR] [--budget S]

Steps, in order, each a subprocess with a time limit (its share of ``--budget`` plus what earlier
steps left): ``environment`` (environment.json), ``build`` (the compiled extensions of csrc/, side by
side), ``tests`` (the op test files, tests.xml and tests.log), ``benchmarks`` (benchmarks/run.py),
``unroll-memory`` (benchmarks/unroll_memory.py), ``dm-mnist`` (``ddfast distill --method dm`` on
MNIST). A step that fails or runs out of time is recorded and the next one runs; summary.json and
SUMMARY.md are rewritten after every step. Exit code 0 when every step ran, whatever it found.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/device_check.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402

import torch

from benchmarks.check_runner import FAILED, PASSED, SKIPPED, TIMED_OUT, Budget, Command, run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 480.0
SUMMARY_RESERVE_S = 5.0  # of the budget, for writing the summary after the last step
# seconds of the default budget per step, in the order the steps run
SHARES_S = {"environment": 30, "build": 90, "tests": 150, "benchmarks": 110, "unroll-memory": 35, "dm-mnist": 60}
STEPS = tuple(SHARES_S)
TEST_FILES = ("tests/test_infonce.py", "tests/test_cmi.py", "tests/test_trajectory_mse.py", "tests/test_backends.py")
TINY_TESTS = "(matches_reference_float64 or float64_matches_reference) and mean and (triton or cuda) and (vector or centroids or cosine-labels)"
TINY_UNROLL = ["--steps", "1", "--ipc", "1"]
TINY_DM = ["--set", "iterations=2", "--set", "evaluation.models=1", "--set", "evaluation.epochs=2",
           "--set", "val_per_class=10", "--set", "test_per_class=20", "--set", "real_per_class=16"]
CPU_TINY_SKIPS = {  # steps too slow for ``--device cpu --tiny``, which only checks the check itself
    "tests": "collecting the op test files alone takes about a minute on a small CPU; the default test suite runs them there",
    "benchmarks": "run.py runs each CPU case in a fresh process (minutes for the tiny preset); tests/test_benchmarks.py runs it",
}
EXAMPLES = """examples:
  PYTHONPATH=. python benchmarks/device_check.py                       everything, within 8 minutes on an H200
  PYTHONPATH=. python benchmarks/device_check.py --tiny --skip tests   the smallest sizes, no tests
  PYTHONPATH=. python benchmarks/device_check.py --device cpu --tiny   the check itself, on a CPU
"""


@dataclass(frozen=True)
class Context:
    """What the steps need: where results go, the device, the sizes, the data."""

    out: Path
    device: str
    tiny: bool
    data_root: str | None


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to check (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="the smallest sizes everywhere and a handful of tests")
    p.add_argument("--skip", action="append", default=[], choices=STEPS[1:], metavar="STEP",
                   help=f"leave a step out, recorded as skipped (repeatable): {', '.join(STEPS[1:])}")
    p.add_argument("--out", type=Path, help=f"results folder (default: {RESULTS}/<device>-<date>-device-check)")
    p.add_argument("--data-root", help="folder holding MNIST for the DM run (default: $DDFAST_DATA_ROOT, else the project's default)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help=f"seconds for all steps together (default {DEFAULT_BUDGET_S:.0f})")
    args = p.parse_args(argv)
    if args.budget <= SUMMARY_RESERVE_S:
        p.error(f"--budget must be over {SUMMARY_RESERVE_S:.0f} seconds, got {args.budget}")
    return args


def log(message: str) -> None:
    print(f"device check: {message}", file=sys.stderr, flush=True)


def child_env(device: str) -> dict[str, str]:
    """The steps' environment: this checkout importable, output unbuffered, no GPU for a CPU check."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# --- environment ------------------------------------------------------------------------------


def environment(device: str, limit_s: float) -> tuple[dict, str, str, str]:
    """(document, status, note, stderr) of ``benchmarks/environment.py`` in its own process."""
    fallback = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": device, "slug": device,
                "python": sys.version.split()[0]}
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.environment", device], cwd=ROOT, env=child_env(device),
                              capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr or ""
        return fallback, TIMED_OUT, f"stopped at the limit of {limit_s:.0f} s", stderr if isinstance(stderr, str) else stderr.decode(errors="replace")
    if done.returncode != 0:
        return fallback, FAILED, f"exit code {done.returncode} (environment.log)", done.stderr
    try:
        return json.loads(done.stdout), PASSED, "", done.stderr
    except ValueError:
        return fallback, FAILED, "its output was not JSON (environment.log)", done.stdout + done.stderr


def default_out(env: dict) -> Path:
    return RESULTS / f"{env['slug']}-{datetime.date.today().isoformat()}-device-check"


# --- the steps' commands: each returns the commands to run, or a string saying why the step is skipped


def build_commands(ctx: Context) -> list[Command]:
    suffixes = ("_cpu.cpp", "_cuda.cu") if ctx.device == "cuda" else ("_cpu.cpp",)
    names = sorted(path.name.rsplit(".", 1)[0] for path in (ROOT / "csrc").glob("*/*") if path.name.endswith(suffixes))
    code = "import sys; from ddfast._extension import build; build(sys.argv[1], verbose=True)"
    return [Command([sys.executable, "-c", code, name], ctx.out / f"build-{name}.log") for name in names]


def suite_commands(ctx: Context, files: tuple[str, ...] = TEST_FILES) -> list[Command]:
    argv = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", f"--junitxml={ctx.out / 'tests.xml'}", *files]
    return [Command(argv + (["-k", TINY_TESTS] if ctx.tiny else []), ctx.out / "tests.log")]


def benchmark_commands(ctx: Context) -> list[Command]:
    preset = ["--preset", "tiny"] if ctx.tiny else []
    return [Command([sys.executable, "benchmarks/run.py", "--device", ctx.device, "--out", str(ctx.out), *preset], ctx.out / "benchmarks.log")]


def unroll_commands(ctx: Context) -> list[Command]:
    sizes = TINY_UNROLL if ctx.tiny else []
    return [Command([sys.executable, "benchmarks/unroll_memory.py", "--device", ctx.device, "--out", str(ctx.out), *sizes],
                    ctx.out / "unroll-memory.log")]


def mnist_root(explicit: str | None) -> Path | str:
    """The data root holding MNIST, or why there is none."""
    from ddfast.distill.training.data import data_root

    try:
        root = data_root(explicit)
    except FileNotFoundError as exc:
        return str(exc)
    root = root.resolve()
    return root if (root / "MNIST" / "raw").is_dir() else f"MNIST is not under {root} (pass --data-root or set $DDFAST_DATA_ROOT)"


def dm_commands(ctx: Context) -> list[Command] | str:
    root = mnist_root(ctx.data_root)
    if isinstance(root, str):
        return root
    argv = [sys.executable, "-m", "ddfast", "distill", "--method", "dm", "--dataset", "mnist", "--ipc", "10", "--preset", "quick",
            "--device", ctx.device, "--out", str(ctx.out / "dm-mnist-quick"), "--data-root", str(root),
            "--cache-dir", str(ctx.out / "cache"), "--restart", "--quiet", *(TINY_DM if ctx.tiny else [])]
    return [Command(argv, ctx.out / "dm-mnist.log")]


# --- the steps' key figures, read from what they wrote (also after a failure or a timeout) -------


def newest(paths) -> Path:
    """The most recently written of ``paths`` (a folder reused on another day holds several)."""
    return max(paths, key=lambda path: path.stat().st_mtime)


def suite_figures(out: Path) -> dict:
    """Counts from tests.xml (from tests.log's result lines when pytest was stopped before writing it),
    the failed tests' ids and pytest's summary line."""
    text = (out / "tests.log").read_text(errors="replace") if (out / "tests.log").exists() else ""
    summary = [line.strip("= ") for line in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    figures = {"summary_line": summary[-1] if summary else None}
    if (out / "tests.xml").exists():
        suites = list(ElementTree.parse(out / "tests.xml").getroot().iter("testsuite"))
        count = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        figures.update(passed=count["tests"] - count["failures"] - count["errors"] - count["skipped"],
                       failed=count["failures"], errors=count["errors"], skipped=count["skipped"], failed_tests=failed)
    else:
        outcomes = Counter(m.group(2) for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.MULTILINE))
        failed = [m.group(1) for m in re.finditer(r"^(\S+::\S+) (FAILED|ERROR)", text, re.MULTILINE)]
        figures.update(passed=outcomes["PASSED"], failed=outcomes["FAILED"], errors=outcomes["ERROR"], skipped=outcomes["SKIPPED"],
                       failed_tests=failed)
    figures["headline"] = (f"{figures['passed']} passed, {figures['failed']} failed, {figures['errors']} errors, "
                           f"{figures['skipped']} skipped (tests.log, tests.xml)")
    return figures


def benchmark_figures(out: Path) -> dict:
    """The run's JSON and CSV, its cases by status, its acceptance checks; its table into benchmarks.md."""
    from benchmarks import report

    path = newest(p for p in out.glob("*.json") if re.search(r"-\d{4}-\d{2}-\d{2}\.json$", p.name))
    doc = json.loads(path.read_text())
    (out / "benchmarks.md").write_text(report.table(doc))
    statuses = Counter(r["status"] for r in doc["results"])
    return {"json": path.name, "csv": path.with_suffix(".csv").name, "table": "benchmarks.md", "cases": dict(statuses),
            "checks": [report.check_line(c) for c in doc.get("checks", [])],
            "headline": ", ".join(f"{n} {status}" for status, n in statuses.items()) + " cases (table in benchmarks.md)"}


def unroll_figures(out: Path) -> dict:
    path = newest(out.glob("*-unroll-memory.json"))
    rows = json.loads(path.read_text())["results"]
    peaks = "; ".join(f"{r['mode']} {r['syn_steps']}: " + ("failed" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB") for r in rows)
    return {"json": path.name, "results": rows, "headline": f"peak memory by syn_steps: {peaks}"}


def dm_figures(out: Path) -> dict:
    results = json.loads((out / "dm-mnist-quick" / "results.json").read_text())
    synthetic, real = results["evaluation"]["synthetic"], results["evaluation"]["random_real"]
    per_iteration = results["seconds"]["distill"]["wall"] / results["iterations"]
    figures = {"test_accuracy": synthetic["test_mean"], "test_accuracy_std": synthetic["test_std"], "random_real_accuracy": real["test_mean"],
               "iterations": results["iterations"], "seconds_per_iteration": per_iteration,
               "seconds": {name: round(entry["wall"], 2) for name, entry in results["seconds"].items()}}
    figures["headline"] = (f"test accuracy {100 * synthetic['test_mean']:.2f} +- {100 * synthetic['test_std']:.2f} % (random real "
                           f"{100 * real['test_mean']:.2f} %), {per_iteration:.3g} s per iteration over {results['iterations']}")
    return figures


COMMANDS = {"build": build_commands, "tests": suite_commands, "benchmarks": benchmark_commands, "unroll-memory": unroll_commands,
            "dm-mnist": dm_commands}
FIGURES = {"tests": suite_figures, "benchmarks": benchmark_figures, "unroll-memory": unroll_figures, "dm-mnist": dm_figures}


def run_step(name: str, ctx: Context, limit_s: float, skip: str | None) -> dict:
    """One step's record: status, note, wall and limit seconds, logs, key figures."""
    record = {"name": name, "status": SKIPPED, "note": skip or "", "wall_s": 0.0, "limit_s": round(limit_s, 1), "logs": [], "figures": {}}
    if skip:
        return record
    started = time.perf_counter()
    try:
        commands = COMMANDS[name](ctx)
        if isinstance(commands, str):
            record["note"] = commands
            return record
        record["logs"] = [c.log.name for c in commands]
        record["status"], record["note"] = run(commands, limit_s, child_env(ctx.device), ROOT)
    except Exception as exc:  # the step could not start: recorded, the check goes on
        record["status"], record["note"] = FAILED, f"{type(exc).__name__}: {exc}"
    record["wall_s"] = round(time.perf_counter() - started, 1)
    if name in FIGURES:
        try:
            record["figures"] = FIGURES[name](ctx.out)
        except Exception as exc:  # nothing (or nothing readable) was written
            record["figures"] = {"headline": f"no figures ({type(exc).__name__}: {exc})"}
    return record


# --- summary ---------------------------------------------------------------------------------


def write_summary(doc: dict, out: Path) -> str:
    """summary.json and SUMMARY.md; returns the markdown."""
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    env = doc["environment"]
    where = env.get("gpu") or env["device"]
    versions = [f"{label} {env[key]}" for label, key in (("python", "python"), ("torch", "torch"), ("triton", "triton"),
                ("CUDA runtime", "cuda_runtime"), ("driver", "driver"), ("compute capability", "compute_capability"),
                ("SMs", "sm_count")) if env.get(key) is not None]
    lines = [f"# Device check: {where}, {env['date'][:10]}", "",
             f"commit {env.get('commit') or 'unknown'}{' (dirty)' if env.get('dirty') else ''}; {', '.join(versions)}; "
             f"{'tiny sizes, ' if doc['settings']['tiny'] else ''}budget {doc['settings']['budget_s']:.0f} s, {doc['wall_s']:.0f} s used.", "",
             "| step | status | wall s | limit s | key figures / note |", "|---|---|---|---|---|"]
    for step in doc["steps"]:
        said = "; ".join(filter(None, [step["note"], step["figures"].get("headline")]))
        lines.append(f"| {step['name']} | {step['status']} | {step['wall_s']:.1f} | {step['limit_s']:.0f} | {said.replace('|', '/')} |")
    figures = {step["name"]: step["figures"] for step in doc["steps"]}
    failed = figures.get("tests", {}).get("failed_tests")
    if failed:
        lines += ["", f"Failed tests ({len(failed)}):", *(f"- `{test}`" for test in failed[:30])] + (["- ..."] if len(failed) > 30 else [])
    if figures.get("tests", {}).get("summary_line"):
        lines += ["", f"pytest: {figures['tests']['summary_line']}"]
    if figures.get("benchmarks", {}).get("checks"):
        lines += ["", "Benchmark checks:", *(f"- {line}" for line in figures["benchmarks"]["checks"])]
    text = "\n".join(lines) + "\n"
    (out / "SUMMARY.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    budget = Budget(args.budget - SUMMARY_RESERVE_S, SHARES_S)
    limit = budget.limit("environment")
    log(f"environment ({args.device}) ...")
    env, status, note, stderr = environment(args.device, limit)
    out = (args.out or default_out(env)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    (out / "environment.log").write_text(stderr)
    ctx = Context(out, args.device, args.tiny, args.data_root)
    environment_step = {"name": "environment", "status": status, "note": note, "wall_s": round(time.perf_counter() - started, 1),
                        "limit_s": round(limit, 1), "logs": ["environment.log"], "figures": {"headline": "environment.json"}}
    log(f"environment: {status} {note}".rstrip() + f"; results in {out}")
    doc = {"created": env["date"], "command": " ".join(["python benchmarks/device_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "settings": {"device": args.device, "tiny": args.tiny, "skip": args.skip, "budget_s": args.budget, "data_root": args.data_root},
           "environment": env, "steps": [environment_step], "wall_s": 0.0}
    write_summary(doc, out)
    for name in STEPS[1:]:
        skip = "left out with --skip" if name in args.skip else CPU_TINY_SKIPS.get(name) if args.device == "cpu" and args.tiny else None
        limit = budget.limit(name)
        if not skip:
            log(f"{name}: running, limit {limit:.0f} s ...")
        step = run_step(name, ctx, limit, skip)
        log(f"{name}: {step['status']} in {step['wall_s']:.1f} s {step['note']}".rstrip())
        doc["steps"].append(step)
        doc["wall_s"] = round(time.perf_counter() - started, 1)
        write_summary(doc, out)
    print(write_summary(doc, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
