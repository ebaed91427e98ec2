"""The sharded operations (``group=``) on 2 and 3 gloo processes against one process's float64
reference on the concatenated shards: values and every gradient. Each rank checks its own results."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from distributed_support import RankFailed, Ranks
from ops_support import assert_close

from benchmarks.distributed import bytes_counted
from ddfast import cmi_loss, infonce, trajectory_mse
from ddfast.ops import _distributed
from ddfast.ops.cmi.reference import cmi_reference
from ddfast.ops.infonce import reference as infonce_reference
from ddfast.ops.trajectory_mse import reference as trajectory_reference

BACKEND = "torch"  # the streaming kernels: nothing to compile while the peers wait in a collective


@pytest.fixture(scope="module")
def ranks():
    """``ranks(size)``: the module's processes of a ``size``-rank group (started again after a failure)."""
    started: dict[int, Ranks] = {}

    def get(size: int) -> Ranks:
        if size not in started or started[size].closed:
            started[size] = Ranks(size)
        return started[size]

    yield get
    for group in started.values():
        group.close()


TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def shard_sizes(total: int, size: int) -> list[int]:
    """Uneven positive shard sizes summing to ``total`` (the last rank gets the rest)."""
    sizes = [max(1, total // size - (-1) ** r * (r + 1)) for r in range(size - 1)]
    return sizes + [total - sum(sizes)]


def mine(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    return x.split(sizes)[rank]


def check(actual, expected, dtype, what):
    assert_close(actual.double(), expected.double(), **TOLERANCE[dtype], what=what)


# each case: (layout, labelled, reduction, normalize, dtype)
INFONCE_CASES = [
    ("replicated", True, "mean", True, torch.float64),
    ("replicated", False, "sum", True, torch.float64),
    ("replicated", True, "none", False, torch.float32),
    ("sharded", True, "none", True, torch.float64),
    ("sharded", False, "mean", True, torch.float64),
    ("sharded", True, "sum", False, torch.float32),
]


def infonce_ranks(rank: int, size: int) -> None:
    for index, (layout, labelled, reduction, normalize, dtype) in enumerate(INFONCE_CASES):
        what = f"case {index} {layout} labels={labelled} {reduction} normalize={normalize} {dtype}"
        gen = torch.Generator().manual_seed(index)
        n, m, d = 7, 13, 5
        query = torch.randn(n, d, generator=gen, dtype=torch.float64)
        key = torch.randn(m, d, generator=gen, dtype=torch.float64)
        # classes 0-2 on every rank's keys; the last query's class 9 has no key: a row without positives
        query_labels = torch.randint(0, 3, (n,), generator=gen)
        query_labels[-1] = 9
        key_labels = torch.randint(0, 3, (m,), generator=gen)
        upstream = torch.randn(n, generator=gen, dtype=torch.float64)
        temperature = torch.tensor(0.3, dtype=torch.float64)
        labels = (query_labels, key_labels) if labelled else (None, None)

        q, k, t = (x.clone().requires_grad_() for x in (query, key, temperature))
        rows = infonce_reference.infonce(q, k, *labels, temperature=t, normalize=normalize, reduction=reduction)
        (rows * upstream).sum().backward() if reduction == "none" else rows.backward()

        key_sizes, query_sizes = shard_sizes(m, size), shard_sizes(n, size)
        my_query = mine(query, query_sizes, rank) if layout == "sharded" else query
        my_query_labels = mine(query_labels, query_sizes, rank) if layout == "sharded" else query_labels
        my_q = my_query.to(dtype).requires_grad_()
        my_k = mine(key, key_sizes, rank).to(dtype).requires_grad_()
        my_t = temperature.clone().requires_grad_()
        my_labels = (my_query_labels, mine(key_labels, key_sizes, rank)) if labelled else (None, None)
        loss = infonce(my_q, my_k, *my_labels, temperature=my_t, normalize=normalize, reduction=reduction,
                       backend=BACKEND, group=dist.group.WORLD, queries=layout)
        own = slice(sum(query_sizes[:rank]), sum(query_sizes[:rank + 1])) if layout == "sharded" else slice(None)
        if reduction == "none":
            check(loss, rows.detach()[own], dtype, f"{what}: loss rows")
            (loss * upstream[own].to(dtype)).sum().backward()
        else:
            check(loss, rows.detach(), dtype, f"{what}: loss")
            loss.backward()
        check(my_q.grad, q.grad[own], dtype, f"{what}: query gradient")
        check(my_k.grad, mine(k.grad, key_sizes, rank), dtype, f"{what}: key gradient")
        check(my_t.grad, t.grad, dtype, f"{what}: temperature gradient")


@pytest.mark.parametrize("size", [2, 3])
def test_infonce_matches_one_process(ranks, size):
    ranks(size).run(infonce_ranks)


def cmi_ranks(rank: int, size: int) -> None:
    for reduction in ("mean", "none"):
        gen = torch.Generator().manual_seed(1)
        n, k, classes = 11, 6, 4
        features = torch.randn(n, k, generator=gen, dtype=torch.float64) * 3
        labels = torch.randint(0, classes, (n,), generator=gen)
        labels[0] = classes - 1  # a class seen by only some ranks is fine; make the last one present
        upstream = torch.randn(n, generator=gen, dtype=torch.float64)
        f = features.clone().requires_grad_()
        expected = cmi_reference(f, labels, classes, temperature=1.5, reduction=reduction)
        (expected * upstream).sum().backward() if reduction == "none" else expected.backward()

        sizes = shard_sizes(n, size)
        my_f = mine(features, sizes, rank).clone().requires_grad_()
        loss = cmi_loss(my_f, mine(labels, sizes, rank), classes, temperature=1.5, reduction=reduction, backend=BACKEND,
                        group=dist.group.WORLD)
        if reduction == "none":
            check(loss, mine(expected.detach(), sizes, rank), torch.float64, "cmi rows")
            (loss * mine(upstream, sizes, rank)).sum().backward()
        else:
            check(loss, expected.detach(), torch.float64, "cmi loss")
            loss.backward()
        check(my_f.grad, mine(f.grad, sizes, rank), torch.float64, f"cmi {reduction}: feature gradient")


def trajectory_ranks(rank: int, size: int) -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (5,), (2, 2, 2), (7,), (1,), (6,)]
    student, start, target = ([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3))
    leaves = [[x.clone().requires_grad_() for x in tensors] for tensors in (student, start, target)]
    trajectory_reference.trajectory_mse(*leaves).backward()
    expected = trajectory_reference.trajectory_mse(student, start, target)
    mine_only = [i for i in range(len(shapes)) if i % size == rank]  # parameter tensors dealt out round-robin
    my_leaves = [[tensors[i].clone().requires_grad_() for i in mine_only] for tensors in (student, start, target)]
    loss = trajectory_mse(*my_leaves, backend=BACKEND, group=dist.group.WORLD)
    check(loss, expected, torch.float64, "trajectory_mse loss")
    loss.backward()
    for name, tensors, reference_tensors in zip(("student", "start", "target"), my_leaves, leaves):
        for i, x in zip(mine_only, tensors):
            check(x.grad, reference_tensors[i].grad, torch.float64, f"trajectory_mse {name}[{i}] gradient")


def cmi_and_trajectory_ranks(rank: int, size: int) -> None:
    cmi_ranks(rank, size)
    trajectory_ranks(rank, size)


@pytest.mark.parametrize("size", [2, 3])
def test_cmi_and_trajectory_mse_match_one_process(ranks, size):
    ranks(size).run(cmi_and_trajectory_ranks)


def errors_ranks(rank: int, size: int) -> None:
    key = torch.randn(4, 3 + (rank == 1), dtype=torch.float64)
    with pytest.raises(ValueError, match="feature dimension D must be the same on every rank"):
        infonce(torch.randn(4, 3 + (rank == 1), dtype=torch.float64), key, temperature=0.1, backend=BACKEND, group=dist.group.WORLD)
    with pytest.raises(ValueError, match=f"at least N={4 * size + 1} rows"):  # index positives beyond the keys
        infonce(torch.randn(4 * size + 1, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), temperature=0.1,
                backend=BACKEND, group=dist.group.WORLD)
    bad = torch.randn(4, 3, dtype=torch.float64)
    if rank == 1:
        bad[2, 1] = float("nan")
    expected = (ValueError, "key") if rank == 1 else (_distributed.RankFailed, "another rank")
    with pytest.raises(expected[0], match=expected[1]):
        infonce(torch.randn(4, 3, dtype=torch.float64), bad, temperature=0.1, backend=BACKEND, group=dist.group.WORLD)
    with pytest.raises(ValueError, match="queries must be one of"):
        infonce(torch.randn(4, 3), torch.randn(4, 3), temperature=0.1, backend=BACKEND, group=dist.group.WORLD, queries="everywhere")


def test_bad_group_use_raises_on_every_rank(ranks):
    ranks(2).run(errors_ranks)


def counted_ranks(rank: int, size: int) -> None:
    for layout, check in bytes_counted(rank, size, BACKEND).items():
        assert check["counted"] == check["formula"], (layout, check)


@pytest.mark.parametrize("size", [2, 3])
def test_bytes_moved_match_the_formula(ranks, size):
    ranks(size).run(counted_ranks)


def raising_ranks(rank: int, size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank one gives up")
    dist.all_reduce(torch.ones(1))  # waits for rank 1, which never comes


def test_a_raising_rank_fails_the_run(ranks):
    group = ranks(2)
    started = time.monotonic()
    with pytest.raises(RankFailed, match="(?s)rank 1 of 2 raised in raising_ranks.*rank one gives up"):
        group.run(raising_ranks, deadline=40)
    assert group.closed and not any(process.is_alive() for process in group.processes)
    assert time.monotonic() - started < 40


def test_sharded_queries_need_a_group():
    with pytest.raises(ValueError, match="needs group="):
        infonce(torch.randn(2, 3), torch.randn(2, 3), temperature=0.1, queries="sharded")


def test_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="init_process_group"):
        infonce(torch.randn(2, 3), torch.randn(2, 3), temperature=0.1, group=object())
