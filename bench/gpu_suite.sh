#!/usr/bin/env bash
# The GPU suite: one command on a device machine (no network), in stages, within a total budget of command
# time, most valuable first. Every stage writes its JSON (or junit XML, turned into JSON), its log and a
# status file into $OUT as soon as it ends, and the merge DIR/gpu_suite.json (which stages ran, failed,
# were cut by their time limit or skipped for lack of budget) is rewritten after every stage, so a run
# killed at any point returns what it had. The benchmarks also rewrite their JSON after every case.
#   bash bench/gpu_suite.sh                      # everything, 480 s budget, files into $OUT
#   SUITE_BUDGET=300 bash bench/gpu_suite.sh     # a shorter window
#   BUILD=cached bash bench/gpu_suite.sh         # (default) reuse far_kernels._C when built from these sources
#   BUILD=skip | BUILD=fresh | WHEEL=dist/x.whl bash bench/gpu_suite.sh   # (pip offline: --no-index)
#   STAGES_DIR=/tmp/gpu_suite bash bench/gpu_suite.sh   # on a device machine: OUT gets 3 files (see below)
#   DRY_RUN=1 bash bench/gpu_suite.sh            # the whole suite on the CPU (CUDA hidden, tiny cases, the
#                                                # tests under TRITON_INTERPRET=1, CUDA ones skipped): in CI
#                                                # as tests/bench/test_gpu_suite.py; the installed extension is
#                                                # used unless BUILD=fresh or WHEEL is given
# Stages (name: cap s): env 60, build 300, smoke 150 (pytest -m gpu_smoke: tests/conftest.py GPU_SMOKE, one
# test per kernel path and dtype, the stream checks, memcheck on one small case), headline 120 (bench_bilstm:
# DeiT-S B=64 fp16, every row), cuda_scan_headline 60 (H=6 B=64 fp16/bf16 kernel variants), bilstm_tail 200
# (the rest of the grid), cuda_scan_tail 120, crossbar 90, imc_eval 120 (bench_imc_eval --device cuda: emulated
# images/s of the zoo and DeiT-small blocks on the torch and triton crossbar backends, each checked against torch bit
# for bit first, median of 3 batches, the JSON rewritten per row, and the seconds a 10k test set takes: issue 16's
# GPU target; FAR models with the separate LSTM mapping, IMC_EVAL_MAPPINGS=separate,fused for both), cuda_tests
# (every other cuda test: the rest).
# A stage starts only with at least its minimum left (else "skipped"); its limit is min(cap, budget left), where the
# budget left keeps back the 5 s of the last merge and the STAGE_KILL_AFTER (15) s a stage ignoring SIGINT gets before
# SIGKILL: the whole run ends within SUITE_BUDGET even when a stage hangs.
# CAP_<stage>=s overrides a cap; SKIP_STAGES="a b" skips stages; OUT=dir (default bench/results/gpu_suite-<stamp>).
# STAGES_DIR=dir: the ~35 stage files go there and OUT receives only gpu_suite.json (the merge),
# gpu_suite_stages.tar.gz (every stage file) and, at the end, the named copy, the first two rewritten before and after
# every stage and every PUBLISH_EVERY (30) s while one runs (the merge says "running" for it): the device machine
# brings back at most 8 files from its $OUT, and which ones of more is not said.
# At the end the merge is also copied to gpu_suite-<device>-<stamp>.json in OUT and (not in a dry run) bench/results/.
# A run first removes an earlier run's stage files, merge and archive from STAGES_DIR and OUT (not the named copies).
# Older knobs still work: SKIP_BUILD=1 (= BUILD=skip), QUICK=1 (smaller tail grids), BILSTM_TIMEOUT /
# CUDA_SCAN_TIMEOUT / XBAR_TIMEOUT / IMC_EVAL_TIMEOUT / TESTS_TIMEOUT (caps of bilstm_tail, cuda_scan_tail, crossbar,
# imc_eval, cuda_tests),
# BENCH_WAIT_FILE=F (a "wait" stage before the benchmarks: until F exists, at most BENCH_WAIT_MAX s, from the budget).
# Provenance: every JSON records the git commit (far.utils.env.environment). A device machine gets the working tree
# without .git, so pass the commit in the command, expanded where the checkout is (csrc/cuda/NOTES.md's runbook):
#   FAR_GIT_COMMIT=$(git rev-parse HEAD) FAR_GIT_DIRTY=$(git status --porcelain | grep -q . && echo 1 || echo 0) \
#     bash bench/gpu_suite.sh
# (a command string sent to another machine must carry the hash itself, not the $(...)). Without either, the suite
# warns and the results say git_commit null.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the device machines' python3 is the one with torch (KINDS.md)
DRY=${DRY_RUN:-0}
helper() { "$PY" bench/gpu_suite_stage.py "$@"; }
if [ "${1:-}" != __stage ]; then
  # the numeric knobs, checked before anything runs: bash arithmetic on "540s" or "08" failed inside each stage, which
  # then vanished from the merge without a word (SUITE_BUDGET=540s: no stage at all, and exit status 0)
  bad=
  for v in SUITE_BUDGET STAGE_KILL_AFTER PUBLISH_EVERY BENCH_WAIT_MAX BILSTM_TIMEOUT CUDA_SCAN_TIMEOUT XBAR_TIMEOUT \
           IMC_EVAL_TIMEOUT TESTS_TIMEOUT MAX_JOBS $(compgen -v CAP_); do
    [ -z "${!v:-}" ] || [[ "${!v}" =~ ^(0|[1-9][0-9]*)$ ]] || bad+=" $v='${!v}'"
  done
  if [ -n "$bad" ]; then echo "gpu_suite: error: not a whole number (of seconds):$bad; nothing was run" >&2; exit 2; fi
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  SCALE=1; [ "$DRY" = 1 ] && SCALE=5  # a dry run's caps and budget x5: CPU runners are slow and shared
  BUDGET=${SUITE_BUDGET:-$((480 * SCALE))}
  OUTDIR=${OUT:-bench/results/gpu_suite-$stamp}
  mkdir -p "$OUTDIR"
  OUTDIR=$(cd "$OUTDIR" && pwd)
  RETURNDIR=  # with STAGES_DIR: where only the merge and the archive of the stage files go (OUT)
  if [ -n "${STAGES_DIR:-}" ] && [ "$(mkdir -p "$STAGES_DIR" && cd "$STAGES_DIR" && pwd)" != "$OUTDIR" ]; then
    RETURNDIR=$OUTDIR
    OUTDIR=$(cd "$STAGES_DIR" && pwd)
  fi
  helper clean "$OUTDIR" ${RETURNDIR:+"$RETURNDIR"}  # an earlier run's stage files there would pass for this run's
  RESERVE=5  # seconds kept for the last merge
  # a stage still running at its limit gets SIGINT, and STAGE_KILL_AFTER s later SIGKILL (with its children): that
  # grace is counted in the budget, so a stage stuck in a call that ignores SIGINT still ends within SUITE_BUDGET
  KILL_AFTER=${STAGE_KILL_AFTER:-15}
  [ "$KILL_AFTER" -ge 1 ] || KILL_AFTER=1  # (timeout -k 0 would never SIGKILL)
  # the checkout's packages importable before (or without) an install: python/far and far_kernels
  export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} OUTDIR PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if [ "$DRY" = 1 ]; then export CUDA_VISIBLE_DEVICES=""; fi  # the tests' conftest sets TRITON_INTERPRET=1 then
  t_start=$(date +%s)
  [ "${SKIP_BUILD:-0}" = 1 ] && export BUILD=skip
  if [ -z "${FAR_GIT_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
    echo "gpu_suite: warning: no git checkout here and FAR_GIT_COMMIT unset: the results will say git_commit null" >&2
  fi
  cat >"$OUTDIR/suite.json" <<EOF
{"stamp": "$stamp", "budget_s": $BUDGET, "dry_run": $([ "$DRY" = 1 ] && echo true || echo false), "build_mode": "${WHEEL:+wheel:}${WHEEL:-${BUILD:-cached}}", "out": "$OUTDIR"}
EOF
fi
n=0
# the merge of every stage's files, and with STAGES_DIR its copy and the archive of them in OUT
merge() { helper merge "$OUTDIR"; if [ -n "${RETURNDIR:-}" ]; then helper publish "$OUTDIR" "$RETURNDIR"; fi; }

# stage NAME CAP MIN CMD... : run CMD (its stdout+stderr into NAME's log) with limit min(CAP, budget left)
stage() {
  local name=$1 cap=$2 min=$3; shift 3
  n=$((n + 1))
  local tag; tag=$(printf '%02d_%s' "$n" "$name")
  local var="CAP_$name"; cap=${!var:-$((cap * SCALE))}
  local left=$((BUDGET - ($(date +%s) - t_start) - RESERVE - KILL_AFTER))
  local limit=$((cap < left ? cap : left))
  if [[ " ${SKIP_STAGES:-} " == *" $name "* ]]; then
    helper status "$OUTDIR" "$tag" "$name" skipped 0 0 0 "SKIP_STAGES"
  elif [ "$left" -lt "$min" ]; then
    helper status "$OUTDIR" "$tag" "$name" skipped 0 0 0 "budget: ${left} s left, stage needs ${min} s"
  elif [ "$limit" -lt 1 ]; then  # `timeout 0` would mean no limit at all
    helper status "$OUTDIR" "$tag" "$name" skipped 0 0 0 "no time: a limit of ${limit} s (cap ${cap} s)"
  else
    echo "== $tag (limit ${limit} s, ${left} s of budget left)" >&2
    local t0; t0=$(date +%s)
    # said before it starts and merged (with STAGES_DIR: published) every PUBLISH_EVERY s while it runs, so a run
    # killed now (the device call's time limit) returns the stage's log and the JSON it has rewritten so far
    helper status "$OUTDIR" "$tag" "$name" running 0 0 "$limit" "running when this merge was written"
    merge
    # (the sleep's pid is forgotten once it is reaped: the trap never signals a pid that may have been reused; and
    # it stops once the suite ($$, in a subshell too) is gone: killed alone, the suite left it merging forever)
    (s=; trap '[ -n "$s" ] && kill "$s"; exit 0' TERM
     while kill -0 $$ 2>/dev/null; do
       sleep "${PUBLISH_EVERY:-30}" & s=$!; wait "$s"; s=; kill -0 $$ 2>/dev/null && merge
     done) &
    local publisher=$!
    TAG=$tag timeout -s INT -k "$KILL_AFTER" "$limit" bash bench/gpu_suite.sh __stage "$@" >"$OUTDIR/$tag.log" 2>&1
    local rc=$? status=ran took=$(($(date +%s) - t0))
    kill "$publisher"; wait "$publisher"  # a merge under way ends first: one writer at a time
    [ $rc -ne 0 ] && status=failed
    # cut: timeout's 124 (SIGINT at the limit), or SIGKILL after the limit; a SIGKILL before it (the OOM killer) failed
    { [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ "$took" -ge "$limit" ]; }; } && status=cut
    tail -n 5 "$OUTDIR/$tag.log" >&2
    helper status "$OUTDIR" "$tag" "$name" "$status" "$rc" "$took" "$limit"
  fi
  merge
}

