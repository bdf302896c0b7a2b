"""Shared test configuration: tolerances per dtype, backends to exercise, seeds."""
import os

import pytest
import torch

import hierfast
from hierfast.backends import _triton_interpret, backend_status

# Absolute tolerance of a fast path against the float64 reference, per output dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` in this process."""
    out = []
    for name in ("reference", "cpu", "triton", "cuda"):
        st = backend_status(name)
        if not st["available"]:
            continue
        if device == "cpu" and name == "cuda":
            continue
        if device == "cpu" and name == "triton" and not _triton_interpret():
            continue  # on a GPU machine Triton is available, but CPU tensors need TRITON_INTERPRET=1
        if device == "cuda" and name == "cpu":
            continue
        out.append(name)
    return out


# Every activation of the fused conv layers, with each keyword variant (leaky slopes of both signs).
ACTS = [("identity", {}), ("relu", {}), ("relu6", {}), ("leaky_relu", {"negative_slope": 0.2}),
        ("leaky_relu", {"negative_slope": -0.3}), ("gelu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}),
        ("hardswish", {}), ("sigmoid", {}), ("tanh", {}), ("mish", {})]
ACT_IDS = [n + ("_" + "_".join(map(str, kw.values())) if kw else "") for n, kw in ACTS]


def conv_data(shape, dtype=torch.float32, channels_last=False, bias=True, device="cpu"):
    """``(x, w, b, kw)`` of a random conv layer: ``shape`` = (N, C_in, H, W, C_out, k, stride,
    padding, dilation, groups) (k an int or a pair), x ~ 2 N(0, 1), w scaled to unit-variance
    outputs, ``kw`` the conv arguments; drawn in float64 on the CPU, then cast and moved."""
    n, cin, h, w, cout, k, s, p, d, g = shape
    k = k if isinstance(k, tuple) else (k, k)
    x = torch.randn(n, cin, h, w, dtype=torch.float64) * 2
    wt = torch.randn(cout, cin // g, *k, dtype=torch.float64) / (cin // g * k[0] * k[1]) ** 0.5
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    x, wt = x.to(device, dtype), wt.to(device, dtype)
    b = b.to(device, dtype) if b is not None else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, wt, b, dict(stride=s, padding=p, dilation=d, groups=g)


def channel_stats(y: torch.Tensor) -> torch.Tensor:
    """The statistics tap's reference: [sum, sum of squares, count > 0] of y (N x C x H x W) per
    channel, in float64 (C x 3)."""
    yd = y.double()
    return torch.stack([yd.sum((0, 2, 3)), (yd * yd).sum((0, 2, 3)), (yd > 0).sum((0, 2, 3)).double()], 1)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fused_training_at_every_size(monkeypatch, request):
    """Training a small CPU layer runs torch's own ops in production (measured faster,
    hierfast.ops.conv_act.eager_training_pays); the test shapes are small, so tests train
    through the fused op unless marked ``production_training_policy``."""
    if "production_training_policy" not in request.keywords:
        from hierfast.ops import conv_act

        monkeypatch.setattr(conv_act, "_EAGER_TRAIN_MAX_OUTPUT_FROM_Y", 0)
        monkeypatch.setattr(conv_act, "_EAGER_TRAIN_MAX_OUTPUT_SMOOTH", 0)


@pytest.fixture(autouse=True)
def _fixed_triton_tiles(monkeypatch, request):
    """On a GPU the Triton conv kernels autotune their tiles per new shape (seconds each): tests
    take one fixed tile, except those marked ``triton_autotune``."""
    if "triton_autotune" not in request.keywords:
        monkeypatch.setenv("HIERFAST_TRITON_AUTOTUNE", "0")


def pytest_report_header(config):
    info = hierfast.info()
    lines = [f"hierfast {info['hierfast']} torch {info['torch']} triton {info['triton']}"]
    for name, st in info["backends"].items():
        lines.append(f"  backend {name:<9} {'available' if st['available'] else 'NOT available: ' + st['reason']}")
    req = os.environ.get("HIERFAST_REQUIRE_BACKENDS")
    if req:
        lines.append(f"  required backends: {req}")
    return lines
