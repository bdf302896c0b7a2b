"""MinibatchCKA / ExactCKA: streaming == one-shot, merge, state, pickle, reset, gloo sync."""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hierfast.stats import ExactCKA, MinibatchCKA, cka_matrix, linear_cka
from cka_reference import cka, gram_linear, minibatch_cka


def _layers(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 12, generator=g, dtype=torch.float64)
    a = [(base @ torch.randn(12, 30, generator=g, dtype=torch.float64) + 40).relu(),
         base[:, :5] ** 2,
         torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64) + base[:, :1, None, None]]
    b = [base @ torch.randn(12, 4, generator=g, dtype=torch.float64), torch.tanh(base[:, 3:])]
    return [t.to(dtype) for t in a], [t.to(dtype) for t in b]


def _batches(xs, size):
    n = xs[0].shape[0]
    return [[x[i:i + size] for x in xs] for i in range(0, n, size)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minibatch_matches_reference_cross(dtype):
    fa, fb = _layers(100, dtype=dtype)
    acc = MinibatchCKA()
    for ba, bb in zip(_batches(fa, 25), _batches(fb, 25)):
        acc.update(ba, bb)
    got = acc.compute()
    assert got.shape == (3, 2) and got.dtype == torch.float64
    for i in range(3):
        for j in range(2):
            ref = minibatch_cka([b[i].double().reshape(25, -1).numpy() for b in _batches(fa, 25)],
                                [b[j].double().reshape(25, -1).numpy() for b in _batches(fb, 25)])
            assert got[i, j].item() == pytest.approx(ref, abs=1e-10 if dtype == torch.float64 else 1e-5)
    assert int(acc.n_samples.item()) == 100 and int(acc.n_batches.item()) == 4


def test_minibatch_golden():
    rng = np.random.RandomState(1337)
    x = torch.tensor(rng.randn(100, 10))
    y = torch.tensor(rng.randn(100, 10)) + x
    acc = MinibatchCKA()
    for i in range(4):
        acc.update([x[25 * i:25 * (i + 1)]], [y[25 * i:25 * (i + 1)]])
    assert acc.compute().item() == pytest.approx(0.51327, abs=5e-6)


def test_minibatch_single_batch_equals_debiased_cka():
    fa, _ = _layers(64)
    acc = MinibatchCKA()
    acc.update(fa)
    torch.testing.assert_close(acc.compute(), cka_matrix(fa, debiased=True))


def test_cross_mode_equals_joint():
    """Nguyen et al.'s own check: across-model mode equals the joint single-model computation."""
    fa, fb = _layers(96)
    cross, joint = MinibatchCKA(), MinibatchCKA()
    for ba, bb in zip(_batches(fa, 32), _batches(fb, 32)):
        cross.update(ba, bb)
        joint.update(ba + bb)
    torch.testing.assert_close(cross.compute(), joint.compute()[:3, 3:], atol=1e-12, rtol=0)
    m = joint.compute()
    torch.testing.assert_close(m.diagonal(), torch.ones(5, dtype=torch.float64))
    assert (m.abs() <= 1 + 1e-12).all()


def test_ragged_last_batch_weighs_by_size():
    fa, fb = _layers(70)
    acc = MinibatchCKA()
    for ba, bb in zip(_batches(fa, 32), _batches(fb, 32)):  # 32, 32, 6
        acc.update(ba, bb)
    ref = minibatch_cka([b[0].reshape(b[0].shape[0], -1).numpy() for b in _batches(fa, 32)],
                        [b[1].numpy() for b in _batches(fb, 32)])
    assert acc.compute()[0, 1].item() == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("cls", [MinibatchCKA, ExactCKA])
def test_merge_state_pickle_reset(cls, tmp_path):
    fa, fb = _layers(96)
    whole, left, right = cls(), cls(), cls()
    for k, (ba, bb) in enumerate(zip(_batches(fa, 16), _batches(fb, 16))):
        whole.update(ba, bb)
        (left if k % 2 else right).update(ba, bb)
    merged = left.clone().merge(right)
    torch.testing.assert_close(merged.compute(), whole.compute(), atol=1e-12, rtol=0)
    torch.save(whole.state_dict(), tmp_path / "s.pt")
    restored = cls().load_state_dict(torch.load(tmp_path / "s.pt"))
    torch.testing.assert_close(restored.compute(), whole.compute(), atol=0, rtol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(whole)).compute(), whole.compute(), atol=0, rtol=0)
    assert cls().merge(whole).compute().equal(whole.compute())  # merge into empty
    whole.reset()
    with pytest.raises(ValueError, match="before any update"):
        whole.compute()


