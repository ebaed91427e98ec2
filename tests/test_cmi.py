"""cmi_loss and ClassCentroids: every backend against the plain-torch reference (float64), numerics, API, errors, compile."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import ops_support
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from ops_support import DEVICE, assert_fits_hopper, backends

import ddfast
from benchmarks import static_sm90
from ddfast import _extension
from ddfast._backends import triton_interpreted
from ddfast.ops.cmi import REGISTRY, ClassCentroids, CMILoss, cmi_loss, cmi_per_class, cuda, streaming
from ddfast.ops.cmi.reference import cmi_authors, cmi_reference
from ddfast.ops.cmi.segments import Segments

assert_close = functools.partial(ops_support.assert_close, atol_relative=False)  # this file's tolerances are absolute

# numpy warns about log(0) and 0 * inf in masked-out lanes of Triton tiles run by the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")


def batch(n, k, classes, *, dtype=torch.float64, device="cpu", scale=3.0, seed=0):
    """Unsorted labels; the last class absent and the one before it holding a single row."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, k, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, classes - 2, (n,), generator=gen)
    labels[n // 2] = classes - 2
    return features.to(device=device, dtype=dtype), labels.to(device)


def simplex(classes, k, *, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(classes, k, generator=gen, dtype=torch.float64) * 2, dim=1).to(dtype)


def value_and_grad(fn, features, weights, view=None):
    """fn(view(leaf)) for a leaf copy of ``features`` (strides kept; ``view`` defaults to the leaf
    itself), and the gradient of its ``weights``-weighted sum with respect to the leaf."""
    leaf = features.detach().clone().requires_grad_()
    loss = fn(leaf if view is None else view(leaf))
    (grad,) = torch.autograd.grad((loss.to(weights.dtype) * weights).sum(), leaf)
    return loss.detach(), grad


def assert_float64_match(actual, expected):
    """A (loss, gradient) pair against the reference's, both computed in float64."""
    (value, grad), (expected_value, expected_grad) = actual, expected
    assert_close(value, expected_value, rtol=1e-10, atol=1e-13, what="loss")
    assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13, what="gradient")


def weights_for(reduction, n, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n if reduction == "none" else (), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("name", backends(REGISTRY))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("given_centroids", [False, True], ids=["batch-centroids", "given-centroids"])
def test_matches_reference_float64(name, reduction, given_centroids):
    features, labels = batch(67, 37, 6, device=DEVICE)
    centroids = simplex(6, 37).to(DEVICE) if given_centroids else None
    weights = weights_for(reduction, 67, device=DEVICE)
    options = dict(temperature=0.7, centroids=centroids, reduction=reduction)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 6, backend=name, **options), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_reference(f, labels, 6, **options), features, weights)
    assert value.dtype == torch.float64 and value.shape == expected_value.shape
    assert_float64_match((value, grad), (expected_value, expected_grad))
    assert expected_grad.abs().max() > 1e-3


@pytest.mark.parametrize("name", backends(REGISTRY))
def test_many_tiles_and_chunks(name, monkeypatch):
    """Classes of more rows than a chunk, K above a column tile, streaming over several row blocks."""
    monkeypatch.setattr(streaming, "ELEMENTS", 1000)
    features, labels = batch(203, 150, 4, device=DEVICE, seed=3)
    weights = weights_for("none", 203, device=DEVICE)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, temperature=1.3, reduction="none", backend=name), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_reference(f, labels, 4, temperature=1.3, reduction="none"), features, weights)
    assert_float64_match((value, grad), (expected_value, expected_grad))


@pytest.mark.parametrize("name", backends(REGISTRY))
def test_wide_rows_and_non_contiguous_features(name):
    """K above 1000 (and no multiple of any block or vector width), features given as a strided view."""
    features, labels = batch(1030, 21, 5, device=DEVICE, seed=4)
    features = features.t()  # (21, 1030), not contiguous
    labels = labels[:21] % 3
    weights = weights_for("none", 21, device=DEVICE)
    assert not features.detach().clone().is_contiguous()  # value_and_grad's copy keeps the strides
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 3, temperature=2.5, reduction="none", backend=name), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_reference(f, labels, 3, temperature=2.5, reduction="none"), features, weights)
    assert_float64_match((value, grad), (expected_value, expected_grad))


@pytest.mark.parametrize("name", backends(REGISTRY))
def test_hundred_thousand_rows(name):
    """N = 100,000 rows in float32."""
    if name == "triton" and triton_interpreted():
        pytest.skip("the interpreted Triton backend is too slow for 100,000 rows")
    features, labels = batch(100_003, 8, 12, dtype=torch.float32, device=DEVICE, scale=2.0, seed=9)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 12, backend=name), features, torch.ones((), device=DEVICE))
    exact_value, exact_grad = value_and_grad(lambda f: cmi_reference(f.double(), labels, 12), features,
                                             torch.ones((), dtype=torch.float64, device=DEVICE))
    assert_close(value.double(), exact_value.double(), rtol=1e-5, atol=0)
    assert_close(grad.double(), exact_grad.double(), rtol=1e-4, atol=1e-5 * exact_grad.abs().max().item())


