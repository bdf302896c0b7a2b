"""Dimensionality: known answers (METRICS.md §5 golden values), streaming, analyze, bad input."""
import pytest
import torch

import hierfast
from hierfast.stats import DimensionAccumulator, effective_rank, participation_ratio, twonn
from hierfast.stats.dimension import _erank, _pr, two_nearest


def test_two_nearest_equals_cdist_topk_with_duplicates():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (1500, 3), generator=g).double()  # many ties and exact duplicates
    r1, r2 = two_nearest(x)
    d = torch.cdist(x, x) ** 2
    d.fill_diagonal_(float("inf"))
    ref = torch.topk(d, 2, dim=1, largest=False).values
    torch.testing.assert_close(r1, ref[:, 0], atol=1e-9, rtol=0)
    torch.testing.assert_close(r2, ref[:, 1], atol=1e-9, rtol=0)


def test_twonn_on_a_5d_linear_manifold_in_100d():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5000, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(100, 5, generator=g, dtype=torch.float64))
    mean, sd = twonn(z @ q.T, resamples=3)
    assert abs(mean - 5.0) < 0.3 and sd < 0.3  # measured 4.98 ± 0.04 (10 resamples)


def test_participation_ratio_and_effective_rank_golden_values():
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    assert _pr(lam) == pytest.approx(2.909091, abs=1e-6)  # METRICS.md §5.2 check values
    assert _erank(lam) == pytest.approx(3.828427, abs=1e-6)
    x = torch.randn(20000, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert participation_ratio(x) == pytest.approx(16, rel=0.02)  # isotropic: PR = d
    assert effective_rank(x) == pytest.approx(16, rel=0.01)
    assert participation_ratio(x[:, :1] * torch.ones(1, 16)) == pytest.approx(1.0)


def test_accumulator_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    wide = torch.randn(600, 40, generator=g)
    acc = DimensionAccumulator(reservoir=1000, max_dim=16, resamples=2)
    for i in range(0, 600, 64):
        acc.update({"x": x[i:i + 64], "wide": wide[i:i + 64]})
    r = acc.compute()
    assert r["twonn"][0] == pytest.approx(twonn(x, resamples=2)[0], abs=1e-9)  # whole stream fits the reservoir
    assert r["participation_ratio"][0].item() == pytest.approx(participation_ratio(x), rel=1e-9)
    assert r["effective_rank"][1].item() == pytest.approx(effective_rank(wide), rel=1e-9)


def test_reservoir_is_bounded_and_resumable():
    acc = DimensionAccumulator(reservoir=50, resamples=1, seed=3)
    data = torch.randn(400, 4, generator=torch.Generator().manual_seed(4))
    for i in range(0, 200, 40):
        acc.update([data[i:i + 40]])
    resumed = DimensionAccumulator(reservoir=50, resamples=1, seed=3).load_state_dict(acc.state_dict())
    for a in (acc, resumed):
        for i in range(200, 400, 40):
            a.update([data[i:i + 40]])
    assert acc.samples[0].shape == (50, 4)
    assert torch.equal(acc.samples[0], resumed.samples[0])
    assert not torch.equal(acc.samples[0], data[:50])  # later rows did replace early ones


def test_dimension_statistic_through_analyze():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    data = [torch.randn(64, 6) for _ in range(5)]
    res = hierfast.analyze(net, data, stats={"dimension": {"resamples": 2}}, progress=False)
    assert res.dimension["twonn"].shape == (2,)
    assert bool((res.dimension["participation_ratio"] >= 1).all())
    assert res.dimension["twonn"][0] < 7.5  # a linear map of 6-d inputs: at most ~6


@pytest.mark.parametrize("call, match", [
    (lambda: twonn(torch.randn(5, 3)), "n >= 8"),
    (lambda: twonn(torch.full((20, 3), float("nan"))), "NaN"),
    (lambda: twonn(torch.randn(20, 3), fraction=0.0), "fraction"),
    (lambda: twonn(torch.randint(0, 3, (20, 3))), "dtype"),
    (lambda: DimensionAccumulator(reservoir=2), "reservoir"),
    (lambda: DimensionAccumulator().compute(), "before any update"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("n, d, dtype", [(9, 1, torch.float32), (700, 5, torch.float32), (1300, 64, torch.float64),
                                         (500, 300, torch.float16)])
def test_two_nearest_on_continuous_data(n, d, dtype):
    """Float32 screening + exact float64 recomputation == float64 cdist + topk."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, d, generator=g) * 3 + 50).to(dtype)  # a large offset: cancellation-prone
    x[3] = x[1]  # an exact duplicate
    r1, r2 = two_nearest(x)
    xd = x.double()
    dist = torch.cdist(xd, xd) ** 2
    dist.fill_diagonal_(float("inf"))
    ref = torch.topk(dist, 2, dim=1, largest=False).values
    torch.testing.assert_close(r1, ref[:, 0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(r2, ref[:, 1], atol=1e-9, rtol=1e-9)
    assert r1[1] == 0 and r1[3] == 0


def _twonn_reference(x, fraction):
    """Plain float64 TwoNN: cdist, ties (r2 = r1 up to 1e-9) and duplicates out, F = i/N on at most N - 1."""
    import math

    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    r = d.sort(1).values
    keep = (r[:, 0] > 0) & (r[:, 1] > r[:, 0] * (1 + 1e-9))
    mu = (r[keep, 1] / r[keep, 0]).sort().values
    n = mu.numel()
    m = min(n - 1, int(math.floor(fraction * n)))
    lx = mu[:m].log()
    ly = -torch.log1p(-torch.arange(1, m + 1, dtype=torch.float64) / n)
    return float((lx * ly).sum() / (lx * lx).sum())


def test_twonn_fraction_one_is_finite():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, _ = twonn(x, fraction=1.0, resamples=1)  # was inf: F = N/N -> -log(0)
    assert mean == pytest.approx(_twonn_reference(x, 1.0), rel=1e-9)


def test_twonn_on_tied_distances_raises_a_clear_error():
    grid = torch.cartesian_prod(torch.arange(6.0), torch.arange(6.0))
    t = torch.linspace(0, 2 * torch.pi, 41, dtype=torch.float64)[:-1]
    circle = torch.stack([t.cos(), t.sin()], 1)  # was 2e15 (mu - 1 ~ 1e-16 not seen as a tie)
    for x in (grid, circle):
        with pytest.raises(ValueError, match="tied distances"):
            twonn(x, resamples=1)
    with pytest.raises(ValueError, match="duplicates"):
        twonn(torch.full((20, 3), 0.1), resamples=1)


def test_constant_layer_spectrum_is_nan_with_warning():
    from hierfast.stats import ConstantLayerWarning

    for dtype in (torch.float64, torch.float32):
        x = torch.full((37, 3), 0.1, dtype=dtype)  # centring residues gave PR 1.0, erank 1.0000001
        with pytest.warns(ConstantLayerWarning):
            assert participation_ratio(x) != participation_ratio(x)
        with pytest.warns(ConstantLayerWarning):
            assert effective_rank(x) != effective_rank(x)


def test_accumulator_survives_a_constant_layer_and_large_offsets():
    from hierfast.stats.dimension import merge_states

    g = torch.Generator().manual_seed(3)
    z = torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 1, 0.5, 0.1],
                                                                              dtype=torch.float64)
    dead = torch.full((500, 4), 0.1, dtype=torch.float64)
    lam = torch.linalg.eigvalsh(torch.cov(z.T))
    ref_pr = float(lam.sum() ** 2 / (lam ** 2).sum())
    shards = [DimensionAccumulator(reservoir=600, resamples=1) for _ in range(2)]
    for i in range(0, 500, 100):
        shards[(i // 100) % 2].update({"z": z[i:i + 100] + 1e7, "dead": dead[i:i + 100]})
    merged = DimensionAccumulator(reservoir=600, resamples=1).load_state_dict(
        merge_states([s.state_dict() for s in shards]))
    for acc in (shards[0], merged):
        with pytest.warns(RuntimeWarning, match="dead") as rec:
            r = acc.compute()
        assert any("TwoNN" in str(w.message) for w in rec)
        assert r["twonn"][1] != r["twonn"][1] and r["participation_ratio"][1] != r["participation_ratio"][1]
        assert r["twonn"][0] == r["twonn"][0]
    assert merged.compute()["participation_ratio"][0].item() == pytest.approx(ref_pr, rel=1e-9)  # was 2.33203


def test_participation_ratio_and_effective_rank_are_scale_invariant_at_extremes():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x * torch.tensor([3.0, 2, 1, 1, 0.5], dtype=torch.float64)
    lam = torch.linalg.eigvalsh(torch.cov(x.T))
    ref_pr = float(lam.sum() ** 2 / (lam ** 2).sum())
    sig = lam.sqrt() / lam.sqrt().sum()
    ref_er = float(torch.exp(-(sig * sig.log()).sum()))
    for scale in (1e80, 1e160, 1e-160):  # 1e80 raised a bare OverflowError
        assert participation_ratio(x * scale) == pytest.approx(ref_pr, rel=1e-9)
        assert effective_rank(x * scale) == pytest.approx(ref_er, rel=1e-9)
    acc = DimensionAccumulator(resamples=1)
    acc.update([x * 1e80])
    assert acc.compute()["participation_ratio"][0].item() == pytest.approx(ref_pr, rel=1e-9)


def test_merge_equals_one_stream_and_keeps_the_options():
    """DimensionAccumulator had no merge()/sync() (every other accumulator does), and a state
    saved with another reservoir / max_dim / seed was silently loaded."""
    from hierfast.stats.dimension import merge_states

    g = torch.Generator().manual_seed(5)
    x = torch.randn(240, 6, generator=g, dtype=torch.float64) + 50.0
    whole, left, right = (DimensionAccumulator(reservoir=300, resamples=1) for _ in range(3))
    for i in range(0, 240, 40):
        whole.update([x[i:i + 40]])
        (left if i < 120 else right).update([x[i:i + 40]])
    merged = DimensionAccumulator(reservoir=300, resamples=1).merge(left).merge(DimensionAccumulator(
        reservoir=300, resamples=1)).merge(right)  # empty accumulators add nothing
    assert torch.equal(merged.samples[0], x)
    assert merged.compute()["participation_ratio"][0].item() == pytest.approx(participation_ratio(x), rel=1e-10)
    assert merged.compute()["twonn"][0].item() == pytest.approx(whole.compute()["twonn"][0].item(), abs=1e-12)
    assert merged.sync() is merged  # not distributed: no-op
    assert merge_states([DimensionAccumulator(reservoir=300).state_dict(), left.state_dict()])["seen"] == 120
    with pytest.raises(ValueError, match=r"saved by DimensionAccumulator\(reservoir=300\).*reservoir=8"):
        DimensionAccumulator(reservoir=8).load_state_dict(left.state_dict())
    with pytest.raises(ValueError, match=r"cannot merge a DimensionAccumulator\(max_dim=2, seed=1\)"):
        DimensionAccumulator(reservoir=300).merge(DimensionAccumulator(reservoir=300, max_dim=2, seed=1))
    old = left.state_dict()
    del old["options"]  # a state of an older version records none: accepted
    assert DimensionAccumulator(reservoir=8).load_state_dict(old).seen == 120


def test_twonn_ties_split_by_float32_rounding_are_ties():
    from hierfast.stats.dimension import twonn

    for k in (12, 30):
        axis = torch.arange(k, dtype=torch.float32) * 0.1  # 0.1 steps are not exact in float32
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        with pytest.raises(ValueError, match="tied distances"):  # was: about 1e6
            twonn(grid, resamples=1)
    # the tolerance leaves real data alone: float32 equals the float64 estimate of the same values
    x = torch.randn(400, 10, generator=torch.Generator().manual_seed(0))
    assert twonn(x) == pytest.approx(twonn(x.double()), rel=1e-9)
    assert twonn(x.bfloat16()) == pytest.approx(twonn(x.bfloat16().double()), rel=1e-9)


def test_streamed_covariance_overflow_raises_clearly():
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    acc = DimensionAccumulator()
    acc.update([x * 1e160])  # was: torch's _LinAlgError from eigh
    with pytest.raises(ValueError, match="covariance sums overflowed float64.*power of two"):
        acc.compute()
