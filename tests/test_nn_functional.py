"""hierfast.functional.conv2d_act against F.conv2d + activation in float64: shapes,
memory formats, dtypes, backends, gradients, custom-op checks, errors."""
import pytest
import torch
import torch.nn.functional as F

from hierfast import _dtypes
from hierfast.functional import conv2d_act
from hierfast.ops import activations as A
from hierfast.ops import conv_act as K
from hierfast.ops._launch import cpu_kernels
from conftest import ACT_IDS, ACTS, available_backends, channel_stats
from conftest import conv_data as _data

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
SHAPES = [
    (2, 3, 13, 11, 8, 7, 2, 3, 1, 1),     # stem-like 7x7/2, odd sizes
    (2, 4, 9, 10, 6, 3, 1, 1, 1, 1),      # 3x3
    (3, 8, 7, 7, 8, 3, 1, 2, 2, 1),       # dilation 2
    (2, 6, 8, 9, 4, 3, 2, 1, 1, 2),       # groups 2, stride 2
    (2, 6, 11, 8, 6, 3, 1, 1, 1, 6),      # depthwise
    (1, 5, 6, 7, 9, 1, 1, 0, 1, 1),       # 1x1
    (2, 4, 5, 5, 3, (1, 3), (2, 1), (0, 1), (1, 2), 1),  # rectangular kernel, mixed stride
]
CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
# The CPU backend picks oneDNN's post-op convolution or torch's convolution + our epilogue by the
# layer's size: the test shapes are small, so each test that covers the CPU paths forces both too.
CPU_PATHS = ["by_size", "onednn", "epilogue"]
BACKEND_PATHS = [(b, path) for b in CPU_BACKENDS for path in (CPU_PATHS if b == "cpu" else CPU_PATHS[:1])]


def _force_cpu_path(monkeypatch, path):
    """Make the CPU backend take oneDNN's post-op convolution (where it runs the call) or our
    epilogue whatever the layer's size; "by_size" leaves the measured limits alone."""
    if path == "by_size":
        return
    limit = 0 if path == "onednn" else 1 << 62
    for name in ("_ONEDNN_MIN_OUTPUT", "_ONEDNN_MIN_MACS_KEPT", "_ONEDNN_MIN_MACS_REORDERED",
                 "_ONEDNN_MIN_OUTPUT_PER_WEIGHT"):
        monkeypatch.setattr(K, name, limit)


