"""Helpers of bench/gpu_suite.sh (standard library only, fast to start; `env` and `build-check` import torch).

    python bench/gpu_suite_stage.py env OUT.json             # machine, versions, flags, nvidia-smi
    python bench/gpu_suite_stage.py build-check OUT.json     # does far_kernels._C load, with CUDA kernels?
    python bench/gpu_suite_stage.py src-hash                 # hash of what the extension is built from
    python bench/gpu_suite_stage.py smoke-ids                # tests/conftest.py GPU_SMOKE, one per line, in order
    python bench/gpu_suite_stage.py status DIR TAG NAME STATUS RC SECONDS LIMIT [NOTE]
    python bench/gpu_suite_stage.py merge DIR                # DIR/gpu_suite.json from every stage's files
    python bench/gpu_suite_stage.py publish DIR DEST         # DEST/gpu_suite.json + DEST/gpu_suite_stages.tar.gz
    python bench/gpu_suite_stage.py named DIR                # gpu_suite-<device>-<stamp>.json, its name to keep
    python bench/gpu_suite_stage.py clean DIR                # remove an earlier run's stage files, merge, archive

Every stage TAG (01_env, 02_build, ...) leaves DIR/TAG.status.json (how it ended: ran, failed, cut by
its time limit, skipped; "running" while it runs, and so in the merge of a run killed then), DIR/TAG.log
and, when it produced one, DIR/TAG.json (a test stage's junit XML DIR/TAG.xml is turned into TAG.json here).
merge collects them, in stage order, into DIR/gpu_suite.json; the suite runs it after every stage, so a killed
run still leaves the merge of the stages before.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the end of each stage log that the archive keeps: a device machine returns no file over 16 MiB, and 11 stage logs
# of 1 MiB with the JSON beside them stay under that even where a runaway log does not compress
LOG_KEEP = 1 << 20


def _write(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _tail(path: Path, n: int) -> bytes:
    """The last n bytes of a file (a stage log can be huge: it is never read whole)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - n))
        return f.read(n)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"[:300]}


def junit_to_dict(path: Path) -> dict:
    """pytest's junit XML -> {"summary": {passed, failed, error, skipped}, "cases": [...]}."""
    root = ET.parse(path).getroot()
    cases, messages = [], {}
    for case in root.iter("testcase"):
        status = "passed"
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                status = name
                messages[case.get("name")] = (el.get("message") or "")[:300]
                break
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "status": status,
                      "time_s": float(case.get("time") or 0)})
    summary = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {"summary": summary, "cases": cases, "messages": messages}


def src_hash() -> str:
    h = hashlib.sha256()
    files = sorted([*ROOT.glob("csrc/**/*.cpp"), *ROOT.glob("csrc/**/*.h"), *ROOT.glob("csrc/**/*.cu"),
                    ROOT / "setup.py"])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    h.update(os.environ.get("FAR_CUDA_ARCHS", "9.0").encode())
    return h.hexdigest()[:16]


def smoke_ids() -> list:
    """tests/conftest.py's GPU_SMOKE, in its order, without importing the conftest (torch): the assignment's
    expression (string literals, f-strings, generators) is evaluated alone."""
    import ast

    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "GPU_SMOKE" for t in n.targets))
    return list(eval(compile(ast.Expression(node.value), "conftest.py:GPU_SMOKE", "eval"), {"__builtins__": {}}))


