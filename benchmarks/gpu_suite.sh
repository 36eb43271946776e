#!/usr/bin/env bash
# GPU check (kernels issue, item 6) and benchmark suite (benchmarks issue) for a CUDA machine without
# network access. Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh OUTDIR [SECTION ...]
#
# Sections (default "all" = install info audit tests memcheck racecheck quick; the full benchmark is
# opt-in because it takes longer than one 10-minute command — split it with bench:OP):
#   install        pip install --no-deps --no-build-isolation -e .  (skipped if cplfast already imports
#                  from this checkout). Prints the setuptools version first and fails with a one-line
#                  reason if it is older than pyproject.toml needs (build-system requires; 77 for a
#                  PEP 639 string license)
#   info           python / torch / triton / CUDA versions, nvidia-smi; imports every
#                  cplfast.kernels.<op> module (yes / MISSING; fails if one is missing)
#   audit          the kernels' compile audit with this machine's Triton: python -m cplfast.kernels.audit --quick
#   tests          the CUDA tests: pytest -m gpu tests/  (kernel tests parametrised for CUDA, fp32/fp16/bf16)
#   tests-all      pytest -m "gpu or not slow" tests/  (the whole fast suite, on the GPU machine)
#   memcheck       compute-sanitizer --tool memcheck over benchmarks/sanitize_launches.py (one small launch
#                  of every kernel, forward + backward; without compute-sanitizer the launches still run;
#                  a sanitizer that refuses the device is reported as "sanitizer unavailable on this
#                  device", status ok)
#   racecheck      the same with --tool racecheck;  "sanitize" = memcheck racecheck
#   quick          first timings: cplfast bench --device cuda --quick --no-sweep --ops ops (SPEC training
#                  shapes of every fused op; e2e excluded: compiling the whole model takes minutes)
#   bench          full benchmark of every op and e2e (sweeps included; ~15-25 min: prefer bench:OP)
#   bench:OP[,OP]  full benchmark of the named ops / workloads, e.g. bench:sparse_prompt,infonce or
#                  bench:e2e (names as in `cplfast bench --ops`); results in OUTDIR/bench-OP[-OP]/
#   summary        merge every OUTDIR/*/results.json into OUTDIR/merged/ and print the tables
#
# Each section logs to OUTDIR/<section>.log, appends "<section> <status> <seconds>" to
# OUTDIR/sections.tsv and is cut off after SECTION_TIMEOUT seconds (default 540), so one call with one
# or two sections fits a 10-minute command. The summary table is printed last.
#
# Environment: PYTHON (default python), SECTION_TIMEOUT, BENCH_ARGS (extra `cplfast bench` arguments,
# e.g. "--dtype bfloat16"), PYTEST_ARGS (extra pytest arguments), CPLFAST_COMMIT (recorded commit when
# .git is absent).
#
# Examples (three commands of under 10 minutes each):
#   bash benchmarks/gpu_suite.sh "$OUT" install info audit tests sanitize
#   bash benchmarks/gpu_suite.sh "$OUT" install quick
#   bash benchmarks/gpu_suite.sh "$OUT" install bench:sparse_prompt,topm_channel_attention
#   bash benchmarks/gpu_suite.sh "$OUT" install bench:e2e

set -u -o pipefail

