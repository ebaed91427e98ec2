"""ddfast.infonce: every backend against the plain-torch reference, forward and all gradients."""

import pytest
import torch

import ddfast
from ddfast.ops.infonce import REGISTRY, reference

KERNEL_BACKENDS = ["torch", "cpu", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs interpreted on the CPU


def make(n, m, d, *, labels, dtype=torch.float64, classes=5, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, d, generator=g, dtype=torch.float64) * spread).to(DEVICE, dtype).requires_grad_()
    k = (torch.randn(m, d, generator=g, dtype=torch.float64) * spread).to(DEVICE, dtype).requires_grad_()
    ql = torch.randint(0, classes, (n,), generator=g).to(DEVICE) if labels else None
    kl = torch.randint(0, classes, (m,), generator=g).to(DEVICE) if labels else None
    return q, k, ql, kl


def loss_and_grads(backend, q, k, ql, kl, temperature, **options):
    """Loss and the gradients of every input that requires one (q, k, temperature), with a random
    upstream gradient for reduction='none' so that each row's gradient is weighted differently."""
    loss = ddfast.infonce(q, k, ql, kl, temperature=temperature, backend=backend, **options)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    inputs = [x for x in (q, k, temperature) if isinstance(x, torch.Tensor) and x.requires_grad]
    return [loss, *torch.autograd.grad((loss * upstream).sum(), inputs)]


def assert_matches_reference(backend, q, k, ql, kl, temperature, rtol=1e-9, atol=1e-11, **options):
    """Agreement elementwise, with ``atol`` relative to each tensor's largest magnitude."""
    ours = loss_and_grads(backend, q, k, ql, kl, temperature, **options)
    expected = loss_and_grads("reference", q, k, ql, kl, temperature, **options)
    for name, a, b in zip(["loss", "grad 1", "grad 2", "grad 3"], ours, expected):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "index"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_reference(backend, labels, normalize, reduction):
    q, k, ql, kl = make(37, 101, 19, labels=labels)
    temperature = torch.tensor(0.3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_reference(backend, q, k, ql, kl, temperature, normalize=normalize, reduction=reduction)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (3, 70, 130), (70, 3, 5), (129, 257, 33)])
def test_odd_shapes(backend, n, m, d):
    q, k, ql, kl = make(n, m, d, labels=True, classes=3)
    assert_matches_reference(backend, q, k, ql, kl, 0.5, reduction="none")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
def test_temperatures_and_large_logits(backend, temperature):
    # unnormalised features with large norms: logits reach about 1e4 / temperature
    q, k, ql, kl = make(23, 61, 17, labels=True, spread=30.0)
    assert_matches_reference(backend, q, k, ql, kl, temperature, normalize=False, reduction="none", rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_one_many_and_no_positives(backend):
    q, k, _, _ = make(6, 9, 8, labels=False)
    ql = torch.tensor([0, 1, 2, 7, 7, 2], device=DEVICE)   # 7: no key has it
    kl = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 5], device=DEVICE)  # class 0 has a single key
    assert_matches_reference(backend, q, k, ql, kl, 0.2, reduction="none")
    rows = ddfast.infonce(q, k, ql, kl, temperature=0.2, reduction="none", backend=backend)
    assert rows[3] == 0 and rows[4] == 0 and (rows[[0, 1, 2, 5]] > 0).all()
    # the mean counts only the queries that have a positive
    mean = ddfast.infonce(q, k, ql, kl, temperature=0.2, backend=backend)
    torch.testing.assert_close(mean, rows.sum() / 4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_query_has_a_positive(backend):
    q, k, _, _ = make(4, 7, 5, labels=False)
    ql, kl = torch.full((4,), 9, device=DEVICE), torch.arange(7, device=DEVICE)
    loss, dq, dk = loss_and_grads(backend, q, k, ql, kl, 0.1)
    assert loss.item() == 0.0 and torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "index"])
def test_symmetric(backend, labels):
    q, k, ql, kl = make(29, 45, 12, labels=labels)
    assert_matches_reference(backend, q, k, ql, kl, 0.25, symmetric=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_keys_without_gradient(backend):
    q, k, ql, kl = make(17, 40, 9, labels=True)
    k = k.detach()
    ours = loss_and_grads(backend, q, k, ql, kl, 0.2)
    expected = loss_and_grads("reference", q, k, ql, kl, 0.2)
    assert len(ours) == 2
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float32_precision(backend):
    q, k, ql, kl = make(45, 300, 64, labels=True, dtype=torch.float32)
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    ours = loss_and_grads(backend, q, k, ql, kl, 0.07, reduction="none")
    truth = loss_and_grads("reference", q64, k64, ql, kl, 0.07, reduction="none")
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_no_worse_than_reference(backend, dtype, reduction):
    q, k, ql, kl = make(67, 131, 40, labels=True, dtype=dtype)
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    truth = loss_and_grads("reference", q64, k64, ql, kl, 0.07, reduction=reduction)
    ours = loss_and_grads(backend, q, k, ql, kl, 0.07, reduction=reduction)
    theirs = loss_and_grads("reference", q, k, ql, kl, 0.07, reduction=reduction)
    assert all(x.dtype == dtype for x in ours)
    for name, a, b, t in zip(["loss", "dq", "dk"], ours, theirs, truth):
        our_error, their_error = (a.double() - t).norm(), (b.double() - t).norm()
        assert our_error <= their_error, f"{name}: error {our_error:.3e} > reference's own {their_error:.3e} in {dtype}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph(backend):
    def step(q, k, ql, kl):
        return ddfast.infonce(2 * q, k, ql, kl, temperature=0.2, backend=backend) + 1

    q, k, ql, kl = make(33, 70, 16, labels=True, dtype=torch.float32)
    compiled = loss_and_grads_of(torch.compile(step, fullgraph=True), q, k, ql, kl)
    eager = loss_and_grads_of(step, q, k, ql, kl)
    torch.testing.assert_close(compiled, eager)


def loss_and_grads_of(fn, q, k, ql, kl):
    loss = fn(q, k, ql, kl)
    return [loss, *torch.autograd.grad(loss, [q, k])]


def test_operator_registration():
    q, k, _, _ = make(5, 9, 8, labels=False, dtype=torch.float32)
    temperature = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ddfast.infonce_forward.default, (q, k, None, None, temperature, True, "torch"))


