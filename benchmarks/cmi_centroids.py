"""Time and peak memory of one refresh of CMI's real-data centroids (``cmi.centroids=real``).

    python benchmarks/cmi_centroids.py [--dataset mnist] [--features logits embed] [--chunk 1024] [--repeats 1] [--limit N]

A refresh is ``CMIRegularizer.real_centroids``: the frozen network over the whole real training split
(the quick preset's split: the training set less 100 validation images per class) in batches of
``--chunk`` images, without gradients, each batch's softmaxes folded into per-class centroids
(``ddfast.ops.cmi.ClassCentroids``). The network is the default ConvNet (width 128, depth 3) at its
seeded initialisation: the time does not depend on its weights. Peak memory is that of the first
timed refresh above the memory in use before it (``harness.peak_bytes``); beside the wall-clock time
the process CPU time (all threads), which a machine shared with other jobs inflates less. Writes
``results/<device>-<date>-cmi-centroids.json`` and prints a line per feature space.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/cmi_centroids.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402

import torch

from benchmarks import device as machine
from benchmarks import harness
from ddfast.distill.cmi_regularizer import FEATURES, CMIConfig, CMIRegularizer
from ddfast.distill.training.data import Split, load
from ddfast.distill.training.models import ModelSpec

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_VAL_PER_CLASS = 100  # the quick preset's validation split


def refresh_cost(features: str, train: Split, num_classes: int, chunk: int, repeats: int, device: torch.device) -> dict:
    """Seconds per refresh (median of ``repeats``) and the first refresh's peak memory, for one feature space."""
    torch.manual_seed(0)
    channels, size = train.images.shape[1], train.images.shape[-1]
    network = ModelSpec().build(channels, num_classes, size).to(device).eval().requires_grad_(False)
    reg = CMIRegularizer([network], CMIConfig(weight=1.0, features=features, centroids="real"), num_classes, train, chunk=chunk)
    warm = CMIRegularizer([network], reg.config, num_classes, train.subset(torch.arange(min(chunk, len(train)), device=device)), chunk=chunk)
    try:
        warm.real_centroids(network)  # kernels loaded or built, allocator primed
    except ValueError:
        pass  # a first batch without every class: warmed all the same
    seconds, cpu_seconds, columns = [], [], []

    def refresh():
        start, cpu = time.perf_counter(), time.process_time()
        columns.append(reg.real_centroids(network).shape[1])
        harness.synchronize(device)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu)

    peak = harness.peak_bytes(refresh, device)  # the first timed refresh
    while len(seconds) < repeats:
        refresh()
    return {"features": features, "images": len(train), "columns": columns[0], "chunk": chunk, "repeats": len(seconds),
            "seconds": statistics.median(seconds), "all_seconds": seconds, "cpu_seconds": statistics.median(cpu_seconds),
            "images_per_second": len(train) / statistics.median(seconds),
            "peak_mib": None if peak is None else peak / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", help="data root (default: $DDFAST_DATA_ROOT, else ~/.cache/ddfast/data)")
    p.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES), help="feature spaces (default: both)")
    p.add_argument("--chunk", type=int, default=1024, help="images per batch of the pass (default 1024, the regulariser's)")
    p.add_argument("--repeats", type=int, default=1, help="timed refreshes per feature space (default 1)")
    p.add_argument("--limit", type=int, help="use only N random training images (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.chunk < 1 or args.repeats < 1 or (args.limit is not None and args.limit < 1):
        p.error("--chunk, --repeats and --limit must be >= 1")
    device = torch.device(args.device)
    data = load(args.dataset, args.data_root, val_per_class=QUICK_VAL_PER_CLASS)
    if args.limit is None:
        train = data.train
    else:
        train = data.train.subset(torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[: args.limit])
    train = train.to(device)
    rows = []
    for features in args.features:
        row = refresh_cost(features, train, data.info.num_classes, args.chunk, args.repeats, device)
        rows.append(row)
        peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"
        print(f"{features:>6} (K={row['columns']}): {row['seconds']:.2f} s per refresh of {row['images']} images "
              f"({row['images_per_second']:.0f} images/s; {row['cpu_seconds']:.2f} s of process CPU time), peak {peak} above the start",
              flush=True)
    stem = args.out / f"{machine.slug(device)}-{datetime.date.today().isoformat()}-cmi-centroids"
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "one refresh of CMI's real-data centroids (default ConvNet over the real training split)", "dataset": data.info.name,
           "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "hardware": machine.hardware(device),
           "software": machine.software(),
           "git": machine.git(Path(__file__).resolve().parents[1]), "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
