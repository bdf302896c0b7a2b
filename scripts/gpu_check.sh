#!/usr/bin/env bash
# One prepared GPU check for a session that is lent a GPU machine for a few minutes:
#
#   bash scripts/gpu_check.sh          # from the repository root (or anywhere: it cd's there)
#
# Stages, in this order (each under `timeout`, all inside one global deadline):
#   info          nvidia-smi -L, python/torch/triton/setuptools/pybind11/nvcc versions
#   build         the compiled core in place, CUDA required, sm_90 (setup.py build_ext --inplace:
#                 no pip, no network, no build isolation, nothing written to site-packages)
#   import        hierfast._C and hierfast._C_cuda import from this tree; the cuda and triton
#                 backends are available; a tiny conv2d_act on cuda and triton matches torch
#   tests-conv    pytest: CUDA conv epilogue, Triton conv kernels, required backends
#   tests-kernels pytest: gram/centre, knn2, channel_topk, CKA, transforms (CUDA + Triton cases)
#   bench-conv    benchmarks/run.py conv, one run per layer filter, most important first,
#                 merged into $OUT/conv.json and one Markdown table in the log
#   bench-others  benchmarks/run.py resnet_step|cka|capture|dimension|visualize --quick, while
#                 time remains (resnet_step trains on the GPU; the other four run on the CPU even
#                 on a GPU machine: they time the host)
# It ends with a summary table (stage, status, exit code, seconds, budget, note) as the last
# lines and exits 0 even when a stage failed, so that the log always comes back.
#
# The build writes hierfast/_C*.so into this tree: for a trial on a machine whose tree others
# use, run a copy of the tree, or skip the build (GPU_CHECK_SKIP=build). A trial without GPU:
#   PYTHON=.venv/bin/python GPU_CHECK_REQUIRE_GPU=0 HIERFAST_REQUIRE_BACKENDS=cpu,cuda-compiled \
#     GPU_CHECK_TOTAL_S=200 bash scripts/gpu_check.sh
#
# What it leaves under $OUT (default ./gpu-out; at most 7 files, within the device tool's 8):
#   gpu_check.log  the full log        junit.xml  the pytest results of both test stages
#   conv.json      the conv rows       cka.json capture.json dimension.json visualize.json
#
# Environment overrides (seconds unless said otherwise):
#   PYTHON=python3                 interpreter (the GPU machine's python3 holds torch)
#   GPU_CHECK_REV=<sha>            printed in the log (the copied tree has no .git there)
#   GPU_CHECK_TOTAL_S=565          global deadline; no stage starts or runs past it
#   GPU_CHECK_STAGES="info build import tests-conv tests-kernels bench-conv bench-others"
#   GPU_CHECK_SKIP=""              stage names to skip, e.g. "build" when already built
#   GPU_CHECK_INFO_S=60 GPU_CHECK_BUILD_S=150 GPU_CHECK_IMPORT_S=90
#   GPU_CHECK_TESTS_S=240          pool shared by the two test stages, in order
#   GPU_CHECK_TESTS_CONV_S=150 GPU_CHECK_TESTS_KERNELS_S=150   cap of each test stage
#   GPU_CHECK_TEST_TIMEOUT_S=90    per test (pytest-timeout, when installed)
#   GPU_CHECK_XDIST=4              pytest-xdist processes per test stage (0: one process)
#   GPU_CHECK_CONV_S=240           bench-conv stage; GPU_CHECK_CONV_MIN_S=30: no new layer run
#                                  starts with less left than this
#   GPU_CHECK_CONV_FILTERS="dw3x3;stem;1x1 64->256 @56;3x3 64 @56;3x3 128 @28;3x3 256 @14"
#                                  ';'-separated HIERFAST_CONV_LAYERS filters, run in order
#   GPU_CHECK_CONV_QUICK=0         1: pass --quick (N=8, stem and dw3x3 32 only)
#   GPU_CHECK_MAX_AUTOTUNE=0       1: also time torch.compile(mode="max-autotune") (the issue's
#                                  provider; its autotuning takes minutes per layer, so give the
#                                  stage a whole call: GPU_CHECK_STAGES="info build bench-conv")
#   GPU_CHECK_OTHERS="resnet_step cka capture dimension visualize"   GPU_CHECK_OTHER_S=90 (cap of each)
#   GPU_CHECK_REQUIRE_GPU=1        0: the import stage does not demand a GPU (local trials)
#   HIERFAST_REQUIRE_BACKENDS=cpu,triton,cuda,cuda-compiled   (tests/test_backends.py)
#   HIERFAST_CUDA=1 HIERFAST_CUDA_ARCHS=90 MAX_JOBS=$(nproc)  (setup.py's own switches)
#   GPU_CHECK_STRICT=0             1: exit 1 when a stage failed
# shellcheck disable=SC2329  # the stage bodies are run by name, through `bash -c`
set -u

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
OUT=${OUT:-$(dirname "$SELF")/../gpu-out}   # a relative OUT is taken from the caller's directory
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$SELF")/.." || exit 1
ROOT=$(pwd)

