"""csrc/cuda's kernels run on the CPU under a host emulation of the CUDA features they use
(tests/cuda_emu/cuda_emu.h): their indexing, per-block reductions, barriers, warp shuffles and
launch plans, against plain loops or the CPU kernels, on every machine, GPU or not. (On a GPU the
real kernels are tested too: tests/test_nn_epilogue_kernels.py, tests/test_ops.py.)"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")


def _split_top_level(s: str) -> list[str]:
    """``s`` split at the commas outside any brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def emulated_source(src: str) -> tuple[str, int]:
    """``src`` with every ``kernel<...><<<grid, block[, smem, stream]>>>(args)`` made
    ``emu::launch(grid, block, kernel<...>)(args)``; and how many launches it rewrote."""
    out, count, pos = "", 0, 0
    while (start := src.find("<<<", pos)) >= 0:
        end = src.index(">>>", start)
        k = start  # the kernel expression ends here: identifier, optionally <template args>
        if src[k - 1] == ">":
            depth = 0
            while True:
                k -= 1
                depth += {">": 1, "<": -1}.get(src[k], 0)
                if depth == 0:
                    break
        while k > 0 and (src[k - 1].isalnum() or src[k - 1] in "_:"):
            k -= 1
        grid, block = _split_top_level(src[start + 3:end])[:2]
        out += src[pos:k] + f"emu::launch({grid}, {block}, {src[k:start]})"
        pos, count = end + 3, count + 1
    return out + src[pos:], count


def _build(tmp_path: Path, name: str, harness: str, cuda_sources: list[str], cpu_sources: list[str],
           launches: int) -> Path:
    flags = ["-std=c++20", "-O1", "-pthread", "-fopenmp", f"-I{EMU}", f"-I{EMU / 'include'}",
             f"-I{ROOT / 'csrc' / 'include'}"]
    objs = []
    total = 0
    for rel in cuda_sources:
        src, n = emulated_source((ROOT / rel).read_text())
        total += n
        assert "<<<" not in src, rel
        cpp = tmp_path / (Path(rel).stem + "_emu.cpp")
        cpp.write_text(src)
        objs.append(cpp)
    # a changed launch syntax must fail here, not leave a kernel unemulated
    assert total == launches, f"rewrote {total} launches in {cuda_sources}, expected {launches}"
    exe = tmp_path / name
    cmd = ["g++", *flags, "-include", str(EMU / "cuda_emu.h"), *map(str, objs),
           *(str(ROOT / s) for s in cpu_sources), str(EMU / harness), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return exe


def _run(exe: Path):
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "failures: 0" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]


def test_launch_rewriter():
    src = "a<<<g, b, 0, st>>>(x); f<T, int64_t><<<dim3(kC, kR), 256, 0, s>>>(y, z);"
    out, n = emulated_source(src)
    assert n == 2 and out == ("emu::launch(g, b, a)(x); emu::launch(dim3(kC, kR), 256, f<T, int64_t>)(y, z);")


def test_cuda_conv_epilogue_kernels_under_host_emulation(tmp_path):
    """Every element, the statistics and bias-gradient reductions, NCHW/NHWC, bias, in place, odd
    shapes (the forward and backward launches: 2, each for 32- and 64-bit indices)."""
    _run(_build(tmp_path, "conv_act", "conv_act_harness.cpp", ["csrc/cuda/conv_act.cu"], [], launches=2))


def test_cuda_stats_kernels_under_host_emulation(tmp_path):
    """Gram epilogue, column centring and channel top-k against the CPU kernels; the 2-NN
    screen against a brute force."""
    _run(_build(tmp_path, "kernels", "kernels_harness.cpp",
                ["csrc/cuda/gram_epilogue.cu", "csrc/cuda/center.cu", "csrc/cuda/channel_topk.cu",
                 "csrc/cuda/knn2.cu"],
                ["csrc/cpu/gram_epilogue.cpp", "csrc/cpu/center.cpp", "csrc/cpu/channel_topk.cpp"],
                launches=3 + 3 + 1 + 2))
