"""cmi_loss: every backend against the plain-torch reference (float64), numerics, API, errors, compile."""

from __future__ import annotations

import pytest
import torch

import ddfast
from ddfast import _extension
from ddfast.ops.cmi import REGISTRY, CMILoss, cmi_loss, cmi_per_class, cuda, streaming
from ddfast.ops.cmi.reference import cmi_authors, cmi_reference
from ddfast.ops.cmi.segments import Segments

# numpy warns about log(0) and 0 * inf in masked-out lanes of Triton tiles run by the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [pytest.param(name, device, id=f"{name}-{device}") for device in DEVICES for name in REGISTRY.available(device, torch.float64)
         if name != "reference"]
LOW_PRECISION_CASES = [pytest.param(name, device, id=f"{name}-{device}") for device in DEVICES
                       for name in REGISTRY.available(device, torch.float32) if name != "reference"]


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


def value_and_grad(fn, features, weights):
    features = features.detach().clone().requires_grad_()
    loss = fn(features)
    (grad,) = torch.autograd.grad((loss.to(weights.dtype) * weights).sum(), features)
    return loss.detach(), grad


def weights_for(reduction, n, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n if reduction == "none" else (), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def assert_close(actual, expected, *, rtol, atol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("given_centroids", [False, True], ids=["batch-centroids", "given-centroids"])
def test_matches_reference_float64(name, device, reduction, given_centroids):
    features, labels = batch(67, 37, 6, device=device)
    centroids = simplex(6, 37).to(device) if given_centroids else None
    weights = weights_for(reduction, 67, device=device)
    options = dict(temperature=0.7, centroids=centroids, reduction=reduction)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 6, backend=name, **options), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_reference(f, labels, 6, **options), features, weights)
    assert value.dtype == torch.float64 and value.shape == expected_value.shape
    assert_close(value, expected_value, rtol=1e-10, atol=1e-13)
    assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)
    assert expected_grad.abs().max() > 1e-3


@pytest.mark.parametrize("name,device", CASES)
def test_many_tiles_and_chunks(name, device, monkeypatch):
    """Classes of more rows than a chunk, K above a column tile, streaming over several row blocks."""
    monkeypatch.setattr(streaming, "ELEMENTS", 1000)
    features, labels = batch(203, 150, 4, device=device, seed=3)
    weights = weights_for("none", 203, device=device)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, temperature=1.3, reduction="none", backend=name), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_reference(f, labels, 4, temperature=1.3, reduction="none"), features, weights)
    assert_close(value, expected_value, rtol=1e-10, atol=1e-13)
    assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name,device", CASES)
def test_wide_rows_and_non_contiguous_features(name, device):
    """K above 1000 (and no multiple of any block or vector width), features given as a strided view."""
    features, labels = batch(1030, 21, 5, device=device, seed=4)
    features = features.t()  # (21, 1030), not contiguous
    labels = labels[:21] % 3
    weights = weights_for("none", 21, device=device)
    assert not features.detach().clone().is_contiguous()  # value_and_grad's copy keeps the strides
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 3, temperature=2.5, reduction="none", backend=name), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_reference(f, labels, 3, temperature=2.5, reduction="none"), features, weights)
    assert_close(value, expected_value, rtol=1e-10, atol=1e-13)
    assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name,device", [c for c in CASES if c.values[0] != "triton" or c.values[1] != "cpu"])
def test_hundred_thousand_rows(name, device):
    """N = 100,000 rows in float32 (the interpreted Triton backend is too slow for this size)."""
    features, labels = batch(100_003, 8, 12, dtype=torch.float32, device=device, scale=2.0, seed=9)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 12, backend=name), features, torch.ones((), device=device))
    exact_value, exact_grad = value_and_grad(lambda f: cmi_reference(f.double(), labels, 12), features, torch.ones((), dtype=torch.float64, device=device))
    assert_close(value, exact_value, rtol=1e-5, atol=0)
    assert_close(grad, exact_grad, rtol=1e-4, atol=1e-5 * exact_grad.abs().max().item())


