"""trajectory_mse: every backend against reference.py, forward and each input's gradient."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
from ops_support import DEVICE, assert_close, assert_fits_hopper, backends

from benchmarks import static_sm90
from benchmarks.trajectory_mse import convnet_shapes, resnet18_shapes
from ddfast import TrajectoryMSE, _extension, trajectory_mse
from ddfast.ops.trajectory_mse import REGISTRY, cpu, cuda, reference, streaming


@pytest.fixture
def device() -> str:
    """Where the backends' inputs live: the GPU where there is one, else the CPU."""
    return DEVICE


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
    """Elementwise |actual - expected| <= rtol * max|expected|, however small that is (one scale per tensor:
    gradients pass through 0)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=0, atol=rtol * max(scale, 1e-300), atol_relative=False)


def weights_for(reduction, trajectories, device):
    """A different upstream gradient for every trajectory where the loss is per trajectory."""
    return torch.linspace(-1.0, 2.0, trajectories, dtype=torch.float64, device=device) if reduction == "none" else None


def float64_leaves(args) -> list[list[torch.Tensor]]:
    """Detached float64 copies of lists of tensors, each requiring a gradient."""
    return [[x.detach().double().requires_grad_(True) for x in arg] for arg in args]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", backends(REGISTRY))
def test_matches_reference_float64(device, name, case, reduction):
    args = make_inputs(case, device=device)
    batched = CASES[case][2]
    trajectories = trajectory_mse(*args, reduction="none", batched=batched, backend="reference").numel()
    weights = weights_for(reduction, trajectories, device)
    expected, expected_grads = loss_and_grads(args, backend="reference", reduction=reduction, batched=batched, weights=weights)
    actual, actual_grads = loss_and_grads(args, backend=name, reduction=reduction, batched=batched, weights=weights)
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    assert_close(actual, expected, rtol=1e-13, atol=0)
    for got, want in zip(actual_grads, expected_grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_close_tensors(got, want, rtol=1e-12)


@pytest.mark.parametrize("model", ["convnet", "resnet18"])
@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
def test_model_shaped_parameter_lists(device, name, model):
    """One float32 trajectory of a ConvNet's / ResNet-18's parameters, all three gradients, against float64."""
    if model == "resnet18" and name == "triton" and DEVICE == "cpu":
        pytest.skip("11.7M parameters are too slow for the Triton interpreter (the ConvNet case covers it)")
    shapes = convnet_shapes() if model == "convnet" else resnet18_shapes()
    generator = torch.Generator().manual_seed(2)
    target = [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]
    start = [t + torch.randn(shape, generator=generator) * 0.01 for t, shape in zip(target, shapes)]
    student = [t + torch.randn(shape, generator=generator) * 0.005 for t, shape in zip(target, shapes)]
    args = [[x.to(device).requires_grad_(True) for x in arg] for arg in (student, start, target)]
    exact_args = float64_leaves(args)
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
        assert_close(got, expected, rtol=1e-14, atol=0)


SUBSETS = list(itertools.product((False, True), repeat=3))  # requires_grad of (student, start, target)
SUBSET_IDS = ["+".join(n for n, need in zip(("student", "start", "target"), needs) if need) or "none" for needs in SUBSETS]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("needs", SUBSETS, ids=SUBSET_IDS)
@pytest.mark.parametrize("name", backends(REGISTRY))
def test_gradients_only_where_needed(device, name, needs, reduction):
    """Every subset of {student, start, target} requiring a gradient, every reduction."""
    args = make_inputs("list_B3", device=device, requires_grad=needs)
    weights = weights_for(reduction, 3, device)
    expected, expected_grads = loss_and_grads(args, backend="reference", reduction=reduction, batched=True, weights=weights)
    actual, actual_grads = loss_and_grads(args, backend=name, reduction=reduction, batched=True, weights=weights)
    assert_close(actual, expected, rtol=1e-13, atol=0)
    assert actual.requires_grad == any(needs)
    for got, want in zip(actual_grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close_tensors(got, want, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", backends(REGISTRY))
def test_gradients_for_part_of_a_list(device, name, reduction):
    """Only some tensors of each list require a gradient (e.g. frozen layers, a partly learned target)."""
    student, start, target = make_inputs("list_B3", device=device, requires_grad=(False, False, False))
    for tensor in (student[0], student[2], start[1], target[2], target[4]):
        tensor.requires_grad_(True)
    args = (student, start, target)
    weights = weights_for(reduction, 3, device)
    _, expected_grads = loss_and_grads(args, backend="reference", reduction=reduction, batched=True, weights=weights)
    _, actual_grads = loss_and_grads(args, backend=name, reduction=reduction, batched=True, weights=weights)
    assert [g is None for g in actual_grads] == [g is None for g in expected_grads]
    for got, want in zip(actual_grads, expected_grads):
        if got is not None:
            assert_close_tensors(got, want, rtol=1e-12)


def low_precision_results(device, name, dtype):
    """(result, result of the reference in dtype, exact float64 result), each as [loss, *gradients]."""
    args = make_inputs("list_B3", dtype=dtype, device=device)
    exact_args = float64_leaves(args)
    weights = torch.tensor([0.5, -1.0, 2.0], device=device)
    runs = [loss_and_grads(args, backend=name, reduction="none", batched=True, weights=weights.to(dtype)),
            loss_and_grads(args, backend="reference", reduction="none", batched=True, weights=weights.to(dtype)),
            loss_and_grads(exact_args, backend="reference", reduction="none", batched=True, weights=weights.double())]
    return [[loss, *grads] for loss, grads in runs]


def max_error(x, exact):
    return (x.double() - exact).abs().max().item() if x.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
def test_half_precision_no_worse_than_reference(device, name, dtype):
    """Against float64, the error is at most the reference's own in ``dtype``, or one final rounding."""
    actual, in_dtype, exact = low_precision_results(device, name, dtype)
    for got, reference_result, want in zip(actual, in_dtype, exact):
        assert got.dtype == dtype
        half_ulp = want.abs().max().item() * torch.finfo(dtype).eps / 2 if want.numel() else 0.0
        assert max_error(got, want) <= max(max_error(reference_result, want), half_ulp) * 1.001


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
def test_float32_accuracy(device, name):
    """float32 inputs: loss and gradients within a few float32 epsilons of the float64 result."""
    actual, _, exact = low_precision_results(device, name, torch.float32)
    for got, want in zip(actual, exact):
        assert got.dtype == torch.float32
        if want.numel():
            assert max_error(got, want) <= 8 * torch.finfo(torch.float32).eps * want.abs().max().item()


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
def test_float32_error_does_not_grow_with_length(device, name):
    """P in the millions: float32 sums stay at float32 accuracy where a running float32 sum does not."""
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
@pytest.mark.parametrize("case", ["matrix_B3", "list_B3"])
@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32, reference=True))
def test_zero_denominator_raises(device, name, case):
    """Only trajectory 1 has start == target (in every tensor of a list): every backend names it."""
    student, start, target = make_inputs(case, dtype=torch.float32, device=device, requires_grad=(False, False, False))
    for x, t in zip(*(arg if isinstance(arg, list) else [arg] for arg in (start, target))):
        x[1] = t[1]
    with pytest.raises(ValueError, match=r"\|\|start - target\|\|\^2 is zero for trajectory \[1\]"):
        trajectory_mse(student.requires_grad_() if case == "matrix_B3" else student, start, target, batched=True, backend=name)


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
def test_deterministic(device, name):
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
    assert_close(module(*args), trajectory_mse(*args, reduction="none", batched=True), rtol=1e-13, atol=0)
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
    assert_close(loss, torch.tensor(0.25), rtol=1e-5, atol=0)
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
    "complex dtype": (lambda s, st, t: (s, st, [torch.complex(t[0], t[0])] + t[1:]), TypeError, r"target\[0\] must have dtype"),
    "bool dtype": (lambda s, st, t: (s, [st[0] > 0] + st[1:], t), TypeError, r"start\[0\] must have dtype"),
    "nested list": (lambda s, st, t: ([s[:2]] + s[1:], st, t), TypeError, r"student\[0\] must be a torch.Tensor"),
    "no trajectories": (lambda s, st, t: tuple([x[:0] for x in arg] for arg in (s, st, t)), ValueError, r"no trajectories \(B = 0\)"),
    "no elements": (lambda s, st, t: tuple([x.new_empty(3, 0) for x in arg] for arg in (s, st, t)), ValueError, "no elements"),
    "float16 with float32": (lambda s, st, t: ([x.half() for x in s], [x.half() for x in st], [x.float() for x in t]), TypeError,
                             r"target\[0\] has dtype torch.float32 but student\[0\] has torch.float16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("name", REGISTRY.names())
def test_bad_inputs_are_named(case, name):
    make, error, message = BAD_INPUTS[case]
    student, start, target = make_inputs("list_B3", requires_grad=(False, False, False))
    with pytest.raises(error, match=message):
        trajectory_mse(*make(student, start, target), batched=True, backend=name)


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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_registered_operators_pass_opcheck(reduction):
    student, start, target = make_inputs("list_B3", dtype=torch.float32, requires_grad=(True, False, True))
    name = "cpu" if REGISTRY.problem("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    torch.library.opcheck(torch.ops.ddfast.trajectory_mse_forward.default, (student, start, target, 3, reduction, name))
    detached = [[x.detach() for x in arg] for arg in (student, start, target)]
    _, per_trajectory, den, exponent = torch.ops.ddfast.trajectory_mse_forward(*detached, 3, reduction, name)
    needs = [True] * 5 + [False] * 5 + [False, True, False, True, True]
    torch.library.opcheck(torch.ops.ddfast.trajectory_mse_backward.default,
                          (torch.ones(3), per_trajectory, den, exponent, *detached, needs, name))


def test_backends_share_the_protocol():
    """Each compiled backend's module, as REGISTRY loads it, defines streaming's functions with its signatures."""
    modules = {"cpu": cpu, "cuda": cuda, "torch": streaming}
    if REGISTRY.problem("triton", torch.device(DEVICE), torch.float32) is None:
        from ddfast.ops.trajectory_mse import triton
        modules["triton"] = triton
    for name, module in modules.items():
        assert REGISTRY.backends[name].load() is module
        for function in ("forward", "backward"):
            assert inspect.signature(getattr(module, function)) == inspect.signature(getattr(streaming, function)), (name, function)


def test_torch_compile_fullgraph():
    name = "cpu" if REGISTRY.problem("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    student, start, target = make_inputs("list_B3", dtype=torch.float32, requires_grad=(True, False, False))

    def step(student, start, target):
        return 10 * trajectory_mse(student, start, target, reduction="mean", batched=True, backend=name)

    eager = torch.autograd.grad(step(student, start, target), student)
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(student, start, target)
    grads = torch.autograd.grad(loss, student)
    assert_close(loss, step(student, start, target), rtol=1e-6, atol=0)
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.skipif(_extension.cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine: the CUDA sources cannot be compiled")
def test_cuda_sources_build():
    _extension.build("trajectory_mse_cuda")
    assert hasattr(torch.ops.ddfast_trajectory_mse_cuda, "forward")
    assert hasattr(torch.ops.ddfast_trajectory_mse_cuda, "backward")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_triton_kernels_compile_for_hopper(dtype):
    """Every Triton kernel, with the backend's launch options, lowers to sm_90 code whose shared memory
    fits, without spills (ResNet-18's 62 tensors: the widest table block)."""
    pytest.importorskip("triton")
    assert_fits_hopper(static_sm90.trajectory_mse_specs(len(resnet18_shapes()), dtype))


# ---- odd layouts -------------------------------------------------------------------------------

LAYOUT_LENGTH = 4099  # crosses the cpu (2048) and triton (4096) chunks


def in_layout(kind: str, shape: tuple, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor of ``shape`` laid out as ``kind``, the leaf it is a view of); float64 values in [0, 1)."""
    def leaf(*size):
        return torch.rand(size, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)

    rows, columns = shape if len(shape) == 2 else (1, shape[0] if shape else 1)
    if kind == "contiguous":
        base = leaf(*shape)
        return base, base
    if kind == "strided":  # every other column
        base = leaf(rows, 2 * columns)
        view = base[:, ::2]
    elif kind == "transposed":
        base = leaf(columns, rows)
        view = base.t()
    elif kind == "expanded":  # stride 0 over the rows
        base = leaf(1, columns)
        view = base.expand(rows, columns)
    elif kind == "offset":  # storage offset of one element: not 16-byte aligned
        base = leaf(rows * columns + 1)
        view = base[1:].view(rows, columns)
    else:
        raise AssertionError(kind)
    return view.reshape(shape) if len(shape) < 2 else view, base


LAYOUTS = ("strided", "transposed", "expanded", "offset", "contiguous")
# (shapes, batched, layout of tensor i of argument k: LAYOUTS[(i + k + shift) % 5])
LAYOUT_CASES = {
    **{f"matrix-{kind}": ([(3, LAYOUT_LENGTH)], True, LAYOUTS.index(kind)) for kind in LAYOUTS[:4]},
    "batched list, mixed layouts": ([(3, LAYOUT_LENGTH), (3, 5), (3, 1), (3, 7), (3, 2)], True, 0),
    "one trajectory, mixed layouts": ([(1, LAYOUT_LENGTH), (4, 6), (5,), (2, 3), (1, 1)], None, 2),
    "0-dim tensors": ([(), (7,), (), (2, 3)], None, 4),
}


def layout_inputs(case, device):
    """student, start, target of a LAYOUT_CASES case (lists, or tensors for the matrix cases), and every leaf."""
    shapes, batched, shift = LAYOUT_CASES[case]
    generator = torch.Generator().manual_seed(3)
    args, leaves_ = [], []
    for k in range(3):
        tensors = []
        for i, shape in enumerate(shapes):
            kind = LAYOUTS[(i + k + shift) % len(LAYOUTS)] if shape else "contiguous"
            view, leaf = in_layout(kind, shape, generator, device)
            tensors.append(view * (0.5 if k == 0 else 1.5) if kind == "contiguous" else view)
            leaves_.append(leaf)
        args.append(tensors if case[:6] != "matrix" else tensors[0])
    return args, batched, leaves_


def grads_of(loss, weights, wanted):
    """Gradients of ``sum(weights * loss)``, keeping the graph (views of the leaves are shared by two losses)."""
    return torch.autograd.grad((loss * weights).sum() if weights is not None else loss, wanted, retain_graph=True)


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
@pytest.mark.parametrize("name", backends(REGISTRY, reference=True))
def test_odd_layouts_match_reference(device, name, case):
    """Strided, transposed, expanded (stride 0), misaligned, 0-dim, mixed within a list: float64 loss and
    every leaf's gradient as the reference computes them on contiguous copies."""
    args, batched, wanted = layout_inputs(case, device)
    copies = [[x.clone(memory_format=torch.contiguous_format) for x in arg] if isinstance(arg, list) else arg.clone() for arg in args]
    assert any(not x.is_contiguous() or x.storage_offset() for x in leaves(args) if x.dim())
    loss = trajectory_mse(*args, reduction="none", batched=batched, backend=name)
    expected = trajectory_mse(*copies, reduction="none", batched=batched, backend="reference")
    assert_close(loss, expected, rtol=1e-13, atol=0)
    weights = weights_for("none", loss.numel(), device)
    for got, want in zip(grads_of(loss, weights, wanted), grads_of(expected, weights, wanted)):
        assert_close_tensors(got, want, rtol=1e-12)


@pytest.mark.parametrize("name", backends(REGISTRY, reference=True))
def test_the_same_tensor_passed_twice(device, name):
    """One tensor twice in a list (tied weights) and as both student and target (loss 0, gradient 0)."""
    generator = torch.Generator().manual_seed(4)
    tied, other, *fixed = (torch.rand(3, 257, generator=generator, dtype=torch.float64).to(device).requires_grad_(True) for _ in range(6))
    cases = [([tied, tied], [other, fixed[0]], [fixed[1], fixed[2]]), ([tied, other], fixed[:2], [tied, fixed[3]])]
    for student, start, target in cases:
        loss = trajectory_mse(student, start, target, reduction="sum", batched=True, backend=name)
        expected = trajectory_mse(student, start, target, reduction="sum", batched=True, backend="reference")
        assert_close(loss, expected, rtol=1e-13, atol=0)
        for got, want in zip(torch.autograd.grad(loss, [tied, other]), torch.autograd.grad(expected, [tied, other])):
            assert_close_tensors(got, want, rtol=1e-12)
    same = trajectory_mse(tied, other, tied, reduction="none", backend=name)
    assert torch.equal(same, torch.zeros(3, dtype=torch.float64, device=device))
    (grad,) = torch.autograd.grad(same.sum(), tied)
    assert torch.equal(grad, torch.zeros_like(tied))


@pytest.mark.parametrize("name", backends(REGISTRY, device="cpu", reference=True))
def test_buffer_at_an_odd_byte_offset(name):
    """A tensor read from a byte buffer at an offset that is not a multiple of its element size."""
    student, start, target = make_inputs("matrix_B3", requires_grad=(False, False, False))
    buffer = bytearray(student.numel() * 8 + 1)
    odd = torch.frombuffer(buffer, dtype=torch.float64, offset=1, count=student.numel()).view(student.shape)
    assert odd.data_ptr() % 8 != 0
    odd.copy_(student)
    odd.requires_grad_(True)
    loss = trajectory_mse(odd, start, target, backend=name)
    expected = reference.trajectory_mse(student.requires_grad_(True), start, target)
    assert_close(loss, expected, rtol=1e-13, atol=0)
    assert_close_tensors(torch.autograd.grad(loss, odd)[0], torch.autograd.grad(expected, student)[0], rtol=1e-12)


# ---- transforms --------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["tensor", "list"])
@pytest.mark.parametrize("name", backends(REGISTRY, reference=True))
def test_vmap_matches_reference(device, name, form):
    """torch.func.vmap over 2 entries, the vmapped dimension in different places (and shared start):
    loss and the gradients of its weighted sum, against the reference entry by entry."""
    generator = torch.Generator().manual_seed(5)

    def leaf(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)

    if form == "tensor":
        student, start, target = leaf(2, 3, 4099), leaf(3, 4099), leaf(3, 4099, 2)
        in_dims, entry = (0, None, 2), lambda v: (student[v], start, target[..., v])
    else:
        student, start, target = [leaf(2, 3, 5), leaf(3, 2, 7)], [leaf(3, 5), leaf(3, 7)], [leaf(2, 3, 5), leaf(3, 7, 2)]
        in_dims = ([0, 1], None, [0, 2])

        def entry(v):
            return [student[0][v], student[1][:, v]], start, [target[0][v], target[1][..., v]]

    loss = torch.func.vmap(lambda *args: trajectory_mse(*args, reduction="none", batched=True, backend=name), in_dims=in_dims)(student, start, target)
    expected = torch.stack([reference.trajectory_mse(*entry(v), reduction="none", batched=True) for v in range(2)])
    assert_close(loss, expected, rtol=1e-13, atol=0)
    weights = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]], dtype=torch.float64, device=device)
    wanted = leaves((student, start, target))
    for got, want in zip(grads_of(loss, weights, wanted), grads_of(expected, weights, wanted)):
        assert_close_tensors(got, want, rtol=1e-12)


def refused_transforms():
    """name -> run(f, x): each applies a transform the fused operators cannot follow to f at x."""
    def forward_ad(f, x):
        with torch.autograd.forward_ad.dual_level():
            return f(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))

    def double_backward(f, x):
        (grad,) = torch.autograd.grad(f(x), x, create_graph=True)
        grad.square().sum().backward()

    return {
        "jvp": lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
        "jacfwd": lambda f, x: torch.func.jacfwd(f)(x),
        "forward_ad": forward_ad,
        "grad": lambda f, x: torch.func.grad(f)(x),
        "vjp": lambda f, x: torch.func.vjp(f, x),
        "jacrev": lambda f, x: torch.func.jacrev(f)(x),
        "vmap of grad": lambda f, x: torch.func.vmap(torch.func.grad(f))(x.unsqueeze(0)),
        "double backward": double_backward,
    }


