"""Seconds per distillation iteration and peak memory, per method: ddfast's path against one that mirrors
the reference code's structure, in one run.

    python benchmarks/loops.py [--device cpu] [--ipc 10] [--real 64] [--steps 10] [--methods dm dsa mtt bptt] [--same-allocator]

Each method's iteration runs the library's own loss code on random MNIST-shaped data (10 classes, a
ConvNet of width 128 and depth 3, DSA on): DM (a fresh network, the class-mean embedding distance of
``--real`` real and ``--ipc`` synthetic images per class, the image update), DSA (gradient matching:
two outer steps on a fresh network with five inner epochs between them, as the quick preset runs
it), MTT (``--steps`` unrolled student steps on all synthetic images, ``trajectory_mse`` against a
target, the backward pass) and BPTT (``--steps`` unrolled steps from a fresh network, the
cross-entropy on 32 real images per class). Paths:

- ``reference``: one eager, contiguous (NCHW) pass per class and side, float32, glibc's allocator
  defaults: the reference code's structure (the reference scripts themselves can run faster or slower
  than this path: glibc's heap after loading a dataset serves their large buffers differently; README
  reports them timed beside it);
- ``ddfast``: the default speed settings (``ddfast.distill.training.speed``: compiled network calls,
  compiled parameter gradients of first and second order, also for gradient matching's inner epochs,
  DM batched over classes on CUDA) and freed memory kept in the process (``keep_freed_memory``, as
  ddfast's command line), float32, the same values to rounding;
- ``bfloat16``: the same with ``speed.precision=bfloat16`` (opt-in; values change).

Each path runs in a process of its own. The first iteration of each path (compilation included) is
reported apart and not timed; the paths' later iterations run in turn, round after round, so that a
shared machine's drift reaches them alike. ``--same-allocator`` runs the reference path with
``keep_freed_memory`` too (the allocator's share of the ratio).
Writes ``results/<device>-<date>-loops[-same-allocator].{json,png}`` and prints a table; ``benchmarks/run.py`` records
the same figures under ``loops``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/loops.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402

import torch
import torch.nn.functional as F

from benchmarks import device as machine
from benchmarks import harness, report
from ddfast.distill.allocator import keep_freed_memory
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
MEMORY_CPU = ("peak resident set size (VmHWM) during one iteration minus the resident set size right before it, in the path's "
              "own process after its first iteration, glibc's free heap returned before (malloc_trim)")


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
                              decay_at_half=False, fast=fast)

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
            reps: int = 5, same_allocator: bool = False) -> dict:
    """Per method and path: the first iteration's seconds, the median seconds per iteration after it (the paths
    called in turn, ``reps`` rounds at least: ``harness.interleaved_ms``) and the peak bytes of one iteration; per
    method the ratios to the reference path.

    Each path runs in a process of its own, with the allocator it runs with in practice: the reference path with
    glibc's defaults (as the reference scripts), ddfast's paths keeping freed memory (``keep_freed_memory``, as
    ddfast's command line does); ``same_allocator`` gives the reference path ddfast's setting too."""
    settings = {"ipc": ipc, "real_per_class": real_per_class, "steps": steps}
    workers = {name: PathWorker(name, device, settings, keep_memory=name != "reference" or same_allocator) for name in PATHS}
    out = {}
    try:
        for method in methods:
            rows, timed_first = {}, {}
            for name, worker in workers.items():
                first, peak, timed_first[name] = worker.build(method)
                rows[name] = {"first_iteration_s": first, "peak_bytes": peak}
            timed = harness.interleaved_ms({name: worker.run for name, worker in workers.items()}, torch.device("cpu"), reps, timed_first)
            for name, figures in timed.items():
                rows[name] = {"s_per_iteration": figures["median_ms"] / 1000, **rows[name], "reps": figures["reps"]}
            reference = rows["reference"]["s_per_iteration"]
            out[method] = {**rows, "ratio": {name: rows[name]["s_per_iteration"] / reference for name in PATHS if name != "reference"},
                           "settings": {**settings, "dsa": True},
                           "allocator": {name: "keep_freed_memory" if worker.keep_memory else "glibc defaults"
                                         for name, worker in workers.items()}}
    finally:
        for worker in workers.values():
            worker.close()
    return out


class PathWorker:
    """One path's iterations in a process of its own (spawned): ``build(method)`` makes and warms up its iteration,
    ``run()`` runs one (synchronised on CUDA) and returns when it is done."""

    def __init__(self, path: str, device: torch.device, settings: dict, *, keep_memory: bool):
        self.path, self.keep_memory = path, keep_memory
        spawn = multiprocessing.get_context("spawn")
        self._conn, child = spawn.Pipe()
        self._process = spawn.Process(target=_serve, args=(child, path, str(device), settings, keep_memory), daemon=True)
        self._process.start()

    def build(self, method: str) -> tuple[float, int | None, list[float]]:
        """The first iteration's seconds, the peak bytes of the second one and its milliseconds (as a list)."""
        return self._ask("build", method)

    def run(self) -> float:
        return self._ask("run")

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(("stop", None))
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    def _ask(self, command: str, method: str | None = None):
        self._conn.send((command, method))
        try:
            ok, answer = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.path} path's process ended (exit code {self._process.exitcode})") from None
        if not ok:
            raise RuntimeError(f"the {self.path} path failed:\n{answer}")
        return answer


