"""The registry: availability, forcing, refusals, and that CI really built the fast paths."""
import os
import warnings

import pytest
import torch

import hierfast
from hierfast import ops
from hierfast.backends import BackendFallbackWarning, BackendUnavailableError, Op


def test_info_shape():
    info = hierfast.info()
    for key in ("hierfast", "torch", "triton", "cuda", "backends"):
        assert key in info
    for name in ("reference", "cpu", "triton", "cuda"):
        st = info["backends"][name]
        assert isinstance(st["available"], bool)
        assert (st["reason"] is None) == st["available"]
    assert "backend" in hierfast.format_info()


def test_required_backends_are_built():
    """CI sets HIERFAST_REQUIRE_BACKENDS=cpu,triton (and cuda-compiled where nvcc exists):
    a missing fast path fails the run instead of silently testing the reference."""
    required = [b for b in os.environ.get("HIERFAST_REQUIRE_BACKENDS", "").split(",") if b]
    if not required:
        pytest.skip("HIERFAST_REQUIRE_BACKENDS not set (CI sets it)")
    for name in required:
        if name == "cuda-compiled":
            assert hierfast.info()["backends"]["cuda"].get("compiled"), hierfast.info()["backends"]["cuda"]
        else:
            st = hierfast.info()["backends"][name]
            assert st["available"], f"backend {name} required but unavailable: {st['reason']}"


def test_unknown_backend_is_rejected():
    x = torch.randn(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="not a backend"):
        ops.gram_epilogue(x @ x.T, unbiased=False, backend="fortran")


def test_env_override(monkeypatch):
    x = torch.randn(6, 3, dtype=torch.float64)
    monkeypatch.setenv("HIERFAST_BACKEND", "reference")
    assert ops.gram_epilogue.__module__  # module imported
    from hierfast.ops.gram_epilogue import OP
    g = x @ x.T
    out = torch.empty(36, dtype=torch.float64)
    assert OP.select((g, out)).backend == "reference"
    monkeypatch.setenv("HIERFAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        OP.select((g, out))


def test_forced_unavailable_backend_raises_with_reasons():
    x = torch.randn(6, 6, dtype=torch.float64)
    if hierfast.info()["backends"]["cuda"]["available"]:
        pytest.skip("CUDA is available here")
    with pytest.raises(BackendUnavailableError, match="forced but cannot run"):
        ops.gram_epilogue(x, unbiased=False, backend="cuda")


def test_automatic_fallback_warns_once():
    op = Op("demo", preference={"cpu": ("cuda", "reference")})
    calls = []
    op.register("cuda", devices=("cuda",), dtypes=(torch.float32,))(lambda t: calls.append("cuda"))
    op.register("reference", devices=("cpu",), dtypes=(torch.float32,))(lambda t: calls.append("ref"))
    t = torch.zeros(2)
    if hierfast.info()["backends"]["cuda"]["available"]:
        pytest.skip("CUDA is available here")
    with pytest.warns(BackendFallbackWarning):
        op(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op(t)  # second time: silent
    assert calls == ["ref", "ref"]


def test_selection_cache_respects_data_dependent_limits():
    """A choice is cached per (device, dtype) only when no implementation consulted for it has
    data-dependent limits: a limit on the preferred backend is re-checked on every call, and a
    limited backend that this device never consults does not stop the cache."""
    op = Op("demo_cache", preference={"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")})
    op.register("cpu", devices=("cpu",), dtypes=(torch.float32,),
                reasons=lambda t: [] if t.dim() == 2 else ["takes 2-D tensors"])(lambda t: "cpu")
    op.register("reference", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float64))(lambda t: "ref")
    op.register("triton", devices=("cuda",), dtypes=(torch.float32,),
                reasons=lambda t: ["never"])(lambda t: "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        assert op(torch.zeros(2, 2)) == "cpu"
        assert op(torch.zeros(2)) == "ref"        # same key (cpu, float32): re-checked, not cached
        assert op(torch.zeros(2, 2)) == "cpu"
        assert op._cache == {}
        assert op(torch.zeros(2, dtype=torch.float64)) == "ref"   # cpu refuses float64 by dtype
        # consulted: cpu (has reasons) then reference -> still not cacheable
        assert op._cache == {}
    plain = Op("demo_cache2", preference={"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")})
    plain.register("cpu", devices=("cpu",), dtypes=(torch.float32,))(lambda t: "cpu")
    plain.register("triton", devices=("cuda",), dtypes=(torch.float32,), reasons=lambda t: ["never"])(lambda t: "t")
    assert plain(torch.zeros(3)) == "cpu"
    assert [i.backend for i in plain._cache.values()] == ["cpu"]   # triton's limits are not consulted on CPU


def test_env_forced_triton_conv_backward(monkeypatch):
    # HIERFAST_BACKEND=triton once broke conv2d_act's backward ("conv2d_act_grad: no 'triton'
    # implementation exists"): only backend="triton" was mapped to the automatic choice
    import hierfast.functional as HF
    from hierfast.backends import backend_status

    if not backend_status("triton")["available"]:
        pytest.skip("triton cannot run here (CPU tensors need TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(21)
    x0, w0 = torch.randn(1, 2, 5, 5, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    gy = torch.randn(1, 3, 5, 5, generator=g)

    def grads(**kw):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        HF.conv2d_act(x, w, None, padding=1, activation="gelu", **kw).backward(gy)
        return x.grad, w.grad

    ref = grads(backend="reference")
    monkeypatch.setenv("HIERFAST_BACKEND", "triton")
    got = grads()
    for a, b in zip(got, ref):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
