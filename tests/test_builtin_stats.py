"""analyze's built-in statistics besides CKA, against plain-torch references."""
import pytest
import torch
from torch import nn

import hierfast
from hierfast.stats import normalized_invariance
from hierfast.transforms import Translate, sweep


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _data(n_batches=3, b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 12, 12, generator=g) for _ in range(n_batches)]


def test_sparsity_equals_fraction_positive():
    net, data = _net(), _data()
    res = hierfast.analyze(net, data, layers=["0", "1", "4"], stats=("sparsity",), progress=False)
    with torch.no_grad():
        outs = [net[0](x) for x in data]
        ref = [torch.cat([(o > 0).flatten() for o in outs]).double().mean(),
               torch.cat([(o.relu() > 0).flatten() for o in outs]).double().mean(),
               torch.cat([(net(x) > 0).flatten() for x in data]).double().mean()]
    torch.testing.assert_close(res.sparsity, torch.stack(ref), atol=1e-12, rtol=0)


def test_invariance_pooled_features_are_invariant_to_circular_shifts():
    net, data = _net(), _data()
    tf = {"shift": sweep(Translate, [0, 3], mode="circular")}
    res = hierfast.analyze(net, data, layers=["1", "3", "4"], stats={"invariance": {"transforms": tf}},
                           progress=False)
    score = res.invariance["shift"]["score"]
    assert res.invariance["shift"]["magnitudes"] == [0.0, 3.0]
    torch.testing.assert_close(score[0], torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)  # magnitude 0
    torch.testing.assert_close(score[1, 1:], torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert score[1, 0] < 0.5  # the conv map itself moves with the shift


def test_invariance_matches_the_one_shot_function():
    """Streamed through analyze == normalized_invariance on the same draws, concatenated."""
    net, data = _net(), _data()
    tf = {"shift": [Translate(2, mode="zeros")]}
    stat = hierfast.capture.get_statistic("invariance")(["1", "4"], transforms=tf, seed=5)
    res = hierfast.analyze(net, data, layers=["1", "4"], stats={"invariance": {"transforms": tf, "seed": 5}},
                           progress=False)
    feats = {n: [] for n in ("ref", "t", "t2")}
    with torch.no_grad():
        for k, x in enumerate(data):
            xt = tf["shift"][0](x, generator=stat._generator(k, 0, 0, 0, x.device))
            xt2 = tf["shift"][0](x, generator=stat._generator(k, 0, 0, 1, x.device))
            for key, inp in (("ref", x), ("t", xt), ("t2", xt2)):
                feats[key].append([net[:2](inp).flatten(1), net(inp)])
    cat = {k: [torch.cat([b[i] for b in v]) for i in range(2)] for k, v in feats.items()}
    ref = normalized_invariance(cat["t"], cat["t2"], cat["ref"])
    torch.testing.assert_close(res.invariance["shift"]["score"][0], ref, atol=1e-9, rtol=0)


def test_invariance_resume_equals_uninterrupted(tmp_path):
    net, data = _net(), _data(n_batches=4)
    stats = {"invariance": {"transforms": {"rot": sweep(hierfast.transforms.Rotate, [10])}}}
    full = hierfast.analyze(net, data, layers=["1", "4"], stats=stats, progress=False)
    ck = tmp_path / "ck.pt"
    hierfast.analyze(net, data, layers=["1", "4"], stats=stats, progress=False, checkpoint=ck,
                     checkpoint_every=1, max_batches=2)
    resumed = hierfast.analyze(net, data, layers=["1", "4"], stats=stats, progress=False, checkpoint=ck,
                               checkpoint_every=1)
    assert torch.equal(full.invariance["rot"]["score"], resumed.invariance["rot"]["score"])


def test_invariance_with_compare_to_reports_both_models():
    data = _data()
    res = hierfast.analyze(_net(0), data, layers=["1", "4"], compare_to=_net(1),
                           stats={"invariance": {"transforms": {"s": [Translate(1)]}}}, progress=False)
    assert set(res.invariance) == {"a", "b"}
    assert res.invariance["b"]["s"]["score"].shape == (1, 2)


def test_invariance_bad_options():
    with pytest.raises(ValueError, match="non-empty dict"):
        hierfast.analyze(_net(), _data(), layers=["1"], stats={"invariance": {"transforms": {}}}, progress=False)
    with pytest.raises(TypeError, match="inputs must be tensors"):
        _analyze_dict_inputs()


def _analyze_dict_inputs():
    """A model fed dict batches (as from a tokenizer): image transforms cannot apply."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x)

    hierfast.analyze(M(), [{"x": torch.randn(8, 4)}], stats=("invariance",), progress=False)


def test_deterministic_transforms_are_scored_one_sided():
    """Blur draws nothing at random: T = T', so the two-view score would be 1 by construction."""
    from hierfast.transforms import GaussianBlur

    net, data = _net(), _data()
    blur = GaussianBlur(1.0)
    res = hierfast.analyze(net, data, layers=["1", "4"], stats={"invariance": {"transforms": {"blur": [blur]}}},
                           progress=False)
    with torch.no_grad():
        ref = [torch.cat([net[:2](x).flatten(1) for x in data]), torch.cat([net(x) for x in data])]
        tb = [torch.cat([net[:2](blur(x)).flatten(1) for x in data]), torch.cat([net(blur(x)) for x in data])]
    expect = normalized_invariance(tb, None, ref)
    torch.testing.assert_close(res.invariance["blur"]["score"][0], expect, atol=1e-9, rtol=0)
    assert res.invariance["blur"]["score"][0, 0] < 0.999


def test_dimension_statistic_syncs_through_its_accumulators(monkeypatch):
    from hierfast.stats import DimensionAccumulator

    stat = hierfast.capture.get_statistic("dimension")(["0"], ["1"])
    calls = []
    monkeypatch.setattr(DimensionAccumulator, "sync", lambda self, group=None: calls.append(group) or self)
    assert stat.sync("g") is stat and calls == ["g", "g"]  # one copy of the gather-and-merge
    monkeypatch.undo()
    assert stat.sync() is stat  # not distributed: a no-op (was: get_world_size raised)