@pytest.mark.parametrize("name", backends(REGISTRY))
def test_single_class_and_all_singletons(name):
    features, _ = batch(23, 9, 3, device=DEVICE)
    one_class = torch.zeros(23, dtype=torch.long, device=DEVICE)
    assert_close(cmi_loss(features, one_class, backend=name), cmi_reference(features, one_class), rtol=1e-10, atol=1e-13)
    singletons = torch.randperm(23).to(DEVICE)
    kl = cmi_loss(features, singletons, 23, reduction="none", backend=name)
    assert torch.equal(kl, torch.zeros_like(kl))  # each row is its own centroid: KL exactly 0
    assert cmi_loss(features, one_class, backend=name) > 0.1


@pytest.mark.parametrize("name", backends(REGISTRY))
def test_equals_the_authors_formulation(name):
    """The float32 loss and gradient agree with the authors' F.kl_div form to float32 precision."""
    features, labels = batch(120, 64, 10, dtype=torch.float32, device=DEVICE, scale=2.0, seed=5)
    weights = torch.ones((), device=DEVICE)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 10, backend=name), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_authors(f.double(), labels, 10), features, weights.double())
    assert_close(value.double(), expected_value.double(), rtol=2e-5, atol=1e-7)
    assert_close(grad.double(), expected_grad.double(), rtol=2e-4, atol=1e-9)


def test_reference_equals_the_authors_formulation():
    features, labels = batch(50, 20, 5, scale=1.0)
    assert_close(cmi_reference(features, labels, 5, temperature=2.0), cmi_authors(features, labels, 5, temperature=2.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "column-major"])
def test_low_precision_errs_no_more_than_the_reference_in_that_dtype(name, dtype, reduction, layout):
    features, labels = batch(91, 45, 6, dtype=dtype, device=DEVICE, scale=2.0)
    if layout == "column-major":
        features = features.t().contiguous().t()  # value_and_grad's copy keeps the strides
    weights = weights_for(reduction, 91, device=DEVICE)
    exact_value, exact_grad = value_and_grad(lambda f: cmi_reference(f.double(), labels, 6, reduction=reduction), features, weights)
    ref_value, ref_grad = value_and_grad(lambda f: cmi_reference(f, labels, 6, reduction=reduction), features, weights.to(dtype))
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 6, reduction=reduction, backend=name), features, weights.to(dtype))
    assert value.dtype == dtype and grad.dtype == dtype
    for ours, theirs, exact in ((value, ref_value, exact_value), (grad, ref_grad, exact_grad)):
        our_error = (ours.double() - exact).abs().max()
        their_error = (theirs.double() - exact).abs().max()
        assert our_error <= their_error, f"{name} {dtype}: error {our_error:.3g} above the reference's own {their_error:.3g}"


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
@pytest.mark.parametrize("scale,temperature", [(60.0, 1.0), (1.0, 0.01)], ids=["wide-features", "small-temperature"])
def test_finite_where_naive_float32_underflows(name, scale, temperature):
    features, labels = batch(40, 16, 4, dtype=torch.float32, device=DEVICE, scale=scale, seed=11)
    naive = cmi_reference(features, labels, 4, temperature=temperature)
    assert not torch.isfinite(naive), "the case must break the naive float32 form"
    weights = torch.ones((), dtype=torch.float64, device=DEVICE)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, temperature=temperature, backend=name), features, weights)
    exact_value, exact_grad = value_and_grad(lambda f: cmi_reference(f.double(), labels, 4, temperature=temperature), features, weights)
    assert torch.isfinite(exact_value) and torch.isfinite(exact_grad).all()
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert_close(value.double(), exact_value.double(), rtol=1e-5, atol=1e-6)
    assert_close(grad.double(), exact_grad.double(), rtol=1e-4, atol=1e-5 * exact_grad.abs().max().item())