# the stages' commands (each run by `stage` with TAG set; outputs go to $OUTDIR/$TAG.*)
st_env() { helper env "$OUTDIR/$TAG.json"; }

st_build() {
  if [ "$DRY" = 1 ] && [ -z "${WHEEL:-}" ] && [ "${BUILD:-}" != fresh ]; then  # BUILD=fresh: the build runs here too
    echo "dry run: the installed extension is used"; helper build-check "$OUTDIR/$TAG.json"; return
  fi
  local want; want=$(helper src-hash)
  local stampf=build/.far-cuda-src-hash
  # the device machine has no network: pip must not look for anything (--no-index, no version check)
  local pip=(env PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --no-index --no-build-isolation --no-deps)
  local pep660="import importlib.util as u, setuptools as s, sys; "
  pep660+="sys.exit(u.find_spec('pip') is None or int(s.__version__.split('.')[0]) < 64)"
  if [ -n "${WHEEL:-}" ]; then
    "${pip[@]}" --force-reinstall "$WHEEL" || return 1
  elif [ "${BUILD:-cached}" = skip ]; then
    echo "BUILD=skip: no build"
  elif [ "${BUILD:-cached}" = cached ] && [ -f "$stampf" ] && [ "$(cat "$stampf")" = "$want" ] &&
       "$PY" -c "import sys; from far_kernels._ext import lib; sys.exit(0 if lib is not None and lib.has_cuda() else 1)"; then
    echo "cached: far_kernels._C was built from these sources ($want)"
  elif "$PY" -c "$pep660" 2>/dev/null; then  # pip, and a setuptools with editable installs (PEP 660)
    "${pip[@]}" -e . || return 1  # no second try: a compile error would only repeat, at the cost of minutes
    mkdir -p build && echo "$want" >"$stampf"
  else  # the in-place extension (PYTHONPATH has the tree)
    "$PY" setup.py build_ext --inplace || return 1
    mkdir -p build && echo "$want" >"$stampf"
  fi
  helper build-check "$OUTDIR/$TAG.json"
  "$PY" -c "import sys; from far_kernels._ext import lib; sys.exit(0 if lib is not None and lib.has_cuda() else 3)"
}