# Re-run this script with everything it prints going through tee: the log in $OUT is
# complete even if the caller's time limit kills the call (what is under $OUT comes back).
if [ "${_GPU_CHECK_TEED:-0}" != 1 ]; then
  export _GPU_CHECK_TEED=1 OUT
  bash "$SELF" "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi

export PYTHONUNBUFFERED=1          # Python's output in the log as it happens, not at exit
export PYTHONDONTWRITEBYTECODE=1
export TQDM_DISABLE=1
# Triton must compile for the GPU, and no backend may be forced: the check is of the
# automatic dispatch and of each backend as the tests force it.
unset TRITON_INTERPRET HIERFAST_BACKEND
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # hierfast from this tree (in-place build)

PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 4)
TOTAL=${GPU_CHECK_TOTAL_S:-565}
RESERVE=12                         # kept for the junit merge and the summary at the end
STAGES=${GPU_CHECK_STAGES:-"info build import tests-conv tests-kernels bench-conv bench-others"}
SKIP=" ${GPU_CHECK_SKIP:-} "
TESTS_POOL=${GPU_CHECK_TESTS_S:-240}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PY NPROC ROOT OUT WORK
T0=$SECONDS

left() { echo $((TOTAL - RESERVE - (SECONDS - T0))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
banner() { printf '\n========== %s  (t=%ds) ==========\n' "$*" $((SECONDS - T0)); }

# ---------------------------------------------------------------- stage bodies
# Each body runs in its own `bash -c` under `timeout`, so it gets exported functions and
# variables only. `timeout` signals the whole process group, so python children die too.

stage_info() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L || echo "nvidia-smi -L failed: no GPU visible"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
  fi
  echo "host: $(uname -srm), $NPROC cores; python: $(command -v "$PY")"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
  command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: not found (thread-pool build)"
  if [ -d "$ROOT/.git" ]; then
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)," \
      "$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed paths"
  else
    echo "git: no .git in this copy of the tree; GPU_CHECK_REV=${GPU_CHECK_REV:-<not given>}"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for dist in ("torch", "triton", "setuptools", "pybind11", "pytest", "pytest-timeout", "pytest-xdist",
             "numpy", "tqdm", "scikit-learn", "matplotlib"):
    try:
        print(f"{dist:<15} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist:<15} NOT INSTALLED")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB,",
          f"{p.multi_processor_count} SMs")
EOF
}

