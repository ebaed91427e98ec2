"""Peak memory of one MTT iteration (unrolled student, fwd + bwd) in both memory modes against syn_steps.

    python benchmarks/unroll_memory.py [--steps 10 20 40] [--ipc 10] [--device cpu]

The student is the ConvNet on MNIST-shaped images (the whole synthetic set each step, DSA on). Each
(mode, steps) case runs in a fresh process on the CPU (peak resident set above the start, see
``harness.peak_bytes``) and in this process on CUDA (peak allocated). Writes
``results/<device>-<date>-unroll-memory.{json,png}`` and prints a table: the ``standard`` mode keeps
every step's graph and grows with the steps, the ``constant`` mode stays flat.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import queue as queue_module
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/unroll_memory.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402

import torch

from benchmarks import device as machine
from benchmarks import harness, report
from ddfast import trajectory_mse
from ddfast.distill.training.augment import DSA
from ddfast.distill.training.models import ConvNet
from ddfast.distill.unroll import MODES, Student

RESULTS = Path(__file__).resolve().parent / "results"


def peak(mode: str, steps: int, ipc: int, device: str) -> int:
    """Peak bytes of one MTT iteration with ``steps`` student steps in memory ``mode``."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = ConvNet(1, 10, 28).to(dev)
    student = Student(model, torch.arange(10, device=dev).repeat_interleave(ipc), dsa=DSA())
    images = torch.randn(10 * ipc, 1, 28, 28, device=dev, requires_grad=True)
    lr = torch.tensor(0.01, device=dev, requires_grad=True)
    start = [p.detach().clone() for p in model.parameters()]
    target = [p + 0.01 * torch.randn_like(p) for p in start]
    plan = student.plan(steps, images.shape)

    def iteration():
        loss = trajectory_mse(student.train(start, images, lr, plan, mode), start, target)
        loss.backward()

    iteration()  # warm-up: kernels loaded, allocator primed
    return harness.peak_bytes(iteration, dev)


def _child(args, queue) -> None:
    queue.put(peak(*args))


def isolated(mode: str, steps: int, ipc: int, device: str) -> int | None:
    """``peak`` in a fresh process on the CPU (None when that process dies, e.g. out of memory)."""
    if device != "cpu":
        try:
            return peak(mode, steps, ipc, device)
        except torch.OutOfMemoryError:
            return None
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=((mode, steps, ipc, device), queue))
    process.start()
    while process.is_alive() or not queue.empty():
        try:
            value = queue.get(timeout=1)
        except queue_module.Empty:
            continue
        process.join()
        return value
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40], help="syn_steps values (default 10 20 40)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if any(s < 1 for s in args.steps) or args.ipc < 1:
        p.error("--steps and --ipc must be >= 1")
    device = torch.device(args.device)
    rows = []
    for mode in MODES:
        for steps in args.steps:
            peak_bytes = isolated(mode, steps, args.ipc, args.device)
            mib = None if peak_bytes is None else peak_bytes / 2**20
            rows.append({"mode": mode, "syn_steps": steps, "peak_mib": mib})
            print(f"{mode:>9} syn_steps {steps:>4}: " + ("failed (out of memory?)" if mib is None else f"peak {mib:9.1f} MiB"), flush=True)
    stem = args.out / f"{machine.slug(device)}-{datetime.date.today().isoformat()}-unroll-memory"
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "peak memory of one MTT iteration (ConvNet, MNIST shape, DSA, fwd + bwd)", "ipc": args.ipc,
           "memory": harness.describe(device)["memory"], "hardware": machine.hardware(device), "software": machine.software(),
           "git": machine.git(Path(__file__).resolve().parents[1]), "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    _plot(rows, stem.with_suffix(".png"), doc["hardware"].get("gpu") or doc["hardware"]["cpu"])
    print(f"wrote {stem}.json and .png")
    return 0


def _plot(rows: list[dict], path: Path, hardware: str) -> None:
    with report.figure(path) as ax:
        for mode in MODES:
            points = [(r["syn_steps"], r["peak_mib"]) for r in rows if r["mode"] == mode and r["peak_mib"] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=mode)
        ax.set(xlabel="syn_steps", ylabel="peak memory (MiB)", title=f"MTT iteration memory\n{hardware}", ylim=(0, None))
        ax.legend()

if __name__ == "__main__":
    sys.exit(main())
