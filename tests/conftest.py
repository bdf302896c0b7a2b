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