@pytest.mark.parametrize("name,device", CASES)
def test_single_class_and_all_singletons(name, device):
    features, _ = batch(23, 9, 3, device=device)
    one_class = torch.zeros(23, dtype=torch.long, device=device)
    assert_close(cmi_loss(features, one_class, backend=name), cmi_reference(features, one_class), rtol=1e-10, atol=1e-13)
    singletons = torch.randperm(23).to(device)
    kl = cmi_loss(features, singletons, 23, reduction="none", backend=name)
    assert torch.equal(kl, torch.zeros_like(kl))  # each row is its own centroid: KL exactly 0
    assert cmi_loss(features, one_class, backend=name) > 0.1


@pytest.mark.parametrize("name,device", CASES)
def test_equals_the_authors_formulation(name, device):
    """The float32 loss and gradient agree with the authors' F.kl_div form to float32 precision."""
    features, labels = batch(120, 64, 10, dtype=torch.float32, device=device, scale=2.0, seed=5)
    weights = torch.ones((), device=device)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 10, backend=name), features, weights)
    expected_value, expected_grad = value_and_grad(lambda f: cmi_authors(f.double(), labels, 10), features, weights.double())
    assert_close(value, expected_value, rtol=2e-5, atol=1e-7)
    assert_close(grad, expected_grad, rtol=2e-4, atol=1e-9)


def test_reference_equals_the_authors_formulation():
    features, labels = batch(50, 20, 5, scale=1.0)
    assert_close(cmi_reference(features, labels, 5, temperature=2.0), cmi_authors(features, labels, 5, temperature=2.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,device", LOW_PRECISION_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_errs_no_more_than_the_reference_in_that_dtype(name, device, dtype, reduction):
    features, labels = batch(91, 45, 6, dtype=dtype, device=device, scale=2.0)
    weights = weights_for(reduction, 91, device=device)
    exact_value, exact_grad = value_and_grad(lambda f: cmi_reference(f.double(), labels, 6, reduction=reduction), features, weights)
    ref_value, ref_grad = value_and_grad(lambda f: cmi_reference(f, labels, 6, reduction=reduction), features, weights.to(dtype))
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 6, reduction=reduction, backend=name), features, weights.to(dtype))
    assert value.dtype == dtype and grad.dtype == dtype
    for ours, theirs, exact in ((value, ref_value, exact_value), (grad, ref_grad, exact_grad)):
        our_error = (ours.double() - exact).abs().max()
        their_error = (theirs.double() - exact).abs().max()
        assert our_error <= their_error, f"{name} {dtype}: error {our_error:.3g} above the reference's own {their_error:.3g}"


@pytest.mark.parametrize("name,device", LOW_PRECISION_CASES)
@pytest.mark.parametrize("scale,temperature", [(60.0, 1.0), (1.0, 0.01)], ids=["wide-features", "small-temperature"])
def test_finite_where_naive_float32_underflows(name, device, scale, temperature):
    features, labels = batch(40, 16, 4, dtype=torch.float32, device=device, scale=scale, seed=11)
    naive = cmi_reference(features, labels, 4, temperature=temperature)
    assert not torch.isfinite(naive), "the case must break the naive float32 form"
    weights = torch.ones((), dtype=torch.float64, device=device)
    value, grad = value_and_grad(lambda f: cmi_loss(f, labels, 4, temperature=temperature, backend=name), features, weights)
    exact_value, exact_grad = value_and_grad(lambda f: cmi_reference(f.double(), labels, 4, temperature=temperature), features, weights)
    assert torch.isfinite(exact_value) and torch.isfinite(exact_grad).all()
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert_close(value, exact_value, rtol=1e-5, atol=1e-6)
    assert_close(grad, exact_grad, rtol=1e-4, atol=1e-5 * exact_grad.abs().max().item())


