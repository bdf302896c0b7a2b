"""Fused CPU depthwise forward (csrc/cpu/dw_conv_forward.cpp) against float64 F.conv2d + activation."""
import pytest
import torch
import torch.nn.functional as F

from hierfast import _dtypes
from hierfast.functional import conv2d_act
from hierfast.ops import activations as A
from hierfast.ops import conv_act as ops
from hierfast.ops._launch import cpu_kernels
from conftest import channel_stats
from test_nn_functional import ACT_IDS, ACTS

# (N, C, H, W, k, stride, padding, dilation): shapes the fused kernel takes
DW_SHAPES = [
    (2, 16, 9, 11, 3, 1, 1, 1),            # one channel block, odd sizes
    (3, 48, 8, 7, 3, 1, 1, 1),             # three blocks
    (1, 32, 10, 9, 5, 1, 2, 1),            # 5x5
    (2, 32, 12, 13, 3, 2, 1, 1),           # stride 2 (MobileNet's downsampling depthwise)
    (1, 16, 11, 10, 5, 2, 2, 1),           # 5x5 stride 2 (EfficientNet)
    (2, 32, 12, 12, 3, 1, 2, 2),           # dilation 2
    (2, 16, 7, 7, 3, 1, 0, 1),             # no padding: output smaller than input
    (1, 16, 6, 9, 3, 1, (2, 0), (1, 2)),   # uneven padding / dilation
    (1, 16, 5, 6, 3, 1, 3, 1),             # padding beyond the filter's reach: border rows see no input
    (1, 16, 3, 3, 5, 1, 2, 1),             # image smaller than the filter: no interior pixel
    (1, 16, 4, 40, 3, (1, 3), 1, 1),       # mixed stride
    (9, 64, 5, 6, 5, 1, 1, 1),             # many images, partial padding on a 5x5
    (1, 32, 30, 2, 3, 1, 1, 1),            # a single image split into row bands
]
# shapes and inputs it does not take (the unfused path must still be right)
OTHER_SHAPES = [
    (2, 19, 8, 7, 3, 1, 1, 1),             # channels not a multiple of 16
    (2, 16, 9, 9, 7, 1, 3, 1),             # 7x7
    (2, 16, 8, 9, (1, 3), 1, (0, 1), 1),   # rectangular
]
IDS = [f"s{i}" for i in range(len(DW_SHAPES))]


