"""ddfast.infonce: every backend against the plain-torch reference, forward and all gradients."""

import inspect
import itertools

import pytest
import torch
from ops_support import DEVICE, assert_all_close, assert_close, assert_fits_hopper, backends

import ddfast
from benchmarks import static_sm90
from ddfast.ops.infonce import REGISTRY, reference

FUSED = backends(REGISTRY)  # every backend but reference, in float64
FUSED_FLOAT32 = backends(REGISTRY, torch.float32)
EVERY = backends(REGISTRY, reference=True)
LOW_PRECISION = [pytest.param(*p.values, dtype, marks=p.marks, id=f"{p.id}-{str(dtype).removeprefix('torch.')}")
                 for dtype in (torch.bfloat16, torch.float16) for p in backends(REGISTRY, dtype)]


def make(n, m, d, *, labels, dtype=torch.float64, classes=5, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, d, generator=g, dtype=torch.float64) * spread).to(DEVICE, dtype).requires_grad_()
    k = (torch.randn(m, d, generator=g, dtype=torch.float64) * spread).to(DEVICE, dtype).requires_grad_()
    ql = torch.randint(0, classes, (n,), generator=g).to(DEVICE) if labels else None
    kl = torch.randint(0, classes, (m,), generator=g).to(DEVICE) if labels else None
    return q, k, ql, kl


def with_grads(loss, inputs):
    """``[loss, *gradients of inputs]`` with a varying upstream gradient (0.5 to 1.5) for reduction='none',
    so that each row's gradient is weighted differently."""
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    return [loss, *torch.autograd.grad((loss * upstream).sum(), inputs)]


def loss_and_grads(backend, q, k, ql, kl, temperature, **options):
    """Loss and the gradients of every input that requires one (q, k, temperature)."""
    loss = ddfast.infonce(q, k, ql, kl, temperature=temperature, backend=backend, **options)
    return with_grads(loss, [x for x in (q, k, temperature) if isinstance(x, torch.Tensor) and x.requires_grad])


def assert_matches_reference(backend, q, k, ql, kl, temperature, rtol=1e-9, atol=1e-11, **options):
    """Agreement elementwise, with ``atol`` relative to each tensor's largest magnitude."""
    ours = loss_and_grads(backend, q, k, ql, kl, temperature, **options)
    expected = loss_and_grads("reference", q, k, ql, kl, temperature, **options)
    assert_all_close(ours, expected, rtol=rtol, atol=atol, names=["loss", "grad 1", "grad 2", "grad 3"], what=backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "index"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_reference(backend, labels, normalize, reduction):
    q, k, ql, kl = make(37, 101, 19, labels=labels)
    temperature = torch.tensor(0.3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_reference(backend, q, k, ql, kl, temperature, normalize=normalize, reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (3, 70, 130), (70, 3, 5), (129, 257, 33), (5, 200, 70)])
def test_odd_shapes(backend, n, m, d):
    """Odd sizes; under Triton's interpreter (16 x 16 tiles, 32-feature chunks and output blocks) they
    cover partial row, key and feature blocks, several chunks, output blocks and key splits at once."""
    q, k, ql, kl = make(n, m, d, labels=True, classes=3)
    assert_matches_reference(backend, q, k, ql, kl, 0.5, reduction="none")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
def test_temperatures_and_large_logits(backend, temperature):
    # unnormalised features with large norms: logits reach about 1e4 / temperature
    q, k, ql, kl = make(23, 61, 17, labels=True, spread=30.0)
    assert_matches_reference(backend, q, k, ql, kl, temperature, normalize=False, reduction="none", rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backend", FUSED)
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


@pytest.mark.parametrize("backend", FUSED)
def test_no_query_has_a_positive(backend):
    q, k, _, _ = make(4, 7, 5, labels=False)
    ql, kl = torch.full((4,), 9, device=DEVICE), torch.arange(7, device=DEVICE)
    loss, dq, dk = loss_and_grads(backend, q, k, ql, kl, 0.1)
    assert loss.item() == 0.0 and torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "index"])
