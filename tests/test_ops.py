"""Every kernel against its plain-torch float64 reference: shapes, dtypes, strides, backends."""
import pytest
import torch

from hierfast import ops
from conftest import TOL, available_backends, devices

SIZES = [4, 5, 31, 64, 129, 300]


def _case(device):
    return [(dev, be) for dev in devices() for be in available_backends(dev) if dev == device]


@pytest.mark.parametrize("device,backend", [c for d in devices() for c in _case(d)])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float64),
                                                 (torch.float32, torch.float32)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_gram_epilogue_matches_reference(device, backend, n, unbiased, in_dtype, out_dtype, layout):
    if backend == "triton" and device == "cpu" and n > 129:
        pytest.skip("large shapes are slow in the Triton interpreter; 129 already spans >1 block")
    x = torch.randn(n, 7, dtype=torch.float64, device=device) * 3 + 5
    g = (x @ x.T).to(in_dtype)
    if layout == "transposed":
        g = g.T  # symmetric, but column-major strides
    elif layout == "strided":
        big = torch.randn(2 * n, 2 * n, dtype=in_dtype, device=device)
        big[::2, ::2] = g
        g = big[::2, ::2]
    ref_out, ref_r, ref_t = ops.gram_epilogue_reference(g, unbiased)
    # Poison the destination: a kernel that skips an element must fail.
    dest = torch.full((n * n,), float("nan"), dtype=out_dtype, device=device)
    out, r, t = ops.gram_epilogue(g, unbiased=unbiased, out=dest, backend=backend)
    assert out.data_ptr() == dest.data_ptr()
    scale = ref_out.abs().max().item()
    tol = TOL[out_dtype] * max(scale, 1.0) if out_dtype == torch.float32 else 1e-12 * max(scale, 1.0)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(r, ref_r, atol=1e-12 * max(ref_r.abs().max().item(), 1), rtol=1e-12)
    torch.testing.assert_close(t, ref_t, atol=1e-10 * max(ref_t.abs().item(), 1), rtol=1e-12)
    if unbiased:
        assert torch.all(out.diagonal() == 0)
        # U-centred Grams have zero row sums (Szekely & Rizzo 2014)
        eps = 1e-12 if out_dtype == torch.float64 else 1e-6
        assert out.double().sum(1).abs().max().item() <= eps * n * max(scale, 1)


def test_gram_epilogue_writes_into_stacked_row():
    n, L = 9, 3
    F = torch.full((L, n * n), float("nan"), dtype=torch.float64)
    xs = [torch.randn(n, 4, dtype=torch.float64) for _ in range(L)]
    for i, x in enumerate(xs):
        ops.gram_epilogue(x @ x.T, unbiased=True, out=F[i])
    for i, x in enumerate(xs):
        torch.testing.assert_close(F[i].view(n, n), ops.gram_epilogue_reference(x @ x.T, True)[0])


