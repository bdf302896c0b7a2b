"""CKA functions against golden values and an independent numpy float64 reference."""
import warnings

import numpy as np
import pytest
import torch

from hierfast.stats import ConstantLayerWarning, cka_matrix, linear_cka, rbf_cka
from cka_reference import cka, gram_linear, gram_rbf
from conftest import available_backends


@pytest.fixture
def demo_data():
    """The Kornblith demo notebook's data (METRICS.md §1.5)."""
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    return torch.tensor(x), torch.tensor(y)


@pytest.mark.parametrize("form", ["feature", "gram", "auto"])
def test_golden_linear(demo_data, form):
    x, y = demo_data
    assert linear_cka(x, y, form=form).item() == pytest.approx(0.5576132566, abs=1e-9)
    assert linear_cka(x, y, debiased=True, form=form).item() == pytest.approx(0.51346, abs=5e-6)


def test_golden_rbf(demo_data):
    x, y = demo_data
    assert rbf_cka(x, y, threshold=0.5).item() == pytest.approx(0.65483, abs=5e-6)
    assert rbf_cka(x, y, threshold=1.0).item() == pytest.approx(0.57583, abs=5e-6)
    assert rbf_cka(x, y, threshold=0.2).item() == pytest.approx(0.98981, abs=5e-6)
    assert rbf_cka(x, y, threshold=0.5, debiased=True).item() == pytest.approx(0.41928, abs=5e-6)


def test_rbf_tends_to_linear(demo_data):
    x, y = demo_data
    assert rbf_cka(x, y, threshold=1e3).item() == pytest.approx(0.5576133, abs=1e-6)


