"""analyze() as a long job: resume after a kill, failures mid-run, 2 gloo ranks, bounded memory, CLI."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hierfast.capture import Results, analyze
from test_capture import FlipStat  # noqa: F401  (registers the "test_flip" statistic)


def make_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 8, 3, stride=2),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def make_data(n_batches=10, b=8, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n_batches)]


class DieAt(nn.Module):
    """Wraps a model; on forward number ``at`` it raises, or kills the process (``hard``)."""

    def __init__(self, net, at, hard=False):
        super().__init__()
        self.net, self.at, self.hard, self.calls = net, at, hard, 0

    def forward(self, x):
        if self.calls == self.at:
            if self.hard:
                os._exit(17)  # like SIGKILL: no exception handler, no atexit, no flush
            raise RuntimeError("simulated failure")
        self.calls += 1
        return self.net(x)


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_capture_runs import DieAt, make_net, make_data
    from hierfast.capture import analyze
    torch.set_num_threads(1)
    analyze(DieAt(make_net(), at=6, hard=True), make_data(), compare_to=make_net(1), checkpoint={ckpt!r},
            checkpoint_every=2, progress=False)
""")


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    ckpt = tmp_path / "run.pt"
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), ckpt=str(ckpt))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 17, p.stderr
    state = torch.load(ckpt, weights_only=True)
    assert state["next_batch"] == 6 and state["n_batches"] == 6  # every 2 batches: 2, 4, 6
    full = analyze(DieAt(make_net(), at=-1), make_data(), compare_to=make_net(1), progress=False)
    resumed = analyze(DieAt(make_net(), at=-1), make_data(), compare_to=make_net(1), checkpoint=ckpt,
                      checkpoint_every=2, progress=False)
    assert torch.equal(resumed.cka, full.cka)  # bit for bit: float64 sums added in the same order
    assert resumed.n_samples == full.n_samples == 80 and resumed.layers == full.layers
    assert not list(tmp_path.glob("*.tmp*"))


def test_model_raising_mid_run_keeps_everything(tmp_path):
    ckpt = tmp_path / "c.pt"
    net = make_net()
    with pytest.raises(RuntimeError, match="simulated failure"):
        analyze(DieAt(net, at=7), make_data(), checkpoint=ckpt, checkpoint_every=100, progress=False)
    assert net.training  # flags restored even on failure
    state = torch.load(ckpt, weights_only=True)
    assert state["next_batch"] == 7  # saved on the way out although checkpoint_every=100
    resumed = analyze(DieAt(net, at=-1), make_data(), checkpoint=ckpt, progress=False)
    full = analyze(net, make_data(), progress=False)
    assert torch.equal(resumed.cka, full.cka) and resumed.n_batches == 10
    # rerunning a finished call returns the same result; more data continues; other statistics refuse
    again = analyze(DieAt(net, at=-1), make_data(), checkpoint=ckpt, progress=False)
    assert torch.equal(again.cka, full.cka) and again.n_batches == 10
    with pytest.raises(ValueError, match="checkpoint=.* another configuration: layers: "):
        analyze(net, make_data(12), checkpoint=ckpt, progress=False)  # not the wrapped model's layer names
    more = analyze(DieAt(net, at=-1), make_data(12), checkpoint=ckpt, progress=False)
    torch.testing.assert_close(more.cka, analyze(net, make_data(12), progress=False).cka, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="holds statistics"):
        analyze(DieAt(net, at=-1), make_data(12), stats=("cka", "test_flip"), checkpoint=ckpt, progress=False)


