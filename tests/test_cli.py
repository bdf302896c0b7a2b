"""The console entry points run end to end."""
import json
import re
import subprocess
import sys

import pytest

from hierfast.cli import main


def test_info_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "reference" in out and "cpu" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["backends"]) == {"reference", "cpu", "triton", "cuda"}


def test_unknown_subcommand_exits_with_usage():
    r = subprocess.run([sys.executable, "-m", "hierfast", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_demo_quick_writes_report_with_the_hierarchy(tmp_path, capsys):
    """The demo's measurable claims, asserted on its results.json (quick mode, same code path)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "report:" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    a = saved["analysis"]
    assert a["accuracy"] >= 0.95
    assert a["layers"][0] == "conv1" and a["layers"][-1] == "head"
    assert (tmp_path / "report.html").stat().st_size > 10_000
    # the seed's hierarchy, measured on held-out digits (margins in quick mode, seed 0: probe rank
    # correlation +0.76 vs 0.5 needed; translation NIS 0.67 bottom vs 0.95 top; adjacent CKA 0.94 vs
    # 0.75 distant; CKA to initialisation 0.99 bottom vs 0.50 top)
    verdicts = {p["name"]: p["holds"] for p in saved["patterns"]}
    assert verdicts == {"probe_rises_with_depth": True, "translation_invariance_rises": True,
                        "adjacent_layers_more_similar": True, "training_changes_upper_layers": True}
    assert set(a["invariance"]) == {"translate", "rotate", "noise", "blur"}
    assert len(a["probe"]["selectivity"]) == len(a["layers"])
    assert len(a["dimension"]["twonn"]) == len(a["layers"]) and min(a["dimension"]["twonn"]) > 1
    # the meta reports how many held-out images the statistics saw (whole batches of 60 only)
    held = int(re.search(r"(\d+) held-out images", a["meta"]["data"]).group(1))
    assert a["n_samples"] == held // 60 * 60 and f"statistics on the {held // 60 * 60}" in a["meta"]["data"]


def test_bench_unknown_name_lists_available():
    r = subprocess.run([sys.executable, "-m", "hierfast", "bench", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown benchmark" in r.stderr and "cka" in r.stderr


def test_bench_all_cannot_mix_with_names(capsys):
    assert main(["bench", "all", "cka"]) == 2
    assert "'all' cannot be combined" in capsys.readouterr().err


def test_demo_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    """A second run of the same configuration loads the trained weights instead of training;
    --restart retrains. Training is stubbed after the first run to prove it is skipped."""
    import hierfast.demo as demo

    out = tmp_path / "d"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert (out / "checkpoint" / "trained.pt").is_file()
    capsys.readouterr()

    def no_training(*a, **k):
        raise AssertionError("training ran although a checkpoint of this configuration exists")

    monkeypatch.setattr(demo, "train", no_training)
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    second = json.loads((out / "results.json").read_text())
    assert second["analysis"]["accuracy"] == first["analysis"]["accuracy"]
    assert second["analysis"]["cka"] == first["analysis"]["cka"]
    with pytest.raises(AssertionError, match="training ran"):
        main(["demo", "--quick", "--out", str(out), "--no-progress", "--restart"])


def test_demo_unwritable_out_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["demo", "--quick", "--out", str(blocker / "sub"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hierfast demo: cannot write to") and "--out" in err and "\n" not in err


FACTORIES = """
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

def data():
    return [torch.randn(16, 6) for _ in range(2)]
"""


@pytest.mark.parametrize("extra,message", [
    (["--stats", "bogus"], r"--stats: unknown statistic\(s\) \['bogus'\]; available: \[.*'cka'"),
    (["--layers", "nosuch"], "has no submodule named 'nosuch'"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--model", "cli_factories:data"], "--model 'cli_factories:data' gave a list, not a torch.nn.Module"),
    (["--model", "cli_factories:nothing"], "cannot load --model 'cli_factories:nothing'"),
    (["--model", "nocolon"], "--model must look like pkg.module:function"),
])
def test_analyze_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, extra, message):
    import re

    (tmp_path / "cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["analyze", "--model", "cli_factories:model", "--data", "cli_factories:data", "--out",
            str(tmp_path / "o"), "--no-progress"]
    i = args.index("--model")
    if extra[0] == "--model":
        args[i + 1] = extra[1]
    else:
        args += extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hierfast analyze: ") and "\n" not in err and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "results.json").exists()


def test_analyze_max_batches_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "m:f", "--data", "m:f", "--out", "o", "--max-batches", "0"])
    assert e.value.code == 2 and "--max-batches: must be a positive integer, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ('{"something": "else"}', r"is not a results.json written by Results.save \(no \['layers', 'values'\]\)"),
    ("[1, 2]", "is not a results.json written by Results.save"),
])
def test_report_of_a_corrupt_or_foreign_json_is_one_line_exit_2(tmp_path, capsys, content, message):
    import re

    (tmp_path / "results.json").write_text(content)
    r = subprocess.run([sys.executable, "-m", "hierfast", "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("hierfast report: ") and "\n" not in err and re.search(message, err), err


def test_demo_seed_reaches_the_invariance_draws():
    """measure(seed=...) passes the seed to the invariance statistic, not only to the transforms."""
    import torch
    from torch import nn

    from hierfast import transforms as T
    from hierfast.demo_analysis import measure

    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x, y = torch.randn(120, 1, 8, 8, generator=g), torch.arange(120) % 3
    scores = [measure(net, net, x, y, layers=["2", "3"], quick=True, seed=s, progress=False, n_classes=3,
                      transforms={"rotate": [T.Rotate(30, seed=1)]})["invariance"]["rotate"]["score"]
              for s in (0, 1)]
    assert not torch.allclose(scores[0], scores[1])


def test_demo_summary_words_agree_with_the_report(capsys):
    import torch

    from hierfast.demo import _print_summary
    from hierfast.report.html import _pattern_table

    patterns = [{"holds": None, "undefined": ["conv3"], "statement": "s1", "evidence": "e1"},
                {"holds": None, "statement": "s2", "evidence": "not measured"},
                {"holds": False, "statement": "s3", "evidence": "e3"}]
    a = {"meta": {"data": "d"}, "accuracy": 0.5, "layers": ["conv1", "conv2"], "cka": torch.eye(2)}
    _print_summary(a, {"patterns": patterns})
    out = capsys.readouterr().out
    table = _pattern_table(patterns)
    for word in ("undefined", "not measured", "does not hold"):
        assert f"[{word}]" in out and f">{word}</td>" in table


BUGGY = FACTORIES + """

class Buggy(nn.Module):
    def forward(self, x):
        return {"a": x}["b"]  # a bug in the user's model: KeyError('b')

def buggy_model():
    return nn.Sequential(nn.Linear(6, 8), Buggy())

def buggy_data():
    raise ValueError("bad shard")  # a bug in the user's data factory
"""


@pytest.mark.parametrize("flag,spec,error", [("--model", "cli_buggy:buggy_model", KeyError),
                                             ("--data", "cli_buggy:buggy_data", ValueError)])
def test_analyze_bugs_in_the_users_code_keep_their_traceback(tmp_path, monkeypatch, capsys, flag, spec, error):
    (tmp_path / "cli_buggy.py").write_text(BUGGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = {"--model": "cli_buggy:model", "--data": "cli_buggy:data", flag: spec}
    with pytest.raises(error):  # was: "hierfast analyze: b", exit 2, no traceback
        main(["analyze", *(x for kv in args.items() for x in kv), "--out", str(tmp_path / "o"), "--no-progress"])
    assert "hierfast analyze:" not in capsys.readouterr().err


def test_analyze_cuda_device_without_cuda_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["analyze", "--model", "cli_factories:model", "--data", "cli_factories:data", "--out",
                 str(tmp_path / "o"), "--no-progress", "--device", "cuda"]) == 2
    assert "--device 'cuda': CUDA is not available here" in capsys.readouterr().err
