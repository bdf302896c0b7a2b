"""The console entry points run end to end."""
import json
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


def test_bench_unknown_name_lists_available():
    r = subprocess.run([sys.executable, "-m", "hierfast", "bench", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown benchmark" in r.stderr and "cka" in r.stderr


def test_bench_all_cannot_mix_with_names(capsys):
    assert main(["bench", "all", "cka"]) == 2
    assert "'all' cannot be combined" in capsys.readouterr().err