def _ref(x, w, b, kw, name, akw):
    z = F.conv2d(x.double(), w.double(), None if b is None else b.double(), **kw)
    return A.apply(z, A.resolve(name, **akw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["relu", "gelu", "mish"])
def test_low_precision_gradients_within_2x_torch_error(dtype, act):
    """Gradients in bfloat16/float16 within 2x torch's own error. A ReLU mask is where low
    precision bites: many pre-activations sit near zero (bias ~ -conv), and rounding conv(x, w)
    before adding the bias flips their mask (the bias now goes into the convolution's float32
    accumulation on these dtypes)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, 12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64) / 8
    # biases that cancel each channel's mean pre-activation: a large share of values near 0
    b = -F.conv2d(x, w, padding=1).mean((0, 2, 3)) + 0.01 * torch.randn(16, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 16, 12, 12, generator=g, dtype=torch.float64)
    lo = [t.to(dtype) for t in (x, w, b)]

    def grads(fn, ts, g_out):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        fn(*ts).backward(g_out)
        return [t.grad.double() for t in ts]

    a = A.resolve(act)
    ref = grads(lambda *t: A.apply(F.conv2d(*t, padding=1), a), [t.double() for t in lo], gy)
    theirs = grads(lambda *t: A.apply(F.conv2d(*t, padding=1), a), lo, gy.to(dtype))
    ours = grads(lambda *t: conv2d_act(*t, padding=1, activation=act), lo, gy.to(dtype))
    for name, o, t, r in zip(("x", "w", "b"), ours, theirs, ref):
        eps = torch.finfo(dtype).eps * r.abs().max().item()
        err, tol = (o - r).abs().max().item(), 2 * (t - r).abs().max().item() + eps
        assert err <= tol, f"{act} {dtype} grad {name}: error {err:.3g} > 2x torch's ({tol:.3g})"


@pytest.mark.parametrize("backend,path", BACKEND_PATHS, ids=[f"{b}-{p}" for b, p in BACKEND_PATHS])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_forward_fp32_matches_float64(shape, channels_last, backend, path, monkeypatch):
    _force_cpu_path(monkeypatch, path)
    for (name, akw), bias in zip(ACTS, [True, False] * 6):
        x, w, b, kw = _data(shape, channels_last=channels_last, bias=bias)
        y = conv2d_act(x, w, b, activation=name, backend=backend, **kw, **akw)
        ref = _ref(x, w, b, kw, name, akw)
        assert y.shape == ref.shape and y.dtype == torch.float32
        # same memory format as torch's own conv
        assert y.is_contiguous(memory_format=torch.channels_last) == \
            F.conv2d(x, w, b, **kw).is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.double(), ref, atol=2e-5 * max(1.0, ref.abs().max().item()), rtol=0,
                                   msg=lambda m: f"{name}{akw}: {m}")


def _tol_from_torch(x, w, b, kw, name, akw, dtype):
    """2x the error of torch's own conv + activation in ``dtype`` (plus one ulp of slack)."""
    ref = _ref(x, w, b, kw, name, akw)
    theirs = A.apply(F.conv2d(x, w, b, **kw), A.resolve(name, **akw)).double()
    eps = torch.finfo(dtype).eps * ref.abs().max().item()
    return ref, 2 * (theirs - ref).abs().max().item() + eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_low_precision_within_2x_torch_error(dtype, channels_last):
    for i, (name, akw) in enumerate(ACTS):
        x, w, b, kw = _data(SHAPES[i % len(SHAPES)], dtype=dtype, channels_last=channels_last)
        ref, tol = _tol_from_torch(x, w, b, kw, name, akw, dtype)
        y = conv2d_act(x, w, b, activation=name, **kw, **akw)
        assert y.dtype == dtype
        err = (y.double() - ref).abs().max().item()
        assert err <= tol, f"{name}{akw} {dtype}: error {err:.3g} > 2x torch's ({tol:.3g})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_gradcheck_float64(act, backend):
    name, akw = act
    x, w, b, kw = _data((1, 4, 5, 6, 4, 3, 1, 1, 1, 2), dtype=torch.float64)
    # keep |z| away from the kinks of relu6/hardswish/leaky so finite differences are valid
    args = tuple(t.detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d_act(x, w, b, activation=name, backend=backend,
                                                               **kw, **akw), args)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_fp32_gradients_match_float64(act, channels_last):
    name, akw = act
    for shape in (SHAPES[0], SHAPES[4]):
        x, w, b, kw = _data(shape, channels_last=channels_last)
        ours = [t.clone().requires_grad_() for t in (x, w, b)]
        y = conv2d_act(*ours, activation=name, **kw, **akw)
        g = torch.randn_like(y)
        y.backward(g)
        refs = [t.double().requires_grad_() for t in (x, w, b)]
        _ref(*refs[:2], refs[2], kw, name, akw).backward(g.double())
        for o, r in zip(ours, refs):
            torch.testing.assert_close(o.grad.double(), r.grad, atol=5e-5 * max(1, r.grad.abs().max().item()),
                                       rtol=0)


@pytest.mark.parametrize("route", ["fused", "depthwise", "traced"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_second_derivatives_as_torch(act, route):
    """create_graph=True (a gradient penalty: d/dw, d/db of |d sum(y) / dx|^2) gives torch's
    second derivatives, through the fused op, the fused depthwise kernels, and the custom op
    (make_fx): the fused kernels' gradients are plain tensors, so these once came out wrong
    (w: off by 226, b: None) with no error."""
    from torch.fx.experimental.proxy_tensor import make_fx

    name, akw = act
    if route == "depthwise":  # float32 channels_last, 16 channels, rows >= 28 px: the fused dw kernels
        x, w, b, kw = _data((2, 16, 5, 30, 16, 3, 1, 1, 1, 16), channels_last=True)
    else:
        x, w, b, kw = _data(SHAPES[1], dtype=torch.float64)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))

    def penalty_grads(fn):
        y = fn(x, w, b)
        gx, = torch.autograd.grad((y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum(), x,
                                  create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), (w, b), materialize_grads=True)  # identity: b unused

    def ours(x, w, b):
        return conv2d_act(x, w, b, activation=name, **kw, **akw)

    ref = penalty_grads(lambda x, w, b: _ref(x, w, b, kw, name, akw).to(x.dtype))
    got = penalty_grads(make_fx(ours)(x, w, b) if route == "traced" else ours)
    tol = 1e-9 if x.dtype == torch.float64 else 2e-4
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=tol * max(1, r.abs().max().item()), rtol=0)


