"""Triton conv kernels (implicit GEMM, depthwise) under TRITON_INTERPRET=1 (or on a GPU)
against F.conv2d + activation in float64, small shapes."""
import pytest
import torch
import torch.nn.functional as F

from hierfast.backends import backend_status
from hierfast.functional import conv2d_act
from hierfast.ops import activations as A
from conftest import channel_stats

pytestmark = pytest.mark.skipif(not backend_status("triton")["available"],
                                reason="triton backend unavailable: " + str(backend_status("triton")["reason"]))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = [("identity", {}), ("relu", {}), ("relu6", {}), ("leaky_relu", {"negative_slope": 0.2}), ("gelu", {}),
        ("gelu", {"approximate": "tanh"}), ("silu", {}), ("hardswish", {}), ("sigmoid", {}), ("tanh", {}),
        ("mish", {})]
# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
SHAPES = [(2, 3, 9, 11, 5, 7, 2, 3, 1, 1), (1, 6, 7, 6, 18, 3, 1, 1, 1, 1), (2, 4, 7, 7, 6, 3, 2, 2, 2, 2),
          (1, 20, 5, 4, 7, 1, 1, 0, 1, 1)]
DW = [(2, 5, 9, 8, 5, 3, 1, 1, 1, 5), (1, 20, 7, 9, 20, 3, 2, 1, 1, 20), (1, 3, 8, 8, 3, 5, 1, 4, 2, 3)]


def _check(shape, channels_last, bias, act, dtype=torch.float32):
    n, cin, h, w, cout, k, s, p, d, g = shape
    name, akw = act
    x = torch.randn(n, cin, h, w, dtype=torch.float64, device=DEV)
    wt = torch.randn(cout, cin // g, k, k, dtype=torch.float64, device=DEV) / (cin // g * k * k) ** 0.5
    b = torch.randn(cout, dtype=torch.float64, device=DEV) if bias else None
    ref = A.apply(F.conv2d(x, wt, b, s, p, d, g), A.resolve(name, **akw))
    xi = x.to(dtype)
    if channels_last:
        xi = xi.to(memory_format=torch.channels_last)
    y = conv2d_act(xi, wt.to(dtype), None if b is None else b.to(dtype), s, p, d, g, activation=name,
                   backend="triton", **akw)
    assert y.shape == ref.shape and y.dtype == dtype
    # the layout torch's own convolution gives (a drop-in: a following view() works as before)
    theirs = F.conv2d(xi, wt.to(dtype), None, s, p, d, g)
    assert y.stride() == theirs.stride(), (y.stride(), theirs.stride())
    # float32 on a GPU runs the dot products on tf32 tensor cores (10-bit mantissa, unit
    # roundoff 2^-11 ~ 4.9e-4 on each rounded input; the weights are scaled so outputs are O(1)),
    # as torch's cuDNN convolutions do by default; the interpreter computes them in IEEE float32.
    f32 = 2e-3 if DEV == "cuda" else 1e-4
    tol = {torch.float32: f32, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype] * max(1, ref.abs().max().item())
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=0, msg=lambda m: f"{name}{akw}: {m}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_implicit_gemm(shape, channels_last):
    for i, act in enumerate(ACTS):
        if i % 2 == (0 if channels_last else 1):  # every activation runs, split over the two layouts
            _check(shape, channels_last, bias=i % 3 != 0, act=act)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", DW, ids=[f"dw{i}" for i in range(len(DW))])
def test_depthwise(shape, channels_last):
    for i, act in enumerate(ACTS):
        if i % 2 == (0 if channels_last else 1):
            _check(shape, channels_last, bias=i % 3 != 1, act=act)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    _check(SHAPES[1], True, True, ("silu", {}), dtype)
    _check(DW[0], True, True, ("relu", {}), dtype)


def test_triton_forward_backward():
    x = torch.randn(2, 4, 6, 6, device=DEV, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=DEV, requires_grad=True)
    y = conv2d_act(x, w, None, padding=1, activation="gelu", backend="triton")
    y.square().sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.gelu(F.conv2d(xr, wr, padding=1)).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-3 * xr.grad.abs().max().item(), rtol=0)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-3 * wr.grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], DW[1]], ids=["igemm", "igemm_groups", "dw"])
def test_64_bit_offsets(shape, monkeypatch):
    """The WIDE variant (64-bit offsets, taken from 2^31 elements on) on small shapes."""
    from hierfast.kernels import conv_act as kernels

    monkeypatch.setattr(kernels, "_WIDE_AT", 0)
    for channels_last in (False, True):
        _check(shape, channels_last, bias=True, act=("gelu", {}))