# -- distributed -------------------------------------------------------------------------------
def _worker(rank, world, port, out, ckpt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = make_data(9)[rank::world]  # what DistributedSampler(shuffle=False) would give, by batch
        res = analyze(make_net(), shard, compare_to=make_net(1), progress=False, checkpoint=ckpt)
        torch.save({"cka": res.cka, "n": res.n_samples, "nb": res.n_batches}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _empty_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        analyze(make_net(), make_data(2) if rank == 0 else [], progress=False)
    except ValueError as e:
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(e))
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = str(tmp_path / "res")
    ckpt = tmp_path / "ck.pt"
    mp.spawn(_worker, args=(2, _free_port(), out, str(ckpt)), nprocs=2, join=True)
    # one checkpoint per rank, each with its own shard's count (written before the sum)
    assert [torch.load(tmp_path / f"ck.rank{r}.pt", weights_only=True)["n_batches"] for r in range(2)] == [5, 4]
    one = analyze(make_net(), make_data(9), compare_to=make_net(1), progress=False)
    for r in range(2):
        got = torch.load(f"{out}.{r}", weights_only=True)
        assert got["n"] == one.n_samples == 72 and got["nb"] == 9
        torch.testing.assert_close(got["cka"], one.cka, atol=1e-6, rtol=0)


@pytest.mark.distributed
def test_rank_without_data_fails_on_every_rank_without_hanging(tmp_path):
    out = str(tmp_path / "err")
    mp.spawn(_empty_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for r in range(2):
        assert "rank(s) [1] received no batch" in open(f"{out}.{r}").read()


# -- memory ------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read the RSS")
def test_memory_does_not_grow_with_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8192), nn.Tanh())
    per_batch = 2 * 32 * 8192 * 4  # features of the two layers: 2 MiB per batch

    def data(n, rss):
        for i in range(n):
            yield torch.randn(32, 64)
            rss.append(_rss_bytes())  # resumed after the batch was used: current, not peak, RSS

    small, large = [], []
    analyze(net, data(10, small), layers=["0", "1"], progress=False)
    analyze(net, data(100, large), layers=["0", "1"], progress=False)
    growth = large[-1] - large[9]  # 90 more batches
    # keeping the activations would add 180 MiB; allow allocator noise well below that
    assert growth < 15 * per_batch, f"RSS grew by {growth / 2**20:.1f} MiB over 90 batches"


# -- CLI ---------------------------------------------------------------------------------------
FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 4))

    def other():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def data():
        g = torch.Generator().manual_seed(2)
        return [torch.randn(16, 6, generator=g) for _ in range(4)]