@pytest.mark.parametrize("act", ["gelu", "silu", "mish", "tanh", "leaky_relu"])
def test_gradgradcheck_float64(act):
    x, w, b, kw = _data((1, 4, 5, 6, 4, 3, 1, 1, 1, 2), dtype=torch.float64)
    args = tuple(t.detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: conv2d_act(x, w, b, activation=act, backend="cpu", **kw),
                                        args)


def test_only_needed_gradients_and_no_bias():
    x, w, _, kw = _data(SHAPES[1], dtype=torch.float64)
    w.requires_grad_()
    conv2d_act(x, w, None, activation="gelu", **kw).sum().backward()
    ref = w.detach().clone().requires_grad_()
    F.gelu(F.conv2d(x, ref, None, **kw)).sum().backward()
    torch.testing.assert_close(w.grad, ref.grad)
    assert x.grad is None


@pytest.mark.parametrize("padding,k,d", [("same", 4, 1), ("same", 3, 2), ("same", (2, 5), (3, 1)),
                                          ("valid", 3, 1), ((2, 0), 3, 1)])
def test_padding_modes_and_unbatched(padding, k, d):
    x = torch.randn(3, 9, 10, dtype=torch.float64)
    k2 = k if isinstance(k, tuple) else (k, k)
    w = torch.randn(4, 3, *k2, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    y = conv2d_act(x, w, b, padding=padding, dilation=d, activation="silu")
    torch.testing.assert_close(y, F.silu(F.conv2d(x, w, b, padding=padding, dilation=d)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_propagates_like_torch(dtype):
    """NaN in -> NaN out, as torch. Exception (documented): float32/bfloat16 ReLU-family
    layers on CPU run oneDNN's fused conv, whose ReLU/ReLU6 may map NaN to 0."""
    x, w, b, kw = _data(SHAPES[2], dtype=dtype)
    x[0, 0, 4, 4] = float("nan")
    for name, akw in ACTS:
        y = conv2d_act(x, w, b, activation=name, **kw, **akw)
        ref = _ref(x, w, b, kw, name, akw)
        if dtype == torch.float32 and name in ("relu", "relu6", "leaky_relu"):
            assert not (torch.isnan(y) & ~torch.isnan(ref)).any(), name  # never a NaN torch would not give
            continue
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), name


EXTREMES = [float("-inf"), float("inf"), float("nan"), -3e38, -1e30, 1e30, -1e4, -100.0, -88.5, -88.0, -87.5,
            -87.0, -13.5, -9.0, 0.0, 9.0, 20.5, 88.3, 88.7, 1e4]


def _accurate(z, act):
    """float64 activation accurate in the tails: torch's float64 GELUs compute 1 + erf(x / sqrt 2)
    and 1 + tanh(u), which cancel to 0 far below zero (GELU(-9) = -1.0e-18 and tanh-GELU(-9) =
    -1.4e-28, not -0); erfc and the sigmoid form do not."""
    if act.code == A.GELU:
        return z * 0.5 * torch.special.erfc(-z * 0.5 ** 0.5)
    if act.code == A.GELU_TANH:
        return z * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3))
    return A.apply(z, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_activation_and_gradient_at_the_ends_of_the_float_range(act, dtype):
    """Every activation and its derivative in the C++ kernels at +-inf, NaN, huge and underflowing
    inputs, against float64 (NaN exactly where it gives NaN, the same infinities, elsewhere within
    2x the error of torch's own op in ``dtype`` + 1e-30: underflow to 0 is allowed, a small
    nonzero number where the limit is 0 is not; SiLU, Mish and tanh-GELU once gave -6e-9 at
    -1e30 and -0.6 at -3e38). Through the epilogue (1x1 depthwise conv) and the fused depthwise
    forward and backward (3x3, rows of 40 px)."""
    name, akw = act
    a = A.resolve(name, **akw)
    c, width = 32, 2 * len(EXTREMES)  # the fused depthwise kernels' limits: 16-lane blocks, rows >= 28 px
    v = torch.tensor(EXTREMES, dtype=torch.float64)
    x = torch.stack([v.roll(i).repeat(2) for i in range(c)])  # every value in every channel, shifted
    x = x.reshape(1, c, 1, width).to(dtype).to(memory_format=torch.channels_last)

    def check(what, out, ref, theirs):
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(out), nan), \
            f"{what}: NaN pattern differs at inputs {x[torch.isnan(out) != nan][:4].tolist()}"
        o, r, t = out.double()[~nan], ref[~nan], theirs.double()[~nan]
        inf = torch.isinf(r)
        assert torch.equal(o[inf], r[inf]), f"{what}: infinities differ at inputs {x[~nan][inf][o[inf] != r[inf]]}"
        o, r, t = o[~inf], r[~inf], t[~inf]
        tol = 2 * (t - r).abs().nan_to_num(0.0, 0.0, 0.0) + 1e-30 + 2 * torch.finfo(dtype).eps * r.abs()
        bad = (o - r).abs() > tol
        assert not bad.any(), f"{what}: {o[bad][:4].tolist()} where float64 gives {r[bad][:4].tolist()} " \
            f"(inputs {x[~nan][~inf][bad][:4].tolist()})"

    w1 = torch.ones(c, 1, 1, 1, dtype=dtype)
    w3 = torch.zeros(c, 1, 3, 3, dtype=dtype)
    w3[:, 0, :, 1] = 1  # 3x3 filter of a 1-row image: only its centre row meets data
    for w, pad in ((w1, 0), (w3, 1)):
        k = w.shape[-1]
        xr, xt, xo = (x.double().requires_grad_(), x.detach().clone().requires_grad_(),
                      x.detach().clone().requires_grad_())
        ref = _accurate(F.conv2d(xr, w.double(), padding=pad, groups=c), a)
        theirs = A.apply(F.conv2d(xt, w, padding=pad, groups=c), a)
        ours = conv2d_act(xo, w, None, padding=pad, groups=c, activation=name, backend="cpu", **akw)
        for t in (ref, theirs, ours):
            t.backward(torch.ones_like(t))
        check(f"{name} {k}x{k} forward", ours, ref.detach(), theirs.detach())
        check(f"{name} {k}x{k} gradient", xo.grad, xr.grad, xt.grad)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(x=torch.randn(2, 5, 8, 8)), ValueError, "to have 4 channels, but got 5"),
    (dict(x=torch.randn(8, 8)), ValueError, "3D .unbatched. or 4D"),
    (dict(activation="swishy"), ValueError, "unknown activation 'swishy'"),
    (dict(activation="relu", akw={"negative_slope": 0.1}), TypeError, "takes no argument"),
    (dict(x=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, r"Input type \(torch.float64\) and weight"),
    (dict(b=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(w=torch.randn(6, 4, 3, 3, device="meta")), ValueError, "weight is on meta"),
    (dict(padding="full"), ValueError, "padding must be 'same', 'valid'"),
    (dict(x=torch.randn(2, 4, 2, 2)), ValueError, "smaller than the dilated kernel"),
    (dict(stride=0), ValueError, "stride and dilation must be >= 1"),
])
def test_errors(bad, exc, match):
    a = dict(x=torch.randn(2, 4, 8, 8), w=torch.randn(6, 4, 3, 3), b=torch.randn(6), activation="relu", akw={},
             padding=0, stride=1)
    a.update(bad)
    with pytest.raises(exc, match=match):
        conv2d_act(a["x"], a["w"], a["b"], stride=a["stride"], padding=a["padding"], activation=a["activation"],
                   **a["akw"])