@pytest.mark.triton_autotune
@pytest.mark.skipif(DEV != "cuda", reason="autotuning runs on a GPU only")
def test_autotuned_tiles(monkeypatch):
    """The autotuned kernels (Triton times the configs that fit the GPU and keeps the fastest)
    compute the layer (bf16, channels_last: the GPU's case): implicit GEMM and depthwise."""
    import os

    assert os.environ.get("HIERFAST_TRITON_AUTOTUNE", "1") != "0"
    for shape in (SHAPES[1], (4, 64, 14, 14, 64, 3, 1, 1, 1, 1), DW[0], (4, 32, 28, 28, 32, 3, 1, 1, 1, 32)):
        _check(shape, True, True, ("relu", {}), torch.bfloat16)
    # the statistics tap on a first (autotuning) call counts y once, not once per trial
    n, cin, h, w, cout, k, s, p, d, g = (2, 48, 12, 12, 48, 3, 1, 1, 1, 48)
    for groups, cin_g in ((g, 1), (1, cin)):
        x = torch.randn(n, cin, h, w, device=DEV, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        wt = torch.randn(cout, cin_g, k, k, device=DEV, dtype=torch.bfloat16) / 3
        stats = torch.zeros(cout, 3, dtype=torch.float64, device=DEV)
        y = conv2d_act(x, wt, None, s, p, d, groups, activation="gelu", backend="triton", stats=stats)
        torch.testing.assert_close(stats[:, 2], (y > 0).sum((0, 2, 3)).double(), atol=0, rtol=0)


def test_autotune_keys_name_kernel_arguments():
    """Every name in the autotuning keys is an argument of its kernel (Triton skips a key it cannot
    find, which would make layers that differ there share one tuned tile), and the keys separate
    what changes the access pattern at one GEMM size: filter width, stride, layout."""
    from hierfast.kernels import conv_act as kernels

    for tuned, kernel, must in ((kernels._igemm_tuned, kernels._igemm_kernel, {"M", "K", "KW", "stride_w", "sxc"}),
                                (kernels._depthwise_tuned, kernels._depthwise_kernel, {"P", "C", "KH", "KW", "sxc"})):
        assert set(tuned.keys) <= set(kernel.arg_names), set(tuned.keys) - set(kernel.arg_names)
        assert must <= set(tuned.keys)


def test_output_layout_follows_torch_for_ambiguous_strides():
    """Size-1 dimensions make strides fit both layouts; the output takes torch's choice: a 1x1
    weight permuted from O x H x W x I (strides C, 1, C, C) is channels_last to torch, one of
    strides (C, 1, 1, 1) is not; a strided bias view is read right."""
    x = torch.randn(2, 8, 5, 5, device=DEV)
    b = torch.randn(8, device=DEV)[::2]
    for w in (torch.randn(4, 1, 1, 8, device=DEV).permute(0, 3, 1, 2), torch.randn(4, 8, 1, 1, device=DEV),
              torch.randn(4, 8, 3, 3, device=DEV).contiguous(memory_format=torch.channels_last)):
        pad = w.shape[-1] // 2
        y = conv2d_act(x, w, b, padding=pad, activation="relu", backend="triton")
        ref = F.relu(F.conv2d(x, w, b, padding=pad))
        assert y.stride() == ref.stride(), (w.stride(), y.stride(), ref.stride())
        torch.testing.assert_close(y, ref, atol=2e-3 if DEV == "cuda" else 1e-5, rtol=0)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], DW[0]], ids=["igemm", "igemm_groups", "dw"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_tap_in_the_kernel(shape, channels_last):
    """The tap (per-channel [sum, sum of squares, count > 0] of y, added to what is there) comes
    from the kernels' epilogue, one atomic per tile and channel: equal to the sums of y; under
    deterministic algorithms torch's reductions give the same."""
    n, cin, h, w, cout, k, s, p, d, g = shape
    x = torch.randn(n, cin, h, w, device=DEV)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(cout, cin // g, k, k, device=DEV) / (cin // g * k * k) ** 0.5
    b = torch.randn(cout, device=DEV)
    for name in ("relu", "gelu"):
        for deterministic in (False, True):
            stats = torch.full((cout, 3), 0.5, dtype=torch.float64, device=DEV)
            prev = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                y = conv2d_act(x, wt, b, s, p, d, g, activation=name, backend="triton", stats=stats)
            finally:
                torch.use_deterministic_algorithms(prev)
            ref = 0.5 + channel_stats(y)
            torch.testing.assert_close(stats, ref, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