def _data(shape, dtype=torch.float32, bias=True):
    n, c, h, w, k, s, p, d = shape
    k = k if isinstance(k, tuple) else (k, k)
    g = torch.Generator().manual_seed(sum(map(hash, map(str, shape))) % 2 ** 31)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2).to(dtype)
    wt = (torch.randn(c, 1, *k, generator=g, dtype=torch.float64) / (k[0] * k[1]) ** 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x.to(memory_format=torch.channels_last), wt, b, dict(stride=s, padding=p, dilation=d, groups=c)


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _kernel(x, w, b, kw, act, keep, stats):
    """Call the kernel directly on NaN-poisoned outputs: every element must be written."""
    p = ops.ConvArgs(_pair(kw["stride"]), _pair(kw["padding"]), _pair(kw["dilation"]), kw["groups"])
    n, c, h, wd = x.shape
    oh, ow = ops._output_size(x, w, p)
    y = torch.full((n, c, oh, ow), float("nan")).to(memory_format=torch.channels_last)
    z = torch.full_like(y, float("nan")) if keep else None
    geometry = [n, c, h, wd, oh, ow, w.shape[2], w.shape[3], *p.stride, *p.padding, *p.dilation]
    cpu_kernels().dw_conv_act_forward(x.data_ptr(), w.contiguous().data_ptr(), 0 if b is None else b.data_ptr(),
                                      y.data_ptr(), 0 if z is None else z.data_ptr(),
                                      0 if stats is None else stats.data_ptr(), _dtypes.code(x.dtype), geometry,
                                      act.code, act.alpha)
    return y, z


def _ref(x, w, b, kw, act):
    z = F.conv2d(x.double(), w.double(), None if b is None else b.double(), **kw)
    return z, A.apply(z, act)


def test_the_fused_path_is_taken_where_it_wins(monkeypatch):
    """Guard: the layer runs the fused kernel where ops._depthwise_forward_wins says it is faster
    (so the layer tests below exercise it), and the other paths elsewhere."""
    calls = []
    real = ops._depthwise_forward_cpu
    monkeypatch.setattr(ops, "_depthwise_forward_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))

    def fused(shape, name, train, stats=False, **change):
        x, w, b, kw = _data(shape)
        if change.get("dtype"):
            x, w, b = (t.to(change["dtype"]) for t in (x, w, b))
        if change.get("nchw"):
            x = x.contiguous()
        st = torch.zeros(w.shape[0], 3, dtype=torch.float64) if stats else None
        ts = [t.clone().requires_grad_(train) for t in (x, w, b)]
        with torch.set_grad_enabled(train):
            y = conv2d_act(*ts, activation=name, stats=st, **kw)
        zref, yref = _ref(x, w, b, kw, A.resolve(name))
        tol = 2e-2 if change.get("dtype") == torch.bfloat16 else 2e-5
        torch.testing.assert_close(y.double(), yref, atol=tol * max(1.0, yref.abs().max().item()), rtol=0)
        n, calls[:] = len(calls), []
        return n == 1

    s1 = (2, 16, 5, 30, 3, 1, 1, 1)                             # 3x3, stride 1, 30 px rows
    narrow, s2, k5 = DW_SHAPES[0], (1, 16, 5, 60, 3, 2, 1, 1), (1, 16, 5, 30, 5, 1, 2, 1)
    assert fused(s1, "relu6", train=False) and fused(s1, "hardswish", train=True) and fused(s1, "mish", False)
    assert fused(s1, "relu", train=False) and fused(s1, "relu", train=True)
    assert fused(s1, "gelu", train=True)                        # y and z in one pass
    assert fused(s1, "gelu", train=False)
    assert fused(s1, "gelu", train=False, stats=True) and fused(s1, "relu", False, stats=True)  # the tap
    for other in (narrow, s2, k5):                              # measured slower there
        assert not fused(other, "silu", train=True) and not fused(other, "silu", False, stats=True)
    # NCHW input, float64, bfloat16, and the shapes it does not take: the unfused paths
    assert not fused(s1, "silu", False, nchw=True)
    assert not fused(s1, "silu", False, dtype=torch.float64) and not fused(s1, "silu", False, dtype=torch.bfloat16)
    for shape in OTHER_SHAPES:
        assert not fused(shape, "mish", train=False, stats=True)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=IDS)
def test_kernel_matches_float64(shape, act):
    """y, the pre-activation z and the statistics, all from one call on poisoned outputs."""
    name, akw = act
    a = A.resolve(name, **akw)
    x, w, b, kw = _data(shape, bias=shape[0] % 2 == 1)
    stats = torch.full((x.shape[1], 3), 0.5, dtype=torch.float64)  # the kernel adds to what is there
    y, z = _kernel(x, w, b, kw, a, keep=True, stats=stats)
    zref, yref = _ref(x, w, b, kw, a)
    scale = max(1.0, zref.abs().max().item())
    torch.testing.assert_close(z.double(), zref, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(y.double(), yref, atol=2e-5 * scale, rtol=0)
    sref = 0.5 + channel_stats(y)
    torch.testing.assert_close(stats, sref, atol=1e-9, rtol=1e-12)
    # without z and statistics the same y
    y2, _ = _kernel(x, w, b, kw, a, keep=False, stats=None)
    assert torch.equal(y2, y)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_layer_forward_and_training(act):
    """Through conv2d_act: inference, training (saved y or z feeds the backward), and the tap, on
    a shape where the layer picks the fused kernel (for most activations; the guard test above)."""
    name, akw = act
    x, w, b, kw = _data((2, 32, 6, 29, 3, 1, 1, 1))
    zref, yref = _ref(x, w, b, kw, A.resolve(name, **akw))
    with torch.no_grad():
        y = conv2d_act(x, w, b, activation=name, **kw, **akw)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), yref, atol=2e-5 * max(1.0, zref.abs().max().item()), rtol=0)
    ts = [t.clone().requires_grad_() for t in (x, w, b)]
    conv2d_act(*ts, activation=name, **kw, **akw).square().sum().backward()
    rs = [t.double().requires_grad_() for t in (x, w, b)]
    A.apply(F.conv2d(*rs, **kw), A.resolve(name, **akw)).square().sum().backward()
    for o, r in zip(ts, rs):
        torch.testing.assert_close(o.grad.double(), r.grad, atol=1e-4 * max(1.0, r.grad.abs().max().item()), rtol=0)
    stats = torch.zeros(x.shape[1], 3, dtype=torch.float64)
    with torch.no_grad():
        y = conv2d_act(x, w, b, activation=name, stats=stats, **kw, **akw)
    yd = y.double()
    torch.testing.assert_close(stats[:, 0], yd.sum((0, 2, 3)), atol=1e-9, rtol=1e-12)


