"""Fused CPU depthwise backward (csrc/cpu/dw_conv_backward.cpp) against float64 autograd."""
import pytest
import torch
import torch.nn.functional as F

from hierfast.functional import conv2d_act
from hierfast.ops import activations as A
from hierfast.ops import conv_act as ops
from test_nn_functional import ACT_IDS, ACTS

# (N, C, H, W, k, stride, padding, dilation): shapes the fused kernel takes
DW_SHAPES = [
    (2, 16, 9, 11, 3, 1, 1, 1),       # one channel block
    (3, 48, 8, 7, 3, 1, 1, 1),        # three blocks, odd sizes
    (1, 32, 10, 9, 5, 1, 2, 1),       # 5x5
    (2, 32, 12, 12, 3, 1, 2, 2),      # dilation 2
    (2, 16, 7, 7, 3, 1, 0, 1),        # no padding: output smaller than input
    (1, 16, 6, 9, 3, 1, (2, 0), (1, 2)),  # uneven padding / dilation, padding beyond the filter reach
    (9, 64, 5, 6, 5, 1, 1, 1),        # many images, partial padding on a 5x5
    (2, 32, 9, 9, 3, 2, 1, 1),        # stride 2 (MobileNet's downsampling layers)
    (1, 16, 10, 11, 3, 2, 1, 1),      # stride 2, even height: the last input row feeds no output
    (2, 16, 11, 9, 5, 2, 2, 1),       # 5x5 stride 2 (EfficientNet)
    (1, 16, 9, 13, 3, (1, 3), (1, 0), (2, 1)),  # mixed stride, uneven padding and dilation
]
# shapes it does not take (the unfused path must still be right)
OTHER_SHAPES = [
    (2, 19, 8, 7, 3, 1, 1, 1),        # channels not a multiple of 16
    (2, 16, 9, 9, 7, 1, 3, 1),        # 7x7
    (2, 16, 8, 9, (1, 3), 1, (0, 1), 1),  # rectangular
]


def _data(shape, dtype):
    n, c, h, w, k, s, p, d = shape
    k = k if isinstance(k, tuple) else (k, k)
    g = torch.Generator().manual_seed(sum(map(hash, map(str, shape))) % 2 ** 31)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2).to(dtype)
    wt = (torch.randn(c, 1, *k, generator=g, dtype=torch.float64) / (k[0] * k[1]) ** 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last), wt, b, dict(stride=s, padding=p, dilation=d, groups=c)


def _grads(x, w, b, kw, name, akw, gy, dtype=None):
    ts = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    if dtype is None:
        y = conv2d_act(*ts, activation=name, **kw, **akw)
    else:  # float64 reference: F.conv2d + the activation, plain autograd
        ts = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        y = A.apply(F.conv2d(*ts, **kw), A.resolve(name, **akw))
    y.backward(gy.to(y.dtype))
    return [t.grad for t in ts]


