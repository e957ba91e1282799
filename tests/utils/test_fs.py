"""far.utils.fs: the modes of the files the atomic writer finalizes, and outputs whose folder cannot be
written (refused up front, named in every error). The writer's other guarantees are tested with the
hostile inputs (tests/test_hostile.py)."""
import contextlib
import os
import stat

import pytest
import torch

import far
from far.errors import ConfigError
from far.utils import fs


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def tiny():
    torch.manual_seed(0)
    return far.create_model("fmnist_deit_tiny", depth=1, embed_dim=8, num_heads=2, hidden_sizes=2)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["022", "077", "002"])
def test_written_files_get_the_umask_mode(tmp_path, mask, mode):
    """safetensors creates its file 0600 itself; the writer gives every file the mode the umask gives."""
    with umask(mask):
        far.save(tiny(), tmp_path / "m.safetensors")
        fs.write_json(tmp_path / "r.json", {"a": 1})
        fs.atomic_write(tmp_path / "b.bin", b"x")
        fs.atomic_write(tmp_path / "s.pt", lambda tmp: torch.save({"x": torch.zeros(1)}, tmp))
    for name in ("m.safetensors", "r.json", "b.bin", "s.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    assert far.load(tmp_path / "m.safetensors") is not None


def test_overwriting_gives_the_umask_mode_too(tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    with umask(0o022):
        far.save(tiny(), target, force=True)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_unwritable_folder_is_refused_up_front(tmp_path, where):
    """/proc refuses new files even to root (for whom os.access says yes); a file is no folder at all."""
    (tmp_path / "somefile").write_text("x")
    path = "/proc/far-test.json" if where == "proc" else tmp_path / "somefile" / "out.json"
    with pytest.raises(ConfigError) as e:
        fs.check_output(path, what="--json")
    assert str(e.value).startswith(f"--json {path}" if where == "proc" else f"{path.parent}: not a folder"), e.value
    assert ".tmp" not in str(e.value)


def test_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == os.fspath(tmp_path)
                        else real(p, mode, **kw))
    with pytest.raises(ConfigError, match=r"--json .*out\.json: cannot write in its folder .*permission denied"):
        fs.check_output(tmp_path / "out.json", what="--json")


def test_writability_check_leaves_nothing_behind(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    assert fs.check_output(tmp_path / "new.json") == tmp_path / "new.json"
    assert fs.check_output(tmp_path / "old.json", force=True) == tmp_path / "old.json"
    assert sorted(os.listdir(tmp_path)) == ["old.json"]


@pytest.mark.parametrize("content", [b"x", "text", lambda tmp: open(tmp, "wb").close()])
def test_late_write_error_names_the_destination(content):
    """A write that fails after the checks (here: the writer itself skips the folder check) names the
    destination, never its temporary file."""
    with pytest.raises(OSError) as e:
        fs.atomic_write("/proc/far-test.json", content)
    assert e.value.filename == "/proc/far-test.json" and ".tmp" not in str(e.value), e.value


def test_late_write_error_in_the_command_line_names_the_destination():
    """As one `far: error:` line: the destination and why."""
    from far.cli.main import _fmt_error

    with pytest.raises(OSError) as e:
        fs.atomic_write("/proc/far-test.json", b"x")
    line = _fmt_error(e.value)
    assert line.startswith("/proc/far-test.json: cannot write (") and ".tmp" not in line, line


@pytest.mark.parametrize("where", ["same-folder", "other-folder", "other-filesystem"])
def test_a_symlink_is_written_through(tmp_path, where):
    """An existing destination that is a symlink keeps being one: its target gets the new content (as cp
    and editors that preserve links do), wherever it lies; the old writer put a plain file in the link's
    place, or (target on another file system) failed with 'Invalid cross-device link'."""
    if where == "other-filesystem":
        if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("no second file system (/dev/shm) to link to")
        import tempfile

        folder = tempfile.mkdtemp(dir="/dev/shm")
    else:
        folder = tmp_path if where == "same-folder" else tmp_path / "real"
        os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "target.json")
    try:
        with open(target, "w") as f:
            f.write("old")
        link = tmp_path / "link.json"
        os.symlink(target, link)
        fs.write_json(link, {"a": 1})
        fs.atomic_write(link, lambda tmp: open(tmp, "w").write('{"b": 2}'))
        assert os.path.islink(link) and os.readlink(link) == target
        with open(target) as f:
            assert f.read() == '{"b": 2}'
        assert not [n for n in os.listdir(folder) + os.listdir(tmp_path) if n.endswith(".tmp")]
    finally:
        if where == "other-filesystem":
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def test_a_dangling_symlink_creates_its_target_and_a_loop_is_refused(tmp_path):
    os.symlink("new.json", tmp_path / "dangling.json")
    fs.atomic_write(tmp_path / "dangling.json", "x")
    assert os.path.islink(tmp_path / "dangling.json") and (tmp_path / "new.json").read_text() == "x"
    os.symlink("nowhere/t.json", tmp_path / "nofolder.json")
    with pytest.raises(ConfigError, match=r"nofolder\.json: a symlink to .*nowhere.*does not exist"):
        fs.atomic_write(tmp_path / "nofolder.json", "x")
    os.symlink("loop.json", tmp_path / "loop.json")
    for write in (fs.atomic_write, fs.write_json):  # not Path.resolve's RuntimeError
        with pytest.raises(ConfigError, match=r"loop\.json: a symlink that cannot be followed"):
            write(tmp_path / "loop.json", "x")


WRITE_PAST_LIMIT = """
import sys, torch
from far.utils import fs
def save(tmp):  # torch.save to a file object turns the file's OSError into RuntimeError('unexpected pos')
    with open(tmp, "wb") as f:
        torch.save({"w": torch.zeros(1 << 18)}, f)
def interrupted(tmp):
    try:
        save(tmp)
    except RuntimeError:
        raise KeyboardInterrupt
for writer in (save, interrupted):
    try:
        fs.atomic_write(sys.argv[1], writer)
    except BaseException as e:
        os_error = isinstance(e, OSError)
        print(type(e).__name__, e.errno if os_error else None, e.filename if os_error else None)
"""


def test_a_writer_that_hides_the_disk_error_is_still_an_oserror_naming_the_destination(tmp_path):
    """A write refused by the OS (here past RLIMIT_FSIZE: EFBIG; a full disk gives ENOSPC) inside a writer that
    re-raises it as its own error (torch.save) is an OSError for the destination, so `far` prints one line; the
    old file stays, no temporary is left. An interrupt during that write stays an interrupt."""
    import errno
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))  # the state above is 1 MiB

    dest = tmp_path / "last.pt"
    dest.write_bytes(b"old")
    p = subprocess.run([sys.executable, "-c", WRITE_PAST_LIMIT, str(dest)], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"OSError {errno.EFBIG} {dest}", "KeyboardInterrupt None None"], p.stdout
    assert os.listdir(tmp_path) == ["last.pt"] and dest.read_bytes() == b"old"