@pytest.mark.parametrize("bad,exc,match", [
    (torch.randn(3, 4), ValueError, "square"),
    (torch.randn(3, 3), ValueError, "n >= 4"),
    (torch.randint(0, 3, (5, 5)), TypeError, "float32 or float64"),
    (torch.randn(5, 5, dtype=torch.float16), TypeError, "float32 or float64"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_gram_epilogue_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        ops.gram_epilogue(bad, unbiased=True)


def test_gram_epilogue_bad_out():
    g = torch.eye(5)
    with pytest.raises(ValueError, match="n\\*n"):
        ops.gram_epilogue(g, unbiased=False, out=torch.empty(24))
    with pytest.raises(ValueError, match="contiguous"):
        ops.gram_epilogue(g, unbiased=False, out=torch.empty(50)[::2])


@pytest.mark.parametrize("device,backend", [c for d in devices() for c in _case(d)])
@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (17, 300), (128, 257), (300, 64)])
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_center_columns_matches_reference(device, backend, shape, in_dtype, out_dtype, layout):
    n, d = shape
    if backend == "triton" and device == "cpu" and n * d > 20000:
        pytest.skip("large shapes are slow in the Triton interpreter")
    base = torch.randn(n, d, dtype=torch.float64, device=device) * 2 + 50  # large common offset
    if layout == "transposed":
        x = base.T.contiguous().T.to(in_dtype) if in_dtype == torch.float64 else base.to(in_dtype).T.contiguous().T
    elif layout == "sliced":
        wide = torch.randn(n, 2 * d, dtype=in_dtype, device=device)
        wide[:, ::2] = base.to(in_dtype)
        x = wide[:, ::2]
    else:
        x = base.to(in_dtype)
    ref, ref_mean = ops.center_columns_reference(x, torch.float64)
    out, mean = ops.center_columns(x, out_dtype=out_dtype, backend=backend)
    assert out.is_contiguous() and out.dtype == out_dtype
    torch.testing.assert_close(mean, ref_mean, atol=1e-10, rtol=1e-12)
    atol = 1e-12 if out_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


def test_center_columns_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        ops.center_columns(torch.empty(0, 3))
    with pytest.raises(TypeError, match="floating"):
        ops.center_columns(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="out_dtype"):
        ops.center_columns(torch.ones(3, 3), out_dtype=torch.float16)


@pytest.mark.parametrize("device,backend", [c for d in devices() for c in _case(d)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exactly_in_place_out_matches_reference(device, backend, dtype):
    # out = the input itself (same storage, offset, dtype, layout) stays supported
    n = 37
    a = torch.randn(n, 6, dtype=torch.float64, device=device) * 3 + 2
    k = (a @ a.T).to(dtype)
    ref = ops.gram_epilogue_reference(k, True)[0]
    buf = k.clone().reshape(-1)
    out, _, _ = ops.gram_epilogue(buf.view(n, n), unbiased=True, out=buf, backend=backend)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype] * ref.abs().max().item(), rtol=0)
    x = torch.randn(n, 9, dtype=torch.float64, device=device).to(dtype) + 40
    refc = ops.center_columns_reference(x, dtype)[0]
    xc = x.clone()
    out, _ = ops.center_columns(xc, out_dtype=dtype, out=xc, backend=backend)
    assert out.data_ptr() == xc.data_ptr()
    torch.testing.assert_close(out.double(), refc.double(), atol=TOL[dtype] * 40, rtol=0)


def _partial_overlaps(n):
    """(gram view, out view) pairs sharing memory without being the same elements."""
    buf = torch.randn(2 * n * n + 4, dtype=torch.float64)
    flat = buf[:n * n]
    return [(flat.view(n, n).T, flat),                       # transposed view of out
            (buf[1:n * n + 1].view(n, n), flat),            # shifted by one element
            (buf[n:n * n + n].view(n, n), flat),            # shifted by one row
            (flat.view(n, n), buf.view(torch.float32)[:n * n]),  # same start, other dtype
            (buf[:2 * n * n].view(n, 2 * n)[:, ::2], buf[n * n - 3:2 * n * n - 3])]  # strided, tail overlap


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("case", range(5))
def test_partially_overlapping_out_is_refused(backend, case):
    # the kernels read the input while writing out: a partial overlap once returned wrong values
    # silently (gram out = gram.T: error 1.57; center_columns likewise 2.37)
    n = 8
    src, out = _partial_overlaps(n)[case]
    before = out.clone()
    with pytest.raises(ValueError, match="out overlaps gram"):
        ops.gram_epilogue(src, unbiased=True, out=out, backend=backend)
    x, dest = src[:, :5], out[:n * 5].view(n, 5)  # (n, 5) views of the same memory
    if x.dtype == dest.dtype:
        with pytest.raises(ValueError, match="out overlaps x"):
            ops.center_columns(x, out_dtype=dest.dtype, out=dest, backend=backend)
    assert torch.equal(out, before)  # nothing written
    # disjoint views of one storage are fine
    far = torch.full((n * n,), float("nan"), dtype=torch.float64)
    whole = torch.cat([src.reshape(-1), far])
    g, o = whole[:n * n].view(n, n), whole[n * n:]
    got = ops.gram_epilogue(g, unbiased=False, out=o, backend=backend)[0]
    torch.testing.assert_close(got, ops.gram_epilogue_reference(g, False)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "triton"])
