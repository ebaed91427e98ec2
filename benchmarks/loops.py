"""Seconds per distillation iteration and peak memory: batched over classes against the reference code's structure.

    python benchmarks/loops.py [--device cpu] [--ipc 10] [--real 64]

DM on MNIST-shaped images (10 classes, a fresh ConvNet width 128 depth 3 each iteration, DSA with one
draw per class, the image update included): batched over classes (all classes' real images in a few
no-grad forward passes, the synthetic set in one; ddfast's default on CUDA) against one forward per
class and side, as the reference code runs it (ddfast's default on the CPU, where batching does not
pay). The images are random: an iteration's cost does not depend on their values.
Writes ``results/<device>-<date>-loops.{json,png}`` and prints a table; ``benchmarks/run.py`` records
the same figures under ``loops``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/loops.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402

import torch

from benchmarks import device as machine
from benchmarks import harness, report
from ddfast.distill.dm import class_mean_distances
from ddfast.distill.training.augment import DSA
from ddfast.distill.training.models import ConvNet

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = {"batched": True, "per-class": False}  # class_mean_distances(batched=...)
CLASSES = 10
MEMORY_CPU = ("peak resident set size (VmHWM) during the first timed iteration minus the resident set size right before it, "
              "both paths in this process, each after its own warm-up iteration, glibc's free heap returned before (malloc_trim)")


def dm_iteration(device: torch.device, ipc: int, real_per_class: int, batched: bool):
    """One DM iteration on random MNIST-shaped data: a callable that runs it (images updated in place)."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(CLASSES, real_per_class, 1, 28, 28, generator=generator).to(device)
    images = torch.randn(CLASSES * ipc, 1, 28, 28, generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.SGD([images], lr=1.0, momentum=0.5)
    dsa = DSA()

    def iteration() -> None:
        network = ConvNet(1, CLASSES, 28).to(device).requires_grad_(False)
        reals, syns = [], []
        for c in range(CLASSES):
            draw = dsa.match_draw(max(real_per_class, ipc), 28, 28)
            reals.append(dsa.apply(real[c], draw))
            syns.append(dsa.apply(images[c * ipc : (c + 1) * ipc], draw))
        optimizer.zero_grad()
        class_mean_distances(network, reals, syns, batched=batched).backward()
        optimizer.step()

    return iteration


def measure(device: torch.device, *, ipc: int = 10, real_per_class: int = 64) -> dict:
    """Per path: median seconds per iteration after one warm-up (``harness.measure``) and peak bytes; the ratio."""
    rows = {}
    for name, batched in PATHS.items():
        iteration = dm_iteration(device, ipc, real_per_class, batched)
        iteration()
        timed = harness.measure(iteration, device)
        rows[name] = {"s_per_iteration": timed["median_ms"] / 1000, "peak_bytes": timed["peak_bytes"], "reps": timed["reps"]}
    return {"dm": {**rows, "ratio": rows["batched"]["s_per_iteration"] / rows["per-class"]["s_per_iteration"],
                   "default": "batched" if device.type == "cuda" else "per-class",
                   "settings": {"ipc": ipc, "real_per_class": real_per_class, "dsa": True}}}


def table(loops: dict) -> str:
    lines = [f"{'method':<6} {'path':<10} {'s / iteration':>14} {'peak MiB':>9}"]
    for method, entry in loops.items():
        for path in PATHS:
            row = entry[path]
            peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
            lines.append(f"{method:<6} {path:<10} {row['s_per_iteration']:>14.3f} {peak:>9}")
        lines.append(f"{method:<6} ratio (batched / per-class) {entry['ratio']:.2f}; ddfast's default here: {entry['default']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    p.add_argument("--real", type=int, default=64, help="real images per class and iteration (default 64)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if min(args.ipc, args.real) < 1:
        p.error("--ipc and --real must be >= 1")
    device = torch.device(args.device)
    loops = measure(device, ipc=args.ipc, real_per_class=args.real)
    print(table(loops))
    stem = args.out / f"{machine.slug(device)}-{datetime.date.today().isoformat()}-loops"
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "seconds per distillation iteration and peak memory, batched over classes against one pass per class and side",
           "time": harness.describe(device)["time"],
           "memory": harness.describe(device)["memory"] if device.type == "cuda" else MEMORY_CPU,
           "hardware": machine.hardware(device), "software": machine.software(), "git": machine.git(Path(__file__).resolve().parents[1]),
           "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "loops": loops}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    _plot(loops, stem.with_suffix(".png"), doc["hardware"].get("gpu") or doc["hardware"]["cpu"])
    print(f"wrote {stem}.json and .png")
    return 0


def _plot(loops: dict, path: Path, hardware: str) -> None:
    methods, width = list(loops), 0.8 / len(PATHS)
    with report.figure(path) as ax:
        for i, name in enumerate(PATHS):
            ax.bar([m + i * width for m in range(len(methods))], [loops[m][name]["s_per_iteration"] for m in methods], width, label=name)
        ax.set_xticks([m + width * (len(PATHS) - 1) / 2 for m in range(len(methods))], methods)
        ax.set(ylabel="seconds per iteration", title=f"distillation iterations\n{hardware}")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
