"""csrc/cuda/conv_act.cu's kernels run on the CPU under a host emulation of the CUDA features
they use (tests/cuda_emu/cuda_emu.h): their indexing, per-block reductions, barriers and
launch plans against a plain loop, on every machine, GPU or not. (On a GPU the real kernels
are tested too: tests/test_nn_epilogue_kernels.py.)"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
LAUNCH = re.compile(r"(\w+_kernel<[^<>]*>)<<<([^,>]+), ([^,>]+), 0, st>>>")


def _emulated_source(src: str) -> tuple[str, int]:
    """The .cu source with every ``kernel<...><<<grid, block, 0, st>>>(args)`` made
    ``emu::launch(grid, block, kernel<...>)(args)``, and how many launches it rewrote."""
    return LAUNCH.subn(r"emu::launch(\2, \3, \1)", src)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
def test_cuda_conv_epilogue_kernels_under_host_emulation(tmp_path):
    src, launches = _emulated_source((ROOT / "csrc" / "cuda" / "conv_act.cu").read_text())
    # four launches (forward and backward, 32- and 64-bit indices): a changed launch syntax must
    # fail here, not leave kernels unemulated
    assert launches == 4 and "<<<" not in src, launches
    (tmp_path / "conv_act_emu.cpp").write_text(src)
    exe = tmp_path / "conv_act_emu"
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", f"-I{tmp_path}", f"-I{EMU}",
                            f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc' / 'include'}",
                            str(EMU / "conv_act_harness.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "failures: 0" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