# the test stages run pytest -v: the log names each test as it starts, so where pytest dies or hangs past SIGINT (a
# kernel that never returns) and writes no junit XML, the log's last line says which test it was
st_smoke() {  # the GPU_SMOKE ids in their order (the sanitizer last: the slowest), -m gpu_smoke checks the marking
  local ids; mapfile -t ids < <(helper smoke-ids)
  "$PY" -m pytest -v -p no:cacheprovider -m gpu_smoke --durations=10 --junitxml="$OUTDIR/$TAG.xml" "${ids[@]}"
}

st_cuda_tests() {
  local where=(tests)
  [ "$DRY" = 1 ] && where=(tests/kernels/ops/test_bilstm_scan_cuda.py)  # collection of every file is the cost on CPU
  # a module that cannot be imported there (a package the device machine lacks) costs that module, not the stage
  "$PY" -m pytest -v -p no:cacheprovider -m "cuda and not gpu_smoke" --continue-on-collection-errors --durations=15 \
    --junitxml="$OUTDIR/$TAG.xml" "${where[@]}"
}

st_py() { exec "$PY" "$@" --out "$OUTDIR/$TAG.json"; }

st_wait() {  # another GPU job (e.g. training) ends by creating $BENCH_WAIT_FILE
  local waited=0
  while [ ! -e "$BENCH_WAIT_FILE" ]; do sleep 2; waited=$((waited + 2)); done
  echo "{\"waited_s\": $waited, \"benchmarks_ran_alone\": true}" >"$OUTDIR/$TAG.json"
}

