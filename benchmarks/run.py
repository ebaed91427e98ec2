"""Benchmark ddfast's operations against the plain-torch reference, torch.compile and peer libraries.

Every case (operation, shape, dtype, implementation) is timed (forward, forward+backward) and its peak
memory measured; CPU cases run one fresh process each, CUDA cases in this process. Results go to
``<out>/<device>-<date>.{json,csv}`` (rewritten after every case) and ``<out>/<device>-<date>-<op>-<dtype>.png``;
the table goes to stdout, a line per case to stderr. A case that fails, runs out of memory or over
its time is recorded as such; Ctrl-C stops the run and keeps what was measured. The static sm_90 report
of the operations' Triton kernels (``benchmarks/static_sm90.py``: registers, spills, shared memory, dot
lowering; no GPU needed) goes into the JSON as ``static_sm90`` and after the table, unless ``--skip-static``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402 (before the imports below)

import torch
from tqdm import tqdm

from benchmarks import case, cold_start, distributed, harness, loops, ops, report, static_sm90
from benchmarks import device as machine
from ddfast._backends import triton_missing

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASE_TIMEOUT_S = {"tiny": 120, "default": 120, "full": 1800}
# loops.measure per preset; tiny times one first-order (DM) and one second-order (MTT) method: each compiles its programs
LOOP_SIZES = {"tiny": {"ipc": 1, "real_per_class": 4, "steps": 1, "reps": 3, "methods": ("dm", "mtt")}, "default": {"reps": 3}, "full": {}}
EXAMPLES = """examples:
  python benchmarks/run.py                       every operation and loop, default preset (within 15 minutes on 2 CPU cores)
  python benchmarks/run.py --full                large sizes
  python benchmarks/run.py --skip-static         without the static sm_90 report (compiling it cold takes minutes)
  python benchmarks/run.py --ops infonce --sizes 1000,50000 --dtypes float32,bfloat16 --impls cpu,reference
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(ops.OPS), help=f"comma-separated operations (default: {','.join(ops.OPS)})")
    p.add_argument("--preset", choices=["tiny", "default", "full"], default="default", help="sizes (default: default)")
    p.add_argument("--full", dest="preset", action="store_const", const="full", help="same as --preset full")
    axes = ", ".join(f"{name}: {ops.load(name).AXIS}" for name in ops.OPS)
    p.add_argument("--sizes", help=f"comma-separated values of each operation's swept dimension ({axes}), replacing the "
                                   "preset's shapes; the other dimensions are those of the preset's first shape")
    p.add_argument("--dtypes", default="float32", help="comma-separated torch dtypes (default: float32)")
    peers = ", ".join(name for op in ops.OPS for name in ops.load(op).PEERS)
    p.add_argument("--impls", help="comma-separated implementations (default: every one that runs here): ddfast backend "
                                   "names (reference, torch, cpu, triton, cuda), 'compiled' (the reference under "
                                   f"torch.compile), peers ({peers})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default: {RESULTS})")
    p.add_argument("--case-timeout", type=float, help="seconds per CPU case before it is stopped and recorded as a timeout "
                                                      f"(default by preset: {CASE_TIMEOUT_S})")
    p.add_argument("--memory-cap", type=float, help="GiB of data segment a CPU case process may reach (torch itself takes "
                                                    "about 1) before it is recorded as out of memory (default: 80%% of the "
                                                    "memory available at start)")
    p.add_argument("--skip-static", action="store_true", help="skip the static sm_90 report of the Triton kernels")
    args = p.parse_args(argv)
    for name in args.ops.split(","):
        if name not in ops.OPS:
            p.error(f"unknown operation {name!r}: choose from {', '.join(ops.OPS)}")
    for name in args.dtypes.split(","):
        if not isinstance(getattr(torch, name, None), torch.dtype):
            p.error(f"unknown dtype {name!r}: e.g. float32, bfloat16, float16, float64")
    return args


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def plan(args: argparse.Namespace, device: torch.device, doc: dict) -> list[case.Case]:
    """Every case to run, ordered by operation, dtype, size, implementation; records what cannot run."""
    wanted = set(args.impls.split(",")) if args.impls else None
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    cases = []
    for op_name in args.ops.split(","):
        op = ops.load(op_name)
        for dtype_name in args.dtypes.split(","):
            problems = {name: why for name, why in ops.problems(op, device, getattr(torch, dtype_name)).items()
                        if wanted is None or name in wanted}
            doc["not_run"].setdefault(op_name, {}).update({n: why for n, why in problems.items() if why is not None})
            for shape in ops.shapes(op, device.type, args.preset, sizes):
                cases += [case.Case(op_name, name, shape, dtype_name, str(device)) for name, why in problems.items() if why is None]
    return cases


def measure(c: case.Case, args: argparse.Namespace, memory_cap: int | None) -> dict:
    """CPU: a fresh process per case (its resident memory is the figure). CUDA: in this process."""
    if c.device == "cpu":
        return case.isolated(c, args.case_timeout or CASE_TIMEOUT_S[args.preset], memory_cap)
    torch.compiler.reset()  # each case compiles its own graph, whatever the earlier cases compiled
    r = case.run(c)
    gc.collect()
    torch.cuda.empty_cache()
    return r


def summary(r: dict) -> str:
    if r["status"] != case.OK:
        return f"{r['status']} {r['note']}"
    both = r["forward_backward"]
    peak = "" if both["peak_bytes"] is None else f", {both['peak_bytes'] / report.MIB:.1f} MiB"
    return f"fwd {r['forward']['median_ms']:.3g} ms, fwd+bwd {both['median_ms']:.3g} ms{peak}"


