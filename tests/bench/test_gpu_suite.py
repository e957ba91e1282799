"""bench/gpu_suite.sh's dry run (DRY_RUN=1: the whole suite on the CPU, CUDA hidden, tiny cases, the CUDA
tests skipped), so that the suite a rare GPU window depends on never rots: every stage leaves its status,
log and JSON as it ends, the merge says which stages ran, were cut or skipped, the benchmarks check their
outputs and time attention beside FAR, and the smoke stage selects exactly tests/conftest.py GPU_SMOKE."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STAGES = ("env", "build", "smoke", "headline", "cuda_scan_headline", "bilstm_tail", "cuda_scan_tail", "crossbar",
          "imc_eval", "cuda_tests")

pytestmark = pytest.mark.slow


def run_suite(out: Path, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SUITE)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


# Fault injection: PYTHON=this script in place of the interpreter. A call whose arguments contain PATTERN behaves as
# FAULTS="PATTERN=what ..." says (hang: ignores SIGINT, like a process stuck in a CUDA call, with a child that does too;
# partial: writes a first JSON to its --out, then hangs; segv: dies of SIGSEGV; kill: of SIGKILL, as the OOM killer
# does; exit: exits 3 without a JSON; ok: writes a JSON; spew: also a 24 MB log that gzip cannot shrink much); every
# other call runs the real interpreter. The pids of the
# misbehaving processes go to FAULT_PIDS, their arguments to FAULT_PIDS.calls.
FAULTY_PYTHON = r"""#!/usr/bin/env bash
out=; prev=
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
for f in $FAULTS; do
  case " $* " in
    *"${f%%=*}"*)
      echo $$ >>"$FAULT_PIDS"; echo "$*" >>"$FAULT_PIDS.calls"
      case ${f#*=} in
        partial) echo '{"rows": 1}' >"$out"; echo "first row written";&
        hang) trap '' INT TERM; sleep 1000 & echo $! >>"$FAULT_PIDS"; wait; exit 0;;
        segv) echo "crashing"; ulimit -c 0; kill -SEGV $$;;
        kill) echo "killed early"; kill -KILL $$;;
        exit) echo "failing without a JSON"; exit 3;;
        ok) echo '{"ok": true}' >"$out"; exit 0;;
        spew) head -c 18000000 /dev/urandom | base64 -w 100; echo '{"ok": true}' >"$out"; echo "END OF LOG"; exit 0;;
      esac;;
  esac