def test_statistics_over_many_tasks_with_a_large_offset():
    """Sums merged over (image, block, band) tasks in float64, on features with a large common
    offset (where float32 sums of squares drift)."""
    x, w, b, kw = _data((5, 64, 17, 19, 3, 1, 1, 1))
    x = x + 40.0
    for name in ("relu", "gelu", "mish"):
        a = A.resolve(name)
        stats = torch.zeros(64, 3, dtype=torch.float64)
        y, _ = _kernel(x, w, b, kw, a, keep=False, stats=stats)
        ref = channel_stats(y)
        torch.testing.assert_close(stats, ref, atol=0, rtol=1e-12, msg=lambda m: f"{name}: {m}")


def test_nan_propagates_like_torch():
    """A NaN input reaches exactly the outputs it touches (also through ReLU: no oneDNN NaN -> 0)."""
    x, w, b, kw = _data(DW_SHAPES[1])
    x[0, 3, 4, 4] = float("nan")
    x[1, 20, 0, 0] = float("nan")  # a corner: border path
    for name, akw in ACTS:
        a = A.resolve(name, **akw)
        y, _ = _kernel(x, w, b, kw, a, keep=False, stats=None)
        ref = _ref(x, w, b, kw, a)[1]
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), name


def test_kernel_rejects_what_it_cannot_run():
    x, w, b, kw = _data(OTHER_SHAPES[0])  # 19 channels
    with pytest.raises(ValueError, match="C % 16"):
        _kernel(x, w, b, kw, A.resolve("relu"), keep=False, stats=None)
    x, w, b, kw = _data(DW_SHAPES[0])
    with pytest.raises(ValueError, match="float32 only"):
        cpu_kernels().dw_conv_act_forward(x.data_ptr(), w.data_ptr(), 0, x.data_ptr(), 0, 0,
                                          _dtypes.code(torch.float64), [2, 16, 9, 11, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1],
                                          1, 0.0)
    with pytest.raises(ValueError, match="geometry"):
        cpu_kernels().dw_conv_act_forward(0, 0, 0, 0, 0, 0, 2, [1, 2, 3], 1, 0.0)


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_opcheck_on_the_fused_path(act):
    """The custom op's fake function agrees with the fused kernel's output (shape, strides)."""
    x, w, b, kw = _data((2, 16, 4, 28, 3, 1, 1, 1))
    a = A.resolve(act)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    for keep in (True, False):
        torch.library.opcheck(torch.ops.hierfast.conv2d_act.default,
                              (*args, [1, 1], [1, 1], [1, 1], 16, a.name, a.code, a.alpha, keep))


def test_compile_fullgraph_on_the_fused_path():
    x, w, b, kw = _data((2, 32, 5, 30, 3, 1, 1, 1))
    ts = [t.clone().requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return conv2d_act(x, w, b, activation="hardswish", **kw).square().sum()

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True)(*ts).backward()
    rs = [t.double().requires_grad_() for t in (x, w, b)]
    F.hardswish(F.conv2d(*rs, **kw)).square().sum().backward()
    for o, r in zip(ts, rs):
        torch.testing.assert_close(o.grad.double(), r.grad, atol=1e-4 * max(1.0, r.grad.abs().max().item()), rtol=0)