@pytest.mark.parametrize("argument", ["student", "start", "target"])
@pytest.mark.parametrize("transform", list(refused_transforms()))
@pytest.mark.parametrize("name", backends(REGISTRY))
def test_unsupported_transforms_are_refused(device, name, transform, argument):
    """Forward-mode AD (its tangent would come out 0), torch.func.grad / vjp / jacrev and double backward
    raise NotImplementedError naming the op, whichever input is differentiated."""
    args = make_inputs("matrix_B1", device=device, requires_grad=(False, False, False))
    index = ("student", "start", "target").index(argument)

    def f(x):
        return trajectory_mse(*args[:index], x, *args[index + 1:], backend=name)

    with pytest.raises(NotImplementedError, match=r"ddfast\.trajectory_mse does not support"):
        refused_transforms()[transform](f, args[index].clone().requires_grad_(True))


def test_reference_supports_every_transform():
    """backend='reference': jvp, forward AD, grad, jacrev / jacfwd and double backward are right."""
    student, start, target = make_inputs("list_B1", requires_grad=(False, False, False))
    tangents = [torch.randn_like(x) for x in student]

    def f(*student):
        return reference.trajectory_mse(list(student), start, target, reduction="sum", batched=True)

    value, tangent = torch.func.jvp(f, tuple(student), tuple(tangents))
    leaves_ = [x.clone().requires_grad_(True) for x in student]
    grads = torch.autograd.grad(f(*leaves_), leaves_, create_graph=True)
    assert_close(value, f(*student), rtol=0, atol=0)
    assert_close(tangent, sum((g * v).sum() for g, v in zip(grads, tangents)), rtol=1e-12, atol=0)
    for got, want in zip(torch.func.grad(f, argnums=tuple(range(len(student))))(*student), grads):
        assert_close_tensors(got, want, rtol=1e-13)
    small = [torch.rand(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def g(*args):
        return reference.trajectory_mse(*args, reduction="none")

    assert torch.autograd.gradgradcheck(g, tuple(small))
    for got, want in zip(torch.func.jacrev(g, argnums=(0, 1, 2))(*small), torch.func.jacfwd(g, argnums=(0, 1, 2))(*small)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", backends(REGISTRY, reference=True))
def test_unrolled_sgd_student_differentiates_to_the_data(device, name):
    """The MTT pattern: a student trained by unrolled SGD (create_graph=True) on learnable data, matched to
    a target, then one ordinary backward to the data; a first-order create_graph=True gradient works."""
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(8, 5, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.randn(8, 3, generator=generator, dtype=torch.float64).to(device)
    start = [torch.randn(5, 3, generator=generator, dtype=torch.float64).to(device), torch.zeros(3, dtype=torch.float64, device=device)]
    target = [x + 0.3 * torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device) for x in start]

    def match(backend):
        params = [x.clone().requires_grad_(True) for x in start]
        for _ in range(3):
            inner = ((images @ params[0] + params[1] - labels) ** 2).mean()
            params = [p - 0.1 * g for p, g in zip(params, torch.autograd.grad(inner, params, create_graph=True))]
        loss = trajectory_mse(params, start, target, backend=backend)
        first_order = torch.autograd.grad(loss, params, create_graph=True)  # first order with a graph is supported
        return loss, first_order, torch.autograd.grad(loss, images)[0]

    (loss, first, grad), (expected, expected_first, expected_grad) = match(name), match("reference")
    assert_close(loss, expected, rtol=1e-13, atol=0)
    for got, want in zip(first, expected_first):
        assert_close_tensors(got, want, rtol=1e-12)
    assert_close_tensors(grad, expected_grad, rtol=1e-11)


# ---- values ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the Triton interpreter's numpy meets the nan
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("argument", ["student", "start", "target"])
@pytest.mark.parametrize("case", ["matrix_B3", "list_B3"])
@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32, reference=True))
def test_non_finite_values_raise_naming_the_argument(device, name, case, argument, value):
    """One nan / inf in one trajectory of one argument: a ValueError naming it, never a loss (an inf in
    start gave 0, in student inf, a nan nan)."""
    args = make_inputs(case, dtype=torch.float32, device=device, requires_grad=(False, False, False))
    poisoned = args[("student", "start", "target").index(argument)]
    (poisoned[2] if isinstance(poisoned, list) else poisoned)[1, 17] = value
    for arg in args[:2]:
        for x in arg if isinstance(arg, list) else [arg]:
            x.requires_grad_(True)
    with pytest.raises(ValueError, match=f"^{argument} contains non-finite values \\(nan or inf\\)"):
        trajectory_mse(*args, reduction="none", batched=True, backend=name)


# float32 magnitudes whose squares (or differences) overflow or underflow float32: (row scale, clamp)
EXTREMES = {"1e20": 1e20, "near float32 max": 1e38, "1e-30": 1e-30, "1e-41 (subnormal)": 1e-41}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's numpy, before rescaling
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", list(EXTREMES))
@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32, reference=True))
def test_extreme_finite_values_match_float64(device, name, magnitude, dtype):
    """Trajectories 0 and 2 scaled to magnitudes whose squares (or differences) leave float32's range,
    trajectory 1 not: the loss and its gradients as float64 computes them from the same values (they
    do not become inf, nan or 0, nor raise)."""
    if magnitude == "1e-41 (subnormal)" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 keeps two significant bits of such subnormals: a zero denominator is likely")
    scale = torch.tensor([EXTREMES[magnitude], 1.0, EXTREMES[magnitude]], dtype=torch.float64).unsqueeze(1)
    largest = torch.finfo(dtype).max
    values = [(x * scale).clamp(-largest, largest).to(dtype) for x in make_inputs("matrix_B3", requires_grad=(False,) * 3)]
    if magnitude == "near float32 max":  # differences beyond float32's range
        values[2][0, :5], values[0][0, :5] = -largest, largest
    args = [x.to(device).requires_grad_(True) for x in values]
    exact_args = [x.double().requires_grad_(True) for x in values]
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    loss, grads = loss_and_grads(args, backend=name, reduction="none", batched=True, weights=weights.to(device, dtype))
    exact, exact_grads = loss_and_grads(exact_args, backend="reference", reduction="none", batched=True, weights=weights)
    bound = 8 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_close(loss.double().cpu(), exact, rtol=bound, atol=0)
    check_grads = magnitude != "1e-41 (subnormal)"  # their gradients (about 1e41) overflow float32
    spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # of dtype's subnormals: near float32's max,
    for got, want in zip(grads, exact_grads) if check_grads else ():  # gradients are about 1e-41
        assert torch.isfinite(got).all()
        for b in range(3):  # one scale per trajectory: they differ by 1e20 and more
            assert max_error(got[b].cpu(), want[b]) <= bound * want[b].abs().max().item() + spacing


