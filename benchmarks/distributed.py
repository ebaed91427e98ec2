"""Bytes a sharded ``infonce`` call communicates, against gathering the keys and against a ring, and
its gloo wall time on 2 CPU processes against one process.

    python benchmarks/distributed.py [--time-size 256,16384,256] [--repeats 3]

Bytes are per rank, per call (forward and backward, gradients for queries and keys), counted as
``ddfast.ops._distributed`` counts them: the sizes of the tensors handed to the collectives (an
all-gather's whole output); an algorithm's own factor (a ring all-reduce moves about twice its
tensor) comes on top of every column alike. The table comes from the formulas below, which two
gloo processes check against the counter at a small size. Writes
``results/<device>-<date>-distributed.json`` and prints the table.

- ``ddfast``: a max all-reduce (N + 1 values) and a sum all-reduce (3 N) forward, the query gradient
  (N D + 1) backward, and the metadata all-gather (R x 11 int64); the sharded layout also gathers
  the queries (N D) and their labels (N int64).
- ``all-gather keys``: every rank gathers the keys (M D) and their labels (M int64), then
  reduce-scatters their gradient (M D).
- ``ring`` (Inf-CL style): each rank's key block (M / R rows) travels around the ring, R - 1 hops,
  with its labels, in the forward; in the backward the blocks travel again with their gradient.
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

if __package__ in (None, ""):  # run as ``python benchmarks/distributed.py``: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import device as machine
from ddfast import infonce
from ddfast.ops import _distributed
from ddfast.ops.infonce.distributed import FIELDS
from tests.distributed_support import free_port

RESULTS = Path(__file__).resolve().parent / "results"
ACC, LABEL = 4, 8  # bytes of a float32 statistic and of an int64 label
SIZES = {"N": 1000, "D": 512, "M": (50_000, 1_000_000), "R": (2, 8)}


def ddfast_bytes(n: int, d: int, ranks: int, layout: str = "replicated", element: int = 4) -> int:
    """Per rank and call, labelled positives, float32 accumulation; N: all queries (equal shards when sharded)."""
    total = ranks * (1 + len(FIELDS)) * LABEL + (n + 1) * ACC + 3 * n * ACC + (n * d + 1) * ACC
    if layout == "sharded":
        total += n * d * element + n * LABEL
    return total


def gathered_keys_bytes(m: int, d: int, element: int = 4) -> int:
    return m * d * element + m * LABEL + m * d * element


def ring_bytes(m: int, d: int, ranks: int, element: int = 4) -> float:
    hops = (ranks - 1) * m / ranks  # rows each rank receives, once around the ring
    return hops * (d * element + LABEL) + hops * 2 * d * element


def table() -> list[dict]:
    """The bytes per rank and call at ``SIZES``, from the formulas."""
    n, d = SIZES["N"], SIZES["D"]
    return [{"N": n, "M": m, "D": d, "R": r, "ddfast_replicated": ddfast_bytes(n, d, r), "ddfast_sharded": ddfast_bytes(n, d, r, "sharded"),
             "all_gather_keys": gathered_keys_bytes(m, d), "ring": ring_bytes(m, d, r)}
            for m in SIZES["M"] for r in SIZES["R"]]


def _size(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def markdown(rows: list[dict]) -> str:
    lines = ["| N | M | D | R | ddfast, queries replicated | ddfast, queries sharded | all-gather of keys | ring |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['M']:,} | {r['D']} | {r['R']} | {_size(r['ddfast_replicated'])} | {_size(r['ddfast_sharded'])} | "
              f"{_size(r['all_gather_keys'])} | {_size(r['ring'])} |" for r in rows]
    return "\n".join(lines)


def _data(n: int, m: int, d: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen),
            torch.randint(0, 10, (n,), generator=gen), torch.randint(0, 10, (m,), generator=gen))


def _call(query, key, query_labels, key_labels, **options) -> None:
    query = query.detach().requires_grad_()
    key = key.detach().requires_grad_()
    infonce(query, key, query_labels, key_labels, temperature=0.1, **options).backward()


def _shard(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return x.tensor_split(size)[rank]


def bytes_counted(rank: int, size: int, backend: str = "auto") -> dict:
    """Bytes the counter saw for one small call in each layout (they do not depend on ``backend``)."""
    n, m, d = 8 * size, 24, 16
    query, key, query_labels, key_labels = _data(n, m, d)
    counted = {}
    for layout in ("replicated", "sharded"):
        q, ql = (query, query_labels) if layout == "replicated" else (_shard(query, rank, size), _shard(query_labels, rank, size))
        with _distributed.count_bytes() as moved:
            _call(q, _shard(key, rank, size), ql, _shard(key_labels, rank, size), group=dist.group.WORLD, queries=layout,
                  backend=backend)
        counted[layout] = {"counted": moved[0], "formula": ddfast_bytes(n, d, size, layout), "N": n, "M": m, "D": d}
    return counted


def _timed(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up (and builds the CPU kernels)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _rank(rank: int, size: int, port: int, shape: tuple[int, int, int], repeats: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=300))
    counts = bytes_counted(rank, size)
    query, key, query_labels, key_labels = _data(*shape)
    mine = (_shard(key, rank, size), _shard(key_labels, rank, size))
    seconds = _timed(lambda: _call(query, mine[0], query_labels, mine[1], group=dist.group.WORLD), repeats, dist.barrier)
    if rank == 0:
        results.put({"counted": counts, "seconds": seconds})
    dist.destroy_process_group()


def measure(shape: tuple[int, int, int], repeats: int, size: int = 2) -> dict:
    """The counter check and the wall time of ``size`` gloo processes (one thread each) and of this
    process (one thread, and all threads) on one forward + backward at ``shape`` = (N, M, D), float32, labelled."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_rank, args=(size, free_port(), shape, repeats, results), nprocs=size, start_method="spawn")
    sharded = results.get()
    threads, one = torch.get_num_threads(), {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        one[count] = _timed(lambda: _call(*_data(*shape)), repeats)
    torch.set_num_threads(threads)
    return {"shape": dict(zip("NMD", shape)), "processes": size, "threads_per_process": 1, "sharded_seconds": sharded["seconds"],
            "one_process_seconds_by_threads": one, "counter_check": sharded["counted"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--time-size", default="256,16384,256", help="N,M,D of the timed call (default 256,16384,256)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (default 3)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.time_size.split(","))
    rows = table()
    print(markdown(rows))
    timing = measure(shape, args.repeats)
    for layout, check in timing["counter_check"].items():
        verdict = "matches" if check["counted"] == check["formula"] else "DIFFERS from"
        print(f"counter, {layout} queries, N={check['N']} M={check['M']} D={check['D']} on 2 ranks: {check['counted']} bytes, "
              f"{verdict} the formula ({check['formula']})")
    one = ", ".join(f"one process x {count} thread{'s' * (count > 1)} {seconds:.3f} s"
                    for count, seconds in timing["one_process_seconds_by_threads"].items())
    print(f"gloo, N={shape[0]} M={shape[1]} D={shape[2]} float32, forward + backward (median of {args.repeats}): "
          f"2 processes x 1 thread {timing['sharded_seconds']:.3f} s, {one}; load average {os.getloadavg()[0]:.1f}")
    device = torch.device("cpu")
    stem = args.out / f"{machine.slug(device)}-{datetime.date.today().isoformat()}-distributed"
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "bytes per rank and call of sharded infonce; gloo wall time", "bytes": rows, "timing": timing,
           "hardware": machine.hardware(device), "software": machine.software(), "git": machine.git(Path(__file__).resolve().parents[1]),
           "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {stem}.json")
    return 0 if all(c["counted"] == c["formula"] for c in timing["counter_check"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
