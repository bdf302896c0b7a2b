"""The conv epilogue kernels (bias + activation over the convolution's output, statistics
taps, the activation gradient with the bias gradient) called raw on every device that has
them, into NaN-poisoned outputs; and conv2d_act on a GPU (the ``cuda`` and ``triton``
backends) against float64: values, gradients, statistics, gradcheck, NaN.

The raw-kernel tests run on the CPU kernels everywhere and on the CUDA kernels where a GPU
is (scripts/gpu_check.sh): one test body for both, so the CPU run also checks the test."""
import pytest
import torch
import torch.nn.functional as F

from hierfast import _dtypes
from hierfast.functional import conv2d_act
from hierfast.ops import activations as A
from hierfast.ops._launch import cpu_kernels, cuda_kernels, cuda_stream
from conftest import ACT_IDS, ACTS, channel_stats, conv_data

NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_GPU, reason="no CUDA device"))]
# (N, C, H, W): few channels (NHWC lanes > C), a channel tail past one 32-lane tile, many rows
EPILOGUE_SHAPES = [(3, 5, 4, 7), (2, 37, 9, 13), (3, 48, 33, 31)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


class Epilogue:
    """The raw forward/backward epilogue of one device, called with tensors (4-D, contiguous
    in NCHW or channels_last order, as hierfast.ops.conv_act passes them)."""

    def __init__(self, device: str):
        self.device = device
        self.mod = cpu_kernels() if device == "cpu" else cuda_kernels()

    def _stream(self, t):
        return () if self.device == "cpu" else (cuda_stream(t),)

    def forward(self, z, y, b, act, stats, nhwc):
        n, c, h, w = z.shape
        self.mod.conv_act_forward(z.data_ptr(), y.data_ptr(), _dtypes.code(z.dtype), n, c, h * w, nhwc,
                                  0 if b is None else b.data_ptr(), act.code, act.alpha,
                                  0 if stats is None else stats.data_ptr(), *self._stream(z))

    def backward(self, g, saved, gz, act, gb, nhwc):
        n, c, h, w = saved.shape
        self.mod.conv_act_backward(g.data_ptr(), saved.data_ptr(), gz.data_ptr(), _dtypes.code(saved.dtype), n, c,
                                   h * w, nhwc, act.code, act.alpha, 0 if gb is None else gb.data_ptr(),
                                   *self._stream(saved))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_epilogue_kernel_writes_every_element(device, dtype, nhwc, with_bias):
    """Keep mode (y written, z keeps the pre-activation) into a NaN-poisoned y, the statistics,
    then the backward into a NaN-poisoned grad_z with the bias gradient."""
    run = Epilogue(device)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    for shape in EPILOGUE_SHAPES:
        c = shape[1]
        z0 = torch.randn(shape, dtype=torch.float64, device=device)
        b = torch.randn(c, dtype=torch.float64, device=device)
        for name, akw in ACTS:
            act = A.resolve(name, **akw)
            zin = z0.to(dtype)
            z = zin.clone().contiguous(memory_format=fmt)
            y = torch.full_like(z, float("nan"))
            stats = torch.zeros(c, 3, dtype=torch.float64, device=device)
            bt = b.to(dtype) if with_bias else None  # kept alive: the kernel takes a raw address
            run.forward(z, y, bt, act, stats, nhwc)
            zref = zin.double() + (bt.double()[:, None, None] if with_bias else 0)
            tol = TOL[dtype]
            what = f"{shape} {name}{akw}"
            torch.testing.assert_close(z.double(), zref.to(dtype).double(), atol=tol, rtol=tol,
                                       msg=lambda m: f"{what} z: {m}")
            torch.testing.assert_close(y.double(), A.apply(zref, act), atol=tol, rtol=tol,
                                       msg=lambda m: f"{what} y: {m}")
            ref_stats = channel_stats(y)
            torch.testing.assert_close(stats, ref_stats, atol=1e-9 * max(1, ref_stats.abs().max().item()),
                                       rtol=1e-9, msg=lambda m: f"{what} stats: {m}")
            g = torch.randn_like(y)
            saved = y if act.grad_from_output else z
            gz = torch.full_like(saved, float("nan"))
            gb = torch.zeros(c, dtype=torch.float64, device=device)
            run.backward(g, saved, gz, act, gb, nhwc)
            gref = g.double() * A.derivative(saved.double(), act)
            torch.testing.assert_close(gz.double(), gref, atol=tol * 4, rtol=tol * 4,
                                       msg=lambda m: f"{what} grad_z: {m}")
            # the bias gradient sums the unrounded grad_z
            torch.testing.assert_close(gb, gref.sum((0, 2, 3)), atol=tol * 40, rtol=tol * 4,
                                       msg=lambda m: f"{what} grad_bias: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "in_place"])
def test_epilogue_statistics_over_many_blocks(device, nhwc, in_place):
    """Statistics taps where the work splits into many tasks (OpenMP row groups and NCHW planes on
    the CPU, thread blocks with block-reduced partials on a GPU), added to what the buffer holds,
    float64 throughout, on post-ReLU-like features with a large common offset (where float32
    sums of squares drift)."""
    run = Epilogue(device)
    for n, c, h, w in ((3, 48, 33, 31), (2, 37, 17, 19)):
        z0 = (torch.randn(n, c, h, w, dtype=torch.float64, device=device) + 40.0).to(torch.float32)
        b = torch.randn(c, dtype=torch.float32, device=device)
        for name in ("relu", "gelu", "mish"):
            act = A.resolve(name)
            z = z0.clone().to(memory_format=torch.channels_last) if nhwc else z0.clone()
            y = z if in_place else torch.full_like(z, float("nan"))
            stats = torch.full((c, 3), 0.25, dtype=torch.float64, device=device)
            run.forward(z, y, b, act, stats, nhwc)
            yref = A.apply(z0.double() + b.double()[:, None, None], act)
            torch.testing.assert_close(y.double(), yref, atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(stats, 0.25 + channel_stats(y), atol=0, rtol=1e-12,
                                       msg=lambda m: f"{name}: {m}")


def _chunked_channel_sums(y, chunk=256):
    """[sum, count > 0] per channel of a huge N x C x H x W tensor, float64, a few images at a time
    (a float64 copy of the whole tensor would not fit beside it)."""
    sums = torch.zeros(y.shape[1], 2, dtype=torch.float64, device=y.device)
    for i in range(0, y.shape[0], chunk):
        part = y[i:i + chunk].double()
        sums[:, 0] += part.sum((0, 2, 3))
        sums[:, 1] += (part > 0).sum((0, 2, 3)).double()
    return sums


@pytest.mark.skipif(NO_GPU, reason="no CUDA device")
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_cuda_epilogue_with_64_bit_indices(nhwc):
    """More than 2^31 elements take the kernels' 64-bit index path: a float16 tensor of 2^31 + 64 K
    elements (4 GiB), NCHW with y written apart from z (the 64-bit division by H x W), NHWC in
    place; then the backward. Checked on the images at both ends and through the per-channel
    sums of everything."""
    n, c, h, w = (1 << 31) // (64 * 1024) + 1, 64, 32, 32
    nbytes = n * c * h * w * 2
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * nbytes + (2 << 30):
        pytest.skip(f"needs ~{(5 * nbytes + (2 << 30)) / 2**30:.0f} GiB of free GPU memory")
    run, act = Epilogue("cuda"), A.resolve("relu")
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    z = torch.randn(n, c, h, w, dtype=torch.float16, device="cuda").contiguous(memory_format=fmt)
    assert z.numel() > 2**31
    b = torch.randn(c, dtype=torch.float16, device="cuda")
    ends = torch.cat([z[:2], z[-2:]]).double()
    y = z if nhwc else torch.full_like(z, float("nan"))
    stats = torch.zeros(c, 3, dtype=torch.float64, device="cuda")
    run.forward(z, y, b, act, stats, nhwc)
    # the kernel adds in float32 before it rounds to float16: within one float16 rounding
    torch.testing.assert_close(torch.cat([y[:2], y[-2:]]).double(), torch.relu(ends + b.double()[:, None, None]),
                               atol=1e-6, rtol=1e-3)
    sums = _chunked_channel_sums(y)
    torch.testing.assert_close(stats[:, 0], sums[:, 0], atol=1e-6, rtol=1e-9)
    torch.testing.assert_close(stats[:, 2], sums[:, 1], atol=0, rtol=0)
    del z
    g = torch.ones_like(y)
    gz = torch.full_like(y, float("nan"))
    gb = torch.zeros(c, dtype=torch.float64, device="cuda")
    run.backward(g, y, gz, act, gb, nhwc)
    torch.testing.assert_close(gb, stats[:, 2], atol=0, rtol=0)  # relu' = 1 exactly where y > 0
    assert not torch.isnan(gz[-2:]).any() and not torch.isnan(gz[:2]).any()


# the kinks of the piecewise activations and the values beside them
KINKS = [-3.0, -0.0, 0.0, 3.0, 6.0, -3.0001, 2.9999, 6.0001, 1e-4, -1e-4]
PIECEWISE = [("relu", {}), ("relu6", {}), ("leaky_relu", {"negative_slope": 0.2}),
             ("leaky_relu", {"negative_slope": -0.3}), ("hardswish", {})]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("act", PIECEWISE, ids=[n + "_".join(map(str, kw.values())) for n, kw in PIECEWISE])
def test_derivatives_at_the_kinks_as_torch(device, dtype, act):
    """At a kink the derivative is torch's one-sided choice (ReLU 0 at 0, ReLU6 0 at 0 and 6,
    leaky ReLU the slope at 0, hardswish 0 at -3 and 1 at +3; hardswish once gave -0.5 and 1.5),
    through conv2d_act: a 1x1 depthwise convolution of weight 1 (the epilogue kernels) and, on the
    CPU in float32, a 3x3 one that meets one pixel (the fused depthwise forward and backward)."""
    name, akw = act
    a, c = A.resolve(name, **akw), 32
    v = torch.tensor(KINKS, dtype=torch.float64)
    x = torch.stack([v.roll(i).repeat(3) for i in range(c)]).reshape(1, c, 1, 3 * len(KINKS))  # rows >= 28 px
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w3 = torch.zeros(c, 1, 3, 3)
    w3[:, 0, :, 1] = 1  # a 1-row image meets only the filter's centre row
    filters = [(torch.ones(c, 1, 1, 1), 0)] + ([(w3, 1)] if device == "cpu" and dtype == torch.float32 else [])
    for w, pad in filters:
        w = w.to(device=device, dtype=dtype)
        xt, xo = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        theirs = A.apply(F.conv2d(xt, w, padding=pad, groups=c), a)
        ours = conv2d_act(xo, w, None, padding=pad, groups=c, activation=name, **akw)
        g = torch.randn_like(theirs)
        theirs.backward(g)
        ours.backward(g)
        eps = torch.finfo(dtype).eps
        what = f"{name}{akw} {w.shape[-1]}x{w.shape[-1]}"
        torch.testing.assert_close(ours, theirs, atol=eps, rtol=2 * eps, msg=lambda m: f"{what} forward: {m}")
        torch.testing.assert_close(xo.grad, xt.grad, atol=eps, rtol=2 * eps,
                                   msg=lambda m: f"{what} gradient at {x[(xo.grad - xt.grad).abs() > eps]}: {m}")


# --------------------------------------------------------------------------- conv2d_act on a GPU
GPU_BACKENDS = ["cuda", "triton"]
# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
GPU_SHAPES = [
    (2, 3, 13, 11, 40, 7, 2, 3, 1, 1),   # stem-like 7x7/2, odd sizes, a channel tail past 32
    (2, 16, 9, 10, 24, 3, 1, 1, 1, 1),   # 3x3
    (3, 8, 7, 7, 8, 3, 1, 2, 2, 2),      # dilation 2, groups 2
    (2, 48, 11, 8, 48, 3, 1, 1, 1, 48),  # depthwise
    (1, 20, 6, 7, 36, 1, 1, 0, 1, 1),    # 1x1
]


def _gpu_data(shape, dtype, channels_last):
    return conv_data(shape, dtype, channels_last, device="cuda")


def _grads(fn, tensors, g):
    """(output, [grad of each tensor]) of fn(*tensors) with the output gradient g."""
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*ts)
    y.backward(g.to(y.dtype))
    return y.detach(), [t.grad for t in ts]


@pytest.mark.skipif(NO_GPU, reason="no CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_forward_and_gradients_match_float64(backend, dtype, channels_last):
    """Output and the x, w, b gradients within 2x the error of torch's own conv + activation in
    that dtype on the GPU (+ one ulp of the largest value). float32: torch's convolutions and our
    Triton kernels both run on TF32 tensor cores (10-bit mantissa), so float32 also gets that
    rounding's bound, 2e-3 of the largest value."""
    for i, (name, akw) in enumerate(ACTS):
        shape = GPU_SHAPES[i % len(GPU_SHAPES)]
        x, w, b, kw = _gpu_data(shape, dtype, channels_last)
        a = A.resolve(name, **akw)
        g = torch.randn(F.conv2d(x, w, b, **kw).shape, dtype=torch.float64, device="cuda")
        ref, ref_g = _grads(lambda *t: A.apply(F.conv2d(*t, **kw), a), [t.double() for t in (x, w, b)], g)
        theirs, their_g = _grads(lambda *t: A.apply(F.conv2d(*t, **kw), a), [x, w, b], g)
        ours, our_g = _grads(lambda *t: conv2d_act(*t, activation=name, backend=backend, **kw, **akw),
                             [x, w, b], g)
        assert ours.dtype == dtype and ours.shape == ref.shape
        for what, o, t, r in zip(("y", "grad x", "grad w", "grad b"), [ours, *our_g], [theirs, *their_g],
                                 [ref, *ref_g]):
            scale = max(1.0, r.abs().max().item())
            tol = 2 * (t.double() - r).abs().max().item() + torch.finfo(dtype).eps * scale
            if dtype == torch.float32:
                tol = max(tol, 2e-3 * scale)
            err = (o.double() - r).abs().max().item()
            assert err <= tol, f"{backend} {name}{akw} {shape} {what}: error {err:.3g} > {tol:.3g}"


@pytest.mark.skipif(NO_GPU, reason="no CUDA device")
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_gpu_gradcheck_float64(act):
    name, akw = act
    x, w, b, kw = _gpu_data((1, 4, 5, 6, 4, 3, 1, 1, 1, 2), torch.float64, False)
    args = tuple(t.detach().requires_grad_() for t in (x, w, b))
    # nondet_tol: cuDNN's float64 weight-gradient algorithms may sum in a different order on each
    # call (torch's own Conv2d gradchecks allow the same)
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d_act(x, w, b, activation=name, backend="cuda",
                                                               **kw, **akw), args, nondet_tol=1e-12)


@pytest.mark.skipif(NO_GPU, reason="no CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_statistics_tap(backend, channels_last):
    """The tap adds y's per-channel [sum, sum of squares, count > 0] on every call."""
    for shape in (GPU_SHAPES[0], GPU_SHAPES[3]):
        x, w, b, kw = _gpu_data(shape, torch.float32, channels_last)
        stats = torch.zeros(w.shape[0], 3, dtype=torch.float64, device="cuda")
        for _ in range(2):
            y = conv2d_act(x, w, b, activation="gelu", stats=stats, backend=backend, **kw)
        ref = 2 * channel_stats(y)
        torch.testing.assert_close(stats, ref, atol=1e-8 * max(1, ref.abs().max().item()), rtol=1e-9)


@pytest.mark.skipif(NO_GPU, reason="no CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_nan_propagates_like_torch(backend):
    """A NaN input gives NaN in every output whose window holds it (float64 reference), and no
    NaN that neither that reference nor torch's own float32 layer gives (cuDNN's Winograd and
    FFT algorithms spread a NaN over a whole output tile: torch's own layer then has more)."""
    x, w, b, kw = _gpu_data(GPU_SHAPES[1], torch.float32, True)
    x[0, 0, 4, 4] = float("nan")
    for name, akw in ACTS:
        a = A.resolve(name, **akw)
        y = torch.isnan(conv2d_act(x, w, b, activation=name, backend=backend, **kw, **akw))
        ref = torch.isnan(A.apply(F.conv2d(x.double(), w.double(), b.double(), **kw), a))
        theirs = torch.isnan(A.apply(F.conv2d(x, w, b, **kw), a))
        assert ref.any() and not (ref & ~y).any(), f"{backend} {name}: a NaN input was lost"
        assert not (y & ~(ref | theirs)).any(), f"{backend} {name}: NaN where torch gives none"


@pytest.mark.skipif(NO_GPU, reason="no CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_side_stream(backend):
    """On a side stream the kernels run on that stream (torch's current one), in order with the
    convolution around them: the same results as on the default stream."""
    x, w, b, kw = _gpu_data(GPU_SHAPES[1], torch.float32, True)
    g = torch.randn(F.conv2d(x, w, b, **kw).shape, device="cuda")
    stats0 = torch.zeros(w.shape[0], 3, dtype=torch.float64, device="cuda")
    y0, grads0 = _grads(lambda *t: conv2d_act(*t, activation="gelu", backend=backend, stats=stats0, **kw),
                        [x, w, b], g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stats1 = torch.zeros(w.shape[0], 3, dtype=torch.float64, device="cuda")
        y1, grads1 = _grads(lambda *t: conv2d_act(*t, activation="gelu", backend=backend, stats=stats1, **kw),
                            [x, w, b], g)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats1, stats0, atol=1e-6, rtol=1e-6)
    for a, r in zip(grads1, grads0):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_algorithms_reproduce_every_bit(device):
    """Under torch.use_deterministic_algorithms(True) two runs give the same bits: output,
    statistics, all gradients (the CUDA kernels' atomic per-channel sums give way to torch's
    reductions there; the CPU kernels sum in a fixed order anyway)."""
    n, c = 4, 40
    x = torch.randn(n, 24, 15, 17, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(c, 24, 3, 3, device=device) / 15
    b = torch.randn(c, device=device)
    g = torch.randn(n, c, 15, 17, device=device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            stats = torch.zeros(c, 3, dtype=torch.float64, device=device)
            y, grads = _grads(lambda *t: conv2d_act(*t, padding=1, activation="gelu", stats=stats), [x, w, b], g)
            runs.append([y, stats, *grads])
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, r in zip(*runs):
        assert torch.equal(a, r)
    torch.testing.assert_close(runs[0][1], channel_stats(runs[0][0]), atol=1e-9, rtol=1e-9)