""")


def test_cli_analyze(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "capture_cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    from hierfast.cli import main

    out = tmp_path / "out"
    rc = main(["analyze", "--model", "capture_cli_factories:model", "--data", "capture_cli_factories:data",
               "--compare", "capture_cli_factories:other", "--layers", "0", "2", "--max-batches", "3",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    res = Results.load(out)
    import capture_cli_factories as f

    ref = analyze(f.model(), f.data(), compare_to=f.other(), layers=["0", "2"], max_batches=3, progress=False)
    assert torch.equal(res.cka, ref.cka) and res.layers_b == ["0", "2"] and res.n_samples == 48
    assert (out / "cka.png").stat().st_size > 1000
    assert "results.json" in capsys.readouterr().out
    assert main(["analyze", "--model", "nocolon", "--data", "capture_cli_factories:data", "--out", str(out)]) == 2
    assert "--model must look like pkg.module:function" in capsys.readouterr().err


def test_cli_analyze_report_and_report_command(tmp_path, monkeypatch, capsys):
    """--report renders the run; `hierfast report` renders saved results; bad paths are one-line errors."""
    pytest.importorskip("matplotlib")
    (tmp_path / "capture_cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    from hierfast.cli import main

    out = tmp_path / "out"
    assert main(["analyze", "--model", "capture_cli_factories:model", "--data", "capture_cli_factories:data",
                 "--stats", "cka", "sparsity", "--out", str(out), "--no-progress", "--report"]) == 0
    html = (out / "report" / "report.html").read_text()
    assert "Layer × layer similarity" in html and "Sparsity vs depth" in html
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").stat().st_size > 1000
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["analyze", "--model", "capture_cli_factories:model", "--data", "capture_cli_factories:data",
                 "--out", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_ragged_last_batch_is_left_out_of_the_statistics_too_small_for_it(tmp_path):
    """33 samples in batches of 8: the last batch (1 sample) is too small for CKA (needs 4) and
    invariance (needs 2) but not for sparsity; it is skipped by those two only, with a warning,
    counted in Results.skipped_small, and the checkpoint stays resumable."""
    from torch.utils.data import DataLoader, TensorDataset

    from capture_reference import minibatch_cka_matrix
    from hierfast.transforms import GaussianNoise

    net = make_net()
    g = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.randn(33, 3, 8, 8, generator=g)), batch_size=8)
    stats = {"cka": {}, "sparsity": {}, "invariance": {"transforms": {"noise": [GaussianNoise(0.1)]}}}
    ckpt = tmp_path / "rag.pt"
    with pytest.warns(RuntimeWarning, match=r"batch 4 has 1 sample.*'cka' needs >= 4.*'invariance' needs >= 2"):
        res = analyze(net, loader, layers=["0", "5"], stats=stats, checkpoint=ckpt, progress=False)
    assert res.skipped_small == {"cka": 1, "sparsity": 0, "invariance": 1}
    assert res.n_samples == 33 and res.n_batches == 5
    with torch.no_grad():
        feats = [[net[0](x), net(x)] for (x,) in loader]
    torch.testing.assert_close(res.cka, minibatch_cka_matrix(feats[:4]), atol=1e-6, rtol=0)  # the 4 full batches
    ref_sparsity = [torch.cat([(f[k] > 0).flatten() for f in feats]).double().mean() for k in (0, 1)]
    torch.testing.assert_close(res.sparsity, torch.stack(ref_sparsity), atol=1e-12, rtol=0)  # all 33 samples
    assert torch.load(ckpt, weights_only=True)["next_batch"] == 5
    resumed = analyze(net, loader, layers=["0", "5"], stats=stats, checkpoint=ckpt, progress=False)
    assert torch.equal(resumed.cka, res.cka) and resumed.skipped_small == res.skipped_small
    assert Results.load(res.save(tmp_path / "out")).skipped_small == res.skipped_small


def test_every_batch_too_small_names_the_statistic():
    with pytest.warns(RuntimeWarning, match="'cka' needs >= 4"):
        with pytest.raises(ValueError, match=r"every batch was too small for \['cka'\]"):
            analyze(make_net(), make_data(2, b=3), progress=False)


def _wide_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 9, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(9, 8, 3, stride=2),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


@pytest.mark.parametrize("first,second,what", [
    ({}, {"reduce": "avgpool"}, "reduce: 'flatten' in the checkpoint, 'avgpool' now"),
    ({"stats": {"invariance": {"cka": False}}}, {"stats": {"invariance": {"cka": True}}}, r"stats of \['invariance'\]"),
    ({}, {"compare_to": True}, "compare_to: 'absent' in the checkpoint, 'present' now"),
    ({"compare_to": True}, {}, "compare_to: 'present' in the checkpoint, 'absent' now"),
    ({"compare_to": True}, {"compare_to": True, "layers_b": ["0", "5"]}, "layers_b: "),
    ({}, {"model": _wide_net}, r"shapes of \['0', '2'\] differ"),
])
def test_resume_with_another_configuration_is_refused(tmp_path, first, second, what):
    """Only the statistic and layer names used to be compared: a resume with another reduce,
    options, compare_to, layers_b or layer widths silently mixed two analyses."""
    def run(cfg, **kw):
        cfg = dict(cfg)
        model = cfg.pop("model", make_net)()
        other = make_net(1) if cfg.pop("compare_to", False) else None
        return analyze(model, make_data(4), compare_to=other, checkpoint=tmp_path / "c.pt", progress=False,
                       **cfg, **kw)

    run(first, max_batches=2)
    with pytest.raises(ValueError, match=what) as e:
        run(second)
    assert "delete the file to start fresh" in str(e.value)
    resumed = run(first)  # the same configuration still resumes, equal to one uninterrupted run
    full = analyze(make_net(), make_data(4), compare_to=make_net(1) if first.get("compare_to") else None,
                   progress=False, **{k: v for k, v in first.items() if k != "compare_to"})
    for name in resumed.stats:
        assert str(resumed.values[name]) == str(full.values[name])


def test_checkpoint_of_an_older_version_resumes_with_a_warning(tmp_path):
    ckpt = tmp_path / "old.pt"
    analyze(make_net(), make_data(4), checkpoint=ckpt, max_batches=2, progress=False)
    state = torch.load(ckpt, weights_only=True)
    del state["config"]  # what versions before the configuration record wrote
    torch.save(state, ckpt)
    with pytest.warns(RuntimeWarning, match="older hierfast without a record of its configuration"):
        resumed = analyze(make_net(), make_data(4), checkpoint=ckpt, progress=False)
    assert torch.equal(resumed.cka, analyze(make_net(), make_data(4), progress=False).cka)


# -- checkpoints stay consistent with the counters ---------------------------------------------
def _interrupt_at(line_text, hit, offset=0):
    """A tracer raising KeyboardInterrupt (as Ctrl-C would) the ``hit``-th time analyze reaches
    the line ``offset`` lines after the one reading ``line_text``."""
    import hierfast.capture.engine as engine

    lines = open(engine.__file__).read().splitlines()
    target = [i for i, text in enumerate(lines, 1) if text.strip() == line_text][0] + offset
    hits = [0]

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target:
            hits[0] += 1
            if hits[0] == hit:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is engine.analyze.__code__ else None

    return tracer


@pytest.mark.parametrize("every", [1, 100])
def test_interrupt_after_the_update_before_the_counters_loses_nothing(tmp_path, every):
    """consistent was set before n_samples/n_batches/next_batch moved on: an interrupt there
    saved batch 2's sums with next_batch 2, and the resume counted batch 2 twice."""
    stats = ("cka", "sparsity")
    full = analyze(make_net(), make_data(6), stats=stats, progress=False)
    ckpt = tmp_path / "c.pt"
    sys.settrace(_interrupt_at("run.n_samples += n", hit=3))
    try:
        with pytest.raises(KeyboardInterrupt):
            analyze(make_net(), make_data(6), stats=stats, checkpoint=ckpt, checkpoint_every=every, progress=False)
    finally:
        sys.settrace(None)
    if every == 1:  # the checkpoint after batch 1 is kept, not overwritten from the half-counted state
        assert torch.load(ckpt, weights_only=True)["next_batch"] == 2
    resumed = analyze(make_net(), make_data(6), stats=stats, checkpoint=ckpt, checkpoint_every=every, progress=False)
    assert torch.equal(resumed.cka, full.cka) and torch.equal(resumed.sparsity, full.sparsity)
    assert resumed.n_samples == full.n_samples == 48 and resumed.n_batches == 6