done
exec "$REAL_PYTHON" "$@"
"""


def faulty_env(tmp_path: Path, faults: str) -> dict:
    fake = tmp_path / "python"
    fake.write_text(FAULTY_PYTHON)
    fake.chmod(0o755)
    return {"PYTHON": str(fake), "REAL_PYTHON": sys.executable, "FAULTS": faults,
            "FAULT_PIDS": str(tmp_path / "fault_pids")}


def alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run; the crossbar stage (not this suite's code, 30 s on a CPU) is cut after 1 s on purpose."""
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = run_suite(out, CAP_crossbar="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "gpu_suite.json").read_text())


def test_every_stage_reports_and_the_merge_says_how_it_ended(dry):
    out, merged = dry
    assert [s["stage"] for s in merged["stages"]] == list(STAGES)
    assert merged["status"] == {**{s: "ran" for s in STAGES}, "cuda_scan_tail": "skipped", "crossbar": "cut"}
    assert merged["cut"] == ["crossbar"] and merged["skipped"] == ["cuda_scan_tail"] and merged["failed"] == []
    assert merged["dry_run"] is True and merged["environment"]["flags"]["threads"] >= 1
    assert (out / f"gpu_suite-nodevice-{merged['stamp']}.json").exists()  # the copy to keep under bench/results
    for s in merged["stages"]:
        tag = s["tag"]
        assert (out / f"{tag}.status.json").exists()
        if s["status"] != "skipped":
            assert (out / f"{tag}.log").exists()
        if s["status"] == "ran":
            assert (out / f"{tag}.json").exists(), tag
            assert s["result"] is not None and "unreadable" not in s["result"], tag


def test_stage_files_appear_as_each_stage_ends(dry):
    """Stage k's JSON was written before stage k+1 ended (and the merge rewritten after each stage)."""
    out, merged = dry
    ended = [(out / f"{s['tag']}.status.json").stat().st_mtime for s in merged["stages"]]
    assert ended == sorted(ended)
    for s, nxt in zip(merged["stages"], ended[1:]):
        if (out / f"{s['tag']}.json").exists():
            assert (out / f"{s['tag']}.json").stat().st_mtime <= nxt


def test_benchmarks_check_before_timing_and_time_attention(dry):
    out, merged = dry
    by = {s["stage"]: s["result"] for s in merged["stages"]}
    for stage in ("headline", "bilstm_tail"):
        res = by[stage]
        assert res["complete"] and res["records"] and res["flags"]["cudnn_allow_tf32"] is False
        for rec in res["records"]:
            assert not rec.get("failed"), rec.get("failed")
            assert all(c["ok"] for c in rec["checks"].values()), rec["checks"]
            assert {"attention_sdpa", "scan_cpp", "block_cpp", "dense_masked_lstm"} <= set(rec["timing"])
            t = rec["timing"]["attention_sdpa"]
            assert t["ms"] > 0 and len(t["round_ms"]) >= 1 and t["method"] == "perf_counter"
    scan = by["cuda_scan_headline"]
    assert scan["complete"] and {r["variant"] for r in scan["records"]} >= {"fma", "mma", "attention_sdpa"}
    assert all(r["check"]["ok"] for r in scan["records"]) and all(r["stand_in"] for r in scan["records"] if "stand_in" in r)
    assert by["build"]["extension_status"]["loaded"]
    imc = by["imc_eval"]  # the emulation-speed stage: every backend of the device timed, the 10k-image seconds given
    assert imc["benchmark"] == "imc_eval_speed" and imc["device"] == "cpu" and not imc["partial"]
    [row] = imc["results"]
    assert row["model"] == "fmnist_far_tiny_pruned" and {e["backend"] for e in row["emulated"]} == {"torch", "cpp"}
    assert all(e["seconds_per_10k_images"] > 0 for e in row["emulated"])


def test_smoke_stage_selects_exactly_the_gpu_smoke_ids(dry):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import GPU_SMOKE

    out, merged = dry
    smoke = next(s["result"] for s in merged["stages"] if s["stage"] == "smoke")
    ran = []
    for case in smoke["cases"]:  # junit: classname tests.kernels.ops.test_x, name test_y[id]
        module, name = case["name"].split("::")
        ran.append(module.replace(".", "/") + ".py::" + name)
    assert ran == list(GPU_SMOKE)  # all of them, in the list's order (the slow sanitizer last)
    assert smoke["summary"]["failed"] == 0 and smoke["summary"]["error"] == 0


def test_no_budget_skips_every_stage(tmp_path):
    proc = run_suite(tmp_path, SUITE_BUDGET="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert merged["skipped"] == list(STAGES)
    assert all("budget" in s["note"] for s in merged["stages"] if s["stage"] != "cuda_scan_tail")  # SKIP_STAGES in a dry run


def test_stages_dir_leaves_out_only_the_merge_and_one_archive(tmp_path):
    """A device machine brings back at most 8 files from its $OUT (the suite writes ~35, one per stage output): with
    STAGES_DIR the stage files go there and OUT holds the merge, an archive of every stage file and the named copy."""
    import tarfile

    out, stages = tmp_path / "out", tmp_path / "stages"
    proc = run_suite(out, SUITE_BUDGET="0", STAGES_DIR=str(stages))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((out / "gpu_suite.json").read_text())
    assert merged["skipped"] == list(STAGES)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_suite.json", "gpu_suite_stages.tar.gz", f"gpu_suite-nodevice-{merged['stamp']}.json"])
    with tarfile.open(out / "gpu_suite_stages.tar.gz") as tar:
        archived = {m.name.split("/", 1)[1] for m in tar.getmembers()}
    kept = {p.name for p in stages.iterdir()}
    assert {f"{s['tag']}.status.json" for s in merged["stages"]} | {"suite.json", "gpu_suite.json"} <= archived
    assert archived <= kept


def test_a_hung_stage_is_killed_with_its_children_and_the_run_ends_within_its_budget(tmp_path):
    """A stage stuck where SIGINT does nothing (a CUDA call) is SIGKILLed STAGE_KILL_AFTER s after its limit, with its
    children, and the next stage still runs; the last stage's limit leaves room for that grace, so the whole run
    (the last merge included) ends within SUITE_BUDGET and a device call of SUITE_BUDGET + a margin returns it."""
    budget = 35  # headline: 1 s + 3 s grace; cuda_scan_headline: the rest (its minimum is 20 s), then its 3 s grace
    env = faulty_env(tmp_path, "bench/bench_bilstm.py=hang bench/bench_cuda_scan.py=hang")
    t0 = time.monotonic()
    proc = run_suite(tmp_path / "out", **env, SUITE_BUDGET=str(budget), STAGE_KILL_AFTER="3", CAP_headline="1",
                     SKIP_STAGES="env build smoke bilstm_tail crossbar imc_eval cuda_tests")
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert merged["cut"] == ["headline", "cuda_scan_headline"] and merged["failed"] == [], merged["status"]
    head, scan = (next(s for s in merged["stages"] if s["stage"] == n) for n in ("headline", "cuda_scan_headline"))
    assert head["limit_s"] == 1 and head["rc"] == 137 and scan["rc"] == 137  # SIGINT ignored: SIGKILLed
    assert scan["limit_s"] >= 20
    pids = [int(p) for p in (tmp_path / "fault_pids").read_text().split()]
    assert len(pids) == 4 and not any(alive(p) for p in pids)  # both stages' processes and their children
    # the suite counts whole seconds from its start (< 1 s off) and keeps 5 s for the last merge
    assert wall <= budget + 1.5, (wall, proc.stderr[-2000:])


def test_a_run_killed_during_a_stage_returns_that_stage_so_far(tmp_path):
    """The device tool SIGKILLs the command at its time limit, maybe in the middle of a stage (a call given less
    time than SUITE_BUDGET needs): OUT's merge then says which stage was running, and the archive holds what that
    stage had written (a benchmark rewrites its JSON after every case), not only the stages that had ended."""
    import tarfile

    out, stages = tmp_path / "out", tmp_path / "stages"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "STAGES_DIR": str(stages), "SUITE_BUDGET": "120",
           "PUBLISH_EVERY": "1",
           "SKIP_STAGES": "env build smoke cuda_scan_headline bilstm_tail crossbar imc_eval cuda_tests",
           **faulty_env(tmp_path, "bench/bench_bilstm.py=partial")}
    proc = subprocess.Popen(["bash", str(SUITE)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    archived = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "04_headline.json" not in archived:
            time.sleep(0.5)
            if (out / "gpu_suite_stages.tar.gz").exists():
                with tarfile.open(out / "gpu_suite_stages.tar.gz") as tar:
                    archived = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the device tool's kill of the command
        proc.wait()
        for pid in (tmp_path / "fault_pids").read_text().split() if (tmp_path / "fault_pids").exists() else ():
            try:  # the stage runs in timeout's own process group, which outlives the suite's
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert json.loads(archived.get("04_headline.json", b"null")) == {"rows": 1}, sorted(archived)
    assert b"first row written" in archived["04_headline.log"]
    merged = json.loads((out / "gpu_suite.json").read_text())
    assert merged["running"] == ["headline"] and merged["status"]["headline"] == "running"


def test_a_crashed_stage_is_recorded_and_the_suite_goes_on(tmp_path):
    """A stage whose interpreter dies (SIGSEGV in a kernel, SIGKILL from the OOM killer long before its limit) or
    that exits non-zero without its JSON is "failed" with its exit code, the signal named, its log kept; the next
    stages run."""
    env = faulty_env(tmp_path, "bench/bench_bilstm.py=segv bench/bench_cuda_scan.py=kill bench/bench_crossbar.py=exit "
                               "bench/bench_imc_eval.py=ok")
    proc = run_suite(tmp_path, **env, SUITE_BUDGET="200", SKIP_STAGES="env build smoke bilstm_tail cuda_tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert merged["failed"] == ["headline", "cuda_scan_headline", "crossbar"] and merged["ran"] == ["imc_eval"]
    by = {s["stage"]: s for s in merged["stages"]}
    assert (by["headline"]["rc"], by["headline"]["note"]) == (128 + signal.SIGSEGV, "killed by SIGSEGV")
    scan = by["cuda_scan_headline"]  # not "cut": killed before its limit
    assert (scan["rc"], scan["note"]) == (128 + signal.SIGKILL, "killed by SIGKILL")
    assert by["crossbar"]["rc"] == 3 and by["crossbar"]["note"] == "" and by["crossbar"]["result"] is None
    assert "crashing" in by["headline"]["log_tail"] and "without a JSON" in by["crossbar"]["log_tail"]
    assert by["imc_eval"]["result"] == {"ok": True}


@pytest.mark.parametrize("pep660", [True, False], ids=["pip", "old-setuptools"])
def test_a_failed_build_costs_only_itself_and_needs_no_network(tmp_path, pep660):
    """The device machine has no network and has never compiled these sources: the build (BUILD=fresh runs it in a dry
    run too) installs with pip offline, and a failed compile is not compiled again (setup.py build_ext after pip
    repeated the same error, doubling the minutes lost); the build stage fails with its log, the next stages run.
    setup.py build_ext --inplace is the way only where pip or an editable-capable setuptools (>= 64) is missing."""
    env = faulty_env(tmp_path, "--no-build-isolation=exit setup.py=exit" + ("" if pep660 else " find_spec=exit"))
    proc = run_suite(tmp_path / "out", **env, BUILD="fresh", SUITE_BUDGET="200",
                     SKIP_STAGES="env smoke headline bilstm_tail crossbar imc_eval cuda_tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert merged["failed"] == ["build"] and merged["ran"] == ["cuda_scan_headline"], merged["status"]
    assert "without a JSON" in merged["stages"][1]["log_tail"]
    calls = (tmp_path / "fault_pids.calls").read_text().splitlines()
    if not pep660:
        assert calls[0].startswith("-c ") and "find_spec" in calls[0]
        assert calls[1:] == ["setup.py build_ext --inplace"], calls
        return
    [call] = calls  # pip only, once
    assert call.split()[:3] == ["-m", "pip", "install"] and {"--no-index", "--no-deps", "-e"} <= set(call.split())


def test_a_second_run_into_the_same_folders_reports_only_its_own_results(tmp_path):
    """A warm device machine keeps STAGES_DIR (/tmp/gpu_suite) between calls: a rerun's stage that writes no JSON
    must not show the first run's as its result (nor a test stage's earlier JSON stand for its new junit XML)."""
    out, stages = tmp_path / "out", tmp_path / "stages"
    skip = "env build smoke headline bilstm_tail crossbar imc_eval cuda_tests"
    for faults, want in (("bench/bench_cuda_scan.py=ok", {"ok": True}), ("bench/bench_cuda_scan.py=exit", None)):
        proc = run_suite(out, **faulty_env(tmp_path, faults), STAGES_DIR=str(stages), SUITE_BUDGET="100",
                         SKIP_STAGES=skip)
        assert proc.returncode == 0, proc.stderr[-3000:]
        merged = json.loads((out / "gpu_suite.json").read_text())
        assert merged["stages"][4]["stage"] == "cuda_scan_headline" and merged["stages"][4]["result"] == want
    assert merged["failed"] == ["cuda_scan_headline"] and not (stages / "05_cuda_scan_headline.json").exists()


def test_a_runaway_log_does_not_make_the_archive_too_big_to_come_back(tmp_path):
    """The device machine returns no file over 16 MiB: a stage that prints without end (a test failing in a loop,
    a sanitizer listing every bad access) must not push the archive past that, and the merge never reads a log whole;
    the archive keeps the log's end, where the error is."""
    import tarfile

    out, stages = tmp_path / "out", tmp_path / "stages"
    proc = run_suite(out, **faulty_env(tmp_path, "bench/bench_cuda_scan.py=spew"), STAGES_DIR=str(stages),
                     SUITE_BUDGET="100",
                     SKIP_STAGES="env build smoke headline bilstm_tail crossbar imc_eval cuda_tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (stages / "05_cuda_scan_headline.log").stat().st_size > 24_000_000
    assert (out / "gpu_suite_stages.tar.gz").stat().st_size <= 16 << 20
    merged = json.loads((out / "gpu_suite.json").read_text())
    assert merged["ran"] == ["cuda_scan_headline"] and merged["stages"][4]["log_tail"].endswith("END OF LOG\n")
    with tarfile.open(out / "gpu_suite_stages.tar.gz") as tar:
        log = tar.extractfile("gpu_suite_stages/05_cuda_scan_headline.log").read()
    assert log.startswith(b"[gpu_suite: the first ") and log.endswith(b"END OF LOG\n") and len(log) < (1 << 20) + 100


def test_a_zero_never_means_no_limit(tmp_path):
    """`timeout 0` means no limit, `timeout -k 0` no SIGKILL: a stage whose cap is 0 (CAP_x=0, BENCH_WAIT_MAX=0: "no
    time for it") or whose budget left was exactly 0 ran without a limit, and with STAGE_KILL_AFTER=0 a stage ignoring
    SIGINT was never killed: either held the suite until the device call was killed. Now the first is skipped, the
    second SIGKILLed 1 s after its SIGINT."""
    env = faulty_env(tmp_path, "bench/bench_crossbar.py=hang bench/bench_imc_eval.py=hang")
    try:
        proc = run_suite(tmp_path / "out", timeout=60, **env, CAP_crossbar="0", CAP_imc_eval="1", STAGE_KILL_AFTER="0",
                         SUITE_BUDGET="100",
                         SKIP_STAGES="env build smoke headline cuda_scan_headline bilstm_tail cuda_tests")
    finally:
        for pid in (tmp_path / "fault_pids").read_text().split() if (tmp_path / "fault_pids").exists() else ():
            try:
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    by = {s["stage"]: s for s in merged["stages"]}
    assert by["crossbar"]["status"] == "skipped" and by["crossbar"]["note"].startswith("no time"), by["crossbar"]
    assert by["imc_eval"]["status"] == "cut" and by["imc_eval"]["rc"] == 137 and by["imc_eval"]["seconds"] <= 4
    assert "bench_crossbar" not in (tmp_path / "fault_pids.calls").read_text()  # never started


def test_a_test_stage_that_dies_says_in_which_test(tmp_path):
    """pytest writes its junit XML only at the end: where it dies (SIGKILL after a kernel that never returns, a crash
    in host code), the stage has no JSON and its log is all that tells which test it was in; -q printed dots."""
    (tmp_path / "die_in_second_test.py").write_text(
        "import os, signal\n"
        "seen = []\n"
        "def pytest_runtest_setup(item):\n"
        "    seen.append(item.nodeid)\n"
        "    if len(seen) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n")
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import GPU_SMOKE

    proc = run_suite(tmp_path / "out", PYTHONPATH=str(tmp_path), PYTEST_ADDOPTS="-p die_in_second_test",
                     SUITE_BUDGET="300",
                     SKIP_STAGES="env build headline cuda_scan_headline bilstm_tail crossbar imc_eval cuda_tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    smoke = next(s for s in merged["stages"] if s["stage"] == "smoke")
    assert smoke["status"] == "failed" and smoke["rc"] == 128 + signal.SIGKILL and smoke["result"] is None
    assert smoke["log_tail"].rstrip().splitlines()[-1].startswith(GPU_SMOKE[1]), smoke["log_tail"][-500:]


def test_a_mistyped_knob_is_refused_before_anything_runs(tmp_path):
    """SUITE_BUDGET=540s (or CAP_crossbar=1m, or an octal-looking 08) broke the shell arithmetic inside every stage
    (or that one), which then vanished from the merge without a word, and the suite exited 0; it is now refused at
    once, every bad knob named, before any stage starts."""
    proc = run_suite(tmp_path / "out", timeout=60, SUITE_BUDGET="540s", CAP_crossbar="1m", STAGE_KILL_AFTER="08",
                     CAP_headline="30")
    assert proc.returncode == 2
    assert "SUITE_BUDGET='540s'" in proc.stderr and "CAP_crossbar='1m'" in proc.stderr
    assert "STAGE_KILL_AFTER='08'" in proc.stderr and "CAP_headline" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_publisher_ends_with_the_suite(tmp_path):
    """While a stage runs, a background loop republishes the merge; where the suite alone is killed (not its
    process group: a caller's timeout that kills only the child), the loop must not go on merging for ever."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "SUITE_BUDGET": "120", "PUBLISH_EVERY": "1",
           "SKIP_STAGES": "env build smoke cuda_scan_headline bilstm_tail crossbar imc_eval cuda_tests",
           **faulty_env(tmp_path, "bench/bench_bilstm.py=hang")}
    proc = subprocess.Popen(["bash", str(SUITE)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def ours():  # every process of this run (they all carry its FAULT_PIDS)
        mark = f"FAULT_PIDS={env['FAULT_PIDS']}".encode()
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and mark in (d / "environ").read_bytes().split(b"\0") and alive(int(d.name)):
                    yield int(d.name)
            except OSError:
                pass

    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "fault_pids").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)
        proc.kill()  # the suite alone
        proc.wait()
        for pid in (tmp_path / "fault_pids").read_text().split():
            try:  # the stage (its own process group)
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except ProcessLookupError:  # killed with the first
                pass
        time.sleep(2.5)  # a publisher still there wakes up (every 1 s) and merges
        before = (out / "gpu_suite.json").stat().st_mtime_ns
        time.sleep(2.5)
        assert (out / "gpu_suite.json").stat().st_mtime_ns == before and not list(ours())
    finally:
        for pid in ours():
            os.kill(pid, signal.SIGKILL)