@pytest.mark.parametrize("cls", [MinibatchCKA, ExactCKA])
def test_layout_mismatch_rejected(cls):
    fa, fb = _layers(32)
    acc = cls()
    acc.update(fa, fb)
    with pytest.raises(ValueError, match="differ"):
        acc.update(fa[:2], fb)
    other = cls()
    other.update(fa)
    with pytest.raises(ValueError, match="layouts"):
        acc.merge(other)
    with pytest.raises(TypeError):
        acc.merge(MinibatchCKA() if cls is ExactCKA else ExactCKA())


def test_minibatch_bad_batch():
    with pytest.raises(ValueError, match="n >= 4"):
        MinibatchCKA().update([torch.randn(3, 5)])
    with pytest.raises(ValueError, match="same inputs"):
        MinibatchCKA().update([torch.randn(8, 5)], [torch.randn(9, 5)])
    with pytest.raises(ValueError, match="state was saved by"):
        MinibatchCKA().load_state_dict({"__class__": "ExactCKA"})


@pytest.mark.parametrize("debiased", [False, True])
def test_exact_equals_full_batch(debiased):
    fa, fb = _layers(150)
    acc = ExactCKA(debiased=debiased)
    for ba, bb in zip(_batches(fa, 40), _batches(fb, 40)):  # ragged last batch
        acc.update(ba, bb)
    torch.testing.assert_close(acc.compute(), cka_matrix(fa, fb, debiased=debiased), atol=1e-10, rtol=0)
    single = ExactCKA(debiased=debiased)
    for ba in _batches(fa, 7):
        single.update({"a": ba[0], "b": ba[1], "c": ba[2]})
    m = single.compute()
    assert m.row_names == ["a", "b", "c"]
    torch.testing.assert_close(m, cka_matrix(fa, debiased=debiased), atol=1e-10, rtol=0)


def test_exact_float32_large_offset():
    x = torch.randn(512, 20, dtype=torch.float64) + 50
    y = x @ torch.randn(20, 10, dtype=torch.float64) + 100
    acc = ExactCKA(debiased=True)
    for i in range(0, 512, 100):
        acc.update([x[i:i + 100].float()], [y[i:i + 100].float()])
    ref = linear_cka(x.float().double(), y.float().double(), debiased=True).item()
    assert acc.compute().item() == pytest.approx(ref, abs=1e-8)


def test_exact_memory_limit_message():
    with pytest.raises(ValueError, match="MinibatchCKA"):
        ExactCKA(max_memory=10_000).update([torch.randn(4, 64)])
    with pytest.raises(ValueError, match="max_memory"):
        ExactCKA(max_memory=0)


# -- distributed: 2 gloo processes == 1 process ---------------------------------

def _worker(rank, world, port, cls_name, shards, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acc = {"MinibatchCKA": MinibatchCKA, "ExactCKA": ExactCKA}[cls_name]()
        for ba, bb in shards[rank]:
            acc.update(ba, bb)
        acc.sync()
        if rank == 0:
            torch.save(acc.compute(), out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("cls", [MinibatchCKA, ExactCKA])
def test_gloo_two_ranks_equal_one_process(cls, tmp_path):
    fa, fb = _layers(128)
    batches = list(zip(_batches(fa, 16), _batches(fb, 16)))
    shards = [batches[0::2], batches[1::2]]
    one = cls()
    for ba, bb in batches:
        one.update(ba, bb)
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), cls.__name__, shards, str(out)), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(out), one.compute(), atol=1e-6, rtol=0)