def test_validated_arguments_are_cached_but_never_loosened():
    """The validated geometry is cached per (arguments, shapes): a cached call must not let a
    bad argument through that compares equal to a good one (True == 1), and errors repeat."""
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    ref = F.relu(F.conv2d(x, w, stride=1, padding=1))
    for _ in range(2):
        torch.testing.assert_close(conv2d_act(x, w, stride=(1, 1), padding=(1, 1)), ref)
        torch.testing.assert_close(conv2d_act(x, w, stride=[1, 1], padding=1), ref)  # lists: not cached
    for bad in (dict(stride=True), dict(stride=(True, 1)), dict(padding=(1, True)), dict(dilation=(1, 1.0))):
        with pytest.raises(TypeError, match="must be an int or a pair of ints"):
            conv2d_act(x, w, **{"stride": 1, "padding": 1, **bad})
    with pytest.raises(ValueError, match="groups must be a positive int"):
        conv2d_act(x, w, padding=1, groups=True)
    for _ in range(2):  # an error is raised again, not cached as a result
        with pytest.raises(ValueError, match="to have 4 channels, but got 5"):
            conv2d_act(torch.randn(2, 5, 8, 8), w, padding=1)
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            conv2d_act(torch.randn(2, 4, 2, 2), w, padding=0)
    # the shapes are part of the key: another input size gets its own check and answer
    x2 = torch.randn(3, 4, 5, 7)
    torch.testing.assert_close(conv2d_act(x2, w, padding=(1, 1)), F.relu(F.conv2d(x2, w, padding=1)))
    # padding="same" with an even kernel pads one extra row/column: the size check counts it
    w4 = torch.randn(6, 4, 4, 4)
    x4 = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(conv2d_act(x4, w4, padding="same"), F.relu(F.conv2d(x4, w4, padding="same")))