stage_build() {
  # setup.py's switches: CUDA required, Hopper only (one arch halves nvcc's time), all cores.
  export HIERFAST_CUDA=${HIERFAST_CUDA:-1} HIERFAST_CUDA_ARCHS=${HIERFAST_CUDA_ARCHS:-90}
  export MAX_JOBS=${MAX_JOBS:-$NPROC}
  echo "HIERFAST_CUDA=$HIERFAST_CUDA HIERFAST_CUDA_ARCHS=$HIERFAST_CUDA_ARCHS MAX_JOBS=$MAX_JOBS"
  # build_ext --inplace rather than `pip install -e .`: no index, no build isolation and no
  # write to site-packages are needed; the modules land in hierfast/ and PYTHONPATH finds them.
  "$PY" setup.py build_ext --inplace 2>&1 | tee "$WORK/build.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ] && grep -qiE "configuration error|project\.license|pyproject" "$WORK/build.log"; then
    # An older setuptools that rejects pyproject.toml's metadata (PEP 639 license string):
    # build from a copy of setup.py and csrc/ without pyproject.toml, then copy the modules.
    echo "[gpu_check] build failed on pyproject.toml metadata; retrying without it"
    local tmp="$WORK/build-src"
    mkdir -p "$tmp/hierfast" && cp -r "$ROOT/setup.py" "$ROOT/csrc" "$tmp/" \
      && (cd "$tmp" && "$PY" setup.py build_ext --inplace) && cp "$tmp"/hierfast/_C*.so "$ROOT/hierfast/"
    rc=$?
  fi
  ls -l "$ROOT"/hierfast/_C*.so 2>/dev/null
  return "$rc"
}

stage_import() {
  "$PY" - <<'EOF'
import os, sys
import torch
import hierfast
import hierfast._C  # noqa: F401  (the CPU module)
root = os.environ["ROOT"]
print("hierfast from", os.path.dirname(hierfast.__file__))
assert os.path.realpath(hierfast.__file__).startswith(os.path.realpath(root)), "hierfast is not this tree's"
print(hierfast.format_info())
try:
    import hierfast._C_cuda  # noqa: F401
    print("hierfast._C_cuda imports")
except ImportError as exc:
    sys.exit(f"FAIL: hierfast._C_cuda does not import: {exc}")
if os.environ.get("GPU_CHECK_REQUIRE_GPU", "1") == "0" and not torch.cuda.is_available():
    print("no GPU, and GPU_CHECK_REQUIRE_GPU=0: imports checked, GPU smoke test skipped")
    sys.exit(0)
bad = [b for b in ("cuda", "triton") if not hierfast.info()["backends"][b]["available"]]
if bad:
    sys.exit(f"FAIL: backends not available: {bad}")
# Smoke: one small fused conv on each GPU backend against torch in float64, so that a
# broken kernel shows here even if the test stages run out of time.
import torch.nn.functional as F
from hierfast.functional import conv2d_act
torch.manual_seed(0)
x = torch.randn(2, 8, 12, 12, device="cuda")
w = torch.randn(16, 8, 3, 3, device="cuda") / 8
b = torch.randn(16, device="cuda")
ref = F.gelu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
worst = 0.0
for backend in ("cuda", "triton"):
    y = conv2d_act(x, w, b, padding=1, activation="gelu", backend=backend)
    torch.cuda.synchronize()
    dev = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"smoke conv2d_act gelu backend={backend}: max rel dev {dev:.1e}")
    worst = max(worst, dev)
# float32 Triton convs use TF32 tensor cores (~1e-3): the smoke only catches broken kernels.
sys.exit(0 if worst < 1e-2 else "FAIL: smoke conv deviates")
EOF
}

run_pytest() {  # run_pytest NAME FILES...: junit into $WORK, short report in the log
  local name=$1; shift
  local extra=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    extra+=(--timeout="${GPU_CHECK_TEST_TIMEOUT_S:-90}")
  else
    echo "[gpu_check] pytest-timeout not installed: no per-test time limit, only the stage's"
  fi
  # Triton compiles each kernel specialisation (and autotunes the conv's tiles) on the host
  # CPU: spread the tests over a few processes when pytest-xdist is there (16 cores).
  local nx=${GPU_CHECK_XDIST:-4}
  if [ "$nx" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    extra+=(-n "$nx")
    # share the cores among the workers: OpenMP (hierfast._C, torch) oversubscribed spins
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( NPROC / nx > 0 ? NPROC / nx : 1 ))}
    echo "pytest-xdist: $nx workers, OMP_NUM_THREADS=$OMP_NUM_THREADS"
  elif [ "$nx" != 0 ]; then
    echo "[gpu_check] pytest-xdist not installed: tests run in one process"
  fi
  export HIERFAST_REQUIRE_BACKENDS=${HIERFAST_REQUIRE_BACKENDS:-cpu,triton,cuda,cuda-compiled}
  echo "HIERFAST_REQUIRE_BACKENDS=$HIERFAST_REQUIRE_BACKENDS TRITON_INTERPRET=${TRITON_INTERPRET:-<unset>}"
  # -q with -rfEs: failures, errors and every skip with its reason in the short summary;
  # no -x, so one failure does not hide the others; durations say where the time went.
  # The stage's timeout sends SIGINT: pytest then stops, prints its summary and still writes
  # the junit file. Python ignores SIGINT when started with it ignored (a background job of
  # a non-interactive shell), so the handler is installed explicitly.
  "$PY" -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' \
    -q -rfEs -p no:cacheprovider --durations=15 \
    --junitxml="$WORK/junit-$name.xml" -o junit_suite_name="$name" "${extra[@]}" "$@"
  local rc=$?
  "$PY" - "$WORK/junit-$name.xml" >"$WORK/note" 2>/dev/null <<'EOF' || echo "no junit file" >"$WORK/note"
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r[0]
n = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
print(f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
      f"{n['errors']} errors, {n['skipped']} skipped")