def test_the_fused_path_is_taken(monkeypatch):
    """Guard: the tests below exercise the fused kernel, not the fallback."""
    calls = []
    real = ops._depthwise_backward_cpu
    monkeypatch.setattr(ops, "_depthwise_backward_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b, kw = _data(DW_SHAPES[0], torch.float32)
    ts = [t.clone().requires_grad_() for t in (x, w, b)]
    conv2d_act(*ts, activation="gelu", **kw).sum().backward()
    assert calls == [1]
    # NCHW input, float64, and the shapes it does not take: the unfused path
    ts = [t.clone().contiguous().requires_grad_() for t in (x, w, b)]
    conv2d_act(*ts, activation="gelu", **kw).sum().backward()
    ts = [t.clone().double().requires_grad_() for t in (x, w, b)]
    conv2d_act(*ts, activation="gelu", **kw).sum().backward()
    for shape in OTHER_SHAPES:
        xo, wo, bo, kwo = _data(shape, torch.float32)
        ts = [t.clone().requires_grad_() for t in (xo, wo, bo)]
        conv2d_act(*ts, activation="gelu", **kwo).sum().backward()
    assert calls == [1]


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("shape", DW_SHAPES + OTHER_SHAPES,
                         ids=[f"s{i}" for i in range(len(DW_SHAPES))] + [f"o{i}" for i in range(len(OTHER_SHAPES))])
def test_fp32_gradients_match_float64(shape, act):
    name, akw = act
    x, w, b, kw = _data(shape, torch.float32)
    y = conv2d_act(x, w, b, activation=name, **kw, **akw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(memory_format=torch.channels_last)
    ours = _grads(x, w, b, kw, name, akw, gy)
    ref = _grads(x, w, b, kw, name, akw, gy, dtype=torch.float64)
    for o, r in zip(ours, ref):
        assert o.dtype == torch.float32 and bool(torch.isfinite(o).all())
        torch.testing.assert_close(o.double(), r, atol=2e-5 * max(1.0, r.abs().max().item()), rtol=0)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_gradcheck_float64(act):
    name, akw = act
    x, w, b, kw = _data((1, 5, 5, 6, 3, 2, 1, 1), torch.float64)
    args = tuple(t.detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d_act(x, w, b, activation=name, **kw, **akw), args)


def test_partial_gradients_and_no_bias():
    x, w, b, kw = _data(DW_SHAPES[1], torch.float32)
    gy = None
    for need in [(True, False), (False, True)]:
        xs, ws = x.clone().requires_grad_(need[0]), w.clone().requires_grad_(need[1])
        y = conv2d_act(xs, ws, None, activation="silu", **kw)
        gy = torch.randn_like(y) if gy is None else gy
        y.backward(gy)
        ref = _grads(x, w, torch.zeros_like(b), kw, "silu", {}, gy, dtype=torch.float64)
        if need[0]:
            torch.testing.assert_close(xs.grad.double(), ref[0], atol=2e-5 * ref[0].abs().max().item(), rtol=0)
            assert ws.grad is None
        else:
            torch.testing.assert_close(ws.grad.double(), ref[1], atol=2e-5 * ref[1].abs().max().item(), rtol=0)
            assert xs.grad is None


def test_module_training_step_matches_unfused():
    """Conv2dAct(groups=C) in a training step equals the unfused float64 computation."""
    from hierfast.nn import Conv2dAct

    torch.manual_seed(0)
    m = Conv2dAct(32, 32, 3, padding=1, groups=32, activation="relu6")
    x = torch.randn(4, 32, 15, 15).to(memory_format=torch.channels_last)
    m(x).square().mean().backward()
    ref = m.weight.detach().double().requires_grad_(), m.bias.detach().double().requires_grad_()
    F.relu6(F.conv2d(x.double(), *ref, padding=1, groups=32)).square().mean().backward()
    torch.testing.assert_close(m.weight.grad.double(), ref[0].grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(m.bias.grad.double(), ref[1].grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("act", [("relu", {}), ("gelu", {}), ("silu", {}), ("mish", {})], ids=lambda a: a[0])
@pytest.mark.parametrize("shape", [DW_SHAPES[1], DW_SHAPES[2], DW_SHAPES[7]], ids=["3x3", "5x5", "stride2"])
def test_bfloat16_gradients_within_twice_torchs_error(shape, act, monkeypatch):
    """bfloat16 tensors (float32 arithmetic inside): each gradient's error against float64 is at
    most 2x the error of torch's own bfloat16 conv + activation (the issue's low-precision bar)."""
    calls = []
    real = ops._depthwise_backward_cpu
    monkeypatch.setattr(ops, "_depthwise_backward_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    name, akw = act
    x, w, b, kw = _data(shape, torch.bfloat16)
    y = conv2d_act(x, w, b, activation=name, **kw, **akw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(memory_format=torch.channels_last)
    ours = _grads(x, w, b, kw, name, akw, gy.bfloat16())
    assert calls == [1]
    ts = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    A.apply(F.conv2d(*ts, **kw), A.resolve(name, **akw)).backward(gy.bfloat16())
    ref = _grads(x, w, b, kw, name, akw, gy, dtype=torch.float64)
    for o, t, r in zip(ours, ts, ref):
        assert o.dtype == torch.bfloat16 and bool(torch.isfinite(o).all())
        scale = r.abs().max().item()
        err, torch_err = (o.double() - r).abs().max().item(), (t.grad.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * scale, (err, torch_err)


def _nonfinite_probes(shape, value):
    """x of ``shape`` with one ``value`` (NaN or inf) per channel, channel c at the c-th input
    position (row-major, wrapping): with one filter per channel, every position class
    (interior, next to the halo, stride gaps, rows/columns no output reads) is hit once per
    ``C`` positions. Returns a list of (x, w, b, kw), one per batch of positions."""
    x, w, b, kw = _data(shape, torch.float32)
    n, c, h, wd = x.shape
    out = []
    for first in range(0, h * wd, c):
        xp = x.clone()
        for ch in range(c):
            p = (first + ch) % (h * wd)
            xp[ch % n, ch, p // wd, p % wd] = value
        out.append((xp, w, b, kw))
    return out


def _assert_grads_match_float64(x, w, b, kw, name, akw, gy):
    """The fused gradients have float64 autograd's NaN and inf pattern exactly, and its finite
    values within float32 rounding (relative to the largest finite one)."""
    ours = _grads(x, w, b, kw, name, akw, gy)
    ref = _grads(x, w, b, kw, name, akw, gy, dtype=torch.float64)
    for o, r, what in zip(ours, ref, ("grad_x", "grad_w", "grad_b")):
        assert torch.equal(torch.isnan(o), torch.isnan(r)), what
        assert torch.equal(torch.isinf(o), torch.isinf(r)), what
        fin = torch.isfinite(r)
        scale = max(1.0, r[fin].abs().max().item()) if fin.any() else 1.0
        torch.testing.assert_close(o.double()[fin], r[fin], atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("act", [("relu6", {}), ("gelu", {}), ("identity", {})], ids=lambda a: a[0])
@pytest.mark.parametrize("shape", DW_SHAPES, ids=[f"s{i}" for i in range(len(DW_SHAPES))])
def test_nonfinite_inputs_reach_exactly_the_taps_that_read_them(shape, act, value):
    # the gather once added x * 0 over the zero halo and stride gaps: a NaN that no output
    # reads made a whole filter's weight gradient NaN (torch's: finite)
    name, akw = act
    for x, w, b, kw in _nonfinite_probes(shape, value):
        gy = torch.randn(F.conv2d(x, w, b, **kw).shape,
                         generator=torch.Generator().manual_seed(4)).to(memory_format=torch.channels_last)
        _assert_grads_match_float64(x, w, b, kw, name, akw, gy)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("shape", DW_SHAPES, ids=[f"s{i}" for i in range(len(DW_SHAPES))])
def test_nonfinite_weights_reach_only_the_real_taps_of_grad_x(shape, value):
    # the gather added w * 0 over the zero halo and stride gaps: a NaN tap made 110 grad_x
    # entries NaN where torch has 20 (3x3, stride 2), an inf tap 80 where torch has none.
    # Identity only: with an activation, grad_z follows which pre-activations are NaN, and
    # there torch disagrees with itself (a NaN tap over the padding: NaN in its float64
    # forward, not in its float32 one, which the fused layer matches; relu6's derivative at
    # NaN is 1 on 4 elements, 0 on 64).
    name, akw = "identity", {}
    x, w, b, kw = _data(shape, torch.float32)
    taps = w[0].numel()
    for first in (0, 1):  # channel c's non-finite tap: (first + c) % taps, every tap in turn
        wp = w.clone()
        for ch in range(w.shape[0]):
            wp.view(w.shape[0], taps)[ch, (first + ch) % taps] = value
        gy = torch.randn(F.conv2d(x, wp, b, **kw).shape,
                         generator=torch.Generator().manual_seed(5)).to(memory_format=torch.channels_last)
        _assert_grads_match_float64(x, wp, b, kw, name, akw, gy)