@pytest.mark.parametrize("name", backends(REGISTRY))
def test_given_centroids_are_constants(name):
    features, labels = batch(30, 12, 4, device=DEVICE)
    centroids = simplex(4, 12).to(DEVICE).requires_grad_()
    features.requires_grad_()
    loss = cmi_loss(features, labels, temperature=0.5, centroids=centroids, backend=name)
    grad_f, grad_c = torch.autograd.grad(loss, (features, centroids), allow_unused=True)
    assert grad_c is None or torch.equal(grad_c, torch.zeros_like(grad_c))
    expected = torch.autograd.grad(cmi_reference(features, labels, temperature=0.5, centroids=centroids.detach()), features)[0]
    assert_close(grad_f, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", backends(REGISTRY))
def test_per_class_complexity(name):
    features, labels = batch(60, 10, 5, device=DEVICE)
    per_class = cmi_per_class(features, labels, 5, temperature=0.8, backend=name)
    kl = cmi_reference(features, labels, 5, temperature=0.8, reduction="none")
    assert per_class.shape == (5,) and torch.isnan(per_class[4])
    for c in range(4):
        assert_close(per_class[c], kl[labels == c].mean(), rtol=1e-12, atol=1e-15)
    counts = torch.bincount(labels, minlength=5).to(per_class.dtype)
    assert_close(torch.nansum(per_class * counts) / 60, cmi_loss(features, labels, 5, temperature=0.8, backend=name), rtol=1e-12, atol=0)


def test_module_twin():
    features, labels = batch(20, 8, 4)
    module = CMILoss(4, temperature=0.5, reduction="sum", backend="torch")
    assert_close(module(features, labels), cmi_loss(features, labels, 4, temperature=0.5, reduction="sum"), rtol=1e-12, atol=0)
    centroids = simplex(4, 8)
    assert_close(module(features, labels, centroids), cmi_reference(features, labels, temperature=0.5, centroids=centroids, reduction="sum"),
                 rtol=1e-12, atol=0)
    assert "temperature=0.5" in repr(module) and ddfast.cmi_loss is cmi_loss


def test_infers_num_classes():
    features, labels = batch(20, 8, 4)
    assert_close(cmi_loss(features, labels, backend="torch"), cmi_reference(features, labels), rtol=1e-12, atol=0)
    centroids = simplex(7, 8)
    assert_close(cmi_loss(features, labels, centroids=centroids), cmi_reference(features, labels, centroids=centroids), rtol=1e-12, atol=0)


@pytest.mark.skipif(REGISTRY.problem("cpu", torch.device("cpu"), torch.float64) is not None, reason="the cpu extension is unavailable")
def test_cpu_backend_is_deterministic_across_thread_counts():
    features, labels = batch(300, 70, 5, dtype=torch.float32, seed=2)
    weights = weights_for("none", 300, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append(value_and_grad(lambda f: cmi_loss(f, labels, 5, reduction="none", backend="cpu"), features, weights))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


PROTOCOL = ("row_norm", "class_log_centroids", "row_kl", "centroid_grad", "row_grad")  # streaming.py's docstring


@pytest.mark.parametrize("name", [n for n in REGISTRY.names() if n != "reference"])
def test_every_backend_module_defines_the_protocol(name):
    """What REGISTRY loads for each backend is its module, defining streaming.py's functions with their signatures."""
    if name == "triton":
        pytest.importorskip("triton")
    module = REGISTRY.backends[name].load()
    assert module.__name__ == f"ddfast.ops.cmi.{'streaming' if name == 'torch' else name}"
    for function in PROTOCOL:
        expected = list(inspect.signature(getattr(streaming, function)).parameters)
        assert list(inspect.signature(getattr(module, function)).parameters) == expected, (name, function)


def test_auto_takes_the_compiled_cpu_kernel():
    expected = "cpu" if "cpu" in REGISTRY.available("cpu") else "torch"
    assert REGISTRY.resolve("auto", torch.device("cpu"), torch.float32) == expected


def test_auto_race_on_cmi(monkeypatch):
    """With a race declared for CPU tensors, auto times the candidates once and caches the pick."""
    monkeypatch.setattr(REGISTRY, "race", {"cpu": ("torch", "cpu")})
    monkeypatch.setattr(REGISTRY, "picks", {})
    features, labels = batch(40, 12, 4)
    loss = cmi_loss(features, labels, 4)
    assert_close(loss, cmi_reference(features, labels, 4), rtol=1e-10, atol=0)
    if REGISTRY.problem("cpu", torch.device("cpu"), torch.float64) is None:
        ((key, pick),) = REGISTRY.picks.items()
        assert key[:2] == (torch.device("cpu"), torch.float64) and pick in ("torch", "cpu")
        assert cmi_loss(features * 2, labels, 4) is not None and len(REGISTRY.picks) == 1  # same bucket: no new race


def test_segments_cover_each_class_in_chunks():
    labels = torch.tensor([3, 0, 3, 3, 1, 3, 0, 3, 3])
    seg = Segments(labels, 5)
    chunks = seg.chunks(2)
    assert seg.counts.tolist() == [2, 1, 0, 6, 0]
    assert chunks.first.tolist() == [0, 1, 2, 2, 5, 5]
    assert chunks.cls.tolist() == [0, 1, 3, 3, 3]
    rows = [seg.order[s:e].tolist() for s, e in zip(chunks.start.tolist(), chunks.end.tolist())]
    assert rows == [[1, 6], [4], [0, 2], [3, 5], [7, 8]]


@pytest.mark.parametrize("name,compiler", [("cpu", "inductor"), ("torch", "aot_eager")])
def test_torch_compile_fullgraph(name, compiler):
    if REGISTRY.problem(name, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(f"backend {name} is unavailable here")
    features, labels = batch(33, 17, 5, dtype=torch.float32)

    def step(f, y):
        return cmi_loss(f, y, 5, temperature=0.9, backend=name) * 2 + cmi_loss(f, y, 5, reduction="none", backend=name).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    value, grad = value_and_grad(lambda f: compiled(f, labels), features, torch.ones(()))
    expected_value, expected_grad = value_and_grad(lambda f: step(f, labels), features, torch.ones(()))
    assert_close(value, expected_value, rtol=1e-6, atol=0)
    assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("given_centroids", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_operator_registration(given_centroids, reduction):
    features, labels = batch(19, 7, 4)
    centroids = simplex(4, 7) if given_centroids else None
    torch.library.opcheck(torch.ops.ddfast.cmi_forward.default, (features.requires_grad_(), labels, centroids, 4, 0.8, reduction, "torch"))


@pytest.mark.skipif(_extension.cuda_home() is None, reason="no CUDA toolkit (nvcc and headers) on this machine")
def test_cuda_sources_build():
    _extension.build("cmi_cuda")


@pytest.mark.parametrize("dtype", list(static_sm90.TRITON_DTYPES), ids=list(static_sm90.TRITON_DTYPES.values()))
def test_triton_kernels_compile_for_hopper(dtype):
    """Every Triton kernel, with the launch options the backend picks at the report's K and at two
    narrower column tiles (K = 30, 50), lowers to sm_90 code whose shared memory fits a block, without spills."""
    pytest.importorskip("triton")
    assert_fits_hopper([spec for k in (*static_sm90.CMI_K, 30, 50) for spec in static_sm90.cmi_specs(k, dtype)])


def test_cuda_chunk_size_matches_its_kernel():
    source = (_extension.csrc_dir() / "cmi" / "cmi_cuda.cu").read_text()
    assert f"kChunkRows = {cuda.CHUNK_ROWS};" in source


# ---- bad input: clear errors naming the argument, before any kernel runs ----

def _call(features=None, labels=None, op=cmi_loss, **kwargs):
    default_features, default_labels = batch(10, 6, 4)
    kwargs.setdefault("num_classes", 4)
    return op(default_features if features is None else features, default_labels if labels is None else labels, **kwargs)


BAD_INPUTS = [
    (dict(features=torch.randn(10)), ValueError, "features must have 2 dimension"),
    (dict(features=torch.ones(10, 6, dtype=torch.long)), TypeError, "features must have dtype"),
    (dict(features=[[1.0]]), TypeError, "features must be a torch.Tensor"),
    (dict(features=torch.randn(0, 6), labels=torch.zeros(0, dtype=torch.long)), ValueError, "at least one row"),
    (dict(labels=torch.zeros(9, dtype=torch.long)), ValueError, r"labels must have shape \(10,\)"),
    (dict(labels=torch.zeros(10, 1, dtype=torch.long)), ValueError, r"labels must have shape \(10,\)"),
    (dict(labels=torch.zeros(10)), TypeError, "labels must have an integer dtype"),
    (dict(labels=torch.zeros(10, dtype=torch.long, device="meta")), ValueError, "labels must be on cpu"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=torch.tensor(1.0)), TypeError, "temperature must be a python float"),
    (dict(temperature="1"), TypeError, "temperature must be a positive float"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(backend="nope"), ValueError, "backend must be 'auto' or one of"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=1e-310), ValueError, "temperature must be a finite number > 0 \\(with a finite reciprocal\\)"),
    (dict(num_classes=0), ValueError, "num_classes must be a positive int, got 0"),
    (dict(num_classes=-3), ValueError, "num_classes must be a positive int, got -3"),
    (dict(num_classes=2.5), TypeError, "num_classes must be a positive int, got float"),
    (dict(num_classes=4.0), TypeError, "num_classes must be a positive int, got float"),
    (dict(num_classes=True), TypeError, "num_classes must be a positive int, got bool"),
    (dict(num_classes=torch.tensor(4)), TypeError, "num_classes must be a positive int, got Tensor"),
    (dict(centroids=torch.full((4, 6), 1, dtype=torch.long)), TypeError, "centroids must have dtype"),
    (dict(centroids=torch.full((4, 6), 1 / 6, dtype=torch.complex64)), TypeError, "centroids must have dtype"),
    (dict(centroids=torch.full((4, 5), 0.2)), ValueError, r"centroids must have shape \(num_classes, 6\)"),
    (dict(centroids=torch.full((6,), 1 / 6)), ValueError, "centroids must have 2 dimension"),
    (dict(centroids=torch.full((3, 6), 1 / 6)), ValueError, "num_classes=4 disagrees with centroids"),
    (dict(centroids=torch.full((4, 6), 1 / 6, device="meta")), ValueError, "centroids must be on cpu"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_INPUTS, ids=[b[2][:40] for b in BAD_INPUTS])
def test_bad_input_is_refused_with_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


BAD_VALUES = [
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 0])), "labels must lie in \\[0, num_classes\\) = \\[0, 4\\), got values from 0 to 4"),
    (dict(labels=torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, 0])), "labels must lie in .* got values from -1 to 3"),
    (dict(centroids=torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 3 + [[0.9, 0.2, 0, 0, 0, -0.1]])), "entries >= 0"),
    (dict(centroids=torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 3 + [[0.5, 0.4, 0, 0, 0, 0]])), "row 3 sums to 0.9, not 1"),
    (dict(centroids=torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 3 + [[float("nan"), 0.4, 0, 0, 0, 0]])),
     r"centroids contains non-finite values \(nan or inf\)"),
    (dict(centroids=torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 3 + [[float("inf"), 0, 0, 0, 0, 0]])),
     r"centroids contains non-finite values \(nan or inf\)"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 255, 0, 1, 2, 3, 0], dtype=torch.uint8)), "got values from 0 to 255"),
    (dict(labels=torch.tensor([0, 1, 2, 3, -7, 0, 1, 2, 3, 0], dtype=torch.int8)), "got values from -7 to 3"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(temperature=-0.5), "temperature must be a finite number > 0"),
]