@pytest.mark.parametrize("name,device", CASES)
def test_given_centroids_are_constants(name, device):
    features, labels = batch(30, 12, 4, device=device)
    centroids = simplex(4, 12).to(device).requires_grad_()
    features.requires_grad_()
    loss = cmi_loss(features, labels, temperature=0.5, centroids=centroids, backend=name)
    grad_f, grad_c = torch.autograd.grad(loss, (features, centroids), allow_unused=True)
    assert grad_c is None or torch.equal(grad_c, torch.zeros_like(grad_c))
    expected = torch.autograd.grad(cmi_reference(features, labels, temperature=0.5, centroids=centroids.detach()), features)[0]
    assert_close(grad_f, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name,device", CASES)
def test_per_class_complexity(name, device):
    features, labels = batch(60, 10, 5, device=device)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_kernels_compile_for_hopper(dtype):
    """Every Triton kernel, with the launch options and widest tiles the backend uses, lowers to sm_90
    code whose shared memory fits a block."""
    pytest.importorskip("triton")
    import hopper
    from ddfast.ops.cmi import triton as kernels

    element = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float64: "*fp64"}[dtype]
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    index = {name: "*i64" for name in ("order_ptr", "start_ptr", "end_ptr", "cls_ptr", "labels_ptr", "first_ptr", "counts_ptr")}
    stats = {name: acc for name in ("norm_ptr", "part_ptr", "inv_t_ptr", "log_q_ptr", "kl_ptr", "g_ptr", "a_ptr")}
    pointers = {"f_ptr": element, **index, **stats}
    rows = {"ROWS": kernels.ROWS, "BLOCK_K": kernels.BLOCK_K}
    chunk = {"CHUNK": kernels.CHUNK_ROWS, "BLOCK_K": kernels.BLOCK_K}
    common = {"module": "ddfast.ops.cmi.triton", "floats": [], "pointers": pointers, **kernels.LAUNCH}
    specs = [{**common, "kernel": "_row_norm_kernel", "constexprs": rows},
             {**common, "kernel": "_chunk_norm_kernel", "constexprs": chunk},
             {**common, "kernel": "_row_kl_kernel", "constexprs": rows},
             {**common, "kernel": "_chunk_centroid_grad_kernel", "constexprs": chunk}]
    specs += [{**common, "kernel": "_combine_kernel", "pointers": {**pointers, "out_ptr": acc},
               "constexprs": {"LOG": log, "CHUNKS": kernels.COMBINE_CHUNKS, "BLOCK_K": kernels.BLOCK_K}} for log in (True, False)]
    specs += [{**common, "kernel": "_row_grad_kernel", "pointers": {**pointers, "out_ptr": element},
               "constexprs": {**rows, "HAS_A": has_a}} for has_a in (True, False)]
    for spec, shared in zip(specs, hopper.shared_memory(specs)):
        assert 0 <= shared <= hopper.SHARED_MEMORY_PER_BLOCK, (spec["kernel"], shared)


def test_cuda_chunk_size_matches_its_kernel():
    source = (_extension.csrc_dir() / "cmi" / "cmi_cuda.cu").read_text()
    assert f"kChunkRows = {cuda.BACKEND.chunk_rows};" in source


# ---- bad input: clear errors naming the argument, before any kernel runs ----

def _call(features=None, labels=None, **kwargs):
    default_features, default_labels = batch(10, 6, 4)
    kwargs.setdefault("num_classes", 4)
    return cmi_loss(default_features if features is None else features, default_labels if labels is None else labels, **kwargs)


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
    (dict(num_classes=0), ValueError, "num_classes must be a positive int"),
    (dict(num_classes=2.5), ValueError, "num_classes must be a positive int"),
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
    (dict(centroids=torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 3 + [[0.9, 0.2, 0, 0, 0, -0.1]])), "entries finite and >= 0"),
    (dict(centroids=torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 3 + [[0.5, 0.4, 0, 0, 0, 0]])), "row 3 sums to 0.9, not 1"),
    (dict(centroids=torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 3 + [[float("nan"), 0.4, 0, 0, 0, 0]])), "entries finite"),
]


@pytest.mark.parametrize("name", ["reference"] + [n for n in REGISTRY.available("cpu", torch.float64) if n != "reference"])
@pytest.mark.parametrize("kwargs,match", BAD_VALUES, ids=[b[1][:30] for b in BAD_VALUES])
def test_bad_values_are_refused_by_every_backend(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(backend=name, **{k: v.double() if k == "centroids" else v for k, v in kwargs.items()})
