"""What an installed far-engine needs is in its sdist and its wheel, not only in a checkout.

A copy of the checkout is packed with `setup.py sdist` with the extension build off (setuptools then adds no C++
source by itself, so MANIFEST.in must); the sdist must hold every file of csrc/ (the extension build compiles the
sources and includes the headers) and none of tests/ or bench/. From the unpacked sdist `setup.py build_py` lays out
what a wheel holds besides far_kernels._C, and the package imported from there (outside any checkout) must find what
it looks up at run time: every zoo checkpoint, the IMC cost constants, the CUDA emulation's sources."""
import json
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

LOOKUPS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import far, far_kernels
from far.imc.cost import CONSTANTS_FILE
from far.models.pretrained import ZOO, zoo_path
from far_kernels import cuda_emu
print(json.dumps({"far": far.__file__, "far_kernels": far_kernels.__file__,
                  "zoo": {name: str(zoo_path(name)) for name in ZOO}, "constants": str(CONSTANTS_FILE),
                  "emu": [str(cuda_emu._CSRC / s) for s in cuda_emu._SOURCES]}))
"""


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(names in the sdist, the build_py folder made from the unpacked sdist)."""
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
        tar.extractall(tmp / "x", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (top,) = (tmp / "x").iterdir()
    lib = tmp / "lib"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(lib)], cwd=top, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [n.split("/", 1)[1] for n in names if "/" in n], lib


def test_sdist_holds_every_extension_source_and_no_tests(packed):
    names, _ = packed
    csrc = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file())
    assert csrc and not set(csrc) - set(names), f"missing from the sdist: {sorted(set(csrc) - set(names))}"
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench")]


def test_the_package_finds_its_run_time_files_outside_a_checkout(packed, tmp_path):
    _, lib = packed
    r = subprocess.run([sys.executable, "-c", LOOKUPS, str(lib)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    files = [*found["zoo"].values(), found["constants"], *found["emu"]]
    assert Path(found["far"]).is_relative_to(lib) and Path(found["far_kernels"]).is_relative_to(lib)
    assert all(Path(f).is_relative_to(lib) and Path(f).is_file() for f in files), files
