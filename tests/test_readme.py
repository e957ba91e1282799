"""Every code block of README.md runs as written, in a fresh folder: Python blocks as scripts, shell
blocks line by line (`far` and `python` are this interpreter's). A block may be skipped only when the
line before it says why (`<!-- not run by tests/test_readme.py: ... -->`)."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- not run by tests/test_readme.py: (.+?) -->")


def blocks():
    """(index, language, code, skip reason or None) of every fenced block."""
    lines = (ROOT / "README.md").read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            prev = lines[i - 1] if i else ""
            skip = SKIP.search(prev)
            out.append((len(out), m.group(1), "\n".join(lines[i + 1:j]), skip.group(1) if skip else None))
            i = j
        i += 1
    return out


BLOCKS = blocks()


def test_readme_blocks_are_found_and_skips_are_explained():
    assert len(BLOCKS) >= 6
    langs = {lang for _, lang, _, _ in BLOCKS}
    assert langs <= {"python", "bash", "text"}, langs
    skipped = [b for b in BLOCKS if b[3] is not None]
    assert [b[2].split()[0] for b in skipped] == ["make"], "only the setup block may be skipped"


@pytest.fixture
def workdir(tmp_path):
    """A fresh folder with bench/ and scripts/ linked in, and `far` / `python` on PATH."""
    for name in ("bench", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    shims = tmp_path / ".shims"
    shims.mkdir()
    for name, cmd in (("far", f'exec "{sys.executable}" -m far.cli "$@"'), ("python", f'exec "{sys.executable}" "$@"')):
        f = shims / name
        f.write_text(f"#!/bin/sh\n{cmd}\n")
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg"}
    return tmp_path, env


def _commands(code: str):
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    return [c for c in code.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")]


@pytest.mark.fmnist  # the README's examples use Fashion-MNIST
@pytest.mark.parametrize("index", [i for i, lang, _, skip in BLOCKS if lang in ("python", "bash") and skip is None])
def test_readme_block_runs(index, workdir):
    cwd, env = workdir
    _, lang, code, _ = BLOCKS[index]
    if lang == "python":
        script = cwd / f"block{index}.py"
        script.write_text(code)
        runs = [[sys.executable, str(script)]]
    else:
        runs = [["bash", "-c", cmd] for cmd in _commands(code)]
    for argv in runs:
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"README block {index} ({lang}) failed: {argv[-1]}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
