"""The backend registry: resolution, errors, auto's race between raced backends, and auto's fallback
when a backend's kernel fails to launch."""

import types
import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources

import ddfast
from ddfast._backends import AUTO, TRIAL_REPEATS, Backend, BackendFailed, Registry, launch_failure, on_cpu
from ddfast.ops.infonce import REGISTRY as INFONCE
from ddfast.ops.infonce import reference as infonce_reference


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
    assert reg.kernels("torch", torch.zeros(2, 3)).module == "streaming module"
    with pytest.raises(ValueError, match="backend='reference' is plain torch"):
        reg.kernels("reference", torch.zeros(2, 3))


def test_kernels_load_the_resolved_backend_and_honour_its_limits():
    reg = registry(FakeClock(), cpu=())
    assert reg.kernels(AUTO, torch.zeros(2, 3)).module == "slow module"
    assert reg.kernels("fast", torch.zeros(2, 3)).module == "fast module"
    with pytest.raises(RuntimeError, match="cannot run here: too wide"):
        reg.kernels("fast", torch.zeros(2, 5))
    reg.preference["cpu"] = ("fast", "slow")
    assert reg.kernels(AUTO, torch.zeros(2, 5)).module == "slow module"  # auto moves past a refusal
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        reg.check_name("nope")


def failing(error, calls, **working):
    """A backend module whose every protocol function not in ``working`` raises ``error`` (counting calls)."""
    def broken(*args, **kwargs):
        calls.append(args)
        raise error
    return types.SimpleNamespace(lse=working.get("lse", broken), grads=working.get("grads", broken))


@pytest.fixture
def infonce_cpu(monkeypatch):
    """InfoNCE's registry with its ``cpu`` backend replaced (``install(module)``) and no failure recorded."""
    monkeypatch.setattr(INFONCE, "failed", {})
    monkeypatch.setattr(INFONCE, "picks", {})

    def install(module):
        monkeypatch.setitem(INFONCE.backends, "cpu", Backend("cpu", on_cpu, load=lambda: module))
    return install


def infonce_inputs():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    key = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    return query, key


@pytest.mark.parametrize("error", [OutOfResources(232448, 101376, "shared memory"),
                                   RuntimeError("CUDA error: too many resources requested for launch")],
                         ids=["triton-out-of-resources", "cuda-launch-error"])
def test_auto_falls_back_once_with_one_warning_and_remembers(infonce_cpu, error):
    calls = []
    infonce_cpu(failing(error, calls))
    query, key = infonce_inputs()
    expected = infonce_reference.infonce(query, key, temperature=0.5)
    with pytest.warns(RuntimeWarning) as record:
        loss = ddfast.infonce(query, key, temperature=0.5)
    messages = [str(w.message) for w in record if "failed to launch" in str(w.message)]
    assert len(messages) == 1
    assert "infonce" in messages[0] and "'cpu'" in messages[0] and "lse" in messages[0] and str(error) in messages[0]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ddfast.infonce(query, key, temperature=0.5)
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1  # not retried
    assert INFONCE.resolve(AUTO, query.device, query.dtype) == "torch"


def test_backward_after_a_fallen_back_forward_uses_the_fallback(infonce_cpu):
    calls, grads_calls = [], []

    def grads(*args):
        grads_calls.append(args)
        return torch.zeros_like(args[0]), torch.zeros_like(args[1])

    infonce_cpu(failing(OutOfResources(1, 0, "shared memory"), calls, grads=grads))
    query, key = infonce_inputs()
    expected = torch.autograd.grad(infonce_reference.infonce(query, key, temperature=0.5), (query, key))
    with pytest.warns(RuntimeWarning, match="failed to launch"):
        loss = ddfast.infonce(query, key, temperature=0.5)
    got = torch.autograd.grad(loss, (query, key))
    assert grads_calls == []  # the backward runs on the forward's fallback, not the failed backend
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_a_failure_in_the_backward_falls_back_there(infonce_cpu):
    calls = []
    streaming = INFONCE.backends["torch"].load()
    infonce_cpu(failing(RuntimeError("CUDA error: no kernel image is available for execution on the device"), calls,
                        lse=streaming.lse))
    query, key = infonce_inputs()
    expected = torch.autograd.grad(infonce_reference.infonce(query, key, temperature=0.5), (query, key))
    loss = ddfast.infonce(query, key, temperature=0.5)
    with pytest.warns(RuntimeWarning, match="'cpu' failed to launch grads"):
        got = torch.autograd.grad(loss, (query, key))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_a_forced_backend_raises_naming_it_with_the_error_chained(infonce_cpu):
    error = OutOfResources(232448, 101376, "shared memory")
    infonce_cpu(failing(error, []))
    query, key = infonce_inputs()
    with pytest.raises(BackendFailed, match="backend='cpu' failed to launch lse") as info:
        ddfast.infonce(query, key, temperature=0.5, backend="cpu")
    assert info.value.__cause__ is error
    assert INFONCE.failed == {}  # forcing records nothing: auto still tries it