def test_symmetric(backend, labels):
    q, k, ql, kl = make(29, 45, 12, labels=labels)
    assert_matches_reference(backend, q, k, ql, kl, 0.25, symmetric=True)


@pytest.mark.parametrize("backend", FUSED)
def test_keys_without_gradient(backend):
    q, k, ql, kl = make(17, 40, 9, labels=True)
    k = k.detach()
    ours = loss_and_grads(backend, q, k, ql, kl, 0.2)
    expected = loss_and_grads("reference", q, k, ql, kl, 0.2)
    assert len(ours) == 2
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", FUSED_FLOAT32)
def test_float32_precision(backend):
    q, k, ql, kl = make(45, 300, 64, labels=True, dtype=torch.float32)
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    ours = loss_and_grads(backend, q, k, ql, kl, 0.07, reduction="none")
    truth = loss_and_grads("reference", q64, k64, ql, kl, 0.07, reduction="none")
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION)
@pytest.mark.parametrize("options", [{"reduction": "mean"}, {"reduction": "none"}, {"reduction": "mean", "symmetric": True}],
                         ids=["mean", "none", "symmetric"])
def test_low_precision_no_worse_than_reference(backend, dtype, options):
    q, k, ql, kl = make(67, 131, 40, labels=True, dtype=dtype)
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    truth = loss_and_grads("reference", q64, k64, ql, kl, 0.07, **options)
    ours = loss_and_grads(backend, q, k, ql, kl, 0.07, **options)
    theirs = loss_and_grads("reference", q, k, ql, kl, 0.07, **options)
    assert all(x.dtype == dtype for x in ours)
    for name, a, b, t in zip(["loss", "dq", "dk"], ours, theirs, truth):
        our_error, their_error = (a.double() - t).norm(), (b.double() - t).norm()
        assert our_error <= their_error, f"{name}: error {our_error:.3e} > reference's own {their_error:.3e} in {dtype}"


@pytest.mark.parametrize("backend", FUSED_FLOAT32)
def test_torch_compile_fullgraph(backend):
    def step(q, k, ql, kl):
        return ddfast.infonce(2 * q, k, ql, kl, temperature=0.2, backend=backend) + 1

    q, k, ql, kl = make(33, 70, 16, labels=True, dtype=torch.float32)
    compiled = with_grads(torch.compile(step, fullgraph=True)(q, k, ql, kl), [q, k])
    eager = with_grads(step(q, k, ql, kl), [q, k])
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "index"])
def test_operator_registration(reduction, labels):
    """The forward operator (reducing inside, the loss in the inputs' dtype), its fake implementation and
    its autograd formula (through the backward operator) pass torch's operator checks."""
    q, k, ql, kl = make(5, 9, 8, labels=labels, dtype=torch.float32)
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    args = (q, k, ql, kl, temperature, True, reduction, "torch")
    torch.library.opcheck(torch.ops.ddfast.infonce_forward.default, args)
    loss, lse = torch.ops.ddfast.infonce_forward(*args)
    assert loss.dtype == q.dtype and loss.shape == ((5,) if reduction == "none" else ())
    assert lse.dtype == torch.float32 and lse.shape == (5,)


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


PROTOCOL = ("lse", "grads")  # the functions streaming.py's docstring lists


@pytest.mark.parametrize("backend", FUSED_FLOAT32)
def test_each_backend_loads_its_module_with_the_protocol(backend):
    """``REGISTRY.kernels`` returns the backend's own module, defining the protocol with streaming.py's signatures."""
    from ddfast.ops.infonce import streaming

    module = REGISTRY.kernels(backend, torch.zeros(2, 3, device=DEVICE))
    assert module.__name__ == "ddfast.ops.infonce." + ("streaming" if backend == "torch" else backend)
    for name in PROTOCOL:
        assert inspect.signature(getattr(module, name)) == inspect.signature(getattr(streaming, name)), name