@pytest.mark.parametrize("name", backends(REGISTRY, device="cpu", reference=True))
@pytest.mark.parametrize("kwargs,match", BAD_VALUES, ids=[b[1][:30] for b in BAD_VALUES])
def test_bad_values_are_refused_by_every_backend(name, kwargs, match):
    kwargs = {k: v.double() if k == "centroids" else v for k, v in kwargs.items()}
    for op in (cmi_loss, cmi_per_class):
        with pytest.raises(ValueError, match=match):
            _call(backend=name, op=op, **kwargs)


def test_num_classes_accepts_numpy_integers():
    features, labels = batch(20, 8, 4)
    expected = cmi_loss(features, labels, 4, backend="torch")
    for count in (np.int64(4), np.int32(4)):
        assert_close(cmi_loss(features, labels, count, backend="torch"), expected, rtol=0, atol=0)
        assert cmi_per_class(features, labels, count, backend="reference").shape == (4,)


# ---- odd layouts: every backend reads the values the reference reads ----

# name -> (shape of the leaf for (n, k) features, the view of it that is the features)
FEATURE_LAYOUTS = {
    "strided-columns": (lambda n, k: (n, 2 * k), lambda b: b[:, ::2]),
    "strided-rows": (lambda n, k: (2 * n, k), lambda b: b[::2]),
    "transposed": (lambda n, k: (k, n), lambda b: b.t()),
    "expanded": (lambda n, k: (1, k), lambda b: b.expand(14, -1)),  # layout_case's n
    "non-leaf-view": (lambda n, k: (n, k + 3), lambda b: (b * 1.5)[:, 2:-1]),
}
# name -> labels (n,) in that layout / dtype, from int64 labels (2n,)
LABEL_LAYOUTS = {
    "strided": lambda y: y[::2],
    "int32": lambda y: y[: y.shape[0] // 2].int(),
    "expanded": lambda y: y[:1].expand(y.shape[0] // 2),
    "uint8": lambda y: y[: y.shape[0] // 2].to(torch.uint8),
    "int16-strided": lambda y: y[1::2].to(torch.int16),
}
LAYOUT_CASES = list(zip(FEATURE_LAYOUTS, LABEL_LAYOUTS))


def odd_centroids(classes, k, layout, device):
    """(C, K) probability rows, transposed or every other row of a larger tensor."""
    gen = torch.Generator().manual_seed(3)
    if layout == "transposed":
        centroids = torch.softmax(torch.randn(k, classes, generator=gen, dtype=torch.float64), dim=0).t()
    else:
        centroids = torch.softmax(torch.randn(2 * classes, k, generator=gen, dtype=torch.float64), dim=1)[::2]
    assert not centroids.is_contiguous()
    return centroids.to(device)


def layout_case(features_layout, labels_layout, device, n=14, k=9, classes=5):
    shape, view = FEATURE_LAYOUTS[features_layout]
    gen = torch.Generator().manual_seed(21)
    base = (torch.randn(shape(n, k), generator=gen, dtype=torch.float64) * 2).to(device)
    long_labels = torch.randint(0, classes - 2, (2 * n,), generator=gen)
    long_labels[1::2][n // 2] = long_labels[: n][n // 2] = classes - 2  # a class of one row (absent in "expanded")
    labels = LABEL_LAYOUTS[labels_layout](long_labels.to(device))
    features = view(base)
    assert features.shape == (n, k) and labels.shape == (n,) and not features.is_contiguous()
    assert not labels.is_contiguous() or labels.dtype != torch.long
    return base, view, labels


@pytest.mark.parametrize("name", backends(REGISTRY))
@pytest.mark.parametrize("features_layout,labels_layout", LAYOUT_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("centroids_layout", [None, "transposed", "strided-rows"])
def test_odd_layouts_match_reference(name, features_layout, labels_layout, reduction, centroids_layout):
    base, view, labels = layout_case(features_layout, labels_layout, DEVICE)
    centroids = None if centroids_layout is None else odd_centroids(5, 9, centroids_layout, DEVICE)
    weights = weights_for(reduction, 14, device=DEVICE)

    def loss(backend):
        return lambda f: cmi_loss(f, labels, 5, temperature=0.8, centroids=centroids, reduction=reduction, backend=backend)

    value, grad = value_and_grad(loss(name), base, weights, view)
    expected_value, expected_grad = value_and_grad(loss("reference"), base, weights, view)
    assert_float64_match((value, grad), (expected_value, expected_grad))
    if centroids is not None or "expanded" not in (features_layout, labels_layout):  # batch centroids of identical rows: KL 0
        assert expected_grad.abs().max() > 1e-3


@pytest.mark.parametrize("name", backends(REGISTRY))
@pytest.mark.parametrize("centroids_layout", [None, "transposed"])
def test_per_class_odd_layouts_match_reference(name, centroids_layout):
    base, view, labels = layout_case("transposed", "int16-strided", DEVICE)
    centroids = None if centroids_layout is None else odd_centroids(5, 9, centroids_layout, DEVICE)
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64, device=DEVICE)  # the classes with rows

    def loss(backend):
        return lambda f: cmi_per_class(f, labels, 5, temperature=1.3, centroids=centroids, backend=backend)[:4]

    value, grad = value_and_grad(loss(name), base, weights, view)
    expected_value, expected_grad = value_and_grad(loss("reference"), base, weights, view)
    assert_float64_match((value, grad), (expected_value, expected_grad))
    assert torch.isnan(cmi_per_class(view(base), labels, 5, centroids=centroids, backend=name)[4])


def test_kernels_refuse_layouts_they_do_not_read():
    strided = torch.randn(6, 10, dtype=torch.float64)[:, ::2]
    labels = torch.zeros(12, dtype=torch.long)[::2]
    norm, log_q = torch.zeros(6, 2, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)
    kernels = []
    if REGISTRY.problem("cpu", torch.device("cpu"), torch.float64) is None:
        kernels.append(_extension.load("cmi_cpu"))
    if REGISTRY.problem("triton", torch.device("cpu"), torch.float64) is None:
        from ddfast.ops.cmi import triton
        kernels.append(triton.Kernels)
    if not kernels:
        pytest.skip("neither the cpu extension nor Triton is available")
    for ops in kernels:
        with pytest.raises(RuntimeError, match="contiguous"):
            ops.row_norm(strided, 1.0)
        with pytest.raises(RuntimeError, match="contiguous"):
            ops.row_kl(strided.contiguous(), labels, norm, log_q, 1.0)


# ---- transforms: right, or refused naming the op ----

@pytest.mark.parametrize("name", backends(REGISTRY, device="cpu"))
@pytest.mark.parametrize("op", [cmi_loss, cmi_per_class], ids=["cmi_loss", "cmi_per_class"])
def test_fused_backends_refuse_transforms_they_cannot_follow(name, op):
    features, labels = batch(12, 5, 4)
    tangent = torch.randn_like(features)

    def f(x):
        return op(x, labels, 4, backend=name).nansum()

    refused = f"ddfast.{op.__name__} does not support"
    for transform in (lambda: torch.func.grad(f)(features), lambda: torch.func.vjp(f, features),
                      lambda: torch.func.jacrev(f)(features)):
        with pytest.raises(NotImplementedError, match=f"{refused} torch.func.grad"):
            transform()
    for transform in (lambda: torch.func.jvp(f, (features,), (tangent,)), lambda: torch.func.jacfwd(f)(features)):
        with pytest.raises(NotImplementedError, match=f"{refused} forward-mode AD"):
            transform()
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=f"{refused} forward-mode AD"):
        f(forward_ad.make_dual(features, tangent))


@pytest.mark.parametrize("name", backends(REGISTRY, device="cpu"))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused_and_first_order_create_graph_works(name, reduction):
    features, labels = batch(12, 5, 4)
    weights = weights_for(reduction, 12)
    x = features.clone().requires_grad_()
    (grad,) = torch.autograd.grad((cmi_loss(x, labels, 4, reduction=reduction, backend=name) * weights).sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad((cmi_reference(x, labels, 4, reduction=reduction) * weights).sum(), x)
    assert_close(grad, expected, rtol=1e-9, atol=1e-13)
    with pytest.raises(NotImplementedError, match="ddfast.cmi_loss does not support double backward"):
        grad.pow(2).sum().backward()


def test_reference_supports_every_transform():
    features, labels = batch(9, 5, 3)
    tangent = torch.randn(features.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def f(x):
        return cmi_loss(x, labels, 3, temperature=0.7, backend="reference")

    x = features.clone().requires_grad_()
    (expected,) = torch.autograd.grad(cmi_reference(x, labels, 3, temperature=0.7), x)
    assert expected.abs().max() > 1e-2
    assert_close(torch.func.grad(f)(features), expected, rtol=1e-12, atol=0)
    directional = (expected * tangent).sum()
    assert_close(torch.func.jvp(f, (features,), (tangent,))[1], directional, rtol=1e-10, atol=0)
    with forward_ad.dual_level():
        assert_close(forward_ad.unpack_dual(f(forward_ad.make_dual(features, tangent))).tangent, directional, rtol=1e-10, atol=0)
    # double backward: the Hessian-vector product against central differences of the gradient
    (grad,) = torch.autograd.grad(f(x), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * tangent).sum(), x)
    eps = 1e-5
    differences = (torch.func.grad(f)(features + eps * tangent) - torch.func.grad(f)(features - eps * tangent)) / (2 * eps)
    assert_close(hvp, differences, rtol=1e-6, atol=1e-8)
    assert hvp.abs().max() > 1e-2


@pytest.mark.parametrize("name", backends(REGISTRY, reference=True))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("given_centroids", [False, True], ids=["batch-centroids", "given-centroids"])
def test_vmap_matches_the_reference_per_entry(name, reduction, given_centroids):
    """vmap over dim 1 (each entry a strided slice), num_classes inferred from labels that differ per entry."""
    entries, n, k, classes = 3, 11, 6, 5
    gen = torch.Generator().manual_seed(8)
    features = (torch.randn(n, entries, k, generator=gen, dtype=torch.float64) * 2).to(DEVICE)
    labels = torch.randint(0, classes, (n, entries), generator=gen)
    labels[:, 0] = labels[:, 0] % 3  # entry 0 alone would infer 3 classes
    labels = labels.to(DEVICE)
    centroids = torch.softmax(torch.randn(entries, classes, k, generator=gen, dtype=torch.float64), dim=2).to(DEVICE) if given_centroids else None
    weights = weights_for(reduction, n, device=DEVICE)

    def loss(f, y, c):
        return cmi_loss(f, y, temperature=0.9, centroids=c, reduction=reduction, backend=name)

    x = features.clone().requires_grad_()
    value = torch.func.vmap(loss, in_dims=(1, 1, None if centroids is None else 0))(x, labels, centroids)
    (grad,) = torch.autograd.grad((value * weights).sum(), x)
    expected = [cmi_reference(x[:, b], labels[:, b], classes, temperature=0.9, reduction=reduction,
                              centroids=None if centroids is None else centroids[b]) for b in range(entries)]
    (expected_grad,) = torch.autograd.grad((torch.stack(expected) * weights).sum(), x)
    assert_float64_match((value, grad), (torch.stack(expected), expected_grad))

    per_class = torch.func.vmap(lambda f, y: cmi_per_class(f, y, classes, backend=name), in_dims=(1, 1))(features, labels)
    for b in range(entries):
        expected_per_class = cmi_per_class(features[:, b], labels[:, b], classes, backend="reference")
        torch.testing.assert_close(per_class[b].cpu(), expected_per_class.cpu(), rtol=1e-10, atol=1e-13, equal_nan=True)
    with pytest.raises(ValueError, match="cmi_per_class needs num_classes under torch.func.vmap"):
        torch.func.vmap(lambda f, y: cmi_per_class(f, y, backend=name), in_dims=(1, 1))(features, labels)


# ---- values: refused on every backend, or right at the extremes ----

@pytest.mark.parametrize("name", backends(REGISTRY, device="cpu", reference=True))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("given_centroids", [False, True], ids=["batch-centroids", "given-centroids"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_non_finite_features_are_refused(name, value, given_centroids, dtype):
    features, labels = batch(21, 37, 4, dtype=dtype)
    features[13, 36] = value  # the last column: in a partly filled vector or tile
    centroids = simplex(4, 37, dtype=dtype) if given_centroids else None
    for op in (cmi_loss, cmi_per_class):
        with pytest.raises(ValueError, match=r"features contains non-finite values \(nan or inf\)"):
            op(features.t().contiguous().t(), labels, 4, centroids=centroids, backend=name)


@pytest.mark.parametrize("name", backends(REGISTRY, device="cpu", reference=True))
def test_temperature_whose_inverse_is_not_a_normal_float_is_refused(name):
    features, labels = batch(10, 6, 4, dtype=torch.float32)
    for temperature in (1e-39, 1e38):
        with pytest.raises(ValueError, match=r"temperature must lie in \[2.94e-39, 8.51e\+37\] for torch.float32 features"):
            cmi_loss(features, labels, 4, temperature=temperature, backend=name)
    assert torch.isfinite(cmi_loss(features.double(), labels, 4, temperature=1e-39, centroids=simplex(4, 6), backend=name))


def one_hot_limit(features, labels, centroids=None):
    """(N,) KL as temperature -> 0: P_i is one-hot at row i's argmax a_i, so KL_i = -log Q_{y_i, a_i}."""
    top = features.argmax(dim=1)
    if centroids is not None:
        return -centroids[labels, top].log()
    same = (labels[:, None] == labels[None, :])
    return -((same & (top[:, None] == top[None, :])).sum(1).double() / same.sum(1).double()).log()


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("given_centroids", [False, True], ids=["batch-centroids", "given-centroids"])
def test_tiny_temperature_gives_the_one_hot_limit(name, reduction, given_centroids):
    """T = 1e-36 in float32 (1 / T near the largest float32): every P is one-hot to float precision."""
    features, labels = batch(40, 5, 4, dtype=torch.float32, device=DEVICE, seed=12)
    centroids = simplex(4, 5, dtype=torch.float32).to(DEVICE) if given_centroids else None
    kl = cmi_loss(features, labels, 4, temperature=1e-36, centroids=centroids, reduction="none", backend=name)
    expected = one_hot_limit(features.double(), labels, centroids)
    assert_close(kl.double(), expected.double(), rtol=1e-6, atol=1e-6)
    assert expected.max() > 0.5
    weights = weights_for(reduction, 40, dtype=torch.float32, device=DEVICE)
    _, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, temperature=1e-36, centroids=centroids, reduction=reduction,
                                                backend=name), features, weights)
    assert torch.isfinite(grad).all()  # the exact gradient is of order exp(-gap / T) / T: 0 in float32
    assert grad.abs().max() <= 1e-30


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("given_centroids", [False, True], ids=["batch-centroids", "given-centroids"])
def test_finite_features_whose_log_probability_overflows(name, reduction, given_centroids):
    """Columns at -3e38 in float32: (f - max) / T overflows to -inf there (P = 0 exactly, and log Q = -inf
    with batch centroids); the other columns must come out as if those were absent."""
    features, labels = batch(30, 9, 4, dtype=torch.float32, device=DEVICE, scale=2.0, seed=13)
    features[:, 6:] = -3e38
    centroids = simplex(4, 9, dtype=torch.float32).to(DEVICE) if given_centroids else None
    weights = weights_for(reduction, 30, device=DEVICE)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, temperature=0.5, centroids=centroids, reduction=reduction,
                                                    backend=name), features, weights)
    near = features[:, :6].double()
    expected_value, expected_grad = value_and_grad(
        lambda f: cmi_reference(f, labels, 4, temperature=0.5, reduction=reduction,
                                centroids=None if centroids is None else centroids[:, :6].double()), near, weights)
    assert_close(value.double(), expected_value.double(), rtol=1e-5, atol=1e-6)
    assert_close(grad[:, :6].double(), expected_grad.double(), rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item())
    assert torch.equal(grad[:, 6:], torch.zeros_like(grad[:, 6:])) and expected_grad.abs().max() > 1e-3


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32, device="cpu", reference=True))
def test_huge_temperature_and_features(name):
    """Features near 1e37 with T = 1e37 (f / T of order 1) in float32 match float64."""
    features, labels = batch(30, 9, 4, dtype=torch.float64, scale=1.0, seed=14)
    features = (features * 1e37).float()
    weights = weights_for("none", 30)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, temperature=1e37, reduction="none", backend=name), features, weights)
    exact_value, exact_grad = value_and_grad(lambda f: cmi_reference(f.double(), labels, 4, temperature=1e37, reduction="none"),
                                             features, weights)
    assert_close(value.double(), exact_value.double(), rtol=1e-4, atol=1e-6)
    assert_close(grad.double(), exact_grad.double(), rtol=1e-3, atol=1e-4 * exact_grad.abs().max().item())
    assert exact_value.max() > 0.05


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32, device="cpu", reference=True))
def test_large_finite_features_with_a_small_temperature(name):
    """float32 features near 3e38 at T = 0.5: f / T would overflow, (f - max) / T does not."""
    gen = torch.Generator().manual_seed(15)
    features = (3e38 - 1e38 * torch.rand(12, 6, generator=gen, dtype=torch.float64)).float()
    labels = torch.arange(12) % 3
    centroids = simplex(3, 6, dtype=torch.float32)
    kl = cmi_loss(features, labels, 3, temperature=0.5, centroids=centroids, reduction="none", backend=name)
    assert_close(kl.double(), one_hot_limit(features.double(), labels, centroids.double()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", backends(REGISTRY))
@pytest.mark.parametrize("n,k", [(1, 7), (9, 1), (1, 1)])
@pytest.mark.parametrize("given_centroids", [False, True], ids=["batch-centroids", "given-centroids"])
def test_one_row_or_one_column(name, n, k, given_centroids):
    features, _ = batch(n, k, 4, device=DEVICE)
    labels = torch.arange(n, device=DEVICE) % 3
    centroids = simplex(4, k).to(DEVICE) if given_centroids else None
    weights = weights_for("none", n, device=DEVICE)
    options = dict(temperature=0.6, centroids=centroids, reduction="none")
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, backend=name, **options), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_reference(f, labels, 4, **options), features, weights)
    assert_float64_match((value, grad), (expected_value, expected_grad))
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def full_batch_centroids(features, labels, classes, temperature):
    """Each class's mean softmax over all rows at once, in float64."""
    p = torch.softmax(features.double() / temperature, dim=1)
    return torch.stack([p[labels == c].mean(dim=0) for c in range(classes)])