def test_errors_that_are_not_launch_failures_are_not_caught(infonce_cpu):
    calls = []
    infonce_cpu(failing(ValueError("features must be finite"), calls))
    query, key = infonce_inputs()
    with pytest.raises(ValueError, match="temperature"):
        ddfast.infonce(query, key, temperature=-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="features must be finite"):
            ddfast.infonce(query, key, temperature=0.5)
    infonce_cpu(failing(RuntimeError("shape mismatch"), calls))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ddfast.infonce(query, key, temperature=0.5)
    assert INFONCE.failed == {}


@pytest.mark.parametrize("error, expected", [
    (OutOfResources(1, 0, "shared memory"), True), (ImportError("no module named triton"), True),
    (RuntimeError("CUDA error: invalid device function"), True), (RuntimeError("ptxas fatal: unknown sm"), True),
    (RuntimeError("expected a tensor of shape (3,)"), False), (ValueError("CUDA error in the name"), False),
    (torch.OutOfMemoryError("CUDA out of memory"), False)])
def test_launch_failure_tells_apart_what_cannot_run_here(error, expected):
    assert launch_failure(error) is expected


def test_the_fallback_itself_falling_back_and_torch_never_caught():
    reg = Registry("op", preference={"cpu": ("first", "second")}, streaming=lambda: failing(RuntimeError("CUDA error: x"), []))
    first, second = [], []
    reg.add(Backend("first", on_cpu, load=lambda: failing(ImportError("no extension"), first)))
    reg.add(Backend("second", on_cpu, load=lambda: failing(OutOfResources(1, 0, "registers"), second)))
    run = reg.kernels(AUTO, torch.zeros(2))
    with pytest.warns(RuntimeWarning) as record, pytest.raises(RuntimeError, match="CUDA error: x"):
        run.lse()
    assert [str(w.message).split(" failed")[0] for w in record] == ["ddfast.op: backend 'first'", "ddfast.op: backend 'second'"]
    assert (len(first), len(second), run.name) == (1, 1, "torch")


def test_a_raced_candidate_that_fails_to_launch_is_left_out():
    clock, calls = FakeClock(), []
    reg = registry(clock, cpu=("slow", "fast"))

    def trial(name):
        calls.append(name)
        if name == "fast":
            raise BackendFailed("fast failed") from OutOfResources(1, 0, "shared memory")
        clock.now += 1.0

    with pytest.warns(RuntimeWarning, match="'fast' failed to launch its trial"):
        assert reg.resolve(AUTO, torch.device("cpu"), torch.float32, trial=trial) == "slow"
    assert reg.failed.keys() == {("fast", "cpu")}
    calls.clear()
    assert reg.resolve(AUTO, torch.device("cpu"), torch.float32, trial=trial) == "slow"
    assert calls == []


def test_without_a_trial_auto_keeps_the_raced_pick():
    clock, calls = FakeClock(), []
    reg = registry(clock, cpu=("slow", "fast"))
    trial = timed_trial(clock, {"slow": 2.0, "fast": 1.0}, calls)
    assert reg.resolve(AUTO, torch.device("cpu"), torch.float32, trial=trial, size=8) == "fast"
    assert reg.resolve(AUTO, torch.device("cpu"), torch.float32, size=8) == "fast"  # e.g. the backward


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
