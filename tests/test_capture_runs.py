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