def describe(args: argparse.Namespace, argv: list[str] | None, device: torch.device, memory_cap: int | None) -> dict:
    """The run's document before any case: command, settings, hardware, software, commit."""
    return {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"preset": args.preset, "ops": args.ops, "dtypes": args.dtypes, "sizes": args.sizes, "impls": args.impls,
                     "case_timeout_s": args.case_timeout or CASE_TIMEOUT_S[args.preset],
                     "memory_cap_bytes": memory_cap if device.type == "cpu" else None, **harness.describe(device)},
        "hardware": {**machine.hardware(device), "load_average_start": os.getloadavg()},
        "software": machine.software(),
        "git": machine.git(ROOT),
        "not_run": {},
        "results": [],
    }


def run_cases(cases: list[case.Case], args: argparse.Namespace, memory_cap: int | None, doc: dict, save) -> None:
    """Measures ``cases`` in order into ``doc["results"]``, calling ``save()`` after each. Once an
    implementation runs out of memory or time, its larger sizes in the same series are skipped."""
    failed: dict[tuple, dict] = {}  # (op, dtype, impl, other dimensions) -> its first result out of memory or time
    progress = tqdm(cases, file=sys.stderr, unit="case", dynamic_ncols=True, disable=not sys.stderr.isatty())
    for c in progress:
        progress.set_description(c.label())
        op = ops.load(c.op)
        series = (c.op, c.dtype, c.impl, *((k, v) for k, v in c.shape.items() if k != op.AXIS))
        first = failed.get(series)
        if first and c.shape[op.AXIS] > first["shape"][op.AXIS]:
            r = case.result(c, case.SKIPPED, f"{first['status']} at {op.AXIS}={first['shape'][op.AXIS]}")
        else:
            r = measure(c, args, memory_cap)
        if r["status"] in (case.OUT_OF_MEMORY, case.TIMEOUT):
            failed.setdefault(series, r)
        if r["status"] == case.OK:
            report.add_throughput(r, op.work(c.shape, getattr(torch, c.dtype)), doc["rates"])
        doc["results"].append(r)
        tqdm.write(f"{c.label()}: {summary(r)}", file=sys.stderr)
        save()


def static_report(op_names: list[str], skip: bool) -> dict:
    """``static_sm90``'s rows for the operations, or why there are none."""
    if skip:
        return {"skipped": "--skip-static"}
    if triton_missing():
        return {"skipped": triton_missing()}
    print("compiling the Triton kernels for sm_90 (static report) ...", file=sys.stderr)
    try:
        return {"target": "cuda sm_90a", "rows": static_sm90.report(op_names)}
    except (AssertionError, OSError, subprocess.SubprocessError) as error:
        return {"error": str(error)[-2000:]}


def static_table(static: dict) -> str:
    """The static sm_90 report as a markdown section, or the line saying why there is none."""
    if "rows" in static:
        return "### Triton kernels compiled for sm_90 (static)\n\n" + static_sm90.table(static["rows"])
    return f"Static sm_90 report not made: {static.get('skipped') or static.get('error')}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    op_names = args.ops.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{machine.slug(device)}-{datetime.date.today().isoformat()}"
    memory_cap = int(args.memory_cap * (1 << 30)) if args.memory_cap else int(0.8 * (available_memory_bytes() or 0)) or None
    doc = describe(args, argv, device, memory_cap)

    def save() -> None:
        report.write_json(doc, stem.with_suffix(".json"))
        report.write_csv(doc, stem.with_suffix(".csv"))

    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus / 2:
        print(f"warning: this machine is busy (load average {load:.1f} on {cpus} CPUs): times will be noisy, "
              "memory figures are not affected", file=sys.stderr)
    print(f"measuring this device's matmul rate and memory bandwidth ({device}) ...", file=sys.stderr)
    doc["rates"] = machine.rates(device, [getattr(torch, d) for d in args.dtypes.split(",")])
    cases = plan(args, device, doc)
    started = time.perf_counter()
    try:
        run_cases(cases, args, memory_cap, doc, save)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("interrupted: writing the results gathered so far", file=sys.stderr)
    doc["elapsed_s"] = round(time.perf_counter() - started, 1)
    doc["hardware"]["load_average_end"] = os.getloadavg()
    print("measuring cold first calls and warm calls against the reference ...", file=sys.stderr)
    doc["cold_start"] = {name: cold_start.measure(name, device) for name in op_names}
    print("measuring distillation iterations: ddfast's paths against the reference code's structure ...", file=sys.stderr)
    doc["loops"] = loops.measure(device, **LOOP_SIZES[args.preset])
    print(loops.table(doc["loops"]), file=sys.stderr)
    if "infonce" in op_names:  # from the formulas of benchmarks/distributed.py, which also checks them against the counter
        doc["distributed_bytes"] = distributed.table()
    doc["static_sm90"] = static_report([name for name in op_names if name in static_sm90.OPS], args.skip_static)
    doc["checks"] = [entry for name in op_names for entry in report.checks(doc["results"], device.type, name, ops.load(name).CHECKS)]
    save()
    plots = [path for name in op_names for path in report.plot(doc, name, ops.load(name).AXIS, stem)]
    print(report.table(doc))
    print(static_table(doc["static_sm90"]))
    print("wrote " + ", ".join(str(p) for p in [stem.with_suffix(".json"), stem.with_suffix(".csv"), *plots]), file=sys.stderr)
    return 130 if doc.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
