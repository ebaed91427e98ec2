"""Regression timings of cmi_loss (see conftest.py)."""

from benchmarks import cmi as OP  # noqa: F401  (read by conftest.py)

SHAPES = {"cpu": {"N": 10_000, "K": 512}, "cuda": {"N": 200_000, "K": 512}}


def test_cmi(run_case):
    run_case()
