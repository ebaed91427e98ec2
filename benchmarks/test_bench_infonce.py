"""Regression timings of infonce (see conftest.py)."""

from benchmarks import infonce as OP  # noqa: F401  (read by conftest.py)

SHAPES = {"cpu": {"N": 1000, "M": 10_000, "D": 256}, "cuda": {"N": 1000, "M": 200_000, "D": 512}}


def test_infonce(run_case):
    run_case()
