"""Normalised invariance score and CKA invariance: reference formula, known answers,
streaming == one-shot, bad input."""
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import hierfast.transforms as T
from hierfast.stats import (ConstantLayerWarning, InvarianceAccumulator, invariance_curve, linear_cka,
                            normalized_invariance)


def _nis_reference(ft, ft2, fr):
    """Plain float64: 1 - mean ||ft - ft2||^2 / mean over ordered pairs i != j of ||fr_i - fr_j||^2."""
    ft, ft2, fr = (a.double().reshape(a.shape[0], -1) for a in (ft, ft2, fr))
    n = fr.shape[0]
    num = ((ft - ft2) ** 2).sum(1).mean()
    den = torch.cdist(fr, fr).pow(2).sum() / (n * (n - 1))  # E||f(x) - f(x')||^2 over distinct pairs
    return 1 - num / den


def _views(n=60, shape=(3, 4, 2), seed=0, dtype=torch.float64, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    fr = torch.randn(n, *shape, generator=g, dtype=torch.float64) * 3 + 5
    ft = fr + noise * torch.randn(fr.shape, generator=g, dtype=torch.float64)
    ft2 = fr + noise * torch.randn(fr.shape, generator=g, dtype=torch.float64)
    return ft.to(dtype), ft2.to(dtype), fr.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 2), (1,)])
def test_matches_reference(dtype, shape):
    ft, ft2, fr = _views(shape=shape, dtype=dtype)
    got = normalized_invariance(ft, ft2, fr)
    assert got.dtype == torch.float64 and got.dim() == 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.item() == pytest.approx(_nis_reference(ft, ft2, fr).item(), abs=tol)
    one = normalized_invariance(ft, None, fr)
    assert one.item() == pytest.approx(_nis_reference(ft, fr, fr).item(), abs=tol)
    # non-contiguous input (a transposed view) gives the same answer
    assert normalized_invariance(ft.transpose(0, -1).contiguous().transpose(0, -1), ft2, fr).item() == \
        pytest.approx(got.item(), abs=tol)


def test_scale_of_known_cases():
    ft, ft2, fr = _views(n=400)
    assert normalized_invariance(fr, fr.clone(), fr).item() == 1.0
    g = torch.Generator().manual_seed(3)
    other = fr[torch.randperm(400, generator=g)]  # swap in a random other input: NIS ~ 0
    assert abs(normalized_invariance(other, fr, fr).item()) < 0.15
    assert normalized_invariance(ft, ft2, fr).item() < 1.0


def test_per_unit_and_layers():
    ft, ft2, fr = _views(n=50, shape=(6,))
    fr2, ft_2, ft2_2 = fr[:, :2] * 10, ft[:, :2] * 10, fr[:, :2] * 10
    layers, units = normalized_invariance({"a": ft, "b": ft_2}, {"a": ft2, "b": ft2_2}, {"a": fr, "b": fr2},
                                          per_unit=True)
    assert layers.shape == (2,) and [u.shape for u in units] == [(6,), (2,)]
    for j in range(6):
        assert units[0][j].item() == pytest.approx(_nis_reference(ft[:, j:j + 1], ft2[:, j:j + 1],
                                                                   fr[:, j:j + 1]).item(), abs=1e-12)
    assert layers[0].item() == pytest.approx(_nis_reference(ft, ft2, fr).item(), abs=1e-12)


def _conv_features(x, weights, flatten=False):
    """Two circular-padding conv+ReLU layers; GAP features (or flattened maps)."""
    feats = []
    h = x
    for w in weights:
        h = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="circular"), w).relu()
        feats.append(h.flatten(1) if flatten else h.mean(dim=(2, 3)))
    return feats