if [ $# -lt 1 ]; then
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

OUTDIR=$1
shift
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(all)
PYTHON=${PYTHON:-python}
SECTION_TIMEOUT=${SECTION_TIMEOUT:-540}
BENCH_ARGS=${BENCH_ARGS:-}
PYTEST_ARGS=${PYTEST_ARGS:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$REPO" || exit 2

if [ -z "${CPLFAST_COMMIT:-}" ]; then
    CPLFAST_COMMIT=$(git -C "$REPO" describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
    export CPLFAST_COMMIT
fi

record() {  # record SECTION STATUS SECONDS
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$OUTDIR/sections.tsv"
}

run_section() {  # run_section NAME COMMAND...: bounded, logged, recorded
    local name=$1
    shift
    local log="$OUTDIR/${name//[:,\/]/_}.log"
    local start=$SECONDS
    echo "=== [$name] $*" | tee -a "$log"
    # bash -c runs exported shell functions as well as programs; timeout signals the whole group.
    timeout -k 30 --signal=INT "$SECTION_TIMEOUT" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    local status=ok
    [ "$rc" -ne 0 ] && status="failed(rc=$rc)"
    [ "$rc" -eq 124 ] && status="timeout(${SECTION_TIMEOUT}s)"
    [ "$rc" -eq 5 ] && [ "${name#tests}" != "$name" ] && status="no-tests-collected"
    record "$name" "$status" $((SECONDS - start))
    echo "=== [$name] $status in $((SECONDS - start)) s" | tee -a "$log"
    return 0
}

installed_here() {
    "$PYTHON" - "$REPO" <<'EOF' 2>/dev/null
import os, sys
import cplfast, cplfast.kernels
repo = os.path.realpath(sys.argv[1])
ok = os.path.realpath(cplfast.__file__).startswith(repo) and os.path.realpath(cplfast.kernels.__file__).startswith(repo)
sys.exit(0 if ok else 1)
EOF
}

setuptools_ok() {  # prints the setuptools version; fails with one line if pyproject.toml needs a newer one
    "$PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:
    tomllib = None
try:
    import setuptools
except ImportError:
    print("setuptools: NOT INSTALLED (pip install -e . --no-build-isolation needs it)")
    sys.exit(1)
have = setuptools.__version__
print("setuptools", have)
text = open(sys.argv[1], encoding="utf-8").read()
need = 64  # PEP 660 editable installs
match = re.search(r"setuptools\s*>=\s*(\d+)", text)
if match:
    need = max(need, int(match.group(1)))
if tomllib is not None:
    string_license = isinstance(tomllib.loads(text).get("project", {}).get("license"), str)
else:
    string_license = re.search(r'^license\s*=\s*"', text, re.M) is not None
if string_license:
    need = max(need, 77)  # PEP 639 license expression
major = int(re.match(r"\d+", have).group(0))
if major < need:
    print(f"setuptools {have} is too old: pyproject.toml needs setuptools>={need}")
    sys.exit(1)
EOF
}

section_install() {
    setuptools_ok || return 1
    if installed_here; then
        echo "cplfast already installed from $REPO (editable)"
        return 0
    fi
    "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO"
}

section_info() {
    "$PYTHON" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
import importlib
import cplfast
print("cplfast", cplfast.__version__, "from", cplfast.__file__)
missing = []
for module in ("sparse_prompt", "channel_attention", "token_attention", "infonce", "supcon"):
    name = f"cplfast.kernels.{module}"
    try:
        importlib.import_module(name)
        print(f"  {name}: yes")
    except Exception as err:  # an ImportError, or an error while the module defines its kernels
        print(f"  {name}: MISSING ({type(err).__name__}: {err})")
        missing.append(name)
if missing:
    print("kernel modules missing:", ", ".join(missing))
    sys.exit(1)
EOF
    local rc=$?
    nvidia-smi || echo "nvidia-smi not found"
    return $rc
}

find_sanitizer() {
    command -v compute-sanitizer && return 0
    local candidate
    for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
        /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
        [ -x "$candidate" ] && { echo "$candidate"; return 0; }
    done
    "$PYTHON" - <<'EOF' 2>/dev/null
import glob, os, site, sys
for base in site.getsitepackages():
    for path in glob.glob(os.path.join(base, "nvidia", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            print(path)
            sys.exit(0)
sys.exit(1)
EOF
}

section_sanitize() {  # section_sanitize TOOL (memcheck | racecheck)
    local tool=$1 sanitizer
    if ! sanitizer=$(find_sanitizer); then
        echo "compute-sanitizer not found: running the launches without it (outputs still checked)"
        "$PYTHON" benchmarks/sanitize_launches.py
        return $?
    fi
    sanitizer=$(echo "$sanitizer" | head -n 1)
    echo "using $sanitizer --tool $tool"
    local out rc
    out=$(mktemp)
    "$sanitizer" --tool "$tool" --error-exitcode 3 "$PYTHON" benchmarks/sanitize_launches.py 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ] && grep -q -i -E 'Device not supported|not supported on this device' "$out"; then
        echo "sanitizer unavailable on this device ($tool: compute-sanitizer refused the GPU; not a failure)"
        rc=0
    fi
    rm -f "$out"
    return "$rc"
}

bench_into() {  # bench_into NAME OPS...
    local name=$1
    shift
    # shellcheck disable=SC2086
    "$PYTHON" -m cplfast bench --device cuda --out "$OUTDIR/$name" --ops "$@" $BENCH_ARGS
}

section_summary() {
    echo "--- sections"
    column -t -s $'\t' "$OUTDIR/sections.tsv" 2>/dev/null || cat "$OUTDIR/sections.tsv"
    local log
    for log in "$OUTDIR"/tests.log "$OUTDIR"/tests-all.log; do
        [ -f "$log" ] && echo "$(basename "$log"): $(grep -E '(passed|failed|error|skipped)' "$log" | tail -n 1)"
    done
    for log in "$OUTDIR"/memcheck.log "$OUTDIR"/racecheck.log; do
        [ -f "$log" ] && grep -H -E '(ERROR SUMMARY|RACECHECK SUMMARY|sanitizer unavailable|^[a-z_]+: (ok|FAIL|ERROR|SKIP))' "$log"
    done
    local results=()
    local file
    # quick first: on the same (op, mode, shape, provider) a later (full) run wins the merge
    for file in "$OUTDIR"/quick/results.json "$OUTDIR"/bench*/results.json; do
        [ -f "$file" ] && results+=("$file")
    done
    if [ ${#results[@]} -gt 0 ]; then
        "$PYTHON" -m cplfast bench --merge "${results[@]}" --out "$OUTDIR/merged"
    else
        echo "no benchmark results under $OUTDIR yet"
    fi
}

expand() {
    local s
    for s in "${SECTIONS[@]}"; do
        if [ "$s" = all ]; then
            echo install info audit tests memcheck racecheck quick
        elif [ "$s" = sanitize ]; then
            echo memcheck racecheck
        else
            echo "$s"
        fi
    done
}

export PYTHON REPO OUTDIR BENCH_ARGS
export -f installed_here setuptools_ok section_install section_info find_sanitizer section_sanitize bench_into

for section in $(expand); do
    case "$section" in
        install) run_section install section_install ;;
        info) run_section info section_info ;;
        audit) run_section audit "$PYTHON" -m cplfast.kernels.audit --quick ;;
        tests)
            # shellcheck disable=SC2086
            run_section tests "$PYTHON" -m pytest -q -m gpu tests/ -p no:cacheprovider \
                --junitxml="$OUTDIR/tests-junit.xml" $PYTEST_ARGS ;;
        tests-all)
            # shellcheck disable=SC2086
            run_section tests-all "$PYTHON" -m pytest -q -m "gpu or not slow" tests/ -p no:cacheprovider \
                --junitxml="$OUTDIR/tests-all-junit.xml" $PYTEST_ARGS ;;
        memcheck | racecheck) run_section "$section" section_sanitize "$section" ;;
        quick)
            # shellcheck disable=SC2086
            run_section quick "$PYTHON" -m cplfast bench --device cuda --quick --no-sweep --ops ops \
                --out "$OUTDIR/quick" $BENCH_ARGS ;;
        bench) run_section bench bench_into bench all ;;
        bench:*)
            ops=${section#bench:}
            run_section "$section" bench_into "bench-${ops//,/-}" ${ops//,/ } ;;
        summary) ;;  # always printed last
        *) echo "unknown section '$section' (see the header of $0)" >&2; exit 2 ;;
    esac
done

echo
echo "================ summary ($OUTDIR)"
section_summary 2>&1 | tee "$OUTDIR/summary.txt"