if [ "${1:-}" = __stage ]; then  # a stage's command, run by `stage` under timeout in a child
  shift
  "$@"
  exit $?
fi

if [ "$DRY" = 1 ]; then
  bilstm_head=(--device cpu --quick --threads 1 --no-plot)
  bilstm_tail=(--device cpu --quick --threads 1 --B 2 --no-plot)
  scan_head=(--device cpu --quick)
  scan_tail=(--device cpu --quick)
  xbar=(--device cpu --quick --no-noise --M 64 --KN 64 --B 1 --T 4 --reps 1)
  imc_eval=(--device cpu --quick --no-noise --reps 1 --batch 2 --block-batch 1 --threads 1 --models fmnist_far_tiny_pruned)
  SKIP_STAGES="${SKIP_STAGES:-} cuda_scan_tail"  # the same code as cuda_scan_headline on the CPU
else
  bilstm_head=(--only-first --first small:fp16:64)
  bilstm_tail=(--skip small:fp16:64 --first small:bf16:64,small:fp32:64,tiny:fp16:64,base:fp16:64,small:fp16:256,small:fp16:1)
  scan_head=(--H 6 --dtypes fp16,bf16 --B 64)
  scan_tail=(--B 1,16,256,8 --pruned)
  xbar=()
  # 3 timed batches per row (a median, not one run); within the 120 s cap by timing imc-eval's default LSTM mapping
  # only: 20 rows x (3 reps + 1 warm-up/check call) ~ the 32 rows x 2 calls of both mappings at 1 rep.
  # IMC_EVAL_MAPPINGS=separate,fused adds fused (imc-cost --emulate's costed mapping; raise CAP_imc_eval with it)
  imc_eval=(--device cuda --reps 3 --lstm-mappings "${IMC_EVAL_MAPPINGS:-separate}")
  if [ "${QUICK:-0}" = 1 ]; then
    bilstm_tail=(--skip small:fp16:64 --shapes small,base --dtypes fp16,bf16 --B 64,1)
    scan_tail=(--B 1,256 --dtypes fp16)
    xbar=(--B 8 --no-noise)
  fi