def test_interrupt_in_the_skip_path_counts_the_skipped_batch_once(tmp_path):
    """An interrupt after n_skipped += 1 but before next_batch moved saved n_skipped 1 with
    next_batch at the skipped batch: the resume skipped it again (n_skipped 2)."""
    nan = [(torch.full((8, 3, 8, 8), float("nan")), torch.zeros(8, dtype=torch.long))]
    data = make_data(2) + nan + make_data(2, seed=3)
    with pytest.warns(RuntimeWarning, match="skipped 1 batch"):
        full = analyze(make_net(), data, on_nonfinite="skip", progress=False)
    ckpt = tmp_path / "s.pt"
    sys.settrace(_interrupt_at("run.n_skipped += 1", hit=1, offset=1))
    try:
        with pytest.raises(KeyboardInterrupt):
            analyze(make_net(), data, on_nonfinite="skip", checkpoint=ckpt, checkpoint_every=100, progress=False)
    finally:
        sys.settrace(None)
    with pytest.warns(RuntimeWarning, match="skipped 1 batch"):
        resumed = analyze(make_net(), data, on_nonfinite="skip", checkpoint=ckpt, progress=False)
    assert resumed.n_skipped == 1 and resumed.n_batches == full.n_batches == 4
    assert torch.equal(resumed.cka, full.cka)


