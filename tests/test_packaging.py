"""What an installed far-engine needs is in its sdist, not only in a checkout.

A copy of the checkout is packed with `setup.py sdist` with the extension build off (setuptools then adds no C++
source by itself, so MANIFEST.in must); the sdist must hold every file of csrc/ (the extension build compiles the
sources and includes the headers) and none of tests/ or bench/."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "far-runs",
                                ".pytest_cache")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The names in the sdist."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    env = {**os.environ, "FAR_SKIP_EXT_BUILD": "1"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist"), "--formats=gztar"],
                       cwd=src, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    return [n.split("/", 1)[1] for n in names if "/" in n]


def test_sdist_holds_every_extension_source_and_no_tests(packed):
    names = packed
    csrc = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file())
    assert csrc and not set(csrc) - set(names), f"missing from the sdist: {sorted(set(csrc) - set(names))}"
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench")]

