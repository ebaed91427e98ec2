"""ddfast benchmarks: ``python benchmarks/run.py`` (see run.py) and the pytest-benchmark suite (conftest.py)."""
