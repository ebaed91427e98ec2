"""pytest-benchmark suite: ``python -m pytest benchmarks --benchmark-only`` (kept out of the default run).

Each ``test_bench_<op>.py`` names its ``OP`` (the ``benchmarks.<op>`` module) and ``SHAPES`` per device
type; its test takes the ``run_case`` fixture, parametrised over the phases (forward,
forward+backward) and every implementation of ``OP`` (skipped, with the reason, where one cannot
run here).
"""

import pytest
import torch

from benchmarks import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 5


def pytest_generate_tests(metafunc):
    if "run_case" in metafunc.fixturenames:
        problems = ops.problems(metafunc.module.OP, DEVICE, torch.float32)
        metafunc.parametrize("impl", [pytest.param(name, marks=[pytest.mark.skip(reason=why)] if why else [])
                                      for name, why in problems.items()])
        metafunc.parametrize("phase", ops.PHASES)


@pytest.fixture
def run_case(benchmark, request, impl, phase):
    """``run_case()`` benchmarks ``phase`` of ``impl`` at the module's shape for this device, float32."""
    op, shape = request.module.OP, request.module.SHAPES[DEVICE.type]

    def run() -> None:
        fn = ops.calls(ops.implementation(op, impl), op.inputs(shape, torch.float32, DEVICE))[phase]

        def call():
            fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)

        benchmark.group = f"{op.__name__.rsplit('.', 1)[-1]} {phase} " + " ".join(f"{k}={v}" for k, v in shape.items())
        benchmark.extra_info.update(shape=shape, device=str(DEVICE), dtype="float32")
        benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)

    return run