EOF
  return "$rc"
}
stage_tests_conv() {  # test_nn_triton last: its autotuned kernels compile the longest
  run_pytest tests-conv tests/test_backends.py tests/test_nn_epilogue_kernels.py tests/test_nn_functional.py \
    tests/test_nn_triton.py
}
stage_tests_kernels() {
  run_pytest tests-kernels tests/test_ops.py tests/test_knn2.py tests/test_visualize_topk_kernel.py \
    tests/test_cka.py tests/test_transforms.py
}

stage_bench_conv() {
  # One run.py per layer filter, most important first (the depthwise and stem layers carry
  # the >= 1.3x targets): a run cut off by the deadline loses only its own layers, and
  # every finished one is kept. The budget is this stage's: STAGE_BUDGET seconds.
  local filters=${GPU_CHECK_CONV_FILTERS:-"dw3x3;stem;1x1 64->256 @56;3x3 64 @56;3x3 128 @28;3x3 256 @14"}
  local min_s=${GPU_CHECK_CONV_MIN_S:-30} quick=() rc=0 i=0 f r left
  [ "${GPU_CHECK_CONV_QUICK:-0}" = 1 ] && quick=(--quick)
  local IFS=';'
  # shellcheck disable=SC2206
  local list=($filters)
  unset IFS
  for f in "${list[@]}"; do
    left=$((STAGE_BUDGET - 15 - SECONDS))      # 15 s kept for the merge below
    if [ "$left" -lt "$min_s" ]; then
      echo "[gpu_check] bench-conv: ${left}s left, not starting '$f'"
      echo "NOT RUN (budget)" >"$WORK/conv-status-$i"; echo "$f" >"$WORK/conv-filter-$i"
      i=$((i + 1)); continue
    fi
    echo "[gpu_check] bench-conv: HIERFAST_CONV_LAYERS='$f' (limit ${left}s)"
    HIERFAST_CONV_LAYERS=$f HIERFAST_CONV_MAX_AUTOTUNE=${GPU_CHECK_MAX_AUTOTUNE:-0} timeout -k 5 "$left" \
      "$PY" benchmarks/run.py conv "${quick[@]}" --markdown --json "$WORK/conv-$i.json"
    r=$?
    echo "$r" >"$WORK/conv-status-$i"; echo "$f" >"$WORK/conv-filter-$i"
    [ "$r" != 0 ] && { echo "[gpu_check] bench-conv '$f' exit $r"; rc=$r; }
    i=$((i + 1))
  done
  # Merge the per-filter JSON files into $OUT/conv.json (run.py's format) and print one
  # table with the targets checked over all layers that ran.
  "$PY" - "$WORK" "$OUT/conv.json" <<'EOF' || { [ "$rc" = 0 ] && rc=1; }
import glob, json, os, sys
sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
import _common, bench_conv
work, dest = sys.argv[1], sys.argv[2]
rows, header, runs = [], None, []
for st in sorted(glob.glob(os.path.join(work, "conv-status-*")), key=lambda p: int(p.rsplit("-", 1)[1])):
    i = st.rsplit("-", 1)[1]
    filt = open(os.path.join(work, f"conv-filter-{i}")).read().strip()
    status = open(st).read().strip()
    path = os.path.join(work, f"conv-{i}.json")
    if os.path.exists(path):
        d = json.load(open(path))
        header = header or d["header"]
        rows += d["rows"]
    runs.append(f"{filt!r}: " + ("exit 0" if status == "0" else "TIMEOUT" if status in ("124", "137")
                                else status if not status.isdigit() else f"exit {status}"))
done = sum(r.endswith("exit 0") for r in runs)
with open(os.path.join(work, "note"), "w") as f:
    f.write(f"{done}/{len(runs)} layer runs ok, {len(rows)} rows"
            + "".join(f"; {r}" for r in runs if not r.endswith("exit 0")) + "\n")
if not rows:
    print("bench-conv: no rows (no layer run finished)")
    sys.exit(1)
notes = bench_conv.summary(rows)
head = (header or []) + ["gpu_check: merged per-layer runs: " + "; ".join(runs)]
json.dump({"header": head, "rows": rows, "summary": notes}, open(dest, "w"), indent=1, default=str)
print("\n".join(head))
print()
print(_common.format_table(rows, markdown=True))
print()
print("\n".join("- " + s for s in notes))
print(f"\nwrote {dest} ({len(rows)} rows)")
EOF
  return "$rc"
}