def test_reference_runs_through_no_operator():
    with pytest.raises(ValueError, match="backend='reference' is plain torch"):
        REGISTRY.kernels("reference", torch.zeros(2, 3))


def test_triton_refuses_features_wider_than_its_limit():
    """Rows wider than the Triton kernels take: ``auto`` on a GPU takes the streaming backend, a forced
    ``triton`` raises naming the limit (before any kernel runs)."""
    from ddfast.ops.infonce.op import TRITON_MAX_DIM

    wide, fits = torch.zeros(2, TRITON_MAX_DIM + 1), torch.zeros(2, TRITON_MAX_DIM)
    problem = REGISTRY.problem("triton", torch.device("cuda"), torch.float32)
    if problem is not None:
        pytest.skip(f"backend 'triton' cannot run: {problem}")
    assert REGISTRY.resolve("auto", torch.device("cuda"), torch.float32, like=fits) == "triton"
    assert REGISTRY.resolve("auto", torch.device("cuda"), torch.float32, like=wide) == "torch"
    if REGISTRY.problem("triton", torch.device(DEVICE), torch.float32) is None:
        q = torch.randn(3, TRITON_MAX_DIM + 1, device=DEVICE)
        with pytest.raises(RuntimeError, match=f"feature dimensions up to {TRITON_MAX_DIM}, got {TRITON_MAX_DIM + 1}"):
            ddfast.infonce(q, q, temperature=0.1, backend="triton")


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
    (lambda q, k: ddfast.infonce(q, k, torch.zeros(4, dtype=torch.uint64), torch.zeros(6, dtype=torch.uint64),
                                 temperature=0.1), TypeError, "query_labels must have an integer dtype whose values fit int64"),
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


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 1024), (torch.float16, 128), (torch.float32, 1024), (torch.float16, 100)])
def test_triton_kernels_compile_for_hopper(dtype, d):
    """Every kernel, with the launch configuration the backend picks, lowers to sm_90 code whose shared
    memory fits a block, without spills (the widest rows of each dtype, narrow rows, and an odd width,
    which the backend pads to a multiple of 16)."""
    pytest.importorskip("triton")
    assert_fits_hopper(static_sm90.infonce_specs(d, dtype))


N, M, D = 6, 10, 5  # small odd sizes for the layout, subset and transform tests