def test_checkpoint_while_a_statistic_is_still_empty(tmp_path):
    """A first batch too small for CKA left its accumulator empty, and its state_dict() raised:
    no checkpoint could be written ("MinibatchCKA.state_dict() called before any update()")."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 3, 8, 8, generator=g), torch.zeros(3, dtype=torch.long))] + make_data(4)
    stats = ("cka", "sparsity")
    with pytest.warns(RuntimeWarning, match="'cka' needs >= 4"):
        full = analyze(make_net(), data, stats=stats, progress=False)
    ckpt = tmp_path / "c.pt"
    with pytest.warns(RuntimeWarning, match="'cka' needs >= 4"):
        with pytest.raises(ValueError, match=r"every batch was too small for \['cka'\]"):
            analyze(make_net(), data, stats=stats, checkpoint=ckpt, checkpoint_every=1, max_batches=1,
                    progress=False)
    assert torch.load(ckpt, weights_only=True)["states"]["cka"]["empty"]  # written, with CKA still empty
    resumed = analyze(make_net(), data, stats=stats, checkpoint=ckpt, checkpoint_every=1, progress=False)
    assert torch.equal(resumed.cka, full.cka) and torch.equal(resumed.sparsity, full.sparsity)
    assert resumed.skipped_small == {"cka": 1, "sparsity": 0} and resumed.n_samples == 35


def test_max_batches_below_the_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "m.pt"
    analyze(make_net(), make_data(6), checkpoint=ckpt, max_batches=4, progress=False)
    with pytest.raises(ValueError, match=r"max_batches=2 but checkpoint=.* already holds 4 batches.*"
                                         r"max_batches >= 4"):
        analyze(make_net(), make_data(6), checkpoint=ckpt, max_batches=2, progress=False)
    again = analyze(make_net(), make_data(6), checkpoint=ckpt, max_batches=4, progress=False)
    assert torch.equal(again.cka, analyze(make_net(), make_data(6), max_batches=4, progress=False).cka)


def test_corrupt_checkpoint_and_stale_temporary_files(tmp_path):
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"checkpoint=.*bad\.pt.* cannot be read.*delete it"):
        analyze(make_net(), make_data(2), checkpoint=ckpt, progress=False)
    ckpt = tmp_path / "c.pt"
    stale = [tmp_path / "c.pt.tmp999999", tmp_path / "c.pt.tmp4"]  # left by saves killed mid-write
    other = tmp_path / "c.rank1.pt.tmp5"  # another rank's file: not this checkpoint's
    for p in (*stale, other):
        p.write_bytes(b"partial")
    analyze(make_net(), make_data(2), checkpoint=ckpt, progress=False)
    assert not any(p.exists() for p in stale) and other.exists()


def _lazy_net():
    return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))


def test_lazy_model_analyzes_and_resumes(tmp_path):
    data = [torch.randn(16, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    torch.manual_seed(1)
    net = _lazy_net()
    r = analyze(net, data, progress=False)  # used to fail: the fingerprint read an uninitialized shape
    # reference: the same model, initialized by that first run
    assert r.cka.shape == (2, 2) and torch.equal(r.cka, analyze(net, data, progress=False).cka)
    ckpt = tmp_path / "lazy.pt"
    torch.manual_seed(1)
    analyze(_lazy_net(), data, checkpoint=ckpt, max_batches=2, progress=False)
    torch.manual_seed(1)  # the same weights again: the first forward of the resume initializes them
    resumed = analyze(_lazy_net(), data, checkpoint=ckpt, progress=False)
    torch.testing.assert_close(resumed.cka, r.cka, atol=1e-7, rtol=0)
    assert resumed.n_samples == 64


# -- distributed failures: every rank raises at once, checkpoints hold each rank's own shard -----
def _small_stats():
    from hierfast.transforms import GaussianNoise

    return {"cka": {}, "sparsity": {}, "invariance": {"transforms": {"noise": [GaussianNoise(0.1)]}, "cka": True}}


_SMALL_STATS = _small_stats()  # invariance with cka needs >= 4 samples: empty on rank 1 as well


def _failure_worker(rank, world, port, tmp):
    import datetime
    import time

    import hierfast.capture.statistics as statistics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # short timeout: a rank left waiting in a collective fails the test in seconds
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=15))
    out = {}
    try:
        # 1. Ctrl-C in compute(), after the states were summed: the rank files must keep the shard's sums
        shard = make_data(5)[:4] if rank == 0 else make_data(5)[4:]
        orig, calls = statistics.CKAStatistic.compute, [0]

        def flaky(self):
            calls[0] += 1
            if calls[0] == 1:
                raise KeyboardInterrupt
            return orig(self)

        statistics.CKAStatistic.compute = flaky
        try:
            analyze(make_net(), shard, stats=("cka", "sparsity"), checkpoint=f"{tmp}/s.pt", progress=False)
        except KeyboardInterrupt:
            pass
        statistics.CKAStatistic.compute = orig
        out["file_n"] = torch.load(f"{tmp}/s.rank{rank}.pt", weights_only=True)["n_samples"]
        r = analyze(make_net(), shard, stats=("cka", "sparsity"), checkpoint=f"{tmp}/s.pt", progress=False)
        out["resumed"] = (r.cka, r.sparsity, r.n_samples)
        # 2. rank 1's only batch is too small for CKA: it adds nothing to CKA, its samples to sparsity
        g = torch.Generator().manual_seed(5)
        small = [(torch.randn(3, 3, 8, 8, generator=g), torch.zeros(3, dtype=torch.long))]
        t0 = time.time()
        r = analyze(make_net(), make_data(2) if rank == 0 else small, stats=_SMALL_STATS, progress=False)
        out["small"] = (r.cka, r.sparsity, r.invariance, r.n_samples, r.skipped_small, time.time() - t0)
        # 3. too small for CKA on every rank: the same error everywhere, at once
        t0 = time.time()
        try:
            analyze(make_net(), small, stats=("cka", "sparsity"), progress=False)
        except ValueError as e:
            out["all_small"] = (str(e), time.time() - t0)
        # 4. rank 1's model raises mid-run: rank 0 raises too instead of waiting for the timeout
        t0 = time.time()
        try:
            analyze(DieAt(make_net(), at=1 if rank == 1 else -1), make_data(3), progress=False)
        except RuntimeError as e:
            out["failed"] = (str(e), time.time() - t0)
        # 5. rank 1's checkpoint is corrupt: a setup error; rank 0 raises too instead of waiting
        if rank == 1:
            with open(f"{tmp}/bad.rank1.pt", "wb") as f:
                f.write(b"PK\x03\x04 truncated")
        t0 = time.time()
        try:
            analyze(make_net(), make_data(3), checkpoint=f"{tmp}/bad.pt", progress=False)
        except (ValueError, RuntimeError) as e:
            out["setup"] = (str(e), time.time() - t0)
    finally:
        torch.save(out, f"{tmp}/out{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_failures(tmp_path):
    import warnings

    mp.spawn(_failure_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(2)]
    whole = analyze(make_net(), make_data(5), stats=("cka", "sparsity"), progress=False)
    g = torch.Generator().manual_seed(5)
    small = [(torch.randn(3, 3, 8, 8, generator=g), torch.zeros(3, dtype=torch.long))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        union = analyze(make_net(), make_data(2) + small, stats=_SMALL_STATS, progress=False)
    for r in range(2):
        o = got[r]
        # 1: the file holds the rank's own 32 / 8 samples, not the summed 40; the resume equals one process
        assert o["file_n"] == (32, 8)[r]
        cka, sparsity, n = o["resumed"]
        torch.testing.assert_close(cka, whole.cka, atol=1e-9, rtol=0)
        torch.testing.assert_close(sparsity, whole.sparsity, atol=1e-12, rtol=0)
        assert n == 40
        # 2: the empty CKA on rank 1 adds zeros (it used to leave rank 0 in the all_reduce until the timeout)
        cka, sparsity, inv, n, skipped, took = o["small"]
        torch.testing.assert_close(cka, union.cka, atol=1e-9, rtol=0)
        torch.testing.assert_close(sparsity, union.sparsity, atol=1e-12, rtol=0)
        torch.testing.assert_close(inv["noise"]["score"], union.invariance["noise"]["score"], atol=1e-9, rtol=0)
        torch.testing.assert_close(inv["noise"]["cka"], union.invariance["noise"]["cka"], atol=1e-9, rtol=0)
        assert n == 19 and skipped == {"cka": 1, "sparsity": 0, "invariance": 1} and took < 10
        msg, took = o["all_small"]
        assert "every batch was too small for ['cka']" in msg and took < 10
        # 4: the failing rank raises its own error, the other says which rank failed
        msg, took = o["failed"]
        assert ("simulated failure" if r == 1 else "rank(s) [1] failed during analyze") in msg and took < 10
        # 5: the corrupt file's rank names it, the other says which rank failed (was: the timeout)
        msg, took = o["setup"]
        assert ("cannot be read" if r == 1 else "rank(s) [1] failed during analyze") in msg and took < 10