stage_bench_others() {
  # Quick runs, in order, while the stage's budget lasts; each JSON goes straight to $OUT.
  # resnet_step (the issue's ResNet-18 training step with fuse) runs on the GPU; the others
  # never move data to it.
  local cap=${GPU_CHECK_OTHER_S:-90} rc=0 n left r note=""
  for n in ${GPU_CHECK_OTHERS:-resnet_step cka capture dimension visualize}; do
    left=$((STAGE_BUDGET - 3 - SECONDS))   # ends before the stage's own timeout
    if [ "$left" -lt 20 ]; then
      echo "[gpu_check] bench-others: ${left}s left, not starting $n"
      note+=" $n:not-run"; echo "${note# }" >"$WORK/note"
      continue
    fi
    left=$(( left < cap ? left : cap ))
    echo "[gpu_check] bench-others: $n --quick (limit ${left}s)"
    timeout -k 5 "$left" "$PY" benchmarks/run.py "$n" --quick --json "$OUT/$n.json"
    r=$?
    [ "$r" != 0 ] && { echo "[gpu_check] bench $n exit $r"; rc=$r; }
    case $r in 0) note+=" $n:ok" ;; 124|137) note+=" $n:TIMEOUT" ;; *) note+=" $n:exit-$r" ;; esac
    echo "${note# }" >"$WORK/note"
  done
  return "$rc"
}

export -f stage_info stage_build stage_import run_pytest stage_tests_conv stage_tests_kernels \
  stage_bench_conv stage_bench_others

# ---------------------------------------------------------------- runner
NAMES=() RCS=() SECS=() BUDGETS=() STATUS=() NOTES=()

record() {  # record NAME STATUS RC SECONDS BUDGET [NOTE]
  NAMES+=("$1"); STATUS+=("$2"); RCS+=("$3"); SECS+=("$4"); BUDGETS+=("$5"); NOTES+=("${6:-}")
}

run_stage() {  # run_stage NAME BUDGET FUNCTION [SIGNAL sent at the limit, default TERM]
  local name=$1 budget=$2 fn=$3 sig=${4:-TERM} rc t st note
  if [[ "$SKIP" == *" $name "* ]]; then
    record "$name" "SKIP (GPU_CHECK_SKIP)" - 0 "$budget"; return
  fi
  budget=$(min "$budget" "$(left)")
  if [ "$budget" -lt 10 ]; then
    banner "$name: not run, only ${budget}s left for it"
    record "$name" "SKIP (no time left)" - 0 "$budget"; return
  fi
  banner "$name (limit ${budget}s)"
  rm -f "$WORK/note"   # a stage may leave one line here for the summary's note column
  t=$SECONDS
  STAGE_BUDGET=$budget timeout -s "$sig" -k 15 "$budget" bash -c "$fn"
  rc=$?
  t=$((SECONDS - t))
  case $rc in
    0) st=ok ;;
    124|137) st="TIMEOUT" ;;
    5) st="FAIL (no tests ran)" ;;
    *) st="FAIL" ;;
  esac
  note=$(head -n 1 "$WORK/note" 2>/dev/null)
  echo "[gpu_check] stage $name: $st (exit $rc, ${t}s) $note"
  record "$name" "$st" "$rc" "$t" "$budget" "$note"
}