def leaf(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()


def labels_of(length, seed=1, classes=3):
    return torch.randint(0, classes, (length,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# name -> (leaves, build): build(*leaves) gives (query, key, query_labels, key_labels, temperature) views
def fixed(rows, like):
    """A (rows, D) input that needs no gradient, in ``like``'s dtype."""
    return leaf(rows, D, seed=rows, dtype=like.dtype).detach()


LAYOUTS = {
    "query[:, ::2]": lambda: ((leaf(N, 2 * D),), lambda b: (b[:, ::2], fixed(M, b), None, None, 0.3)),
    "query[::2]": lambda: ((leaf(2 * N, D),), lambda b: (b[::2], fixed(M, b), None, None, 0.3)),
    "query.t()": lambda: ((leaf(D, N),), lambda b: (b.t(), fixed(M, b), None, None, 0.3)),
    "query expanded": lambda: ((leaf(D),), lambda b: (b.expand(N, D), fixed(M, b), None, None, 0.3)),
    "key[:, ::2]": lambda: ((leaf(M, 2 * D),), lambda b: (fixed(N, b), b[:, ::2], None, None, 0.3)),
    "key[::2]": lambda: ((leaf(2 * M, D),), lambda b: (fixed(N, b), b[::2], None, None, 0.3)),
    "key.t()": lambda: ((leaf(D, M),), lambda b: (fixed(N, b), b.t(), None, None, 0.3)),
    "key expanded": lambda: ((leaf(D),), lambda b: (fixed(N, b), b.expand(M, D), None, None, 0.3)),
    "both strided": lambda: ((leaf(D, N), leaf(M, 3 * D)), lambda q, k: (q.t(), k[:, 1::3], None, None, 0.3)),
    "labels[::2]": lambda: ((leaf(N, D), leaf(M, D)),
                            lambda q, k: (q, k, labels_of(2 * N)[::2], labels_of(2 * M, seed=2)[::2], 0.3)),
    "labels expanded": lambda: ((leaf(N, D), leaf(M, D)),
                                lambda q, k: (q, k, labels_of(1).expand(N), labels_of(M, seed=2), 0.3)),
    "temperature[2::3]": lambda: ((leaf(N, D), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, device=DEVICE,
                                                            requires_grad=True)),
                                  lambda q, t: (q, fixed(M, q), None, None, t[2::3])),
    "temperature expanded": lambda: ((leaf(N, D), torch.tensor(0.3, dtype=torch.float64, device=DEVICE, requires_grad=True)),
                                     lambda q, t: (q, fixed(M, q), None, None, t.expand(1))),
    "temperature[1]": lambda: ((leaf(N, D), torch.tensor([0.2, 0.3], dtype=torch.float64, device=DEVICE, requires_grad=True)),
                               lambda q, t: (q, fixed(M, q), None, None, t[1])),
}


def loss_and_leaf_grads(backend, leaves, build, contiguous=False, **options):
    """Loss of ``build(*leaves)`` and the gradient of every leaf; ``contiguous`` copies each view first."""
    q, k, ql, kl, t = build(*leaves)
    if contiguous:
        q, k = q.contiguous(), k.contiguous()
        ql, kl = (None if y is None else y.contiguous() for y in (ql, kl))
        t = t.contiguous() if isinstance(t, torch.Tensor) else t
    return with_grads(ddfast.infonce(q, k, ql, kl, temperature=t, backend=backend, **options), leaves)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_odd_layouts_match_reference(backend, layout, normalize):
    """Strided, transposed and expanded query / key / labels / temperature views give the reference's
    loss and gradients (those of each view's base tensor) in float64."""
    leaves, build = LAYOUTS[layout]()
    reduction = "none" if "expanded" not in layout else "mean"
    ours = loss_and_leaf_grads(backend, leaves, build, normalize=normalize, reduction=reduction)
    expected = loss_and_leaf_grads("reference", leaves, build, contiguous=True, normalize=normalize, reduction=reduction)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, rtol=1e-9, atol=1e-11, what=layout)


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION)
@pytest.mark.parametrize("layout", ["query.t()", "key[:, ::2]", "key expanded", "both strided"])
def test_low_precision_odd_layouts_equal_contiguous(backend, dtype, layout):
    """In bf16 / fp16 a view computes exactly what its contiguous copy computes."""
    leaves, build = LAYOUTS[layout]()
    leaves = tuple(x.detach().to(dtype).requires_grad_() for x in leaves)
    ours = loss_and_leaf_grads(backend, leaves, build)
    copied = loss_and_leaf_grads(backend, leaves, build, contiguous=True)
    for a, b in zip(ours, copied):
        assert a.dtype == dtype and torch.equal(a, b)


SUBSETS = [wrt for size in (1, 2, 3) for wrt in itertools.combinations(("query", "key", "temperature"), size)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("wrt", SUBSETS, ids="+".join)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "index"])
def test_gradient_of_any_subset_of_inputs(backend, wrt, symmetric, labels):
    """Each subset of {query, key, temperature} that requires grad gets exactly its gradients, equal to
    the reference's, for both positive modes, normalisation on and off and every reduction."""
    for normalize in (True, False):
        for reduction in ("mean", "sum") if symmetric else ("mean", "sum", "none"):
            q, k, ql, kl = make(7, 11, 6, labels=labels, classes=3)
            q.requires_grad_("query" in wrt)
            k.requires_grad_("key" in wrt)
            t = torch.tensor([0.3], dtype=torch.float64, device=DEVICE, requires_grad="temperature" in wrt)
            ours = loss_and_grads(backend, q, k, ql, kl, t, normalize=normalize, reduction=reduction, symmetric=symmetric)
            expected = loss_and_grads("reference", q, k, ql, kl, t, normalize=normalize, reduction=reduction,
                                      symmetric=symmetric)
            assert len(ours) == 1 + len(wrt)
            for a, b in zip(ours, expected):
                assert a.shape == b.shape and a.dtype == b.dtype
                assert_close(a, b, rtol=1e-9, atol=1e-11, what=f"normalize={normalize} {reduction}")


