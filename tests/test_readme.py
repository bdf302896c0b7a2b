"""The README's quick-start code runs as written (in a temporary directory)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 3, "the README lost its quick-start code"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for i, code in enumerate(blocks):  # later blocks may use names from earlier ones, as a reader would
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), scope)
        except Exception as e:  # pragma: no cover - the failure message is the point
            pytest.fail(f"README python block {i + 1} failed: {type(e).__name__}: {e}")
    assert (tmp_path / "out" / "results.json").exists()
