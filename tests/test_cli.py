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


@pytest.mark.slow
def test_demo_quick_prints_cka_table(capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "relu1" in out and "logits" in out
    table = [line for line in out.splitlines() if line.startswith("relu1 ")]
    values = [float(v) for v in table[0].split()[1:]]
    assert values[0] == pytest.approx(1.0, abs=1e-9)  # self-similarity on the diagonal


def test_bench_unknown_name_lists_available():
    r = subprocess.run([sys.executable, "-m", "hierfast", "bench", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown benchmark" in r.stderr and "cka" in r.stderr


def test_bench_all_cannot_mix_with_names(capsys):
    assert main(["bench", "all", "cka"]) == 2
    assert "'all' cannot be combined" in capsys.readouterr().err