def test_custom_ops_pass_opcheck(backend):
    """Both ops are registered torch custom ops with fake implementations."""
    g = torch.randn(9, 4, dtype=torch.float64)
    g = g @ g.T
    args = (g, torch.empty(81, dtype=torch.float64), torch.empty(9, dtype=torch.float64),
            torch.empty(1, dtype=torch.float64), True, backend)
    torch.library.opcheck(torch.ops.hierfast.gram_epilogue.default, args)
    x = torch.randn(7, 5)
    torch.library.opcheck(torch.ops.hierfast.center_columns.default,
                          (x, torch.empty(7, 5), torch.empty(5, dtype=torch.float64), backend))


def test_gram_epilogue_under_compile():
    def f(g):
        out, r, t = ops.gram_epilogue(g, unbiased=True)
        return out.sum(1), t
    g = torch.randn(12, 3, dtype=torch.float64)
    g = g @ g.T
    got = torch.compile(f, fullgraph=True)(g)
    ref = f(g)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_nhwc_channel_sums_are_deterministic():
    # per-thread sums were added under `omp critical` in arrival order: identical calls gave
    # different bits, even under torch.use_deterministic_algorithms(True)
    from hierfast.ops import activations as A
    from hierfast.ops import conv_act as ca
    from hierfast.ops._launch import cpu_kernels
    from hierfast import _dtypes

    if "cpu" not in available_backends("cpu"):
        pytest.skip("hierfast._C is not built")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(8)
        y = (torch.randn(8, 64, 16, 16, generator=g) + 0.3).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(y.shape, generator=g).contiguous(memory_format=torch.channels_last)
        act = A.resolve("gelu")
        stats, bias, fwd = set(), set(), set()
        for _ in range(200):  # the old arrival order varied in ~1 call of 100
            st = torch.full((64, 3), 12345.678901, dtype=torch.float64)
            ca._cpu_stats(y, st)
            stats.add(st.numpy().tobytes())
            bias.add(ca._grad_cpu(gy, y, act, True)[1].numpy().tobytes())
            st2 = torch.full((64, 3), -7.25, dtype=torch.float64)
            out = torch.empty_like(y)
            cpu_kernels().conv_act_forward(y.data_ptr(), out.data_ptr(), _dtypes.code(y.dtype), 8, 64, 256, True, 0,
                                           act.code, act.alpha, st2.data_ptr())
            fwd.add(st2.numpy().tobytes())
        assert len(stats) == len(bias) == len(fwd) == 1
        # and right: against float64 sums computed independently
        yd = y.double()
        ref = torch.stack([yd.sum((0, 2, 3)), (yd * yd).sum((0, 2, 3)), (yd > 0).sum((0, 2, 3)).double()], 1)
        torch.testing.assert_close(st - 12345.678901, ref, atol=1e-6, rtol=1e-9)
        ref_b = (gy.double() * A.derivative(y.double(), act)).sum((0, 2, 3))
        torch.testing.assert_close(ca._grad_cpu(gy, y, act, True)[1], ref_b, atol=1e-4, rtol=1e-5)
        za = A.apply(y.double(), act)
        ref_f = torch.stack([za.sum((0, 2, 3)), (za * za).sum((0, 2, 3)), (za > 0).sum((0, 2, 3)).double()], 1)
        torch.testing.assert_close(st2 + 7.25, ref_f, atol=1e-3, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