def test_numpy_integer_arguments_as_conv2d():
    """stride/padding/dilation/groups as numpy integers (nn.Conv2d keeps them so) work as in
    F.conv2d; numpy's bool is refused as Python's is."""
    np = pytest.importorskip("numpy")
    x, w = torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    kw = dict(stride=np.int64(2), padding=(np.int32(1), 2), dilation=[np.int64(1)], groups=np.int64(2))
    torch.testing.assert_close(conv2d_act(x, w, **kw), F.relu(F.conv2d(x, w, stride=2, padding=(1, 2), groups=2)))
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        conv2d_act(x, w, stride=np.bool_(True), groups=2)


def test_cpu_path_choice_by_size():
    """The measured limits of _onednn_pays: small layers take torch's conv + our epilogue, large
    ones oneDNN, by outputs or multiply-adds (benchmarks/small_layers.py paths; inference only)."""
    p = K.ConvArgs((1, 1), (1, 1), (1, 1), 1)

    def pays(c, hw, k, reuse, n=1):
        return K._onednn_pays(torch.empty(n, c, hw, hw), torch.empty(c, c, k, k), K.ConvArgs((1, 1), (k // 2,) * 2,
                                                                                             (1, 1), 1), reuse)
    # kept weight (inference): >= 20 K outputs or >= 2 M multiply-adds
    assert not pays(16, 8, 3, True) and not pays(64, 7, 3, True) and not pays(64, 16, 1, True)
    assert pays(128, 4, 3, True) and pays(32, 28, 1, True) and pays(256, 7, 1, True)
    # weight reordered per call (the default, NCHW input): >= 20 K outputs or >= 5 M multiply-adds,
    # and an output of >= 8 x the weight's elements (the reorder's traffic)
    assert not pays(128, 4, 3, False) and not pays(256, 7, 1, False) and not pays(64, 16, 1, False)
    assert pays(32, 28, 1, False) and pays(16, 40, 3, False) and pays(64, 56, 3, False, n=8)
    assert not pays(64, 14, 3, False) and not pays(256, 7, 3, False) and not pays(256, 14, 3, False, n=8)
    assert pays(64, 14, 3, True) and pays(256, 7, 3, True)  # kept weight: no traffic limit
    assert K._output_numel(torch.empty(2, 3, 9, 8), torch.empty(5, 3, 3, 2), p) == 2 * 5 * 9 * 9


@pytest.mark.production_training_policy
@pytest.mark.parametrize("act", ["relu", "gelu", "mish", "identity"])
def test_small_training_layers_run_torch_ops(act):
    """In production, training a small CPU layer runs torch's convolution and activation (native
    autograd nodes), a large one the fused op; both give float64's gradients, and the statistics
    tap still counts."""
    from hierfast.nn import Conv2dAct

    big = (4, 40, 80, 80) if A.resolve(act).grad_from_output else (4, 32, 56, 56)  # 1 M / 400 K outputs
    for shape, fused in (((2, 8, 12, 12), False), (big, True)):
        m = Conv2dAct(shape[1], shape[1], 3, padding=1, activation=act, track_stats=True)
        x = torch.randn(*shape).to(memory_format=torch.channels_last).requires_grad_()
        assert K.eager_training_pays(x, m.weight, K.ConvArgs((1, 1), (1, 1), (1, 1), 1), m.activation) is not fused
        y = m(x)
        assert ("ConvActFn" in type(y.grad_fn).__name__) is fused, type(y.grad_fn).__name__
        g = torch.randn_like(y)
        y.backward(g)
        refs = [t.detach().double().requires_grad_() for t in (x, m.weight, m.bias)]
        yr = A.apply(F.conv2d(refs[0], refs[1], refs[2], padding=1), A.resolve(act))
        yr.backward(g.double())
        torch.testing.assert_close(y.double(), yr.detach(), atol=1e-4, rtol=0)
        for t, r in zip((x, m.weight, m.bias), refs):
            torch.testing.assert_close(t.grad.double(), r.grad, atol=2e-4 * max(1, r.grad.abs().max().item()), rtol=0)
        st = m.stats()
        torch.testing.assert_close(st["mean"], yr.detach().mean((0, 2, 3)), atol=1e-5, rtol=0)
    # a forced backend always takes the fused op
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    y = conv2d_act(x, torch.randn(8, 8, 3, 3), None, padding=1, backend="cpu")
    assert "ConvActFn" in type(y.grad_fn).__name__


def test_training_never_takes_onednn(monkeypatch):
    """Training (saved tensors for backward) runs torch's convolution + our epilogue whatever the
    layer's size (timed as whole steps: oneDNN's forward never paid); inference on a large
    channels_last layer takes oneDNN."""
    calls = []
    real = K._onednn
    monkeypatch.setattr(K, "_onednn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(4, 32, 32, 32).to(memory_format=torch.channels_last)
    w = torch.randn(32, 32, 3, 3) / 17
    p = K.ConvArgs((1, 1), (1, 1), (1, 1), 1)
    for name in ("relu", "gelu"):
        a = A.resolve(name)
        y, saved = K._fwd_cpu(x, w, None, p, a, True, None)
        ref = A.apply(F.conv2d(x.double(), w.double(), padding=1), a)
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=0)
        assert saved is not None and not calls, name
    K._fwd_cpu(x, w, None, p, A.resolve("relu"), False, None)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("nhwc", [False, True])
def test_read_only_statistics_kernel(dtype, nhwc):
    """conv_act_stats (the tap after oneDNN's fused convolution): y is only read, the sums are
    added to what is there, over many OpenMP tasks, on features with a large common offset."""
    n, c, h, w = 3, 48, 33, 31
    y = (torch.randn(n, c, h, w, dtype=torch.float64) * 3 + 40.0).to(dtype)
    y[:, ::3] -= 60.0  # some channels mostly negative: the positive counts differ per channel
    y = y.to(memory_format=torch.channels_last) if nhwc else y.contiguous()
    before = y.clone()
    stats = torch.full((c, 3), 0.25, dtype=torch.float64)
    cpu_kernels().conv_act_stats(y.data_ptr(), _dtypes.code(dtype), n, c, h * w, nhwc, stats.data_ptr())
    assert torch.equal(y, before)
    ref = 0.25 + channel_stats(y)
    torch.testing.assert_close(stats, ref, atol=0, rtol=1e-12)


def test_stats_tap_matches_reference():
    x, w, b, kw = _data(SHAPES[3], channels_last=True)
    stats = torch.zeros(w.shape[0], 3, dtype=torch.float64)
    for _ in range(2):
        y = conv2d_act(x, w, b, activation="gelu", stats=stats, **kw)
    ref = 2 * channel_stats(y)
    torch.testing.assert_close(stats, ref, atol=1e-8, rtol=1e-9)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_opcheck(act, channels_last):
    x = torch.randn(2, 4, 7, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    a = A.resolve(act)
    for keep in (True, False):
        torch.library.opcheck(torch.ops.hierfast.conv2d_act.default,
                              (x, w, b, [2, 1], [1, 1], [1, 1], 2, a.name, a.code, a.alpha, keep))


def test_compile_fullgraph_forward_backward():
    x = torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)

    def f(x, w, b):
        return conv2d_act(x, w, b, padding=1, activation="gelu", approximate="tanh").square().sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x, w, b)
    out.backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    refs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    F.gelu(F.conv2d(refs[0], refs[1], refs[2], padding=1), approximate="tanh").square().sum().backward()
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g.double(), r.grad, atol=1e-3 * max(1, r.grad.abs().max().item()), rtol=0)


