"""Seconds per distillation iteration and peak memory, per method: ddfast's path against one that mirrors
the reference code's structure, in one run.

    python benchmarks/loops.py [--device cpu] [--ipc 10] [--real 64] [--steps 10] [--methods dm dsa mtt bptt]

Each method's iteration runs the library's own loss code on random MNIST-shaped data (10 classes, a
ConvNet of width 128 and depth 3, DSA on): DM (a fresh network, the class-mean embedding distance of
``--real`` real and ``--ipc`` synthetic images per class, the image update), DSA (gradient matching:
two outer steps on a fresh network with five inner epochs between them, as the quick preset runs
it), MTT (``--steps`` unrolled student steps on all synthetic images, ``trajectory_mse`` against a
target, the backward pass) and BPTT (``--steps`` unrolled steps from a fresh network, the
cross-entropy on 32 real images per class). Paths:

- ``reference``: one eager, contiguous (NCHW) pass per class and side, float32, as the reference code;
- ``ddfast``: the default speed settings (``ddfast.distill.training.speed``: compiled network calls,
  channels-last on the CPU, compiled parameter gradients of first and second order, DM batched over
  classes on CUDA), float32, the same values to rounding;
- ``bfloat16``: the same with ``speed.precision=bfloat16`` (opt-in; values change).

The first iteration of each path (compilation included) is reported apart and not timed; the paths'
later iterations run in turn, round after round, so that a shared machine's drift reaches them alike.
Writes ``results/<device>-<date>-loops.{json,png}`` and prints a table; ``benchmarks/run.py`` records
the same figures under ``loops``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/loops.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402

import torch
import torch.nn.functional as F

from benchmarks import device as machine
from benchmarks import harness, report
from ddfast.distill.dc import matching_loss
from ddfast.distill.dm import class_mean_distances
from ddfast.distill.training.augment import DSA
from ddfast.distill.training.loop import train_network
from ddfast.distill.training.models import ConvNet
from ddfast.distill.training.speed import FastNetwork, SpeedConfig
from ddfast.distill.unroll import Student
from ddfast.ops.trajectory_mse import trajectory_mse

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = {"reference": None, "ddfast": SpeedConfig(), "bfloat16": SpeedConfig(precision="bfloat16")}
METHODS = ("dm", "dsa", "mtt", "bptt")
CLASSES = 10
TIME = ("median wall-clock seconds of an iteration after the first, the paths called in turn for at least {reps} rounds "
        "(synchronised on CUDA)")
MEMORY_CPU = ("peak resident set size (VmHWM) during one iteration minus the resident set size right before it, "
              "all paths in this process, each after its own first iteration, glibc's free heap returned before (malloc_trim)")


def _data(device: torch.device, ipc: int, real_per_class: int):
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(CLASSES, real_per_class, 1, 28, 28, generator=generator).to(device)
    images = torch.randn(CLASSES * ipc, 1, 28, 28, generator=generator).to(device).requires_grad_(True)
    return real, images, torch.optim.SGD([images], lr=1.0, momentum=0.5)


def _network(device: torch.device) -> torch.nn.Module:
    return ConvNet(1, CLASSES, 28).to(device)


def dm_iteration(device: torch.device, speed: SpeedConfig | None, *, ipc: int, real_per_class: int, steps: int):
    """One DM iteration (images updated in place) as a callable."""
    real, images, optimizer = _data(device, ipc, real_per_class)
    dsa, fast = DSA(), None

    def iteration() -> None:
        nonlocal fast
        network = _network(device).requires_grad_(False)
        fast = fast or (FastNetwork(network, speed, device) if speed else None)
        reals, syns = [], []
        for c in range(CLASSES):
            draw = dsa.match_draw(max(real_per_class, ipc), 28, 28)
            reals.append(dsa.apply(real[c], draw))
            syns.append(dsa.apply(images[c * ipc : (c + 1) * ipc], draw))
        optimizer.zero_grad()
        class_mean_distances(network, reals, syns, batched=None if speed else False, fast=fast).backward()
        optimizer.step()

    return iteration


def dsa_iteration(device: torch.device, speed: SpeedConfig | None, *, ipc: int, real_per_class: int, steps: int):
    """One DSA iteration of the quick preset: two outer matching steps, five inner epochs between them."""
    real, images, optimizer = _data(device, ipc, real_per_class)
    labels = torch.arange(CLASSES, device=device).repeat_interleave(ipc)
    dsa, fast = DSA(), None

    def iteration() -> None:
        nonlocal fast
        network = _network(device)
        fast = fast or (FastNetwork(network, speed, device) if speed else None)
        for outer in range(2):
            pairs = [dsa.match(real[c], images[c * ipc : (c + 1) * ipc]) for c in range(CLASSES)]
            optimizer.zero_grad()
            matching_loss(network, [r for r, _ in pairs], [s for _, s in pairs], fast=fast).backward(inputs=[images])
            optimizer.step()
            if outer == 0:
                train_network(network, images.detach(), labels, epochs=5, lr=0.01, momentum=0.0, weight_decay=0.0, dsa=dsa,
                              decay_at_half=False)

    return iteration


def _student(device, speed, ipc):
    labels = torch.arange(CLASSES, device=device).repeat_interleave(ipc)
    template = _network(device)
    return Student(template, labels, dsa=DSA(), fast=FastNetwork(template, speed, device) if speed else None)


def mtt_iteration(device: torch.device, speed: SpeedConfig | None, *, ipc: int, real_per_class: int, steps: int):
    """One MTT iteration: ``steps`` unrolled student steps, the normalised distance to a target, the backward pass."""
    _, images, optimizer = _data(device, ipc, real_per_class)
    student = _student(device, speed, ipc)
    start = [p.detach() for p in _network(device).parameters()]
    target = [p + 0.01 * torch.randn_like(p) for p in start]
    lr = torch.tensor(0.01, device=device, requires_grad=True)

    def iteration() -> None:
        final = student.train(start, images, lr, student.plan(steps, images.shape))
        optimizer.zero_grad()
        trajectory_mse(final, start, target).backward(inputs=[images, lr])
        optimizer.step()

    return iteration


def bptt_iteration(device: torch.device, speed: SpeedConfig | None, *, ipc: int, real_per_class: int, steps: int):
    """One BPTT iteration: ``steps`` unrolled steps from a fresh network, the cross-entropy on 32 real images per class."""
    real, images, optimizer = _data(device, ipc, min(real_per_class, 32))
    student = _student(device, speed, ipc)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    real_labels = torch.arange(CLASSES, device=device).repeat_interleave(real.shape[1])
    dsa = DSA()

    def iteration() -> None:
        start = [p.detach() for p in _network(device).parameters()]
        final = student.train(start, images, lr, student.plan(steps, images.shape))
        optimizer.zero_grad()
        F.cross_entropy(student.logits(final, dsa(real.flatten(0, 1))), real_labels).backward(inputs=[images, lr])
        optimizer.step()

    return iteration


ITERATIONS = {"dm": dm_iteration, "dsa": dsa_iteration, "mtt": mtt_iteration, "bptt": bptt_iteration}


def measure(device: torch.device, *, ipc: int = 10, real_per_class: int = 64, steps: int = 10, methods=METHODS,
            reps: int = 5) -> dict:
    """Per method and path: the first iteration's seconds, the median seconds per iteration after it (the paths
    called in turn, ``reps`` rounds at least: ``harness.interleaved_ms``) and the peak bytes of one iteration; per
    method the ratios to the reference path."""
    out = {}
    for method in methods:
        iterations, rows, timed_first = {}, {}, {}
        for name, speed in PATHS.items():
            torch.manual_seed(0)
            iteration = iterations[name] = ITERATIONS[method](device, speed, ipc=ipc, real_per_class=real_per_class, steps=steps)
            start = time.perf_counter()
            iteration()
            first = time.perf_counter() - start
            seconds = []  # the iteration measured for memory is also the first timed one
            peak = harness.peak_bytes(lambda it=iteration, out=seconds: out.append(harness.wall_ms(it, device)), device)
            timed_first[name] = seconds
            rows[name] = {"first_iteration_s": first, "peak_bytes": peak}
        for name, timed in harness.interleaved_ms(iterations, device, reps, timed_first).items():
            rows[name] = {"s_per_iteration": timed["median_ms"] / 1000, **rows[name], "reps": timed["reps"]}
        reference = rows["reference"]["s_per_iteration"]
        out[method] = {**rows, "ratio": {name: rows[name]["s_per_iteration"] / reference for name in PATHS if name != "reference"},
                       "settings": {"ipc": ipc, "real_per_class": real_per_class, "steps": steps, "dsa": True}}
    return out


def table(loops: dict) -> str:
    lines = [f"{'method':<6} {'path':<10} {'s / iteration':>14} {'first s':>8} {'peak MiB':>9} {'x reference':>12}"]
    for method, entry in loops.items():
        for path in PATHS:
            row = entry[path]
            peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
            ratio = f"{entry['ratio'][path]:.2f}" if path in entry["ratio"] else "1"
            lines.append(f"{method:<6} {path:<10} {row['s_per_iteration']:>14.3f} {row['first_iteration_s']:>8.1f} {peak:>9} {ratio:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    p.add_argument("--real", type=int, default=64, help="real images per class and iteration (default 64)")
    p.add_argument("--steps", type=int, default=10, help="unrolled student steps of MTT and BPTT (default 10)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--reps", type=int, default=5, help="timed rounds of the paths at least (default 5)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if min(args.ipc, args.real, args.steps, args.reps) < 1:
        p.error("--ipc, --real, --steps and --reps must be >= 1")
    device = torch.device(args.device)
    loops = measure(device, ipc=args.ipc, real_per_class=args.real, steps=args.steps, methods=args.methods, reps=args.reps)
    print(table(loops))
    stem = args.out / f"{machine.slug(device)}-{datetime.date.today().isoformat()}-loops"
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "seconds per distillation iteration and peak memory per method: ddfast's paths against the reference code's structure",
           "time": TIME.format(reps=args.reps),
           "memory": harness.describe(device)["memory"] if device.type == "cuda" else MEMORY_CPU,
           "hardware": machine.hardware(device), "software": machine.software(), "git": machine.git(Path(__file__).resolve().parents[1]),
           "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "loops": loops}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    _plot(loops, stem.with_suffix(".png"), doc["hardware"].get("gpu") or doc["hardware"]["cpu"])
    print(f"wrote {stem}.json and .png")
    return 0


def _plot(loops: dict, path: Path, hardware: str) -> None:
    """Seconds per iteration relative to the reference path, per method (log scale: methods differ by 20x)."""
    methods, width = list(loops), 0.8 / len(PATHS)
    with report.figure(path) as ax:
        for i, name in enumerate(PATHS):
            ax.bar([m + i * width for m in range(len(methods))], [loops[m][name]["s_per_iteration"] for m in methods], width, label=name)
        ax.set_xticks([m + width * (len(PATHS) - 1) / 2 for m in range(len(methods))], methods)
        ax.set_yscale("log")
        ax.set(ylabel="seconds per iteration", title=f"distillation iterations\n{hardware}")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