def _serve(conn, path: str, device: str, settings: dict, keep_memory: bool) -> None:
    """A ``PathWorker``'s process: answers (ok, result) or (False, traceback) to each command until ``stop``."""
    if keep_memory:
        keep_freed_memory()
    device, iteration = torch.device(device), None
    while True:
        command, method = conn.recv()
        if command == "stop":
            return
        try:
            if command == "build":
                torch.manual_seed(0)
                iteration = ITERATIONS[method](device, PATHS[path], **settings)
                start = time.perf_counter()
                iteration()
                first = time.perf_counter() - start
                seconds = []  # the iteration measured for memory is also the first timed one
                peak = harness.peak_bytes(lambda: seconds.append(harness.wall_ms(iteration, device)), device)
                conn.send((True, (first, peak, seconds)))
            else:
                conn.send((True, harness.wall_ms(iteration, device)))
        except Exception:
            conn.send((False, traceback.format_exc()))


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
    p.add_argument("--same-allocator", action="store_true",
                   help="run the reference path with ddfast's allocator setting too (keep_freed_memory; default: glibc's defaults)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if min(args.ipc, args.real, args.steps, args.reps) < 1:
        p.error("--ipc, --real, --steps and --reps must be >= 1")
    device = torch.device(args.device)
    loops = measure(device, ipc=args.ipc, real_per_class=args.real, steps=args.steps, methods=args.methods, reps=args.reps,
                    same_allocator=args.same_allocator)
    print(table(loops))
    stem = args.out / f"{machine.slug(device)}-{datetime.date.today().isoformat()}-loops{'-same-allocator' if args.same_allocator else ''}"
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
    """Seconds per iteration per method and path, each bar of ddfast's paths labelled with its ratio to the reference path
    (log scale: methods differ by 20x)."""
    methods, width = list(loops), 0.8 / len(PATHS)
    with report.figure(path) as ax:
        for i, name in enumerate(PATHS):
            bars = ax.bar([m + i * width for m in range(len(methods))], [loops[m][name]["s_per_iteration"] for m in methods], width,
                          label=name)
            if name != "reference":
                ax.bar_label(bars, [f"{loops[m]['ratio'][name]:.2f}x" for m in methods], fontsize=7)
        ax.set_xticks([m + width * (len(PATHS) - 1) / 2 for m in range(len(methods))], methods)
        ax.set_yscale("log")
        ax.set(ylabel="seconds per iteration", title=f"distillation iterations\n{hardware}")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
