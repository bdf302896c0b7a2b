"""Linear probes: scikit-learn parity, known answers, streaming == one-shot, bad input."""
import pytest
import torch

import hierfast
from hierfast.stats import ProbeAccumulator, ridge_probe
from hierfast.stats._identity import uniform01


def _task(n, d, k, noise, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ w + noise * torch.randn(n, k, generator=g, dtype=torch.float64)).argmax(1)
    return x.to(dtype), y


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_probe_matches_sklearn(k, dtype):
    sk = pytest.importorskip("sklearn.linear_model")
    x, y = _task(240, 17, k, 0.7, seed=k)
    xt, yt = _task(90, 17, k, 0.7, seed=100 + k)
    r = ridge_probe(x.to(dtype), y, xt.to(dtype), yt)
    ref = sk.RidgeClassifierCV(alphas=r["alphas"]).fit(x.numpy(), y.numpy())
    assert r["alpha"] == pytest.approx(float(ref.alpha_), rel=1e-12)
    pred_acc = float((torch.as_tensor(ref.predict(xt.numpy())) == yt).double().mean())
    assert r["accuracy"] == pytest.approx(pred_acc, abs=1e-12)


def test_separable_labels_give_accuracy_one_and_random_labels_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    x[:, 0] += torch.where(y == 1, 1.0, -1.0)  # a margin
    assert ridge_probe(x[:400], y[:400], x[400:], y[400:])["accuracy"] == 1.0
    y_rand = torch.randint(0, 4, (600,), generator=g)
    acc = ridge_probe(x[:400], y_rand[:400], x[400:], y_rand[400:])["accuracy"]
    assert abs(acc - 0.25) < 0.1


def test_accumulator_streaming_equals_one_shot_and_matches_ridge_probe():
    x, y = _task(1200, 12, 4, 0.5, seed=3)
    noise = torch.randn(1200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    one = ProbeAccumulator(alphas=[3.0], seed=1)
    one.update({"signal": x, "noise": noise}, y)
    many = ProbeAccumulator(alphas=[3.0], seed=1)
    for i in range(0, 1200, 128):
        many.update({"signal": x[i:i + 128], "noise": noise[i:i + 128]}, y[i:i + 128])
    a, b = one.compute(), many.compute()
    torch.testing.assert_close(a["accuracy"], b["accuracy"], atol=0, rtol=0)
    torch.testing.assert_close(a["control"], b["control"], atol=0, rtol=0)
    assert a["n_test"] == b["n_test"] and a["n_train"] == b["n_train"] == 1200 - a["n_test"]
    # the same split and penalty through the one-shot function
    held = uniform01(torch.arange(1200), 1) < 0.25
    ref = ridge_probe(x[~held], y[~held], x[held], y[held], alphas=[3.0])
    assert a["accuracy"][0].item() == pytest.approx(ref["accuracy"], abs=1e-12)
    assert a["accuracy"][0] > 0.8 and abs(a["accuracy"][1] - a["chance"]) < 0.12
    assert abs(a["control"][0] - 0.25) < 0.1  # control labels are unlearnable from the input


def test_accumulator_merge_and_state_round_trip():
    x, y = _task(800, 8, 3, 0.5, seed=5)
    idx = torch.arange(800)
    whole = ProbeAccumulator(seed=2)
    whole.update([x], y, idx)
    left, right = ProbeAccumulator(seed=2), ProbeAccumulator(seed=2)
    left.update([x[:400]], y[:400], idx[:400])
    right.update([x[400:]], y[400:], idx[400:])
    merged = ProbeAccumulator(seed=2).load_state_dict(left.merge(right).state_dict())
    for key in ("accuracy", "control", "alpha"):
        torch.testing.assert_close(merged.compute()[key], whole.compute()[key], atol=1e-9, rtol=1e-9)


def test_wide_layers_are_reduced_with_a_seeded_projection():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 4, 16, 16, generator=g)
    y = (x.mean(dim=(2, 3))[:, 0] > 0).long()
    x[:, 0] += torch.where(y == 1, 0.5, -0.5)[:, None, None]  # a margin in channel 0
    acc = ProbeAccumulator(max_dim=64, seed=0)
    acc.update([x], y)
    assert acc.layers[0].sx.numel() <= 64
    assert acc.compute()["accuracy"][0] > 0.97  # channel means survive average pooling


@pytest.mark.parametrize("labels, err, match", [
    (torch.zeros(50, dtype=torch.long), ValueError, "single class"),
    (torch.zeros(50), TypeError, "integer class labels"),
    (torch.zeros(49, dtype=torch.long), ValueError, "one label per row"),
])
def test_bad_labels(labels, err, match):
    x = torch.randn(50, 5)
    with pytest.raises(err, match=match):
        acc = ProbeAccumulator()
        acc.update([x], labels)
        acc.compute()
    with pytest.raises(err, match=match):
        ridge_probe(x, labels, x, torch.zeros(50, dtype=torch.long))


def test_nan_features_and_bad_options():
    x = torch.randn(20, 3)
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ProbeAccumulator().update([x], torch.arange(20) % 2)
    with pytest.raises(ValueError, match="test_fraction"):
        ProbeAccumulator(test_fraction=1.5)
    with pytest.raises(ValueError, match="n_classes"):
        ProbeAccumulator(n_classes=1)


