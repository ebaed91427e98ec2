"""Results out: throughput figures, the stdout table (GitHub markdown), JSON, CSV and scaling plots.

A run is one JSON document: settings, hardware, software, git commit, the device's measured rates,
and ``results``, one dict per case as ``benchmarks.case`` returns it plus its throughput.
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

from . import ops
from .case import OK
from .distributed import markdown

UNITS = {"flop": ("TFLOP/s", 1e12, "matmul_tflops", "% matmul"), "byte": ("GB/s", 1e9, "bandwidth_gbs", "% bandwidth")}
MIB = 1 << 20
MARKERS = "os^Dv*"
LEGEND = ("ddfast's backends by name (reference: the plain-torch formula; torch: streaming in pure torch; cpu: compiled "
          f"C++; triton, cuda: GPU kernels); {ops.COMPILED}: the reference under torch.compile; peers: other libraries' "
          "implementations, where installed")


def add_throughput(result: dict, work: ops.Work, rates: dict) -> dict:
    """Adds ``throughput`` and ``share`` (of the device's measured rate) to each phase of ``result``."""
    label, scale, rate_key, _ = UNITS[work.unit]
    device_rate = rates[rate_key]
    if isinstance(device_rate, dict):
        device_rate = device_rate[result["dtype"]]
    result["work"] = {"unit": work.unit, "throughput_unit": label, "count": work.count,
                      "forward": work.forward, "forward_backward": work.forward_backward}
    for phase in ops.PHASES:
        if phase in result:
            rate = getattr(work, phase) / (result[phase]["median_ms"] / 1e3) / scale
            result[phase].update(throughput=rate, share=rate / device_rate)
    return result


def _find(results: list[dict], op: str, shape: dict, dtype: str, impl: str) -> dict | None:
    for r in results:
        if (r["op"], r["shape"], r["dtype"], r["impl"]) == (op, shape, dtype, impl):
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _shape(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def table(doc: dict) -> str:
    """Markdown tables, one per operation, then what did not run and the acceptance checks."""
    hw, sw, rates, settings = doc["hardware"], doc["software"], doc["rates"], doc["settings"]
    matmul = ", ".join(f"{dtype} {value:.3g} TFLOP/s" for dtype, value in rates["matmul_tflops"].items())
    where = f"{hw['gpu']} ({hw['device']}), host {hw['cpu']}" if hw.get("gpu") else f"{hw['cpu']} ({hw['device']})"
    lines = [f"Device: {where}, {hw['cpu_count']} CPUs, {hw['torch_threads']} torch threads; load average "
             f"{' '.join(f'{x:.1f}' for x in hw['load_average_start'])} at start. Measured in this run: matmul {matmul}; "
             f"copy bandwidth {rates['bandwidth_gbs']:.3g} GB/s. torch {sw['torch']}, triton {sw['triton']}, "
             f"commit {(doc['git']['commit'] or '?')[:10]}{' (dirty)' if doc['git']['dirty'] else ''}.", "",
             f"Implementations: {LEGEND}. Times: {settings['time']}. "
             f"Memory: {settings['memory']}. Ratios are to the reference's forward+backward.", ""]
    for op_name in dict.fromkeys(r["op"] for r in doc["results"]):
        results = [r for r in doc["results"] if r["op"] == op_name]
        unit = next((r["work"] for r in results if "work" in r), None)
        rate, share = (UNITS[unit["unit"]][0], UNITS[unit["unit"]][3]) if unit else ("throughput", "% device")
        lines += [f"### {op_name}", ""]
        if unit:
            lines += [f"Throughput counts {unit['count']}.", ""]
        header = ["shape", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd MiB", "fwd+bwd MiB",
                  f"fwd+bwd {rate}", share, "time / ref", "memory / ref", "note"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in results:
            lines.append("| " + " | ".join(_row(r, _find(doc["results"], op_name, r["shape"], r["dtype"], "reference"))) + " |")
        lines.append("")
    if doc.get("distributed_bytes"):
        lines += ["### infonce across processes: bytes per rank and call (forward + backward)", "", markdown(doc["distributed_bytes"]), ""]
    for op_name, problems in doc.get("not_run", {}).items():
        lines.append(f"Not run for {op_name}: " + "; ".join(f"{name} ({why})" for name, why in problems.items()))
    lines += [""] + [check_line(c) for c in doc.get("checks", [])]
    return "\n".join(lines).rstrip() + "\n"


def _row(r: dict, ref: dict | None) -> list[str]:
    cells = [_shape(r["shape"]), r["dtype"], r["impl"]]
    if r["status"] != OK:
        return cells + ["-"] * 8 + [f"{r['status']}: {r['note']}".rstrip(": ")]
    fwd, both = r["forward"], r["forward_backward"]
    peak = [None if x["peak_bytes"] is None else x["peak_bytes"] / MIB for x in (fwd, both)]
    relative = [None, None]
    if ref and ref["status"] == OK:
        relative = [_ratio(both["median_ms"], ref["forward_backward"]["median_ms"]),
                    _ratio(both["peak_bytes"], ref["forward_backward"]["peak_bytes"])]
    return cells + [_fmt(fwd["median_ms"]), _fmt(both["median_ms"]), _fmt(peak[0]), _fmt(peak[1]),
                    _fmt(both.get("throughput")), _fmt(100 * both["share"], 2) if "share" in both else "-",
                    *(_fmt(x, 2) for x in relative), r["note"]]


def checks(results: list[dict], device_type: str, op_name: str, op_checks: list[ops.Check]) -> list[dict]:
    """``op_name``'s acceptance checks for ``device_type``, each with its figures and verdict."""
    out = []
    for check in op_checks:
        if check.device != device_type:
            continue
        ours = _find(results, op_name, check.shape, check.dtype, check.ours)
        base = _find(results, op_name, check.shape, check.dtype, check.baseline)
        entry = {"title": check.title, "ours": check.ours, "baseline": check.baseline, "verdict": "not measured",
                 "max_time_ratio": check.max_time_ratio, "max_memory_ratio": check.max_memory_ratio}
        if ours and base and ours["status"] == OK and base["status"] == OK:
            a, b = ours[check.phase], base[check.phase]
            entry["time_ratio"] = a["median_ms"] / b["median_ms"]
            memory = entry["memory_ratio"] = _ratio(a["peak_bytes"], b["peak_bytes"])
            passed = [check.max_time_ratio is None or entry["time_ratio"] <= check.max_time_ratio,
                      check.max_memory_ratio is None or (memory is not None and memory <= check.max_memory_ratio)]
            entry["verdict"] = "PASS" if all(passed) else "FAIL"
        out.append(entry)
    return out


def check_line(entry: dict) -> str:
    figures = []
    if "time_ratio" in entry:
        figures.append(f"time {entry['ours']}/{entry['baseline']} = {entry['time_ratio']:.2f} (needs <= {entry['max_time_ratio']})")
    if entry.get("memory_ratio") is not None:
        figures.append(f"peak memory {entry['ours']}/{entry['baseline']} = {entry['memory_ratio']:.3f} "
                       f"(needs <= {entry['max_memory_ratio']})")
    return f"{entry['verdict']}: {entry['title']}" + (": " + "; ".join(figures) if figures else "")


def write_json(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


CSV_FIELDS = ["op", "shape", "dtype", "device", "impl", "status", "note"] + [
    f"{phase}_{field}" for phase in ops.PHASES
    for field in ("median_ms", "p20_ms", "p80_ms", "reps", "peak_bytes", "throughput", "share")] + ["throughput_unit"]


def write_csv(doc: dict, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for r in doc["results"]:
            row = {k: r[k] for k in ("op", "dtype", "device", "impl", "status", "note")}
            row.update(shape=_shape(r["shape"]), throughput_unit=r.get("work", {}).get("throughput_unit"))
            for phase in ops.PHASES:
                row.update({f"{phase}_{k}": v for k, v in r.get(phase, {}).items()})
            writer.writerow(row)


@contextlib.contextmanager
def figure(path: Path, figsize: tuple[float, float] = (5, 3.5)):
    """A matplotlib figure and axes (Agg backend) to draw on; laid out, saved to ``path`` and closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot(doc: dict, op_name: str, axis: str, path_stem: Path) -> list[Path]:
    """One PNG per dtype: forward+backward time and peak memory against ``axis``, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    written = []
    results = [r for r in doc["results"] if r["op"] == op_name]
    device_name = doc["hardware"].get("gpu") or f"{doc['hardware']['cpu']}, {doc['hardware']['cpu_count']} CPUs"
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        lines = _lines([r for r in results if r["dtype"] == dtype], axis)
        if not any(times for _, _, times, _, _ in lines):
            continue
        impls = list(dict.fromkeys(impl for impl, *_ in lines))
        series = list(dict.fromkeys(shape for _, shape, *_ in lines))
        fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
        for impl, shape, times, memory, _ in lines:
            style = {"color": f"C{impls.index(impl) % 10}", "marker": MARKERS[series.index(shape) % len(MARKERS)]}
            for ax, points in ((time_ax, times), (mem_ax, memory)):
                if points:
                    ax.plot(*zip(*points), **style)
        failures = {impl: failed for impl, *_, failed in lines if failed}
        handles = [Line2D([], [], color=f"C{i % 10}", label=impl + failures.get(impl, "")) for i, impl in enumerate(impls)]
        if len(series) > 1:
            handles += [Line2D([], [], color="k", linestyle="none", marker=MARKERS[i % len(MARKERS)], label=shape)
                        for i, shape in enumerate(series)]
        for ax, ylabel in ((time_ax, "forward+backward time (ms)"), (mem_ax, "forward+backward peak memory (MiB)")):
            ax.set(xlabel=axis, ylabel=ylabel)
            if ax.has_data():
                ax.set(xscale="log", yscale="log")
            ax.grid(True, which="both", alpha=0.3)
        time_ax.legend(handles=handles, fontsize=8)
        fig.suptitle(", ".join([op_name + (f" {series[0]}" if len(series) == 1 else ""), dtype, device_name]))
        fig.tight_layout()
        path = path_stem.with_name(f"{path_stem.name}-{op_name}-{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _lines(results: list[dict], axis: str) -> list[tuple[str, str, list, list, str]]:
    """Per implementation and values of the other shape fields: (impl, those fields, [(x, ms)],
    [(x, MiB)] where above zero, a note on the first failure)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["impl"], _shape({k: v for k, v in r["shape"].items() if k != axis})), []).append(r)
    lines = []
    for (impl, shape), rs in groups.items():
        ok = [(r["shape"][axis], r["forward_backward"]) for r in rs if r["status"] == OK]
        times = [(x, f["median_ms"]) for x, f in ok]
        memory = [(x, f["peak_bytes"] / MIB) for x, f in ok if f["peak_bytes"]]
        failed = next((f", {r['status']} at {axis}={r['shape'][axis]}" for r in rs if r["status"] != OK), "")
        lines.append((impl, shape, times, memory, failed))
    return lines
