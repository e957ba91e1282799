"""far.utils.env: the machine names written into results and checkpoint metadata, device strings."""
import builtins
import os

import pytest
import torch

import far.utils.env as hw
from far.errors import ConfigError


def test_cpu_name_reads_cpuinfo_and_counts_cores(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t: fpu\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
    assert hw.cpu_model() == "Test CPU 9000"
    assert hw.device_name("cpu") == f"cpu (Test CPU 9000, {os.cpu_count()} cores)"


def test_cpu_name_without_cpuinfo_falls_back_to_platform(monkeypatch):
    def no_file(f, *a, **k):
        raise FileNotFoundError(f)

    monkeypatch.setattr(builtins, "open", no_file)
    monkeypatch.setattr(hw.platform, "processor", lambda: "")
    monkeypatch.setattr(hw.platform, "machine", lambda: "x86_64")
    assert hw.cpu_model() == "x86_64"


def test_resolve_device():
    assert hw.resolve_device("cpu") == torch.device("cpu")
    assert hw.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, msg in (("tpu", "device tpu"), ("meta", "cpu or cuda"), ("cuda:99", "cuda")):
        with pytest.raises(ConfigError, match=msg):
            hw.resolve_device(bad)


def test_environment_names_the_commit_and_versions():
    env = hw.environment(threads=1)
    assert env["threads"] == 1 and env["versions"]["far"] and env["versions"]["torch"] == torch.__version__
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
