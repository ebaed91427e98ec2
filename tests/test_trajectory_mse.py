"""trajectory_mse: every backend against reference.py, forward and each input's gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddfast import TrajectoryMSE, _extension, trajectory_mse
from ddfast.ops.trajectory_mse import REGISTRY, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNELS = [(device, name) for device in DEVICES for name in REGISTRY.names() if name != "reference"]
KERNEL_IDS = [f"{device}-{name}" for device, name in KERNELS]

# Argument forms: (shapes of the student's tensors, is a list, batched). Row lengths are odd and
# cross the kernels' chunk sizes (2048 for cpu, 4096 for triton, 8192 for cuda); B = 1 and B > 1.
CASES = {
    "matrix_B1": ([(1, 9001)], False, True),
    "matrix_B3": ([(3, 8195)], False, True),
    "vector": ([(5003,)], False, True),
    "list_B1": ([(1, 3, 5, 7), (1, 1), (1, 8193), (1, 0), (1, 2, 3)], True, True),
    "list_B3": ([(3, 17, 9), (3,), (3, 4099), (3, 0, 4), (3, 5)], True, True),
    "list_unbatched": ([(16, 3, 3, 3), (16,), (16,), (16, 16, 3, 3), (10, 257), (10,)], True, False),
    "list_default": ([(16, 3, 3, 3), (16,), (7, 16, 3, 3), (10, 257)], True, None),  # one trajectory's parameters
    "tensor_unbatched": ([(2, 3, 1001)], False, False),
}


def backend_or_skip(device: str, name: str, dtype: torch.dtype = torch.float64) -> str:
    problem = REGISTRY.problem(name, torch.device(device), dtype)
    if problem is not None:
        pytest.skip(f"backend {name!r} cannot run {dtype} on {device}: {problem}")
    return name


def make_inputs(case: str, dtype=torch.float64, device="cpu", requires_grad=(True, True, True), seed=0):
    """student, start, target in the form of ``case``; start is farther from target than student."""
    shapes, is_list, _ = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    args = []
    for scale, needs in zip((0.3, 1.0, 0.0), requires_grad):
        tensors = []
        for shape in shapes:
            x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + torch.rand(shape, generator=generator, dtype=torch.float64))
            tensors.append(x.to(device=device, dtype=dtype).requires_grad_(needs))
        args.append(tensors if is_list else tensors[0])
    return args


def leaves(args) -> list[torch.Tensor]:
    return [x for arg in args for x in (arg if isinstance(arg, list) else [arg])]


def loss_and_grads(args, *, backend, reduction, batched, weights=None):
    """The loss and the gradient of ``sum(weights * loss)`` for every leaf that requires one (else None)."""
    loss = trajectory_mse(*args, reduction=reduction, batched=batched, backend=backend)
    objective = loss if weights is None else (loss * weights).sum()
    wanted = [x for x in leaves(args) if x.requires_grad]
    grads = iter(torch.autograd.grad(objective, wanted)) if wanted else iter(())
    return loss, [next(grads) if x.requires_grad else None for x in leaves(args)]


def assert_close_tensors(actual, expected, *, rtol):
    """Elementwise |actual - expected| <= rtol * max|expected| (one scale per tensor: gradients pass through 0)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * max(scale, 1e-300))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_matches_reference_float64(device, name, case, reduction):
    backend_or_skip(device, name)
    args = make_inputs(case, device=device)
    batched = CASES[case][2]
    weights = None
    if reduction == "none":  # a different upstream gradient for every trajectory
        trajectories = trajectory_mse(*args, reduction="none", batched=batched, backend="reference").numel()
        weights = torch.linspace(-1.0, 2.0, trajectories, dtype=torch.float64, device=device)
    expected, expected_grads = loss_and_grads(args, backend="reference", reduction=reduction, batched=batched, weights=weights)
    actual, actual_grads = loss_and_grads(args, backend=name, reduction=reduction, batched=batched, weights=weights)
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-13, atol=0)
    for got, want in zip(actual_grads, expected_grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_close_tensors(got, want, rtol=1e-12)


def convnet_shapes(channels=3, classes=10, width=128, depth=3, feature=4):
    """Parameter shapes of the distillation ConvNet (conv 3x3, GroupNorm affine per layer, linear head)."""
    shapes = []
    for layer in range(depth):
        shapes += [(width, channels if layer == 0 else width, 3, 3), (width,), (width,), (width,)]
    return shapes + [(classes, width * feature * feature), (classes,)]


def resnet18_shapes():
    import torchvision

    with torch.device("meta"):
        return [tuple(p.shape) for p in torchvision.models.resnet18(num_classes=10).parameters()]


@pytest.mark.parametrize("model", ["convnet", "resnet18"])
@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_model_shaped_parameter_lists(device, name, model):
    """One float32 trajectory of a ConvNet's / ResNet-18's parameters, all three gradients, against float64."""
    backend_or_skip(device, name, torch.float32)
    if model == "resnet18" and name == "triton" and device == "cpu":
        pytest.skip("11.7M parameters are too slow for the Triton interpreter (the ConvNet case covers it)")
    shapes = convnet_shapes() if model == "convnet" else resnet18_shapes()
    generator = torch.Generator().manual_seed(2)
    target = [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]
    start = [t + torch.randn(shape, generator=generator) * 0.01 for t, shape in zip(target, shapes)]
    student = [t + torch.randn(shape, generator=generator) * 0.005 for t, shape in zip(target, shapes)]
    args = [[x.to(device).requires_grad_(True) for x in arg] for arg in (student, start, target)]
    exact_args = [[x.detach().double().requires_grad_(True) for x in arg] for arg in args]
    loss, grads = loss_and_grads(args, backend=name, reduction="mean", batched=False)
    exact, exact_grads = loss_and_grads(exact_args, backend="reference", reduction="mean", batched=False)
    bound = 8 * torch.finfo(torch.float32).eps
    assert abs(loss.item() - exact.item()) <= bound * exact.item()
    for got, want in zip(grads, exact_grads):
        assert got.shape == want.shape
        assert max_error(got, want) <= bound * want.abs().max().item()


def test_output_shapes():
    args = make_inputs("list_B3")
    assert trajectory_mse(*args, reduction="none", batched=True).shape == (3,)
    assert trajectory_mse(*args, reduction="mean", batched=True).shape == ()
    assert trajectory_mse(*args, reduction="none").shape == (1,)  # a list is one trajectory by default
    assert trajectory_mse(*make_inputs("vector"), reduction="none").shape == (1,)
    assert trajectory_mse(*make_inputs("list_unbatched"), reduction="none", batched=False).shape == (1,)


def test_reference_is_the_mtt_formula():
    """Per trajectory: ||student - target||^2 / ||start - target||^2 over all parameters, as MTT computes it."""
    student, start, target = make_inputs("list_B3")
    for b in range(3):
        flat = [torch.cat([x[b].reshape(-1) for x in arg]) for arg in (student, start, target)]
        expected = (flat[0] - flat[2]).pow(2).sum() / (flat[1] - flat[2]).pow(2).sum()
        got = reference.trajectory_mse(student, start, target, reduction="none", batched=True)[b]
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True), (False, False, False)],
                         ids=["student", "start", "target", "start+target", "none"])