def test_compile_of_conv2dact_warns_nothing():
    """Compiling a Conv2dAct emits no UserWarning: an lru_cache-wrapped autocast check made
    Dynamo warn on every compile."""
    import warnings

    from hierfast.nn import Conv2dAct

    torch.manual_seed(0)
    m = Conv2dAct(3, 4, 3, padding=1, activation="relu")
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = torch.compile(m, backend="eager", fullgraph=True)(x)
    assert [str(w.message) for w in rec if issubclass(w.category, UserWarning)] == []
    with torch.no_grad():
        ref = F.relu(F.conv2d(x.double(), m.weight.double(), m.bias.double(), padding=1))
    torch.testing.assert_close(y.detach().double(), ref, atol=1e-5, rtol=0)


def test_compile_dynamic_shapes_do_not_recompile():
    """Under torch.compile(dynamic=True) new input sizes reuse the graph: conv2d_act's argument
    checks must not specialise the shapes (a dict keyed on them did: one graph per size)."""
    from torch._dynamo.utils import counters

    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)

    def f(x):
        return conv2d_act(x, w, b, padding=1, activation="gelu")

    torch._dynamo.reset()
    counters.clear()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for n, h in ((2, 9), (3, 11), (5, 7)):
        x = torch.randn(n, 4, h, h)
        torch.testing.assert_close(cf(x), F.gelu(F.conv2d(x, w, b, padding=1)), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_make_fx_symbolic_shapes():
    """make_fx with symbolic shapes (no dynamo: the shapes are SymInts, which do not hash)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    g = make_fx(lambda x, w, b: conv2d_act(x, w, b, padding=1, activation="relu"), tracing_mode="symbolic")(
        torch.randn(2, 4, 9, 9), w, b)
    assert any("hierfast.conv2d_act" in str(n.target) for n in g.graph.nodes)
    x = torch.randn(3, 4, 7, 11)
    torch.testing.assert_close(g(x, w, b), F.relu(F.conv2d(x, w, b, padding=1)), atol=1e-5, rtol=1e-5)


def test_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(5, 3, 3, 3))

        def forward(self, x):
            return conv2d_act(x, self.w, None, padding="same", activation="mish")

    m, x = M(), torch.randn(2, 3, 8, 8)
    ep = torch.export.export(m, (x,))
    assert any("hierfast.conv2d_act" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ep.module()(x2), F.mish(F.conv2d(x2, m.w, padding="same")))


def test_cuda_kernels_are_compiled_when_built():
    from hierfast import _ext

    mod, _ = _ext.cuda_module()
    if mod is None:
        pytest.skip("hierfast was built without CUDA")
    assert hasattr(mod, "conv_act_forward") and hasattr(mod, "conv_act_backward")


def _check_relu_layer(m, x):
    with torch.no_grad():
        y = m(x)
        ref = F.relu(F.conv2d(x.double(), m.weight.double(), m.bias.double(), padding=1))
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0)


def test_inference_sees_weight_writes_that_bypass_the_version_counter():
    """By default nothing of a weight is kept between calls: writes through ``.data`` or numpy
    (which autograd's version counter does not record: nn.init on ``.data``, a momentum
    encoder's update) show in the next call, as with nn.Conv2d."""
    from hierfast.nn import Conv2dAct

    torch.manual_seed(0)
    m = Conv2dAct(8, 32, 3, padding=1).eval()
    x = torch.randn(1, 8, 64, 64).contiguous(memory_format=torch.channels_last)
    _check_relu_layer(m, x)  # large enough for oneDNN's path
    with torch.no_grad():
        m.weight.data.mul_(2)
    _check_relu_layer(m, x)
    m.weight.data.numpy()[:] *= -0.5
    _check_relu_layer(m, x)
    torch.nn.init.normal_(m.weight.data)
    _check_relu_layer(m, x)
    assert m.weight not in K._PACKED_WEIGHTS


def test_onednn_weight_reuse_follows_every_change():
    """Inside frozen_weights(), inference reuses oneDNN's blocked copy of the weight; every
    change of the weight that autograd records, the batch size or the mode must still give
    F.conv2d's answer, nothing may stick to the module (torch.save) or keep the weight alive,
    and the copies go when the block ends."""
    import gc
    import io

    from hierfast.functional import frozen_weights
    from hierfast.nn import Conv2dAct

    torch.manual_seed(0)
    m = Conv2dAct(32, 32, 3, padding=1, activation="relu").to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 16, 16).to(memory_format=torch.channels_last)
    with frozen_weights():
        with frozen_weights():  # nested: the outer block keeps the copies
            _check_relu_layer(m, x)
        assert m.weight in K._PACKED_WEIGHTS  # the reuse path was taken
        with torch.no_grad():
            m.weight.mul_(-2.0)  # in place
        _check_relu_layer(m, x)
        m.weight.data = torch.randn_like(m.weight)  # new storage
        _check_relu_layer(m, x)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().sum().backward()
        opt.step()
        _check_relu_layer(m, x)
        _check_relu_layer(m, torch.randn(7, 32, 16, 16).to(memory_format=torch.channels_last))  # another batch
        with torch.inference_mode():
            y = m(x)
        torch.testing.assert_close(y, F.relu(F.conv2d(x, m.weight.detach(), m.bias.detach(), padding=1)),
                                   atol=1e-4, rtol=1e-5)
        torch.save(m, io.BytesIO())  # no oneDNN tensor attached to the parameters
        n = len(K._PACKED_WEIGHTS)
        del m, opt
        gc.collect()
        assert len(K._PACKED_WEIGHTS) == n - 1
    assert len(K._PACKED_WEIGHTS) == 0  # dropped with the block


def test_frozen_weights_in_threads_keep_each_others_copies():
    """frozen_weights() blocks are counted process-wide: a worker thread's own block (the
    outermost in its context) leaves the copies of a block still open in the main thread,
    and the copies go when the last block, in whichever thread, exits. Worker threads do
    not inherit the main thread's block."""
    import threading

    from hierfast.functional import frozen_weights
    from hierfast.nn import Conv2dAct

    torch.manual_seed(0)
    m = Conv2dAct(32, 32, 3, padding=1, activation="relu").to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 32, 12, 12).to(memory_format=torch.channels_last)
    seen, entered, release = {}, threading.Event(), threading.Event()

    def worker():
        seen["inherited"] = K._FROZEN.get()
        with frozen_weights():
            _check_relu_layer(m, x)
            entered.set()
            release.wait(30)

    with frozen_weights():
        _check_relu_layer(m, x)
        t = threading.Thread(target=worker)
        t.start()
        entered.wait(30)
        release.set()
        t.join()
        assert seen["inherited"] is False
        assert m.weight in K._PACKED_WEIGHTS  # the worker's exit left the main block's copy
        t = threading.Thread(target=worker)
        release.clear(), entered.clear()
        t.start()
        entered.wait(30)
    assert m.weight in K._PACKED_WEIGHTS  # the worker's block is still open
    release.set()
    t.join()
    assert len(K._PACKED_WEIGHTS) == 0  # the last block exited