@pytest.mark.parametrize("name", backends(REGISTRY, reference=True))
def test_class_centroids_stream_to_the_full_batch_means(name):
    """Batches of an odd size, wide-ranging features; a class without rows is named until rows of it arrive."""
    features, labels = batch(203, 13, 6, device=DEVICE, scale=12.0)  # class 5 absent, class 4 one row
    sums = ClassCentroids(6, temperature=0.7, backend=name)
    for start in range(0, 203, 17):
        sums.add(features[start : start + 17], labels[start : start + 17])
    assert torch.equal(sums.counts, torch.bincount(labels, minlength=6))
    with pytest.raises(ValueError, match=r"class\(es\) \[5\] have no rows among the 203 added"):
        sums.centroids()
    extra, _ = batch(3, 13, 6, device=DEVICE, scale=12.0, seed=4)
    sums.add(extra, torch.full((3,), 5, device=DEVICE))
    everything, every_label = torch.cat([features, extra]), torch.cat([labels, torch.full((3,), 5, device=DEVICE)])
    expected = full_batch_centroids(everything, every_label, 6, 0.7)
    assert expected.min() < 1e-12  # entries far below the largest: merged in log space, they keep their relative precision
    got = sums.centroids()
    assert got.dtype == torch.float64 and got.shape == (6, 13)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", backends(REGISTRY, torch.float32, reference=True))
