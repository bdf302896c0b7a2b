"""pytest-benchmark entry point for the CKA providers (the runner, run.py, prints the
full table with ratios and deviations; this gives pytest-benchmark's statistics and
comparisons between runs, e.g. ``--benchmark-autosave`` / ``--benchmark-compare``).

    pytest benchmarks/test_bench_cka.py                       # N = 256 (quick workload)
    HIERFAST_BENCH_FULL=1 pytest benchmarks/test_bench_cka.py # N = 1024
"""
from __future__ import annotations

import os

import pytest
import torch

import bench_cka as bc
from _common import setup_threads

pytest.importorskip("pytest_benchmark")

N = bc.N_FULL if os.environ.get("HIERFAST_BENCH_FULL") else bc.N_QUICK


@pytest.fixture(scope="module")
def feats():
    setup_threads()
    torch.manual_seed(bc.INPUT_SEED)
    x = torch.randn(N, 3, 32, 32)
    A, PA = bc.extract(bc.make_cnn(0), x, bc.BATCH)
    B, PB = bc.extract(bc.make_cnn(1), x, bc.BATCH)
    return A, B, PA, PB


@pytest.fixture(scope="module")
def ref_mb(feats):
    A, B, _, _ = feats
    return bc.ref_minibatch(A, B, bc.BATCH)


def _run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)


def test_ref_minibatch_float64(benchmark, feats):
    A, B, _, _ = feats
    _run(benchmark, lambda: bc.ref_minibatch(A, B, bc.BATCH))


def test_hierfast_minibatch(benchmark, feats, ref_mb):
    A, B, _, _ = feats
    out = _run(benchmark, lambda: bc.hierfast_minibatch(A, B, bc.BATCH))
    dev, nan = bc.deviation(out, ref_mb)
    assert nan == 0 and dev <= bc.TOL


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_hierfast_cka_matrix_full(benchmark, feats, debiased):
    from hierfast.stats import cka_matrix

    A, B, _, _ = feats
    out = _run(benchmark, lambda: cka_matrix(A, B, debiased=debiased))
    assert bc.deviation(out, bc.ref_full(A, B, debiased))[0] <= bc.TOL


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_hierfast_exact_pooled(benchmark, feats, debiased):
    _, _, PA, PB = feats
    out = _run(benchmark, lambda: bc.hierfast_exact(PA, PB, bc.BATCH, debiased))
    assert bc.deviation(out, bc.ref_full(PA, PB, debiased))[0] <= bc.TOL


def test_naive_per_pair_float32(benchmark, feats):
    A, B, _, _ = feats
    _run(benchmark, lambda: bc.naive_minibatch(A, B, bc.BATCH))


def test_ckatorch_cka_batch(benchmark, feats):
    pytest.importorskip("ckatorch")
    A, B, _, _ = feats
    _run(benchmark, lambda: bc.ckatorch_minibatch(A, B, bc.BATCH))