@pytest.mark.parametrize("act", ["relu", "gelu", "identity"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_forward_mode_ad_as_torch(act, grad):
    """Tangents (torch.autograd.forward_ad) as torch's: the fused kernels change y in place, so a
    tangent once came out as the convolution's alone (the activation's derivative missing)."""
    import torch.autograd.forward_ad as fwAD

    x, w, b, kw = _data(SHAPES[1], dtype=torch.float64)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    w.requires_grad_(grad)
    with fwAD.dual_level():
        xd, wd = fwAD.make_dual(x, tx), fwAD.make_dual(w, tw)
        ours = fwAD.unpack_dual(conv2d_act(xd, wd, b, activation=act, **kw))
        ref = fwAD.unpack_dual(_ref(xd, wd, b, kw, act, {}))
    torch.testing.assert_close(ours.primal, ref.primal)
    torch.testing.assert_close(ours.tangent, ref.tangent)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_decompositions_lower_exported_programs_to_aten(act):
    """hierfast.functional.decompositions() lowers an exported program to ATen ops (no hierfast
    op left: what AOTInductor and ExecuTorch can run), computing the same; the backward op's
    decomposition gives the op's gradients."""
    from hierfast.functional import decompositions

    name, akw = act
    x, w, b, kw = _data(SHAPES[1])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(w), torch.nn.Parameter(b)

        def forward(self, x):
            return conv2d_act(x, self.w, self.b, activation=name, **kw, **akw)

    m = M()
    table = torch.export.default_decompositions()
    table.update(decompositions())
    ep = torch.export.export(m, (x,)).run_decompositions(table)
    assert not any("hierfast" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(ep.module()(x2), m(x2), atol=1e-5, rtol=1e-5)
    # the backward op against its decomposition
    a = A.resolve(name, **akw)  # SHAPES[1]: stride 1, padding 1, dilation 1, groups 1
    gy = torch.randn_like(m(x))
    y, pre = torch.ops.hierfast.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, a.name, a.code, a.alpha, True)
    saved = y if a.grad_from_output else pre
    args = (gy, x, w, saved, [1, 1], [1, 1], [1, 1], 1, a.name, a.code, a.alpha, [True, True, True])
    for got, want in zip(torch.ops.hierfast.conv2d_act_backward(*args),
                         decompositions()[torch.ops.hierfast.conv2d_act_backward.default](*args)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
