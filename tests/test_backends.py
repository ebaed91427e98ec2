"""The backend registry: resolution, errors, and auto's race between raced backends."""

import pytest
import torch

from ddfast._backends import AUTO, TRIAL_REPEATS, Backend, Registry, on_cpu


class FakeClock:
    """Time advances only when a fake trial says it worked for a while."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def registry(clock, **race):
    reg = Registry("op", preference={"cpu": ("slow", "fast")}, streaming=lambda: "streaming module", race=race, clock=clock)
    reg.add(Backend("slow", on_cpu, load=lambda: "slow module"))
    reg.add(Backend("fast", on_cpu, load=lambda: "fast module", refuses=lambda x: "too wide" if x.shape[-1] > 4 else None))
    reg.add(Backend("broken", on_cpu, missing=lambda: "no compiler"))
    return reg


def timed_trial(clock, costs, calls):
    def trial(name):
        calls.append(name)
        clock.now += costs[name]
    return trial


def test_auto_without_race_takes_the_preference_order():
    reg = registry(FakeClock())
    assert reg.resolve(AUTO, torch.device("cpu"), torch.float32) == "slow"


def test_auto_races_once_per_bucket_and_keeps_the_fastest():
    clock, calls = FakeClock(), []
    reg = registry(clock, cpu=("slow", "fast", "broken"))
    trial = timed_trial(clock, {"slow": 2.0, "fast": 1.0}, calls)
    cpu = torch.device("cpu")
    assert reg.resolve(AUTO, cpu, torch.float32, trial=trial, size=1000) == "fast"
    assert calls == ["slow"] * (1 + TRIAL_REPEATS) + ["fast"] * (1 + TRIAL_REPEATS)  # broken one never runs
    calls.clear()
    assert reg.resolve(AUTO, cpu, torch.float32, trial=trial, size=1023) == "fast"  # same bucket: cached
    assert calls == []
    trial = timed_trial(clock, {"slow": 1.0, "fast": 3.0}, calls)
    assert reg.resolve(AUTO, cpu, torch.float32, trial=trial, size=1024) == "slow"  # new bucket: raced again
    assert reg.resolve(AUTO, cpu, torch.float64, trial=trial, size=1000) == "slow"  # new dtype: raced again
    assert len(reg.picks) == 3


def test_race_uses_the_best_time_and_ignores_the_warm_up():
    clock, costs = FakeClock(), {"slow": [10.0, 1.5, 1.5, 1.5], "fast": [0.1, 2.0, 1.0, 2.0]}

    def trial(name):
        clock.now += costs[name].pop(0)

    reg = registry(clock, cpu=("slow", "fast"))
    assert reg.resolve(AUTO, torch.device("cpu"), torch.float32, trial=trial) == "fast"


def test_no_race_without_a_trial_or_with_one_candidate():
    clock, calls = FakeClock(), []
    reg = registry(clock, cpu=("fast", "broken"))
    trial = timed_trial(clock, {"slow": 1.0, "fast": 1.0}, calls)
    assert reg.resolve(AUTO, torch.device("cpu"), torch.float32, trial=trial) == "slow"
    assert calls == []
    reg = registry(clock, cpu=("slow", "fast"))
    assert reg.resolve(AUTO, torch.device("cpu"), torch.float32) == "slow"
    assert reg.picks == {}


def test_explicit_backends_are_checked():
    reg = registry(FakeClock())
    assert reg.resolve("fast", torch.device("cpu"), torch.float32) == "fast"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        reg.resolve("nope", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="no compiler"):
        reg.resolve("broken", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="does not run on meta"):
        reg.resolve("fast", torch.device("meta"), torch.float32)


def test_every_registry_has_reference_and_torch():
    reg = registry(FakeClock())
    assert reg.names()[:2] == ["reference", "torch"]
    assert reg.kernels("torch", torch.zeros(2, 3)) == "streaming module"
    with pytest.raises(ValueError, match="backend='reference' is plain torch"):
        reg.kernels("reference", torch.zeros(2, 3))


def test_kernels_load_the_resolved_backend_and_honour_its_limits():
    reg = registry(FakeClock(), cpu=())
    assert reg.kernels(AUTO, torch.zeros(2, 3)) == "slow module"
    assert reg.kernels("fast", torch.zeros(2, 3)) == "fast module"
    with pytest.raises(RuntimeError, match="cannot run here: too wide"):
        reg.kernels("fast", torch.zeros(2, 5))
    reg.preference["cpu"] = ("fast", "slow")
    assert reg.kernels(AUTO, torch.zeros(2, 5)) == "slow module"  # auto moves past a refusal
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        reg.check_name("nope")


def test_first_eager_call_of_every_op_leaves_dynamo_unimported():
    import subprocess
    import sys
    script = """
import sys, torch, ddfast
x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
labels = torch.arange(6) % 3
ddfast.infonce(x, x.detach() + 1, temperature=0.5, backend="torch").backward()
ddfast.cmi_loss(x, labels, num_classes=3, backend="torch").backward()
ddfast.trajectory_mse([x], [x.detach() + 1], [x.detach() - 1], backend="torch").backward()
assert x.grad is not None and x.grad.abs().sum() > 0
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