@pytest.mark.parametrize("magnitude", [1e200, 1e-200], ids=["1e200", "1e-200"])
@pytest.mark.parametrize("name", backends(REGISTRY, reference=True))
def test_float64_extremes_are_scale_invariant(device, name, magnitude):
    """float64 squares overflow / underflow: loss(m x) equals loss(x) and its gradient is gradient(x) / m."""
    args = make_inputs("list_B3", device=device)
    expected, expected_grads = loss_and_grads(args, backend="reference", reduction="none", batched=True, weights=weights_for("none", 3, device))
    scaled_args = [[(x.detach() * magnitude).requires_grad_(True) for x in arg] for arg in args]
    loss, grads = loss_and_grads(scaled_args, backend=name, reduction="none", batched=True, weights=weights_for("none", 3, device))
    assert_close(loss, expected, rtol=1e-13, atol=0)
    for got, want in zip(grads, expected_grads):
        assert_close_tensors(got * magnitude, want, rtol=1e-12)


def test_scaled_trajectories_pass_opcheck():
    """The operators on a trajectory summed scaled (its squares overflow float32)."""
    student, start, target = ([x * 1e20 for x in arg] for arg in make_inputs("list_B3", dtype=torch.float32, requires_grad=(False,) * 3))
    name = "cpu" if REGISTRY.problem("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    torch.library.opcheck(torch.ops.ddfast.trajectory_mse_forward.default, (student, start, target, 3, "none", name))
    _, per_trajectory, den, exponent = torch.ops.ddfast.trajectory_mse_forward(student, start, target, 3, "none", name)
    assert exponent.abs().min() > 0 and torch.isfinite(den).all()
    needs = [True] * 5 + [False] * 5 + [True] * 5
    torch.library.opcheck(torch.ops.ddfast.trajectory_mse_backward.default,
                          (torch.ones(3), per_trajectory, den, exponent, student, start, target, needs, name))