def test_module_learns_temperature():
    module = ddfast.InfoNCE(0.5, learn_temperature=True, backend="torch")
    q, k, ql, kl = make(10, 30, 6, labels=True)
    module(q.float(), k.float(), ql, kl).backward()
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    ddfast.infonce(q, k, ql, kl, temperature=temperature, backend="reference").backward()
    torch.testing.assert_close(module.temperature.grad.double(), temperature.grad, rtol=1e-4, atol=1e-6)
    assert "temperature=0.5" in repr(module)


def test_auto_picks_a_compiled_backend_on_cpu():
    assert REGISTRY.resolve("auto", torch.device("cpu"), torch.float32) == "cpu"


def test_reference_is_the_documented_formula():
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ql, kl = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1, 1, 2])
    s = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).T / 0.5
    expected = torch.stack([s[0].logsumexp(0) - s[0, 1],
                            s[1].logsumexp(0) - s[1, [0, 2, 3]].mean(),
                            s[2].logsumexp(0) - s[2, [0, 2, 3]].mean()]).mean()
    torch.testing.assert_close(reference.infonce(q, k, ql, kl, temperature=0.5), expected)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k: ddfast.infonce(q[0], k, temperature=0.1), ValueError, "query must have 2"),
    (lambda q, k: ddfast.infonce(q.long(), k.long(), temperature=0.1), TypeError, "query must have dtype"),
    (lambda q, k: ddfast.infonce(q, k.double(), temperature=0.1), TypeError, "share one dtype"),
    (lambda q, k: ddfast.infonce(q, k.to("meta"), temperature=0.1), ValueError, "key must be on"),
    (lambda q, k: ddfast.infonce(q, k[:, :3], temperature=0.1), ValueError, "same feature dimension"),
    (lambda q, k: ddfast.infonce(q[:0], k, temperature=0.1), ValueError, "non-empty"),
    (lambda q, k: ddfast.infonce(q, k[:2], temperature=0.1), ValueError, "at least N=4"),
    (lambda q, k: ddfast.infonce(q, k, torch.zeros(4, dtype=torch.long), temperature=0.1), ValueError, "given together"),
    (lambda q, k: ddfast.infonce(q, k, torch.zeros(3, dtype=torch.long), torch.zeros(6, dtype=torch.long), temperature=0.1),
     ValueError, "query_labels must have shape"),
    (lambda q, k: ddfast.infonce(q, k, torch.zeros(4), torch.zeros(6), temperature=0.1), TypeError, "query_labels must have an integer"),
    (lambda q, k: ddfast.infonce(q, k, temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (lambda q, k: ddfast.infonce(q, k, temperature=-1.0), ValueError, "temperature"),
    (lambda q, k: ddfast.infonce(q, k, temperature=torch.tensor(-0.5), backend="torch"), ValueError, "temperature must be"),
    (lambda q, k: ddfast.infonce(q, k, temperature=torch.ones(2)), ValueError, "one-element"),
    (lambda q, k: ddfast.infonce(q, k, temperature=0.1, reduction="avg"), ValueError, "reduction must be"),
    (lambda q, k: ddfast.infonce(q, k, temperature=0.1, reduction="none", symmetric=True), ValueError, "symmetric"),
    (lambda q, k: ddfast.infonce(q, k, temperature=0.1, backend="fast"), ValueError, "backend must be"),
])
def test_bad_input_is_named(call, error, match):
    q, k = torch.randn(4, 5), torch.randn(6, 5)
    with pytest.raises(error, match=match):
        call(q, k)


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 1024), (torch.float32, 1024), (torch.float16, 100)])
def test_triton_kernels_compile_for_hopper(dtype, d):
    """Every kernel, with the launch configuration the backend picks, lowers to sm_90 code whose shared
    memory fits a block (the widest rows of each dtype, and a small odd width)."""
    pytest.importorskip("triton")
    import hopper
    from ddfast.ops.infonce.triton import _config

    config = _config(d, dtype)
    launch = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
    element = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    common = {"constexprs": {"HAS_NORM": True, "ACC": "tl.float32", "UPCAST": False,
                             "PRECISION": "ieee" if dtype == torch.float32 else None, **config},
              "module": "ddfast.ops.infonce.triton", "floats": ["scale_log2e", "scale"], **launch}
    stats = {"RK": "*fp32", "MAX_OUT": "*fp32", "SUM_OUT": "*fp32", "LSE2": "*fp32", "WEIGHT": "*fp32", "OUT": "*fp32"}
    specs = [{**common, "kernel": "_lse_kernel", "pointers": {"Q": element, "K": element, **stats}}]
    for query_rows in (True, False):
        specs.append({**common, "kernel": "_grad_kernel", "pointers": {"A": element, "B": element, **stats},
                      "constexprs": {**common["constexprs"], "QUERY_ROWS": query_rows}})
    for spec, shared in zip(specs, hopper.shared_memory(specs)):
        assert 0 < shared <= hopper.SHARED_MEMORY_PER_BLOCK, (spec["kernel"], shared)