def cmd_env(out: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from common import run_flags

    from far.utils.env import environment

    cuda = torch.cuda.is_available()
    rec = {"environment": environment(), "flags": run_flags("cuda" if cuda else "cpu")}
    try:
        q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,utilization.gpu"
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True, timeout=20)
        rec["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()[:500]
    except (OSError, subprocess.SubprocessError) as e:
        rec["nvidia_smi"] = f"unavailable: {type(e).__name__}"
    _write(Path(out), rec)


def cmd_build_check(out: str) -> None:
    rec = {"src_hash": src_hash()}
    try:
        import far_kernels
        from far_kernels._ext import lib

        rec["extension_status"] = far_kernels.extension_status()
        rec["has_cuda_kernels"] = bool(lib is not None and lib.has_cuda())
        rec["file"] = getattr(lib, "__file__", None)
    except Exception as e:  # reported, the suite goes on
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
    old = {}
    if Path(out).exists():
        old = _read_json(Path(out))
    _write(Path(out), {**old, **rec})


def cmd_status(d, tag, name, status, rc, seconds, limit, note="") -> None:
    d = Path(d)
    if status == "failed" and 128 < int(rc) < 128 + signal.NSIG and not note:  # the shell's code of a signal's death
        try:
            note = f"killed by {signal.Signals(int(rc) - 128).name}"
        except ValueError:  # a real-time signal
            note = f"killed by signal {int(rc) - 128}"
    _write(d / f"{tag}.status.json", {"tag": tag, "stage": name, "status": status, "rc": int(rc),
                                       "seconds": int(seconds), "limit_s": int(limit), "note": note,
                                       "ended_utc": None if status == "running" else
                                       dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    xml = d / f"{tag}.xml"
    if xml.exists() and not (d / f"{tag}.json").exists():
        try:
            _write(d / f"{tag}.json", junit_to_dict(xml))
        except (OSError, ET.ParseError) as e:
            _write(d / f"{tag}.json", {"unreadable_junit": f"{type(e).__name__}: {e}"[:300]})


def cmd_merge(d) -> None:
    d = Path(d)
    meta = _read_json(d / "suite.json") if (d / "suite.json").exists() else {}
    stages = []
    for st in sorted(d.glob("*.status.json")):
        s = _read_json(st)
        tag = st.name[:-len(".status.json")]
        res = d / f"{tag}.json"
        log = d / f"{tag}.log"
        s["result"] = _read_json(res) if res.exists() else None
        s["log_tail"] = _tail(log, 4 * 2500).decode(errors="replace")[-2500:] if log.exists() else None
        stages.append(s)
    env = next((s["result"] for s in stages if s.get("stage") == "env" and s.get("result")), None)
    merged = {"suite": "gpu_suite", **meta, "merged_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "status": {s["stage"]: s["status"] for s in stages},
              "ran": [s["stage"] for s in stages if s["status"] == "ran"],
              "failed": [s["stage"] for s in stages if s["status"] == "failed"],
              "cut": [s["stage"] for s in stages if s["status"] == "cut"],
              "skipped": [s["stage"] for s in stages if s["status"] == "skipped"],
              "running": [s["stage"] for s in stages if s["status"] == "running"],
              "environment": env, "stages": stages}
    _write(d / "gpu_suite.json", merged)


# the files a run writes into DIR (and, with STAGES_DIR, into OUT): what `clean` removes before a run
RUN_FILE = re.compile(r"(\d\d_\w+\.(status\.json|json|log|xml)|gpu_suite\.json|suite\.json|gpu_suite_stages\.tar\.gz)"
                      r"(\.tmp)?")


def cmd_clean(*dirs) -> None:
    """Remove an earlier run's files from DIR (a STAGES_DIR kept on a warm device machine, an OUT given again):
    left there, a stage of this run that wrote no JSON showed the earlier run's as its result, and a test stage's
    new junit XML was never converted (an earlier TAG.json was taken for this run's)."""
    for d in map(Path, dirs):
        if d.is_dir():
            for f in d.iterdir():
                if RUN_FILE.fullmatch(f.name) and f.is_file():
                    f.unlink()


def cmd_publish(d, dest) -> None:
    """DEST/gpu_suite.json (DIR's merge) and DEST/gpu_suite_stages.tar.gz (every file of DIR, of a log over LOG_KEEP
    bytes its end), each replaced atomically: all a device machine must bring back (at most 8 files of its $OUT, each
    at most 16 MiB) while DIR keeps a file per output."""
    import io
    import tarfile

    d, dest = Path(d), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if (d / "gpu_suite.json").exists():
        tmp = dest / "gpu_suite.json.tmp"
        tmp.write_bytes((d / "gpu_suite.json").read_bytes())
        os.replace(tmp, dest / "gpu_suite.json")
    tmp = dest / "gpu_suite_stages.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(d.iterdir()):
            if not f.is_file() or f.name.endswith(".tmp"):
                continue
            size = f.stat().st_size
            if f.suffix == ".log" and size > LOG_KEEP:
                data = (f"[gpu_suite: the first {size - LOG_KEEP} bytes of this log are left out of the archive]\n"
                        .encode() + _tail(f, LOG_KEEP))
                info = tarfile.TarInfo(f"gpu_suite_stages/{f.name}")
                info.size, info.mtime = len(data), int(f.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(f, arcname=f"gpu_suite_stages/{f.name}")
    os.replace(tmp, dest / "gpu_suite_stages.tar.gz")


def main(argv) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "env":
        cmd_env(*args)
    elif cmd == "build-check":
        cmd_build_check(*args)
    elif cmd == "src-hash":
        print(src_hash())
    elif cmd == "smoke-ids":
        print("\n".join(smoke_ids()))
    elif cmd == "status":
        cmd_status(*args)
    elif cmd == "merge":
        cmd_merge(*args)
    elif cmd == "publish":
        cmd_publish(*args)
    elif cmd == "clean":
        cmd_clean(*args)
    elif cmd == "named":  # the merge's file name: gpu_suite-<device>-<stamp>.json
        m = _read_json(Path(args[0]) / "gpu_suite.json")
        dev = (((m.get("environment") or {}).get("environment") or {}).get("cuda") or {}).get("device") or "nodevice"
        print(f"gpu_suite-{re.sub(r'[^A-Za-z0-9_-]+', '_', dev)}-{m.get('stamp', 'nostamp')}.json")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
