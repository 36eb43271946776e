#!/usr/bin/env bash
# GPU check (kernels issue, item 6) and benchmark suite (benchmarks issue) for a CUDA machine without
# network access. Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh OUTDIR [SECTION ...]
#
# Sections (default "all" = install info tests memcheck racecheck quick; the full benchmark is opt-in
# because it takes longer than one 10-minute command — split it with bench:OP):
#   install        pip install --no-deps --no-build-isolation -e .  (skipped if cplfast already imports
#                  from this checkout)
#   info           python / torch / triton / CUDA versions, nvidia-smi
#   tests          the CUDA tests: pytest -m gpu tests/  (kernel tests parametrised for CUDA, fp32/fp16/bf16)
#   tests-all      pytest -m "gpu or not slow" tests/  (the whole fast suite, on the GPU machine)
#   memcheck       compute-sanitizer --tool memcheck over benchmarks/sanitize_launches.py (one small launch
#                  of every kernel, forward + backward; without compute-sanitizer the launches still run)
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
#   bash benchmarks/gpu_suite.sh "$OUT" install info tests sanitize
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

section_install() {
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
import cplfast
from cplfast import functional
print("cplfast", cplfast.__version__, "from", cplfast.__file__)
for op in ("sparse_prompt", "topm_channel_attention", "prompt_token_attention", "infonce", "supcon"):
    print(f"  kernel module for {op}:", "yes" if functional._kernel_module(op) is not None else "MISSING")
EOF
    nvidia-smi || echo "nvidia-smi not found"
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
    "$sanitizer" --tool "$tool" --error-exitcode 3 "$PYTHON" benchmarks/sanitize_launches.py
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
        [ -f "$log" ] && grep -H -E '(ERROR SUMMARY|RACECHECK SUMMARY|^[a-z_]+: (ok|FAIL|ERROR|SKIP))' "$log"
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
            echo install info tests memcheck racecheck quick
        elif [ "$s" = sanitize ]; then
            echo memcheck racecheck
        else
            echo "$s"
        fi
    done
}

export PYTHON REPO OUTDIR BENCH_ARGS
export -f installed_here section_install section_info find_sanitizer section_sanitize bench_into

for section in $(expand); do
    case "$section" in
        install) run_section install section_install ;;
        info) run_section info section_info ;;
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