@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_gradients_only_where_needed(device, name, needs):
    backend_or_skip(device, name)
    args = make_inputs("list_B3", device=device, requires_grad=needs)
    expected, expected_grads = loss_and_grads(args, backend="reference", reduction="mean", batched=True)
    actual, actual_grads = loss_and_grads(args, backend=name, reduction="mean", batched=True)
    torch.testing.assert_close(actual, expected, rtol=1e-13, atol=0)
    assert actual.requires_grad == any(needs)
    for got, want in zip(actual_grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close_tensors(got, want, rtol=1e-12)


@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_gradients_for_part_of_a_list(device, name):
    """Only some of the student's tensors require a gradient (e.g. frozen layers)."""
    backend_or_skip(device, name)
    student, start, target = make_inputs("list_B3", device=device, requires_grad=(False, False, False))
    student[0].requires_grad_(True)
    student[2].requires_grad_(True)
    args = (student, start, target)
    _, expected_grads = loss_and_grads(args, backend="reference", reduction="sum", batched=True)
    _, actual_grads = loss_and_grads(args, backend=name, reduction="sum", batched=True)
    assert [g is None for g in actual_grads] == [g is None for g in expected_grads]
    for got, want in zip(actual_grads, expected_grads):
        if got is not None:
            assert_close_tensors(got, want, rtol=1e-12)


def low_precision_results(device, name, dtype):
    """(result, result of the reference in dtype, exact float64 result), each as [loss, *gradients]."""
    args = make_inputs("list_B3", dtype=dtype, device=device)
    exact_args = [[x.detach().double().requires_grad_(True) for x in arg] for arg in args]
    weights = torch.tensor([0.5, -1.0, 2.0], device=device)
    runs = [loss_and_grads(args, backend=name, reduction="none", batched=True, weights=weights.to(dtype)),
            loss_and_grads(args, backend="reference", reduction="none", batched=True, weights=weights.to(dtype)),
            loss_and_grads(exact_args, backend="reference", reduction="none", batched=True, weights=weights.double())]
    return [[loss, *grads] for loss, grads in runs]


def max_error(x, exact):
    return (x.double() - exact).abs().max().item() if x.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_half_precision_no_worse_than_reference(device, name, dtype):
    """Against float64, the error is at most the reference's own in ``dtype``, or one final rounding."""
    backend_or_skip(device, name, dtype)
    actual, in_dtype, exact = low_precision_results(device, name, dtype)
    for got, reference_result, want in zip(actual, in_dtype, exact):
        assert got.dtype == dtype
        half_ulp = want.abs().max().item() * torch.finfo(dtype).eps / 2 if want.numel() else 0.0
        assert max_error(got, want) <= max(max_error(reference_result, want), half_ulp) * 1.001


@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_float32_accuracy(device, name):
    """float32 inputs: loss and gradients within a few float32 epsilons of the float64 result."""
    backend_or_skip(device, name, torch.float32)
    actual, _, exact = low_precision_results(device, name, torch.float32)
    for got, want in zip(actual, exact):
        assert got.dtype == torch.float32
        if want.numel():
            assert max_error(got, want) <= 8 * torch.finfo(torch.float32).eps * want.abs().max().item()


@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_float32_error_does_not_grow_with_length(device, name):
    """P in the millions: float32 sums stay at float32 accuracy where a running float32 sum does not."""
    backend_or_skip(device, name, torch.float32)
    length = (1 << 22) + 4099
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(1, length, generator=generator)
    student = target + 1 + torch.rand(1, length, generator=generator)  # every squared difference in [1, 4)
    start = target + 2 * (1 + torch.rand(1, length, generator=generator))
    exact = reference.trajectory_mse(student.double(), start.double(), target.double())
    loss = trajectory_mse(*(x.to(device) for x in (student, start, target)), backend=name)
    tolerance = 2e-6
    assert abs(loss.item() - exact.item()) <= tolerance * exact.item()
    def running_sum(x):  # one float32 accumulator, element after element
        return np.cumsum(x.numpy()[0], dtype=np.float32)[-1]

    running = running_sum((student - target) ** 2) / running_sum((start - target) ** 2)
    assert abs(running - exact.item()) > tolerance * exact.item(), "the data must be hard enough to fail a naive sum"


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the Triton interpreter's numpy divides 0 / 0 before the check
@pytest.mark.parametrize("device,name", [(d, n) for d in DEVICES for n in REGISTRY.names()],
                         ids=[f"{d}-{n}" for d in DEVICES for n in REGISTRY.names()])
def test_zero_denominator_raises(device, name):
    backend_or_skip(device, name, torch.float32)
    student, start, target = make_inputs("matrix_B3", dtype=torch.float32, device=device, requires_grad=(True, False, False))
    start = start.detach().clone()
    start[1] = target[1]
    with pytest.raises(ValueError, match=r"\|\|start - target\|\|\^2 is zero for trajectory \[1\]"):
        trajectory_mse(student, start, target, backend=name)


def test_non_contiguous_inputs():
    base = torch.randn(4001, 3, dtype=torch.float64, requires_grad=True)
    student = base.t()  # (3, 4001), not contiguous
    start, target = torch.randn(3, 4001, dtype=torch.float64), torch.randn(3, 4001, dtype=torch.float64)
    for name in REGISTRY.available("cpu", torch.float64):
        loss = trajectory_mse(student, start, target, backend=name)
        (grad,) = torch.autograd.grad(loss, base)
        expected = 2 * (student - target) / (start - target).pow(2).sum(1, keepdim=True) / 3
        torch.testing.assert_close(loss, reference.trajectory_mse(student, start, target), rtol=1e-13, atol=0)
        assert_close_tensors(grad, expected.t(), rtol=1e-12)


@pytest.mark.parametrize("device,name", KERNELS, ids=KERNEL_IDS)
def test_deterministic(device, name):
    backend_or_skip(device, name, torch.float32)
    args = make_inputs("list_B3", dtype=torch.float32, device=device)
    first, first_grads = loss_and_grads(args, backend=name, reduction="mean", batched=True)
    second, second_grads = loss_and_grads(args, backend=name, reduction="mean", batched=True)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def test_auto_prefers_the_compiled_cpu_kernel():
    expected = "cpu" if REGISTRY.problem("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    assert REGISTRY.resolve("auto", torch.device("cpu"), torch.float32) == expected


def test_module_twin():
    args = make_inputs("list_B3")
    module = TrajectoryMSE(reduction="none", batched=True, backend="torch")
    torch.testing.assert_close(module(*args), trajectory_mse(*args, reduction="none", batched=True), rtol=1e-13, atol=0)
    assert "reduction='none'" in repr(module)
    with pytest.raises(ValueError, match="reduction"):
        TrajectoryMSE(reduction="max")


def test_functional_call_parameters_train():
    """The MTT pattern: a student's functional_call parameters against expert snapshots, one trajectory."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(), torch.nn.Linear(4 * 25, 3))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    start = [p.detach() + 0.1 for p in params.values()]
    target = [p.detach() - 0.1 for p in params.values()]
    out = torch.func.functional_call(model, params, (torch.randn(2, 1, 7, 7),))
    assert out.shape == (2, 3)
    loss = trajectory_mse(list(params.values()), start, target)  # a list is one trajectory by default
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.25), rtol=1e-5, atol=0)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params.values())


BAD_INPUTS = {
    "mixed forms": (lambda s, st, t: (s, st[0], t), TypeError, "all be tensors or all be lists"),
    "list lengths": (lambda s, st, t: (s, st, t[:-1]), ValueError, "same number of tensors"),
    "shapes": (lambda s, st, t: (s, st, t[:2] + [t[2][:, :-1]] + t[3:]), ValueError, r"target\[2\] has shape \(3, 4098\)"),
    "dtype": (lambda s, st, t: (s, [st[0].float()] + st[1:], t), TypeError, r"start\[0\] has dtype torch.float32"),
    "device": (lambda s, st, t: (s, st, [t[0].to("meta")] + t[1:]), ValueError, r"target\[0\] is on meta"),
    "integer dtype": (lambda s, st, t: ([s[0].long()] + s[1:], st, t), TypeError, r"student\[0\] must have dtype"),
    "not a tensor": (lambda s, st, t: (s, st, [1.0] + t[1:]), TypeError, r"target\[0\] must be a torch.Tensor"),
    "not a list": (lambda s, st, t: (s, st, {"w": t[0]}), TypeError, "target must be a tensor or a list of tensors"),
    "empty list": (lambda s, st, t: ([], [], []), ValueError, "student is an empty list"),
    "leading dims": (lambda s, st, t: ([x[:2] if i == 1 else x for i, x in enumerate(s)],) * 3, ValueError, r"student\[1\] has leading dimension 2"),
    "0-d in batched list": (lambda s, st, t: ([x[0, 0] if x.dim() == 2 else x for x in s],) * 3, ValueError, r"student\[2\] is a 0-dimensional"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_named(case):
    make, error, message = BAD_INPUTS[case]
    student, start, target = make_inputs("list_B3", requires_grad=(False, False, False))
    with pytest.raises(error, match=message):
        trajectory_mse(*make(student, start, target), batched=True)


def test_bad_tensor_forms_and_options():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"student must have shape \(B, P\) or \(P,\)"):
        trajectory_mse(x, x, x)
    assert trajectory_mse(x, x + 1, x + 2, batched=False).shape == ()  # one trajectory of any shape
    empty = torch.randn(0, 5)
    with pytest.raises(ValueError, match="no trajectories"):
        trajectory_mse(empty, empty, empty)
    with pytest.raises(ValueError, match="no elements"):
        trajectory_mse(torch.randn(2, 0), torch.randn(2, 0), torch.randn(2, 0))
    y = torch.randn(2, 5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        trajectory_mse(y, y, y, reduction="max")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        trajectory_mse(y, y, y, backend="fast")
    with pytest.raises(TypeError, match="batched must be None, True or False"):
        trajectory_mse(y, y, y, batched=1)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        trajectory_mse(y, y + 1, y, backend="cuda")


def test_registered_operators_pass_opcheck():
    student, start, target = make_inputs("list_B3", dtype=torch.float32, requires_grad=(True, False, True))
    name = "cpu" if REGISTRY.problem("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    torch.library.opcheck(torch.ops.ddfast.trajectory_mse_forward.default, (student, start, target, 3, name))
    detached = [[x.detach() for x in arg] for arg in (student, start, target)]
    loss, den = torch.ops.ddfast.trajectory_mse_forward(*detached, 3, name)
    needs = [True] * 5 + [False] * 5 + [False, True, False, True, True]
    torch.library.opcheck(torch.ops.ddfast.trajectory_mse_backward.default, (torch.ones(3), loss, den, *detached, needs, name))


def test_torch_compile_fullgraph():
    name = "cpu" if REGISTRY.problem("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    student, start, target = make_inputs("list_B3", dtype=torch.float32, requires_grad=(True, False, False))

    def step(student, start, target):
        return 10 * trajectory_mse(student, start, target, reduction="mean", batched=True, backend=name)

    eager = torch.autograd.grad(step(student, start, target), student)
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(student, start, target)
    grads = torch.autograd.grad(loss, student)
    torch.testing.assert_close(loss, step(student, start, target), rtol=1e-6, atol=0)
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.skipif(_extension.cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine: the CUDA sources cannot be compiled")
def test_cuda_sources_build():
    _extension.build("trajectory_mse_cuda")
    assert hasattr(torch.ops.ddfast_trajectory_mse_cuda, "forward")
    assert hasattr(torch.ops.ddfast_trajectory_mse_cuda, "backward")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_triton_kernels_compile_for_hopper(dtype):
    """Every Triton kernel, with the backend's launch options, lowers to sm_90 code whose shared memory fits."""
    pytest.importorskip("triton")
    import hopper
    from ddfast.ops.trajectory_mse import triton as kernels

    acc_name = "fp64" if dtype == torch.float64 else "fp32"
    acc = {"ACC": f"tl.float{acc_name[2:]}"}
    types = {"DTYPE": f"tl.{str(dtype).removeprefix('torch.')}", **acc, "TENSORS": 64, "CHUNK": kernels.CHUNK, "BLOCK": kernels.BLOCK}
    common = {"module": "ddfast.ops.trajectory_mse.triton", "floats": [], **kernels.LAUNCH}
    per_trajectory = {name: f"*{acc_name}" for name in ("grad", "loss", "num", "den", "partial_num", "partial_den")}
    specs = [
        {**common, "kernel": "_partials_kernel", "pointers": {"table": "*i64", **per_trajectory}, "constexprs": types},
        {**common, "kernel": "_finish_kernel", "pointers": per_trajectory, "constexprs": {"BLOCK": kernels.FINISH_BLOCK}},
        {**common, "kernel": "_gradients_kernel", "pointers": {"table": "*i64", **per_trajectory},
         "constexprs": {**types, "ROUND_BY_HAND": False}},
    ]
    for spec, shared in zip(specs, hopper.shared_memory(specs)):
        assert 0 <= shared <= hopper.SHARED_MEMORY_PER_BLOCK, (spec["kernel"], shared)