@pytest.mark.parametrize("n,dx,dy", [(4, 3, 9), (37, 5, 200), (150, 20, 7), (64, 64, 64)])
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_against_reference(n, dx, dy, debiased):
    x = np.random.randn(n, dx) * 2 + 7
    y = np.random.randn(n, dy) + np.random.randn(n, 1)
    ref = cka(gram_linear(x), gram_linear(y), debiased)
    for form in ("feature", "gram"):
        got = linear_cka(torch.tensor(x), torch.tensor(y), debiased=debiased, form=form).item()
        assert got == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("threshold", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_against_reference(threshold, debiased):
    x, y = np.random.randn(41, 6), np.random.randn(41, 11)
    ref = cka(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)
    got = rbf_cka(torch.tensor(x), torch.tensor(y), threshold=threshold, debiased=debiased).item()
    assert got == pytest.approx(ref, abs=1e-10)


def test_properties(demo_data):
    x, y = demo_data
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    base = linear_cka(x, y).item()
    assert linear_cka(x @ q, y).item() == pytest.approx(base, abs=1e-12)   # orthogonal invariance
    assert linear_cka(3.7 * x, y).item() == pytest.approx(base, abs=1e-12)  # isotropic scaling
    assert linear_cka(x + 5.0, y).item() == pytest.approx(base, abs=1e-12)  # translation
    assert linear_cka(y, x).item() == pytest.approx(base, abs=1e-12)        # symmetry
    a = torch.randn(10, 10, dtype=torch.float64)
    assert abs(linear_cka(x @ a, y).item() - base) > 1e-3                    # not invariant to general maps
    for deb in (False, True):
        assert linear_cka(x, x, debiased=deb).item() == pytest.approx(1.0, abs=1e-12)


def test_biased_null_value_and_debiased_near_zero():
    """Independent Gaussians, n << d: biased CKA ~ d/(n-1+d), debiased ~ 0 (METRICS.md §1.8)."""
    vals_b, vals_d = [], []
    for _ in range(20):
        x, y = torch.randn(50, 200, dtype=torch.float64), torch.randn(50, 200, dtype=torch.float64)
        vals_b.append(linear_cka(x, y).item())
        vals_d.append(linear_cka(x, y, debiased=True).item())
    assert np.mean(vals_b) == pytest.approx(200 / (49 + 200), abs=0.02)
    assert abs(np.mean(vals_d)) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_with_large_offset(dtype):
    """The published float32 tools' trap: post-ReLU features with a large common offset."""
    base = torch.randn(128, 300, dtype=torch.float64)
    x64 = (base + 50).relu()
    y64 = (base @ torch.randn(300, 300, dtype=torch.float64) / 17 + 50).relu()
    for deb in (False, True):
        ref = cka(gram_linear(x64.numpy()), gram_linear(y64.numpy()), deb)
        got = linear_cka(x64.to(dtype), y64.to(dtype), debiased=deb, form="gram").item()
        tol = 1e-5 if dtype == torch.float32 else 5e-3  # fp16/bf16 inputs are themselves rounded
        assert np.isfinite(got) and got == pytest.approx(ref, abs=tol)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_pairwise(kernel, debiased):
    n = 40
    feats_a = [torch.randn(n, 3, 4, 4, dtype=torch.float64), torch.randn(n, 17, dtype=torch.float64),
               torch.randn(n, 5, dtype=torch.float64)]
    feats_b = [feats_a[1] @ torch.randn(17, 9, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)]
    fn = linear_cka if kernel == "linear" else rbf_cka
    m = cka_matrix(feats_a, feats_b, kernel=kernel, debiased=debiased)
    assert m.shape == (3, 2) and m.dtype == torch.float64 and m.row_names is None
    for i, a in enumerate(feats_a):
        for j, b in enumerate(feats_b):
            kw = {"form": "gram"} if kernel == "linear" else {}
            assert m[i, j].item() == pytest.approx(fn(a, b, debiased=debiased, **kw).item(), abs=1e-10)
    self_m = cka_matrix(feats_a, kernel=kernel, debiased=debiased)
    assert self_m.shape == (3, 3)
    torch.testing.assert_close(self_m.diagonal(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(self_m, self_m.T)


def test_cka_matrix_keeps_names():
    x = torch.randn(20, 6)
    m = cka_matrix({"conv1": x, "relu1": x.relu()}, {"fc": x[:, :3]})
    assert m.row_names == ["conv1", "relu1"] and m.col_names == ["fc"]


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_cka_matrix_backends_agree(backend):
    if backend == "triton":
        n = 24  # the interpreter is slow
    else:
        n = 130
    feats = [torch.randn(n, 50) + 20, torch.randn(n, 7, 3).relu(), torch.randn(n, 1) * 1e3]
    ref = cka_matrix(feats, debiased=True, backend="reference")
    got = cka_matrix(feats, debiased=True, backend=backend)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_constant_layer_is_nan_with_one_warning():
    x = torch.randn(30, 8)
    const = torch.full((30, 4), 3.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = cka_matrix({"x": x, "dead": const, "y": x * 2})
    msgs = [str(r.message) for r in w if issubclass(r.category, ConstantLayerWarning)]
    assert len(msgs) == 1 and "dead" in msgs[0]
    assert torch.isnan(m[1]).all() and torch.isnan(m[:, 1]).all()
    keep = m[[0, 2]][:, [0, 2]]
    assert torch.isfinite(keep).all()
    with pytest.warns(ConstantLayerWarning):
        assert torch.isnan(rbf_cka(x, const))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: linear_cka(torch.randn(5, 3), torch.randn(6, 3)), ValueError, "same inputs"),
    (lambda: linear_cka(torch.randn(1, 3), torch.randn(1, 3)), ValueError, "n >= 2"),
    (lambda: linear_cka(torch.randn(3, 3), torch.randn(3, 3), debiased=True), ValueError, "n >= 4"),
    (lambda: linear_cka(torch.empty(0, 3), torch.empty(0, 3)), ValueError, "empty"),
    (lambda: linear_cka(torch.tensor([[1.0, float("nan")]] * 4), torch.randn(4, 2)), ValueError, "NaN"),
    (lambda: linear_cka(torch.tensor([[1.0, float("inf")]] * 4), torch.randn(4, 2)), ValueError, "inf"),
    (lambda: linear_cka(torch.ones(4, 2, dtype=torch.int64), torch.randn(4, 2)), TypeError, "float"),
    (lambda: linear_cka(np.ones((4, 2)), torch.randn(4, 2)), TypeError, "torch.Tensor"),
    (lambda: linear_cka(torch.randn(4, 2), torch.randn(4, 2), form="svd"), ValueError, "form"),
    (lambda: rbf_cka(torch.randn(4, 2), torch.randn(4, 2), threshold=0), ValueError, "threshold"),
    (lambda: cka_matrix(torch.randn(4, 2)), TypeError, "list, tuple or dict"),
    (lambda: cka_matrix([]), ValueError, "no layers"),
    (lambda: cka_matrix([torch.randn(4, 2)], kernel="poly"), ValueError, "kernel"),
    (lambda: cka_matrix({"a": torch.randn(8, 2), "b": torch.randn(9, 2)}), ValueError, "feats_a\\['b'\\]"),
    (lambda: cka_matrix("abc"), TypeError, "list, tuple or dict"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="device"):
        linear_cka(torch.randn(5, 3), torch.randn(5, 3, device="cuda"))


@pytest.mark.parametrize("offset,expect_raw", [(0.0, True), (1.6, True), (3.0, False), (50.0, False)])
def test_raw_gram_path_accuracy(offset, expect_raw):
    """float32 Grams of uncentred features are used only when well conditioned; either way
    the CKA stays within 1e-5 of float64 (here near the r = 8 threshold too)."""
    from hierfast.stats import _grams

    b = torch.randn(128, 4096, dtype=torch.float64)
    x = b + offset * torch.rand(4096, dtype=torch.float64) * 2
    y = b[:, torch.randperm(4096)] + b * 0.5 + offset
    g = _grams.symmetric_gram(x.float())
    assert _grams._raw_gram_is_usable(g, x.float(), "x") == expect_raw
    for deb in (False, True):
        ref = cka(gram_linear(x.numpy()), gram_linear(y.numpy()), deb)
        assert linear_cka(x.float(), y.float(), debiased=deb, form="gram").item() == pytest.approx(ref, abs=1e-5)


def test_symmetric_gram_equals_matmul():
    from hierfast.stats import _grams

    for n in (64, 128, 200, 1024):
        x = torch.randn(n, 300, dtype=torch.float64)
        torch.testing.assert_close(_grams.symmetric_gram(x), x @ x.T, atol=1e-10, rtol=0)


def _nan_with_warning(call):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        value = call()
    assert torch.isnan(value).all(), value
    assert any(issubclass(r.category, ConstantLayerWarning) for r in w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value,n", [(0.1, 37), (0.3, 100), (1 / 3, 64), (7.7, 37), (1000.1, 100)])
def test_exactly_constant_layer_is_nan_in_every_dtype_and_form(dtype, value, n):
    # centring a constant column leaves ~1e-17 residues: these gave CKA -0.05 (float64)
    x = torch.full((n, 3), value, dtype=dtype)
    y = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    for debiased in (False, True):
        for form in ("feature", "gram"):
            _nan_with_warning(lambda: linear_cka(x, y, debiased=debiased, form=form))
        _nan_with_warning(lambda: rbf_cka(x, y, debiased=debiased))
        for kernel in ("linear", "rbf"):
            m = cka_matrix({"c": x, "y": y}, kernel=kernel, debiased=debiased)
            assert torch.isnan(m[0]).all() and torch.isfinite(m[1, 1])
            _nan_with_warning(lambda: cka_matrix([x], [y], kernel=kernel, debiased=debiased))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiny_but_nonzero_variance_is_not_a_constant_layer(dtype):
    # the exact constancy test must not swallow a legit layer whose variance is tiny
    n = 64
    g = torch.Generator().manual_seed(1)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    one_ulp = torch.full((n, 3), 0.1, dtype=dtype)
    up = torch.nextafter(one_ulp[0, 0], torch.tensor(1.0, dtype=dtype))
    one_ulp[5, 1] = one_ulp[9, 1] = up  # two rows: one spike alone has an unbiased HSIC of exactly 0
    small = 1e-7 if dtype == torch.float64 else 1e-3  # std relative to the mean
    tiny = (0.1 + small * 0.1 * (y[:, :2] + torch.randn(n, 2, generator=g, dtype=torch.float64))).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantLayerWarning)
        for debiased in (False, True):
            for form in ("feature", "gram"):
                assert torch.isfinite(linear_cka(one_ulp, y.to(dtype), debiased=debiased, form=form))
                got = linear_cka(tiny, y.to(dtype), debiased=debiased, form=form).item()
                t64 = tiny.double().numpy()
                ref = cka(gram_linear(t64 - t64.mean(0)), gram_linear(y.to(dtype).double().numpy()), debiased)
                assert got == pytest.approx(ref, rel=1e-3), (form, debiased)


def test_extreme_magnitudes_keep_cka_scale_invariant():
    # float32 ~1e-25: Gram squares underflowed (NaN + a false constant warning); float64 1e80: HSIC
    # overflowed (0.0)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(40, 300, generator=g)
    ys = xs[:, :50] + torch.randn(40, 50, generator=g)
    x64 = torch.randn(57, 6, generator=g, dtype=torch.float64)
    y64 = x64[:, :3] @ torch.randn(3, 4, generator=g, dtype=torch.float64)
    cases = [(xs * 1e-25, ys, xs.double(), ys.double()), (x64 * 1e80, y64, x64, y64),
             (x64 * 1e-200, y64 * 1e-150, x64, y64)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantLayerWarning)
        for x, y, rx, ry in cases:
            for debiased in (False, True):
                ref = cka(gram_linear(rx.numpy()), gram_linear(ry.numpy()), debiased)
                for form in ("feature", "gram"):
                    got = linear_cka(x, y, debiased=debiased, form=form).item()
                    assert got == pytest.approx(ref, abs=1e-5), (form, debiased, x.dtype)
                m = cka_matrix([x], [y], debiased=debiased)
                assert m.item() == pytest.approx(ref, abs=1e-5)


def _host_syncs(monkeypatch, fn) -> int:
    """Calls of the tensor methods that wait for the device (tolist, item, bool, nonzero)."""
    n = [0]
    for name in ("tolist", "item", "__bool__", "nonzero"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            n[0] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return n[0]


def test_centred_gram_path_syncs_once_per_layer(monkeypatch):
    from hierfast.stats import MinibatchCKA

    g = torch.Generator().manual_seed(0)
    counts = []
    for n_layers in (4, 8):
        xs = [torch.randn(32, 64, generator=g) + 50 for _ in range(n_layers)]  # mean 50: the centred path
        acc = MinibatchCKA()
        acc.update(xs)
        counts.append((_host_syncs(monkeypatch, lambda: acc.update(xs)),
                       _host_syncs(monkeypatch, lambda: cka_matrix(xs))))
    (mb4, cm4), (mb8, cm8) = counts
    assert mb8 - mb4 == 4  # one per layer: finiteness, trace and mean @ mean together (was two)
    assert cm8 - cm4 == 8  # the rejected raw Gram's test, then the centred one's (was 3 with the nonzero)


def test_cka_matrix_forms_each_self_hsic_once(monkeypatch):
    import hierfast.stats.cka as cka_mod

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(20, 6, generator=g).relu() for _ in range(3)]
    ys = [torch.randn(20, 5, generator=g) for _ in range(2)]
    calls, orig = [0], torch.einsum

    def einsum(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    monkeypatch.setattr(cka_mod.torch, "einsum", einsum)
    m = cka_matrix(xs, ys)
    assert calls[0] == 2  # one pass per model for its self-HSICs (was four)
    calls[0] = 0
    m_self = cka_matrix(xs)
    assert calls[0] == 0  # the self case reads them off the diagonal of F F^T
    monkeypatch.undo()
    ref = [[cka(gram_linear(x.double().numpy()), gram_linear(y.double().numpy())) for y in ys] for x in xs]
    np.testing.assert_allclose(m.numpy(), np.array(ref), atol=1e-6)
    np.testing.assert_allclose(m_self.diagonal().numpy(), 1.0, atol=1e-12)


def test_extreme_magnitudes_rescale_one_shot_and_raise_clearly_when_streamed():
    from hierfast.stats import MinibatchCKA

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(20, 30, generator=g, dtype=torch.float64))
    ref = cka(gram_linear(x.numpy()), gram_linear(y.numpy()))
    for s in (1e155, 1e200, 1e-160):  # squares overflow (the raw Gram's check raised) or HSICs underflow
        xs, ys = x * s, y * s
        assert cka_matrix([xs, ys])[0, 1].item() == pytest.approx(ref, abs=1e-9)
        assert cka_matrix([xs], [ys])[0, 0].item() == pytest.approx(ref, abs=1e-9)
        assert linear_cka(xs, ys, form="gram").item() == pytest.approx(ref, abs=1e-9)
    for xs, ys in ((x * 1e100, y * 1e100), (x * 1e-160, y * 1e-160), (x.float() * 1e-25, y.float() * 1e-25)):
        acc = MinibatchCKA()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConstantLayerWarning)  # was: NaN, and a false constant-layer warning
            with pytest.raises(ValueError, match="extreme magnitude.*power of two"):
                acc.update([xs, ys])