fi

stage env 60 5 st_env
stage build 300 30 st_build
stage smoke 150 20 st_smoke
[ -n "${BENCH_WAIT_FILE:-}" ] && stage wait "${BENCH_WAIT_MAX:-600}" 0 st_wait
stage headline 120 20 st_py bench/bench_bilstm.py "${bilstm_head[@]}"
stage cuda_scan_headline 60 20 st_py bench/bench_cuda_scan.py "${scan_head[@]}"
stage bilstm_tail "${BILSTM_TIMEOUT:-200}" 30 st_py bench/bench_bilstm.py "${bilstm_tail[@]}"
stage cuda_scan_tail "${CUDA_SCAN_TIMEOUT:-120}" 30 st_py bench/bench_cuda_scan.py "${scan_tail[@]}"
stage crossbar "${XBAR_TIMEOUT:-90}" 30 st_py bench/bench_crossbar.py "${xbar[@]}"
stage imc_eval "${IMC_EVAL_TIMEOUT:-120}" 30 st_py bench/bench_imc_eval.py "${imc_eval[@]}"
stage cuda_tests "${TESTS_TIMEOUT:-600}" 30 st_cuda_tests

merge
named=$(helper named "$OUTDIR")  # gpu_suite-<device>-<stamp>.json
cp "$OUTDIR/gpu_suite.json" "$OUTDIR/$named"
if [ -n "$RETURNDIR" ]; then cp "$OUTDIR/gpu_suite.json" "$RETURNDIR/$named"; fi
if [ "$DRY" != 1 ]; then mkdir -p bench/results && cp "$OUTDIR/gpu_suite.json" "bench/results/$named"; fi
echo "gpu_suite: $(($(date +%s) - t_start)) s of ${BUDGET}; $OUTDIR/gpu_suite.json" >&2
"$PY" - "$OUTDIR/gpu_suite.json" <<'PY' >&2
import json, sys
m = json.load(open(sys.argv[1]))
for s in m["stages"]:
    print(f"  {s['tag']:<24} {s['status']:<8} {s['seconds']:>4} s  {s.get('note') or ''}")
PY