def test_sync_without_distributed_is_noop():
    fa, fb = _layers(16)
    acc = MinibatchCKA()
    acc.update(fa, fb)
    before = acc.compute()
    assert acc.sync() is acc
    torch.testing.assert_close(acc.compute(), before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls,kw", [(ExactCKA, {}), (ExactCKA, {"debiased": True}), (MinibatchCKA, {})])
def test_exactly_constant_layer_is_nan_with_warning(cls, kw, dtype):
    from hierfast.stats import ConstantLayerWarning

    g = torch.Generator().manual_seed(0)
    for value in (0.1, 0.3, 1 / 3, 1000.1):
        acc = cls(**kw)
        for _ in range(2):
            y = torch.randn(37, 3, generator=g, dtype=torch.float64).to(dtype)
            acc.update({"c": torch.full((37, 3), value, dtype=dtype), "y": y})
        with pytest.warns(ConstantLayerWarning, match="c"):
            m = acc.compute()
        assert torch.isnan(m[0]).all() and torch.isnan(m[:, 0]).all() and torch.isfinite(m[1, 1])


@pytest.mark.parametrize("debiased", [False, True])
def test_exact_shared_offset_matches_full_batch(debiased):
    # raw moments cancelled: batches of X + 1e4, Y - 1e4 gave 1.2457 for a true 0.3392
    g = torch.Generator().manual_seed(0)
    x = torch.randn(57, 6, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.randn(3, 4, generator=g, dtype=torch.float64) + torch.randn(57, 4, generator=g,
                                                                                   dtype=torch.float64)
    ref = cka(gram_linear(x.numpy()), gram_linear(y.numpy()), debiased)
    for cuts in ([0, 57], [0, 19, 38, 57]):
        acc = ExactCKA(debiased=debiased)
        for a, b in zip(cuts[:-1], cuts[1:]):
            acc.update([x[a:b] + 1e4], [y[a:b] - 1e4])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no false constant-layer warning
            assert acc.compute().item() == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_exact_merge_of_states_with_different_references(debiased):
    fa, fb = _layers(96)
    fa = [t + 300.0 for t in fa]  # shards' first-batch means differ
    ref = ExactCKA(debiased=debiased)
    shards = [ExactCKA(debiased=debiased), ExactCKA(debiased=debiased)]
    single = [ExactCKA(debiased=debiased), ExactCKA(debiased=debiased)]
    for k, (ba, bb) in enumerate(zip(_batches(fa, 16), _batches(fb, 16))):
        ref.update(ba, bb)
        shards[k % 2].update(ba, bb)
        single[k % 2].update(ba)
    assert not torch.equal(shards[0].shift_a, shards[1].shift_a)
    restored = ExactCKA(debiased=debiased).load_state_dict(pickle.loads(pickle.dumps(shards[1].state_dict())))
    merged = shards[0].clone().merge(restored)
    torch.testing.assert_close(merged.compute(), ref.compute(), atol=1e-10, rtol=0)
    whole = cka_matrix(fa, debiased=debiased)
    torch.testing.assert_close(single[0].clone().merge(single[1]).compute(), whole, atol=1e-10, rtol=0)



def _z(xs):
    """[x_1 .. x_L | ||x_1||^2 .. ||x_L||^2 | 1] of flattened float64 layers."""
    xs = [x.reshape(x.shape[0], -1) for x in xs]
    return torch.cat([*xs, torch.stack([(x * x).sum(1) for x in xs], 1), torch.ones(xs[0].shape[0], 1,
                                                                                     dtype=torch.float64)], 1)


def test_exact_reshift_equals_sums_about_the_new_reference(monkeypatch):
    fa, fb = _layers(40)
    acc = ExactCKA()
    acc.update(fa, fb)
    g = torch.Generator().manual_seed(3)
    new_a = acc.shift_a + torch.randn(acc.shift_a.shape, generator=g, dtype=torch.float64)
    new_b = acc.shift_b + torch.randn(acc.shift_b.shape, generator=g, dtype=torch.float64)

    def about(xs, ref):  # each layer minus its slice of the concatenated reference
        out, off = [], 0
        for x in xs:
            d = x[0].numel()
            out.append(x.reshape(x.shape[0], -1) - ref[off:off + d])
            off += d
        return out

    za, zb = _z(about(fa, new_a)), _z(about(fb, new_b))
    other = acc.clone()
    before = {k: getattr(other, k).clone() for k in ("moments", "own_a", "own_b", "shift_a", "shift_b")}
    got = other._reshifted([new_a, new_b])
    torch.testing.assert_close(got["moments"], za.T @ zb, atol=1e-8, rtol=1e-12)
    own_a = torch.cat([(_z([x]).T @ _z([x])).reshape(-1) for x in about(fa, new_a)])
    torch.testing.assert_close(got["own_a"], own_a, atol=1e-8, rtol=1e-12)
    assert all(torch.equal(getattr(other, k), v) for k, v in before.items())  # read, not changed
    # merge reads the other state's sums without copying it whole
    mine = ExactCKA()
    mine.update([x + 1.0 for x in fa], [x - 1.0 for x in fb])
    monkeypatch.setattr(ExactCKA, "clone", lambda self: pytest.fail("merge cloned the other state"))
    mine.merge(other)
    assert all(torch.equal(getattr(other, k), v) for k, v in before.items())

def test_exact_state_keeps_the_estimator():
    fa, fb = _layers(32)
    acc = ExactCKA(debiased=True)
    acc.update(fa, fb)
    with pytest.raises(ValueError, match="debiased=True"):
        ExactCKA().load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match=r"ExactCKA\(debiased=True\) but this is ExactCKA\(debiased=False\)"):
        biased = ExactCKA()
        biased.update(fa, fb)
        biased.merge(acc)
    torch.testing.assert_close(ExactCKA(debiased=True).load_state_dict(acc.state_dict()).compute(), acc.compute())


@pytest.mark.parametrize("cls", [MinibatchCKA, ExactCKA])
def test_empty_state_round_trips_through_torch_save(cls, tmp_path):
    """state_dict() of an accumulator that has seen nothing used to raise, so a checkpoint could
    not be written while one statistic was still empty (a first batch too small for it)."""
    torch.save(cls().state_dict(), tmp_path / "e.pt")
    restored = cls().load_state_dict(torch.load(tmp_path / "e.pt", weights_only=True))
    assert not restored.initialized
    fa, fb = _layers(64)
    ref = cls()
    for ba, bb in zip(_batches(fa, 16), _batches(fb, 16)):
        ref.update(ba, bb)
        restored.update(ba, bb)
    torch.testing.assert_close(restored.compute(), ref.compute(), atol=0, rtol=0)
    full = cls().load_state_dict(ref.state_dict()).load_state_dict(cls().state_dict())  # loading empty empties
    assert not full.initialized
    with pytest.raises(ValueError, match="state was saved by ExactCKA, not MinibatchCKA|state was saved by "
                                         "MinibatchCKA, not ExactCKA"):
        cls().load_state_dict((ExactCKA if cls is MinibatchCKA else MinibatchCKA)().state_dict())


def _empty_rank_worker(rank, world, port, cls_name, shard, out_path):
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # short timeout: a rank left alone in a collective fails the test in seconds, not 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    try:
        kw = {"debiased": True} if cls_name == "ExactCKA" else {}
        acc = {"MinibatchCKA": MinibatchCKA, "ExactCKA": ExactCKA}[cls_name](**kw)
        for ba, bb in shard if rank == 1 else []:  # rank 0 sees nothing
            acc.update(ba, bb)
        acc.sync()
        out = {"value": acc.compute()}
        try:
            cls = type(acc)
            cls(**kw).sync()  # no rank has data: the same error everywhere
        except ValueError as e:
            out["error"] = str(e)
        torch.save(out, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("cls", [MinibatchCKA, ExactCKA])
def test_gloo_rank_without_data_contributes_zeros(cls, tmp_path):
    """sync() raised on the empty rank only, leaving the other in the all_reduce until the timeout."""
    fa, fb = _layers(64)
    fa = [t + 100.0 for t in fa]  # rank 1's reference point must be the one used, not the empty rank 0's
    shard = list(zip(_batches(fa, 16), _batches(fb, 16)))
    kw = {"debiased": True} if cls is ExactCKA else {}
    one = cls(**kw)
    for ba, bb in shard:
        one.update(ba, bb)
    out = tmp_path / "r"
    mp.spawn(_empty_rank_worker, args=(2, _free_port(), cls.__name__, shard, str(out)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(f"{out}.{r}", weights_only=False)
        torch.testing.assert_close(got["value"], one.compute(), atol=1e-9, rtol=0)
        assert "no rank has data" in got["error"]


def test_exact_options_checked_when_merging_an_empty_state():
    fa, _ = _layers(16)
    acc = ExactCKA()
    acc.update(fa)
    with pytest.raises(ValueError, match=r"debiased=True\) but this is ExactCKA\(debiased=False"):
        acc.merge(ExactCKA(debiased=True))  # empty, but of the other estimator: was accepted
    assert acc._options() == {"debiased": False}  # what sync's agreement compares across ranks
    with pytest.raises(ValueError, match="debiased=False"):
        ExactCKA(debiased=True).load_state_dict(ExactCKA().state_dict())  # an empty state too


def test_exact_extreme_magnitudes_raise_clearly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(20, 30, generator=g, dtype=torch.float64))
    for s in (1e100, 1e-160):  # was: NaN (and for 1e-160 a false ConstantLayerWarning)
        acc = ExactCKA()
        acc.update([x * s, y * s])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="extreme magnitude.*power of two"):
                acc.compute()