def test_class_centroids_in_float32_err_like_the_float32_reference(name):
    features, labels = batch(150, 9, 5, dtype=torch.float32, device=DEVICE)
    labels[-1] = 4
    sums = ClassCentroids(5, temperature=1.3, backend=name)
    for start in range(0, 150, 41):
        sums.add(features[start : start + 41], labels[start : start + 41])
    exact = full_batch_centroids(features, labels, 5, 1.3)
    in_float32 = full_batch_centroids(features.float(), labels, 5, 1.3).float().double()
    own_error = (in_float32 - exact).abs().max().item()
    got = sums.centroids()
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max().item() <= max(4 * own_error, 1e-7)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda s: s.centroids(), ValueError, "no rows were added"),
    (lambda s: s.add(torch.randn(4, 6), torch.tensor([0, 1, 2, 3])), ValueError, r"labels must lie in \[0, num_classes\) = \[0, 3\)"),
    (lambda s: s.add(torch.randn(4, 6), torch.tensor([0, 1, 2])), ValueError, "labels must have shape"),
    (lambda s: s.add(torch.full((2, 6), float("nan")), torch.tensor([0, 1])), ValueError, "features contains non-finite"),
    (lambda s: [s.add(torch.randn(2, 6), torch.tensor([0, 1])), s.add(torch.randn(2, 5), torch.tensor([0, 1]))], ValueError,
     "features must have 6 columns like the rows added before, got 5"),
])
def test_class_centroids_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(ClassCentroids(3, backend="torch"))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(num_classes=0), "num_classes"), (dict(num_classes=3, temperature=0.0), "temperature"),
    (dict(num_classes=3, backend="numpy"), "backend must be 'auto' or one of"),
])
def test_class_centroids_refuse_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassCentroids(**kwargs)