def test_gap_conv_features_invariant_to_circular_shifts():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64),
               torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64)]
    x = torch.randn(64, 3, 12, 12, generator=g, dtype=torch.float64)
    t = T.Translate(4, mode="circular", seed=1)
    acc = InvarianceAccumulator(per_unit=True)
    for i in range(0, 64, 16):
        xb = x[i:i + 16]
        acc.update(_conv_features(t(xb), weights), _conv_features(t(xb), weights), _conv_features(xb, weights))
    res = acc.compute()
    torch.testing.assert_close(res["nis"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(res["nis_one_sided"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(res["cka"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    for u in res["per_unit"]:
        torch.testing.assert_close(u, torch.ones_like(u), rtol=0, atol=1e-6)
    # flattened maps under one common shift (an orthogonal permutation): CKA 1, NIS < 1 (METRICS B6)
    shift = T.Lambda(lambda v: torch.roll(v, (2, 3), dims=(2, 3)))
    flat = InvarianceAccumulator()
    for i in range(0, 64, 16):
        xb = x[i:i + 16]
        flat.update(_conv_features(shift(xb), weights, True), None, _conv_features(xb, weights, True))
    res = flat.compute()
    torch.testing.assert_close(res["cka"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (res["nis"] < 0.9).all()


def test_cka_invariance_matches_debiased_cka_single_batch():
    ft, _, fr = _views(n=40, shape=(5,))
    acc = InvarianceAccumulator()
    acc.update([ft], None, [fr])
    assert acc.compute()["cka"][0].item() == pytest.approx(linear_cka(fr, ft, debiased=True).item(), abs=1e-10)


def test_streaming_equals_one_shot_merge_state_pickle():
    ft, ft2, fr = _views(n=90, shape=(4, 3))
    one = InvarianceAccumulator(per_unit=True, cka=False)
    one.update([ft, ft[:, 0]], [ft2, ft2[:, 0]], [fr, fr[:, 0]])
    parts = [InvarianceAccumulator(per_unit=True, cka=False) for _ in range(3)]
    for k, p in enumerate(parts):
        sl = slice(30 * k, 30 * (k + 1))
        p.update([ft[sl], ft[sl, 0]], [ft2[sl], ft2[sl, 0]], [fr[sl], fr[sl, 0]])
    merged = parts[0].clone().merge(parts[1]).merge(parts[2])
    a, b = one.compute(), merged.compute()
    torch.testing.assert_close(a["nis"], b["nis"], rtol=0, atol=1e-12)
    for u, v in zip(a["per_unit"], b["per_unit"]):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    loaded = InvarianceAccumulator(per_unit=True, cka=False).load_state_dict(pickle.loads(pickle.dumps(merged.state_dict())))
    torch.testing.assert_close(loaded.compute()["nis"], a["nis"])
    # with CKA: streaming batches equal a merge of shards, state round-trips
    s1, s2, whole = InvarianceAccumulator(), InvarianceAccumulator(), InvarianceAccumulator()
    for k in range(3):
        sl = slice(30 * k, 30 * (k + 1))
        (s1 if k < 2 else s2).update([ft[sl]], [ft2[sl]], [fr[sl]])
        whole.update([ft[sl]], [ft2[sl]], [fr[sl]])
    m = InvarianceAccumulator().merge(s1).merge(s2)
    torch.testing.assert_close(m.compute()["cka"], whole.compute()["cka"], rtol=0, atol=1e-12)
    r = InvarianceAccumulator().load_state_dict(whole.state_dict())
    torch.testing.assert_close(r.compute()["cka"], whole.compute()["cka"])


def test_curve_over_magnitudes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 6, 6, generator=g, dtype=torch.float64)
    feats = lambda v: {"pix": v.flatten(1), "mean": v.mean(dim=(1, 2, 3))[:, None] + v[:, 0, 0, :1]}  # noqa: E731
    out = invariance_curve(feats, [x[i:i + 32] for i in range(0, 96, 32)],
                           {"noise": T.sweep(T.GaussianNoise, [0.0, 0.3, 1.0, 3.0], seed=2)})
    c = out["noise"]
    assert c["nis"].shape == (4, 2) and c["layers"] == ["pix", "mean"] and c["cka"].shape == (4, 2)
    torch.testing.assert_close(c["nis"][0], torch.ones(2, dtype=torch.float64))
    assert (c["nis"][1:, 0] < c["nis"][:-1, 0]).all()  # more noise, less invariant
    # pixel features under noise sigma: NIS = 1 - 2 sigma^2 / (2 Var) with Var = 1
    assert c["nis"][1, 0].item() == pytest.approx(1 - 0.09, abs=0.03)


def test_bad_input():
    ft, ft2, fr = _views(n=20, shape=(3,))
    with pytest.raises(ValueError, match="NaN"):
        normalized_invariance(ft, ft2, torch.where(fr > 6, float("nan"), fr))
    with pytest.raises(ValueError, match="paired"):
        normalized_invariance(ft[:, :2], ft2, fr)
    with pytest.raises(ValueError, match="row by row"):
        normalized_invariance(ft[:10], ft2, fr)
    with pytest.raises(ValueError, match="same layers"):
        normalized_invariance([ft, ft], [ft2], [fr])
    with pytest.raises(ValueError, match="n >= 2"):
        normalized_invariance(ft[:1], ft2[:1], fr[:1])
    with pytest.warns(ConstantLayerWarning, match="constant"):
        out = normalized_invariance([ft, torch.ones(20, 2)], [ft2, torch.ones(20, 2)], [fr, torch.ones(20, 2)])
    assert torch.isnan(out[1]) and torch.isfinite(out[0])
    acc = InvarianceAccumulator()
    with pytest.raises(ValueError, match="update"):
        acc.compute()
    with pytest.raises(ValueError, match=">= 4"):
        acc.update([ft[:3]], None, [fr[:3]])
    acc.update([ft], [ft2], [fr])
    with pytest.raises(ValueError, match="layout"):
        acc.update([ft], None, [fr])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exactly_constant_layer_is_nan_with_warning(dtype):
    # raw Σf² - (Σf)²/n cancelled: a constant layer's NIS came out as -1.13e17
    y = torch.randn(37, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    for value in (0.1, 0.3, 1 / 3, 7.7):
        c = torch.full((37, 3), value, dtype=dtype)
        with pytest.warns(ConstantLayerWarning, match="layer"):
            assert torch.isnan(normalized_invariance(y, None, c))
        acc = InvarianceAccumulator(cka=False)
        acc.update({"c": c[:20], "y": y[:20]}, None, {"c": c[:20], "y": y[:20]})
        acc.update({"c": c[20:], "y": y[20:] + 0.1}, None, {"c": c[20:], "y": y[20:]})
        with pytest.warns(ConstantLayerWarning, match="c"):
            nis = acc.compute()["nis"]
        assert torch.isnan(nis[0]) and torch.isfinite(nis[1])


def test_large_offset_matches_reference():
    g = torch.Generator().manual_seed(1)
    for offset, std in ((1e4, 1e-3), (1e8, 1.0)):
        fr = offset + std * torch.randn(1000, 4, generator=g, dtype=torch.float64)
        ft = fr + 0.1 * std * torch.randn(1000, 4, generator=g, dtype=torch.float64)
        ref = _nis_reference(ft, fr, fr - offset)  # the reference's own pairs: offset-free
        assert normalized_invariance(ft, None, fr).item() == pytest.approx(ref.item(), abs=1e-9)


def test_merge_and_state_of_shards_with_different_references():
    ft, ft2, fr = _views(n=90, shape=(5,))
    fr, ft, ft2 = fr + 1e6, ft + 1e6, ft2 + 1e6
    one = InvarianceAccumulator(per_unit=True, cka=False)
    one.update([ft], [ft2], [fr])
    parts = [InvarianceAccumulator(per_unit=True, cka=False) for _ in range(2)]
    for k, p in enumerate(parts):
        sl = slice(45 * k, 45 * (k + 1))
        p.update([ft[sl]], [ft2[sl]], [fr[sl]])
    assert not torch.equal(parts[0].shift, parts[1].shift)
    restored = InvarianceAccumulator(per_unit=True, cka=False).load_state_dict(
        pickle.loads(pickle.dumps(parts[1].state_dict())))
    merged = parts[0].clone().merge(restored)
    ref = _nis_reference(ft, ft2, fr - 1e6)
    for acc in (one, merged):
        assert acc.compute()["nis"][0].item() == pytest.approx(ref.item(), abs=1e-9)
    torch.testing.assert_close(merged.compute()["per_unit"][0], one.compute()["per_unit"][0], atol=1e-9, rtol=0)


def test_curve_scores_deterministic_transforms_one_sided():
    # two-view NIS of a blur (T = T') is 1 by construction: the default gave [1, 1, 1]
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 1, 12, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    feats = lambda v: {"pix": v.flatten(1)}  # noqa: E731
    fams = {"blur": T.sweep(T.GaussianBlur, [0.0, 1.0, 2.0]), "noise": T.sweep(T.GaussianNoise, [0.5], seed=3)}
    out = invariance_curve(feats, batches, fams, cka=False)
    x = torch.cat(batches)
    for k, t in enumerate(fams["blur"]):
        ref = _nis_reference(t(x), x, x)  # NIS_1: f(Tx) against f(x)
        assert out["blur"]["nis"][k, 0].item() == pytest.approx(ref.item(), abs=1e-9)
    assert out["blur"]["two_view"] == [False, False, False] and out["noise"]["two_view"] == [True]
    assert out["blur"]["nis"][2, 0] < out["blur"]["nis"][1, 0] < 0.9
    forced = invariance_curve(feats, batches, fams, two_view=True, cka=False)  # explicit override kept
    torch.testing.assert_close(forced["blur"]["nis"][:, 0], torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="two_view"):
        invariance_curve(feats, batches, fams, two_view="yes")


def test_analyze_random_transform_with_equal_draws_on_one_batch():
    # the capture statistic chose one- or two-view per batch (torch.equal of the draws): a flip
    # whose two draws agreed on the last, 2-image batch crashed with "layout ... differs"
    import hierfast

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(b, 1, 8, 8, generator=g) for b in (8, 8, 2)]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.ReLU()).eval()
    tf = {"flip": [T.HorizontalFlip(0.5)], "blur": [T.GaussianBlur(1.0)]}
    stats = {"invariance": {"transforms": tf, "seed": 0}}
    res = hierfast.analyze(net, data, layers=["1", "2"], stats=stats, progress=False)
    stat = hierfast.capture.get_statistic("invariance")(["1", "2"], transforms=tf, seed=0)
    with torch.no_grad():
        x = torch.cat(data)
        t1 = torch.cat([tf["flip"][0](b, generator=stat._generator(k, 0, 0, 0, b.device)) for k, b in enumerate(data)])
        t2 = torch.cat([tf["flip"][0](b, generator=stat._generator(k, 0, 0, 1, b.device)) for k, b in enumerate(data)])
        for j, upto in enumerate((2, 3)):
            ref_flip = _nis_reference(net[:upto](t1), net[:upto](t2), net[:upto](x))
            ref_blur = _nis_reference(net[:upto](tf["blur"][0](x)), net[:upto](x), net[:upto](x))
            assert res.invariance["flip"]["score"][0, j].item() == pytest.approx(ref_flip.item(), abs=1e-6)
            assert res.invariance["blur"]["score"][0, j].item() == pytest.approx(ref_blur.item(), abs=1e-6)


def _tiny_analyze(tf, seed=0):
    import hierfast

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 1, 8, 8, generator=g) for _ in range(3)]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.ReLU()).eval()
    with torch.no_grad():  # the same network on every call
        net[1].weight.copy_(torch.randn(5, 64, generator=g) / 8)
        net[1].bias.copy_(torch.randn(5, generator=g))
    res = hierfast.analyze(net, data, layers=["1", "2"], stats={"invariance": {"transforms": tf, "seed": seed}},
                           progress=False)
    return res.invariance, net, data


def test_analyze_flip_with_probability_one_is_scored_one_view():
    # HorizontalFlip(1.0) flips every sample: both draws agree, so the two-view score was 1
    # by construction; it is deterministic and scored NIS_1 = f(Tx) vs f(x)
    inv, net, data = _tiny_analyze({"flip": T.sweep(T.HorizontalFlip, [0.5, 1.0])})
    with torch.no_grad():
        x = torch.cat(data)
        for j, upto in enumerate((2, 3)):
            ref = _nis_reference(net[:upto](x.flip(-1)), net[:upto](x), net[:upto](x))
            assert inv["flip"]["score"][1, j].item() == pytest.approx(ref.item(), abs=1e-6)
    assert inv["flip"]["score"][1].max() < 0.9


def test_analyze_transform_seed_reaches_the_draws():
    a = _tiny_analyze({"rot": [T.Rotate(30, seed=1)]})[0]["rot"]["score"]
    b = _tiny_analyze({"rot": [T.Rotate(30, seed=12345)]})[0]["rot"]["score"]
    c = _tiny_analyze({"rot": [T.Rotate(30, seed=1)]}, seed=7)[0]["rot"]["score"]
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # a transform's draws do not move when another family is added before it
    d = _tiny_analyze({"noise": [T.GaussianNoise(0.5)], "rot": [T.Rotate(30, seed=1)]})[0]["rot"]["score"]
    torch.testing.assert_close(d, a, rtol=0, atol=0)


def test_invariance_streams_are_distinct_for_many_families():
    # the old packed formula collided, e.g. (batch 1, family 0, step 1) with (batch 0, family 10, step 0)
    import hierfast

    fams = {f"f{i}": [T.Rotate(30), T.Rotate(30)] for i in range(12)}
    stat = hierfast.capture.get_statistic("invariance")(["1"], transforms=fams, seed=0)
    firsts = {torch.rand(4, generator=stat._generator(k, f, s, v, "cpu"))[0].item()
              for k in range(3) for f in range(12) for s in range(2) for v in range(2)}
    assert len(firsts) == 3 * 12 * 2 * 2


def test_state_and_merge_keep_the_options():
    """load_state_dict took on the saved per_unit / cka (a per_unit=True, cka=False accumulator
    silently became per_unit=False, cka=True); merge refused only through the layout."""
    ft, ft2, fr = _views(n=40, shape=(3,))
    src = InvarianceAccumulator(per_unit=False, cka=True)
    src.update([ft], [ft2], [fr])
    with pytest.raises(ValueError, match=r"saved by InvarianceAccumulator\(per_unit=False, cka=True\).*"
                                         r"construct it with per_unit=False, cka=True"):
        InvarianceAccumulator(per_unit=True, cka=False).load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="cka=True"):
        InvarianceAccumulator(cka=False).load_state_dict(InvarianceAccumulator(cka=True).state_dict())  # empty too
    other = InvarianceAccumulator(per_unit=True, cka=True)
    other.update([ft], [ft2], [fr])
    with pytest.raises(ValueError, match="per_unit"):
        src.clone().merge(other)
    old = src.state_dict()
    del old["options"]  # a state of an older version: its layout still records the options
    with pytest.raises(ValueError, match="per_unit=False"):
        InvarianceAccumulator(per_unit=True).load_state_dict(old)
    back = InvarianceAccumulator(per_unit=False, cka=True).load_state_dict(old)
    ref = _nis_reference(ft, ft2, fr)
    assert back.compute()["nis"][0].item() == pytest.approx(ref.item(), abs=1e-12)


def test_empty_state_round_trips():
    """state_dict() of an accumulator that has seen nothing raised (no checkpoint possible)."""
    ft, ft2, fr = _views(n=40, shape=(3,))
    empty = InvarianceAccumulator(per_unit=True).load_state_dict(
        pickle.loads(pickle.dumps(InvarianceAccumulator(per_unit=True).state_dict())))
    assert not empty.initialized
    empty.update([ft], [ft2], [fr])
    assert empty.compute()["nis"][0].item() == pytest.approx(_nis_reference(ft, ft2, fr).item(), abs=1e-12)
    assert empty.compute()["cka"] is not None
