#!/usr/bin/env bash
# The GPU suite: one command on a device machine (no network). Builds far_kernels._C in place, runs
# every `cuda`-marked test, runs the GPU benchmarks, and writes ONE JSON under bench/results/
# (device, versions, commit, build status, test results, every benchmark figure). Copies it to $OUT
# when the device tool provides one. Keeps going after a failed step and records it.
#   bash bench/gpu_suite.sh            # full run (< 8 min on an H100)
#   QUICK=1 bash bench/gpu_suite.sh    # fewer benchmark cases
#   SKIP_BUILD=1 BENCH_ARGS="--quick" bash bench/gpu_suite.sh   # check the suite itself (any machine)
# Sharing one device call with another GPU job (e.g. training): BENCH_WAIT_FILE=F makes the benchmarks
# wait until F exists (that job's end), at most BENCH_WAIT_MAX seconds (default 600); the JSON records
# whether they ran alone. BILSTM_TIMEOUT / CUDA_SCAN_TIMEOUT / XBAR_TIMEOUT (s) cap the benchmarks;
# TESTS_TIMEOUT (s) interrupts pytest (SIGINT: the tests run so far are still reported).
set -uo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
export MAX_JOBS=${MAX_JOBS:-16}

echo "== build" >&2
t0=$(date +%s)
if [ "${SKIP_BUILD:-0}" = 1 ]; then echo "build skipped (SKIP_BUILD=1)" >"$work/build.log"; build_rc=0
else pip install --no-build-isolation --no-deps -e . >"$work/build.log" 2>&1; build_rc=$?; fi
build_s=$(( $(date +%s) - t0 ))
tail -n 30 "$work/build.log" >&2

echo "== cuda tests" >&2
timeout -s INT -k 20 "${TESTS_TIMEOUT:-0}" python -m pytest -m cuda -q -p no:cacheprovider --durations=15 --junitxml="$work/cuda_tests.xml" tests >"$work/tests.log" 2>&1
tests_rc=$?
tail -n 15 "$work/tests.log" >&2

bench_alone=true
if [ -n "${BENCH_WAIT_FILE:-}" ]; then
  echo "== waiting for $BENCH_WAIT_FILE before timing anything" >&2
  waited=0
  while [ ! -e "$BENCH_WAIT_FILE" ] && [ "$waited" -lt "${BENCH_WAIT_MAX:-600}" ]; do sleep 2; waited=$((waited + 2)); done
  [ -e "$BENCH_WAIT_FILE" ] || { bench_alone=false; echo "   still running after ${waited} s: timings share the GPU" >&2; }
fi

echo "== benchmarks" >&2
bench_args=()
[ "${QUICK:-0}" = 1 ] && bench_args=(--shapes small --dtypes fp16 --B 1,64)
[ -n "${BENCH_ARGS:-}" ] && read -r -a bench_args <<<"$BENCH_ARGS"
timeout "${BILSTM_TIMEOUT:-600}" python bench/bench_bilstm.py "${bench_args[@]}" --out "$work/bilstm.json" >"$work/bench.log" 2>&1
bench_rc=$?
tail -n 40 "$work/bench.log" >&2

echo "== cuda scan variants (fma/mma, tanh modes)" >&2
cuda_args=()
[ "${QUICK:-0}" = 1 ] && cuda_args=(--quick)
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  timeout "${CUDA_SCAN_TIMEOUT:-240}" python bench/bench_cuda_scan.py "${cuda_args[@]}" --out "$work/cuda_scan.json" >"$work/cuda_scan.log" 2>&1
  cuda_bench_rc=$?
else echo "no CUDA device: bench_cuda_scan skipped" >"$work/cuda_scan.log"; cuda_bench_rc=0; fi
tail -n 30 "$work/cuda_scan.log" >&2

echo "== crossbar emulation GEMM (triton vs reference vs bf16 GEMM)" >&2
xbar_args=(); [ "${QUICK:-0}" = 1 ] && xbar_args=(--B 8 --no-noise); [[ "${BENCH_ARGS:-}" == *--quick* ]] && xbar_args=(--quick)
timeout "${XBAR_TIMEOUT:-420}" python bench/bench_crossbar.py "${xbar_args[@]}" --out "$work/crossbar.json" >"$work/crossbar.log" 2>&1
tail -n 20 "$work/crossbar.log" >&2

python - "$work" "$stamp" "$build_rc" "$build_s" "$tests_rc" "$bench_rc" "$bench_alone" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
from far.utils.env import environment
from far.utils.fs import write_json
work, stamp, build_rc, build_s, tests_rc, bench_rc, bench_alone = sys.argv[1:]
work = Path(work)
tests = {"rc": int(tests_rc), "cases": []}
try:
    root = ET.parse(work / "cuda_tests.xml").getroot()
    for case in root.iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                tests.setdefault("messages", {})[case.get("name")] = (el.get("message") or "")[:300]
        tests["cases"].append({"name": f"{case.get('classname')}::{case.get('name')}", "status": status,
                               "time_s": float(case.get("time") or 0)})
    tests["summary"] = {s: sum(c["status"] == s for c in tests["cases"]) for s in ("passed", "failed", "error", "skipped")}
except Exception as e:
    tests["error"] = f"no junit xml: {e}"
bench = None
try:
    bench = json.loads((work / "bilstm.json").read_text())
except Exception as e:
    bench = {"error": f"no benchmark JSON: {e}", "log_tail": (work / "bench.log").read_text()[-3000:]}
env = environment()
import torch
env["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
dev = (env.get("cuda") or {}).get("device", "nodevice").replace(" ", "_")
result = {"suite": "gpu_suite", "stamp": stamp, "environment": env,
          "build": {"rc": int(build_rc), "seconds": int(build_s), "log_tail": (work / "build.log").read_text()[-2000:]},
          "cuda_tests": tests, "benchmarks_ran_alone": bench_alone == "true", "bench_bilstm": bench}
try:
    result["bench_cuda_scan"] = json.loads((work / "cuda_scan.json").read_text())
except Exception as e:
    result["bench_cuda_scan"] = {"error": f"no JSON: {e}", "log_tail": (work / "cuda_scan.log").read_text()[-3000:]}
try:
    result["bench_crossbar"] = json.loads((work / "crossbar.json").read_text())
except Exception as e:
    result["bench_crossbar"] = {"error": f"no JSON: {e}", "log_tail": (work / "crossbar.log").read_text()[-3000:]}
path = write_json(Path("bench/results") / f"gpu_suite-{dev}-{stamp}.json", result)
print(path)
PY
res=$(ls -t bench/results/gpu_suite-*.json 2>/dev/null | head -1)
if [ -n "${OUT:-}" ] && [ -n "$res" ]; then cp "$res" "$OUT/"; cp "$work"/*.log "$OUT/" 2>/dev/null; cp "$work"/*.png "$OUT/" 2>/dev/null; fi
echo "gpu_suite: build rc=$build_rc tests rc=$tests_rc bench rc=$bench_rc cuda_scan rc=$cuda_bench_rc -> $res" >&2