def fused_call(backend, **options):
    k, ql, kl = leaf(M, D, seed=1).detach(), labels_of(N), labels_of(M, seed=2)
    return lambda q, t=0.3: ddfast.infonce(q, k, ql, kl, temperature=t, backend=backend, **options)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("transform", ["jvp", "jvp temperature", "jacfwd", "forward_ad", "grad", "vjp", "jacrev", "hessian"])
def test_unsupported_transforms_are_refused(backend, transform):
    f = fused_call(backend)
    q, t = leaf(N, D).detach(), torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    calls = {
        "jvp": lambda: torch.func.jvp(f, (q,), (torch.ones_like(q),)),
        "jvp temperature": lambda: torch.func.jvp(lambda t: f(q, t), (t,), (torch.ones_like(t),)),
        "jacfwd": lambda: torch.func.jacfwd(f)(q),
        "forward_ad": lambda: _forward_ad(f, q),
        "grad": lambda: torch.func.grad(f)(q),
        "vjp": lambda: torch.func.vjp(f, q),
        "jacrev": lambda: torch.func.jacrev(f)(q),
        "hessian": lambda: torch.func.hessian(f)(q),
    }
    with pytest.raises(NotImplementedError, match="ddfast.infonce does not support"):
        calls[transform]()


def _forward_ad(f, q):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(q, torch.ones_like(q)))).tangent


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_is_refused_first_order_graph_works(backend):
    q = leaf(N, D)
    (grad,) = torch.autograd.grad(fused_call(backend)(q), q, create_graph=True)
    (expected,) = torch.autograd.grad(fused_call("reference")(q), q)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(NotImplementedError, match="ddfast.infonce does not support double backward"):
        grad.square().sum().backward()


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_vmap_matches_reference(backend, symmetric):
    """vmap over a batch of queries and of temperatures: each entry, and the gradients through the
    vmapped call, equal the reference's loop over the entries."""
    queries, temperatures = leaf(3, N, D), torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64, device=DEVICE,
                                                        requires_grad=True)
    k = leaf(M, D, seed=1)
    ql, kl = labels_of(N), labels_of(M, seed=2)

    def one(backend_name):
        return lambda q, t: ddfast.infonce(q, k, ql, kl, temperature=t, symmetric=symmetric, backend=backend_name)

    ours = torch.func.vmap(one(backend))(queries, temperatures)
    expected = torch.stack([one("reference")(q, t) for q, t in zip(queries, temperatures)])
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64, device=DEVICE)
    for a, b in zip([ours, *torch.autograd.grad((ours * weights).sum(), [queries, k, temperatures])],
                    [expected, *torch.autograd.grad((expected * weights).sum(), [queries, k, temperatures])]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_reference_supports_every_transform():
    """torch.func.grad and jvp of the reference agree with reverse-mode autograd, and its Hessian-vector
    product by double backward agrees with forward-over-reverse."""
    f = fused_call("reference", normalize=True)
    q, v = leaf(N, D), leaf(N, D, seed=3).detach()
    (grad,) = torch.autograd.grad(f(q), q, create_graph=True)
    torch.testing.assert_close(torch.func.grad(f)(q), grad, rtol=1e-12, atol=1e-14)
    _, tangent = torch.func.jvp(f, (q.detach(),), (v,))
    torch.testing.assert_close(tangent, (grad * v).sum(), rtol=1e-10, atol=1e-14)
    (hvp,) = torch.autograd.grad(grad, q, v)
    _, hvp_forward = torch.func.jvp(torch.func.grad(f), (q.detach(),), (v,))
    torch.testing.assert_close(hvp, hvp_forward, rtol=1e-9, atol=1e-12)
    assert hvp.abs().max() > 1e-3


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_non_finite_features_are_refused(backend, where, value, normalize):
    q, k, ql, kl = make(5, 8, 4, labels=True)
    x = (q if where == "query" else k).detach()
    x[2, 1] = value
    with pytest.raises(ValueError, match=f"{where} contains non-finite values"):
        ddfast.infonce(q, k, ql, kl, temperature=0.2, normalize=normalize, backend=backend)


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("temperature,error,match", [
    (torch.tensor(0.0), ValueError, "temperature must be a finite number > 0"),
    (torch.tensor([-0.5]), ValueError, "temperature must be a finite number > 0"),
    (torch.tensor(float("nan")), ValueError, "temperature must be a finite number > 0"),
    (torch.tensor(float("inf")), ValueError, "temperature must be a finite number > 0"),
    (torch.tensor(1e-320, dtype=torch.float64), ValueError, "finite reciprocal"),
    (1e-320, ValueError, "finite reciprocal"),
    (float("nan"), ValueError, "temperature must be a finite number > 0"),
    (torch.tensor([[0.5]]), ValueError, r"shape \(\) or \(1,\)"),
    (torch.tensor([0.5, 0.5]), ValueError, "one-element"),
    (torch.tensor(1), TypeError, "temperature must be a python float or a floating tensor"),
    (torch.tensor(0.5, device="meta"), ValueError, "temperature must be on the inputs' device"),
], ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_bad_temperatures_are_refused(backend, temperature, error, match):
    q, k, ql, kl = make(5, 8, 4, labels=True)
    with pytest.raises(error, match=match):
        ddfast.infonce(q, k, ql, kl, temperature=temperature, backend=backend)


@pytest.mark.parametrize("backend", backends(REGISTRY, torch.float32, reference=True))
def test_huge_tiny_and_zero_float32_rows_normalise_without_overflow(backend):
    """float32 rows with entries up to 3e38 (their squares overflow float32), tiny rows and zero rows:
    loss and gradients match the float64 reference of the same values."""
    magnitudes = torch.tensor([3e38, 1e20, 1.0, 1e-30, 0.0, 2e35, 1e-3], dtype=torch.float64)

    def rows(n, seed):
        x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x = x / x.abs().amax(1, keepdim=True) * magnitudes[torch.arange(n) % len(magnitudes), None]
        return x.float().to(DEVICE).requires_grad_()

    q, k = rows(7, 0), rows(12, 1)
    ql, kl = labels_of(7), labels_of(12, seed=2)
    t = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    ours = loss_and_grads(backend, q, k, ql, kl, t, reduction="none")
    q64, k64, t64 = (x.detach().double().requires_grad_() for x in (q, k, t))
    truth = loss_and_grads("reference", q64, k64, ql, kl, t64, reduction="none")
    assert all(torch.isfinite(a).all() for a in ours)
    torch.testing.assert_close(ours[0].double(), truth[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[3].double(), truth[3], rtol=1e-5, atol=1e-5 * truth[3].abs().item())
    for a, x, b in ((ours[1], q64, truth[1]), (ours[2], k64, truth[2])):
        # gradients scale as 1 / ||x_i||: compare them relative to each row (clamped rows: 1 / 1e-12)
        row = x.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
        torch.testing.assert_close(a.double() * row, b * row, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("dtype,spread,temperature", [(torch.float32, 1e20, 0.5), (torch.float64, 1e10, 1e-300)])
def test_overflowing_logits_are_refused(backend, dtype, spread, temperature):
    """Without normalisation, logits beyond the dtype's range raise instead of giving inf or nan."""
    q, k, ql, kl = make(5, 8, 4, labels=True, dtype=dtype, spread=spread)
    with pytest.raises(ValueError, match="logits <q, k> / temperature overflow"):
        ddfast.infonce(q, k, ql, kl, temperature=temperature, normalize=False, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("temperature,dtype", [(1e30, torch.float64), (1e-5, torch.float64), (1e30, torch.float32),
                                               (1e-3, torch.float32)])
def test_extreme_temperatures(backend, temperature, dtype):
    """Temperatures far from 1 give the reference's loss and gradients (float32 against float64 truth)."""
    q, k, ql, kl = make(9, 14, 5, labels=True, dtype=dtype)
    t = torch.tensor(temperature, dtype=dtype, device=DEVICE, requires_grad=True)
    ours = loss_and_grads(backend, q, k, ql, kl, t, reduction="none")
    q64, k64, t64 = (x.detach().double().requires_grad_() for x in (q, k, t))
    truth = loss_and_grads("reference", q64, k64, ql, kl, t64, reduction="none")
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for a, b in zip(ours, truth):
        b = b.to(dtype).double()  # what the dtype can hold (1e30: the temperature's gradient is 0 in float32)
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("temperature,dtype,normalize", [(1e-30, torch.float64, True), (1e-8, torch.float32, True),
                                                         (1e-3, torch.float32, False)])
def test_logits_too_large_to_differentiate_are_refused(backend, temperature, dtype, normalize):
    """Logits so large that their recomputation's rounding would corrupt the softmax weights: the loss
    is the reference's, its backward raises instead of returning nan or wrong gradients."""
    q, k, ql, kl = make(9, 14, 5, labels=True, dtype=dtype, spread=100.0)
    loss = ddfast.infonce(q, k, ql, kl, temperature=temperature, normalize=normalize, reduction="none", backend=backend)
    expected = ddfast.infonce(q, k, ql, kl, temperature=temperature, normalize=normalize, reduction="none",
                              backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    with pytest.raises(ValueError, match="cannot differentiate logits reaching"):
        loss.sum().backward()


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("query_dtype,key_dtype", [(torch.int32, torch.uint8), (torch.uint8, torch.int64),
                                                   (torch.int16, torch.uint16), (torch.uint32, torch.int8)])
def test_label_dtypes_compare_by_value(backend, query_dtype, key_dtype):
    q, k, ql, kl = make(7, 12, 5, labels=True)
    ours = loss_and_grads(backend, q, k, ql.to(query_dtype), kl.to(key_dtype), 0.2, reduction="none")
    expected = loss_and_grads("reference", q, k, ql, kl, 0.2, reduction="none")
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", EVERY)
def test_negative_labels_are_classes(backend):
    q, k, ql, kl = make(7, 12, 5, labels=True)
    shifted = ddfast.infonce(q, k, ql - 7, kl - 7, temperature=0.2, reduction="none", backend=backend)
    torch.testing.assert_close(shifted, ddfast.infonce(q, k, ql, kl, temperature=0.2, reduction="none", backend="reference"))
    # -1 (int8) and 255 (uint8) are different classes: no query has a positive
    rows = ddfast.infonce(q, k, torch.full((7,), -1, dtype=torch.int8, device=DEVICE),
                          torch.full((12,), 255, dtype=torch.uint8, device=DEVICE), temperature=0.2,
                          reduction="none", backend=backend)
    assert torch.equal(rows, torch.zeros_like(rows))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (1, 4, 1), (3, 5, 1), (2, 2, 3)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_tiny_shapes_index_positives(backend, n, m, d, normalize):
    q, k, _, _ = make(n, m, d, labels=False)
    t = torch.tensor(0.4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_reference(backend, q, k, None, None, t, normalize=normalize, symmetric=True)


@pytest.mark.parametrize("backend", FUSED)
def test_zero_rows_match_reference(backend):
    q, k, ql, kl = make(6, 9, 4, labels=True)
    with torch.no_grad():
        q[1] = 0
        k[[0, 5]] = 0
    t = torch.tensor(0.3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_matches_reference(backend, q, k, ql, kl, t, reduction="none")