banner "gpu_check: OUT=$OUT, deadline ${TOTAL}s, stages: $STAGES"
export STAGE_BUDGET=0
for s in $STAGES; do
  case $s in
    info)          run_stage info "${GPU_CHECK_INFO_S:-60}" stage_info ;;
    build)         run_stage build "${GPU_CHECK_BUILD_S:-150}" stage_build ;;
    import)        run_stage import "${GPU_CHECK_IMPORT_S:-90}" stage_import ;;
    tests-conv|tests-kernels)
      # The two test stages share one pool: the second gets what the first left over.
      cap=${GPU_CHECK_TESTS_CONV_S:-150}; fn=stage_tests_conv
      [ "$s" = tests-kernels ] && { cap=${GPU_CHECK_TESTS_KERNELS_S:-150}; fn=stage_tests_kernels; }
      t=$SECONDS
      run_stage "$s" "$(min "$cap" "$TESTS_POOL")" "$fn" INT
      TESTS_POOL=$((TESTS_POOL - (SECONDS - t))) ;;
    bench-conv)    run_stage bench-conv "${GPU_CHECK_CONV_S:-240}" stage_bench_conv ;;
    bench-others)  run_stage bench-others "$(left)" stage_bench_others ;;
    *) echo "[gpu_check] unknown stage '$s'" \
         "(known: info build import tests-conv tests-kernels bench-conv bench-others)"
       record "$s" "FAIL (unknown stage)" - 0 0 ;;
  esac
done

# ---------------------------------------------------------------- junit merge + summary
banner "summary"
timeout 20 "$PY" - "$WORK" "$OUT/junit.xml" <<'EOF'
import glob, os, sys
import xml.etree.ElementTree as ET
work, dest = sys.argv[1], sys.argv[2]
merged = ET.Element("testsuites")
for path in sorted(glob.glob(os.path.join(work, "junit-*.xml"))):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        print(f"{path}: unreadable ({exc})")
        continue
    for suite in ([root] if root.tag == "testsuite" else list(root)):
        merged.append(suite)
        a = suite.attrib
        print(f"pytest {a.get('name')}: {a.get('tests')} tests, {a.get('failures')} failed, "
              f"{a.get('errors')} errors, {a.get('skipped')} skipped, {float(a.get('time', 0)):.0f} s")
if len(merged):
    ET.ElementTree(merged).write(dest, encoding="utf-8", xml_declaration=True)
else:
    print("no junit results (the test stages did not finish or did not run)")
EOF
rm -rf "$WORK"

nfail=0
failed=""
printf '\n%-14s %-21s %4s %5s %6s  %s\n' stage status exit secs budget note
printf '%-14s %-21s %4s %5s %6s  %s\n' -------------- --------------------- ---- ----- ------ ----
for i in "${!NAMES[@]}"; do
  printf '%-14s %-21s %4s %5s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${RCS[$i]}" "${SECS[$i]}" \
    "${BUDGETS[$i]}" "${NOTES[$i]}"
  case ${STATUS[$i]} in ok|SKIP*) ;; *) nfail=$((nfail + 1)); failed+=" ${NAMES[$i]}" ;; esac
done
if [ "$nfail" = 0 ]; then
  echo "gpu_check: all stages ok, $((SECONDS - T0)) s in all; results in $OUT"
else
  echo "gpu_check: $nfail stage(s) FAILED:$failed; $((SECONDS - T0)) s in all; log $OUT/gpu_check.log"
fi
[ "${GPU_CHECK_STRICT:-0}" = 1 ] && [ "$nfail" != 0 ] && exit 1
exit 0
