"""Build of hierfast's compiled core.

Two pybind11 modules, neither linking libtorch (DESIGN.md principle 1):

* ``hierfast._C``      C++17 + OpenMP kernels from ``csrc/cpu`` (always built).
* ``hierfast._C_cuda`` CUDA kernels from ``csrc/cuda`` (built when nvcc is found),
  linked against the static CUDA runtime so it imports on machines without a GPU.

Switches (environment variables):

* ``HIERFAST_CUDA=auto|0|1``  auto (default): build CUDA when nvcc is found;
  0: never; 1: required (the build fails without nvcc).
* ``CUDA_HOME`` / ``CUDA_PATH``  the toolkit root (else ``/usr/local/cuda``, else nvcc on PATH).
* ``HIERFAST_CUDA_ARCHS``  semicolon list of SM versions, default ``80;90`` (+ PTX of the last).
* ``MAX_JOBS``  parallel compile jobs (default: CPU count).

Objects are compiled by ninja when it is installed, else by a thread pool; the
resolved configuration is printed at the start of the build.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _log(msg: str) -> None:
    print(f"[hierfast build] {msg}", flush=True)


def find_cuda_home() -> Path | None:
    """Locate the CUDA toolkit. The nvcc on PATH may be a wrapper script, so the
    toolkit is found through CUDA_HOME or its standard directory first."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            p = Path(os.environ[var])
            if (p / "bin" / "nvcc").exists():
                return p
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists():
        return default
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        if real.parent.name == "bin" and (real.parent.parent / "include").exists():
            return real.parent.parent
        # A wrapper script: read the path it execs.
        try:
            text = Path(nvcc).read_text(errors="ignore")
            for tok in shlex.split(text.replace("\n", " ")):
                if tok.endswith("/bin/nvcc") and Path(tok).exists():
                    return Path(tok).parent.parent
        except (OSError, ValueError):
            pass
    return None


def cuda_mode() -> str:
    mode = os.environ.get("HIERFAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"HIERFAST_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _sources(pattern: str) -> list[str]:
    """Sources relative to setup.py (setuptools refuses absolute paths)."""
    return sorted(p.relative_to(ROOT).as_posix() for p in CSRC.glob(pattern))


class HierfastBuildExt(build_ext):
    """Compiles every object ourselves (ninja or a thread pool), then links."""

    def run(self):  # noqa: D102 - setuptools hook
        self.cuda_home = None
        mode = cuda_mode()
        if mode != "0":
            self.cuda_home = find_cuda_home()
            if self.cuda_home is None and mode == "1":
                raise SystemExit("HIERFAST_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME.")
        archs = os.environ.get("HIERFAST_CUDA_ARCHS", "80;90")
        self.cuda_archs = [a.strip() for a in archs.split(";") if a.strip()]
        self.jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        self.ninja = shutil.which("ninja")
        if self.cuda_home is None:
            # Keep the extension list in sync with what is actually built.
            self.extensions = [e for e in self.extensions if e.name != "hierfast._C_cuda"]
        _log(
            "configuration: "
            f"cxx={self._cxx()} openmp=on cuda={'on (' + str(self.cuda_home) + ', sm ' + ','.join(self.cuda_archs) + ' + PTX)' if self.cuda_home else 'off (' + ('HIERFAST_CUDA=0' if mode == '0' else 'nvcc not found') + ')'} "
            f"compiler-driver={'ninja' if self.ninja else 'thread pool'} jobs={self.jobs}"
        )
        if self.cuda_home is None:
            _log("building CPU-only: hierfast._C_cuda is not built (hierfast.info() will say so)")
        super().run()

    # -- toolchain -------------------------------------------------------
    def _cxx(self) -> str:
        return os.environ.get("CXX") or sysconfig.get_config_var("CXX").split()[0] or "c++"

    def _cxx_flags(self) -> list[str]:
        import pybind11

        return [
            "-std=c++17", "-O3", "-fPIC", "-fopenmp", "-fvisibility=hidden",
            "-Wall", "-Wno-unknown-pragmas",
            f"-I{CSRC / 'include'}", f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
        ]

    def _nvcc_flags(self) -> list[str]:
        flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                 f"-I{CSRC / 'include'}"]
        for a in self.cuda_archs:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        last = self.cuda_archs[-1]
        flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
        return flags

    # -- compile ---------------------------------------------------------
    def _compile_commands(self, ext: Extension, obj_dir: Path) -> list[tuple[list[str], Path, Path]]:
        cmds = []
        for rel in ext.sources:
            src = ROOT / rel
            obj = obj_dir / (rel.replace("/", "_") + ".o")
            if src.suffix == ".cu":
                nvcc = str(self.cuda_home / "bin" / "nvcc")
                cmd = [nvcc, *self._nvcc_flags(), "-c", str(src), "-o", str(obj)]
            else:
                cmd = [self._cxx(), *self._cxx_flags(), *ext.extra_compile_args, "-c", str(src), "-o", str(obj)]
            cmds.append((cmd, src, obj))
        return cmds

    def _run_ninja(self, cmds, obj_dir: Path) -> None:
        lines = ["ninja_required_version = 1.3", ""]
        # every object also depends on every header (csrc/include): a changed act.h must rebuild
        # the kernels that include it (a whole rebuild takes about a minute)
        headers = " ".join(str(h) for h in sorted((CSRC / "include").rglob("*.h*")))
        for i, (cmd, src, obj) in enumerate(cmds):
            lines += [f"rule r{i}", f"  command = {shlex.join(cmd)}", f"  description = compile {src.name}", "",
                      f"build {obj}: r{i} {src} | {headers}", ""]
        (obj_dir / "build.ninja").write_text("\n".join(lines))
        subprocess.run([self.ninja, "-C", str(obj_dir), f"-j{self.jobs}"], check=True)

    def _run_pool(self, cmds) -> None:
        def one(item):
            cmd, src, _ = item
            _log(f"compile {src.relative_to(ROOT)}")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"compiling {src} failed:\n{shlex.join(cmd)}\n{res.stdout}\n{res.stderr}")
            if res.stderr.strip():
                print(res.stderr, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(one, cmds))

    def build_extension(self, ext: Extension) -> None:
        obj_dir = Path(self.build_temp).resolve() / ext.name.replace(".", "_")
        obj_dir.mkdir(parents=True, exist_ok=True)
        cmds = self._compile_commands(ext, obj_dir)
        if self.ninja:
            self._run_ninja(cmds, obj_dir)
        else:
            self._run_pool(cmds)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [self._cxx(), "-shared", "-fopenmp", *[str(o) for _, _, o in cmds], "-o", str(out)]
        if ext.name == "hierfast._C_cuda":
            # Static cudart: the module imports without a GPU and loads the driver lazily.
            link += [f"-L{self.cuda_home / 'lib64'}", "-lcudart_static", "-lrt", "-ldl", "-lpthread"]
        _log(f"link {out.name}")
        subprocess.run(link, check=True)


def extensions() -> list[Extension]:
    return [
        Extension("hierfast._C", ["csrc/bindings.cpp", *_sources("cpu/*.cpp")]),
        Extension("hierfast._C_cuda", ["csrc/cuda_bindings.cpp", *_sources("cuda/*.cu")]),
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": HierfastBuildExt})