def _labelled(n_batches=6, b=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(b, 6, generator=g)
        out.append((x, (x[:, 0] + 0.3 * x[:, 1] > 0).long()))
    return out


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16)).eval()


def test_probe_statistic_through_analyze_and_resume(tmp_path):
    net, data = _mlp(), _labelled()
    res = hierfast.analyze(net, data, stats=("probe",), progress=False)
    assert res.probe["accuracy"].shape == (2,) and res.probe["accuracy"][0] > 0.85
    ck = tmp_path / "ck.pt"
    hierfast.analyze(net, data, stats=("probe",), progress=False, checkpoint=ck, checkpoint_every=1,
                     max_batches=3)
    resumed = hierfast.analyze(net, data, stats=("probe",), progress=False, checkpoint=ck)
    assert torch.equal(resumed.probe["accuracy"], res.probe["accuracy"])
    assert torch.equal(resumed.probe["control"], res.probe["control"])


def test_probe_statistic_needs_labels():
    with pytest.raises(ValueError, match="no labels"):
        hierfast.analyze(_mlp(), [torch.randn(20, 6)], stats=("probe",), progress=False)


def test_merge_of_shards_with_different_control_class_counts_is_refused():
    # k_control is fixed by each shard's first batch: merging 2- and 4-class shards crashed with a
    # bare RuntimeError (and their control labels differ for the same input)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(57, 6, generator=g, dtype=torch.float64)
    a, b = ProbeAccumulator(), ProbeAccumulator()
    a.update([x[:20]], torch.arange(20) % 2)
    b.update([x[20:]], torch.arange(37) % 4, index=torch.arange(20, 57))
    with pytest.raises(ValueError, match="n_classes="):
        a.merge(b)
    with pytest.raises(ValueError, match="layer"):
        c = ProbeAccumulator()
        c.update([x[20:, :3]], torch.arange(37) % 2, index=torch.arange(20, 57))
        a.merge(c)
    # with n_classes declared, the shards agree and merge to the one-pass result
    y = torch.arange(57) % 4
    y[:20] %= 2  # the first shard sees only classes 0, 1
    whole, left, right = (ProbeAccumulator(n_classes=4) for _ in range(3))
    whole.update([x], y)
    left.update([x[:20]], y[:20])
    right.update([x[20:]], y[20:], index=torch.arange(20, 57))
    merged = left.merge(right).compute()
    for key in ("accuracy", "control", "alpha"):
        torch.testing.assert_close(merged[key], whole.compute()[key], atol=1e-9, rtol=1e-9)


def test_state_dict_is_a_snapshot():
    """state_dict() returned the live tensors: an update after it changed the saved state."""
    x, y = _task(300, 6, 3, 0.5, seed=8)
    idx = torch.arange(300)
    acc, first = ProbeAccumulator(seed=1), ProbeAccumulator(seed=1)
    for a in (acc, first):
        a.update([x[:200]], y[:200], idx[:200])
    saved = acc.state_dict()
    acc.update([x[200:]], y[200:], idx[200:])
    restored = ProbeAccumulator(seed=1).load_state_dict(saved)
    for key in ("accuracy", "control", "alpha"):
        torch.testing.assert_close(restored.compute()[key], first.compute()[key], atol=0, rtol=0)
    assert restored.compute()["n_train"] == first.compute()["n_train"]


@pytest.mark.parametrize("opts", [{"test_fraction": 0.5}, {"seed": 3}, {"control": False}, {"max_dim": 4},
                                  {"n_classes": 5}])
def test_state_and_merge_keep_the_options(opts):
    """A state (or shard) with another split, seed, control task or projection was silently
    taken on, mixing held-out splits and control labels."""
    x, y = _task(200, 6, 3, 0.5, seed=9)
    idx = torch.arange(200)
    saved = ProbeAccumulator(**opts)
    saved.update([x[:100]], y[:100], idx[:100])
    key = next(iter(opts))
    with pytest.raises(ValueError, match=rf"saved by ProbeAccumulator\({key}=.*construct it with {key}="):
        ProbeAccumulator().load_state_dict(saved.state_dict())
    mine = ProbeAccumulator()
    mine.update([x[100:]], y[100:], idx[100:])
    with pytest.raises(ValueError, match=rf"cannot merge a ProbeAccumulator\({key}="):
        mine.merge(saved)
    old = saved.state_dict()
    del old["options"]  # a state of an older version records no options: accepted
    assert ProbeAccumulator().load_state_dict(old).seen == 100
    assert ProbeAccumulator(**opts).load_state_dict(saved.state_dict()).seen == 100


def test_sync_without_distributed_is_a_noop_and_merge_checks_the_type():
    x, y = _task(60, 4, 2, 0.5, seed=3)
    acc = ProbeAccumulator(seed=1)
    acc.update([x], y)
    before = acc.state_dict()
    assert acc.sync() is acc  # was: torch.distributed's "Default process group has not been initialized"
    assert all(torch.equal(v, before[k]) for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor))
    from hierfast.stats import MinibatchCKA

    with pytest.raises(TypeError, match="must be a ProbeAccumulator, got MinibatchCKA"):
        acc.merge(MinibatchCKA())
