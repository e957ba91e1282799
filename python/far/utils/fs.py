"""Files: the one atomic writer, the one way to open an input file, strict JSON.

Every file the project writes (checkpoints, training state, JSON results, figures) goes through
atomic_write: the content is written to a uniquely named temporary file in the destination's
folder, flushed to disk, then renamed over the destination. A failure at any point removes the
temporary file and leaves an existing destination as it was; a temporary file left by a process
that was killed is removed by the next write to the same destination.

Inside `command_inputs()` (the `far` command runs in one), every file opened with open_input
(checkpoints, data files) is remembered by inode, and atomic_write refuses to replace any of them:
no command overwrites what it read, under whatever name. Destinations that exist must be regular
files (never a device, FIFO or socket), and exist only with force=True; a symlink is written through
(its target is replaced, the link kept). Every file written gets the
permissions of a newly created file (0o666 less the umask), whatever the function that wrote the
content chose (safetensors creates its files 0600)."""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional, Union

from far.errors import ConfigError, FarError

PathLike = Union[str, os.PathLike]

# (st_dev, st_ino) -> path of every input opened in the current command_inputs() scope; None outside one
_INPUTS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("far_inputs", default=None)


@contextlib.contextmanager
def command_inputs():
    """Scope of one command: files opened with open_input (or passed to note_input) inside it cannot be
    written by atomic_write inside it."""
    token = _INPUTS.set({})
    try:
        yield
    finally:
        _INPUTS.reset(token)


def note_input(path: PathLike) -> None:
    """Remember `path` as an input of the current command (no-op outside command_inputs())."""
    seen = _INPUTS.get()
    if seen is not None:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            seen[(st.st_dev, st.st_ino)] = os.fspath(path)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


class NotRegularFile(ConfigError):
    """A path that must be a regular file is a folder, device, FIFO or socket."""


def open_input(path: PathLike, what: str = "file") -> BinaryIO:
    """`path` opened for binary reading. Anything but a regular file raises NotRegularFile; the open
    never blocks (a FIFO is detected, not waited on). OSError as open() raises it. The file is
    remembered as an input of the current command (command_inputs)."""
    check_regular(path, what)  # devices are refused before they are opened (opening some has effects)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:  # again on what was opened: the path may have been swapped meanwhile
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path}: is {_kind(st.st_mode)}, not a regular {what}")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    seen = _INPUTS.get()
    if seen is not None:
        seen[(st.st_dev, st.st_ino)] = os.fspath(path)
    return f


def read_text(path: PathLike, what: str = "file") -> str:
    """The UTF-8 text of the input file `path`, read through open_input (regular files only, a FIFO never
    waited on); bytes that are not UTF-8 are a ConfigError naming the file and the first bad byte."""
    with open_input(path, what) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json(path: PathLike, what: str = "file") -> Any:
    """The JSON value of the input file `path` (read_text); ConfigError naming the file if it is not JSON
    (e.g. cut short)."""
    try:
        return json.loads(read_text(path, what))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not a JSON {what} ({e})") from None


def check_regular(path: PathLike, what: str = "file") -> None:
    """NotRegularFile unless `path` (followed through symlinks) is a regular file; FileNotFoundError if absent."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path}: is {_kind(st.st_mode)}, not a regular {what}")


def _fsync(path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _temp_name(directory: Path, name: str) -> Path:
    """A temporary file of destination `name` in `directory` (pid and a random part: see _remove_stale_temps)."""
    return directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def _unwritable(directory: Path, name: str) -> Optional[str]:
    """Why no file can be created in `directory` (None if one can): its permissions (os.access), then a
    temporary file created and removed (root passes os.access everywhere, yet cannot create files in
    /proc or on a read-only mount). `name`: the file the caller will write, for the temporary's name."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    probe = _temp_name(directory, name)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        return str(e.strerror or e)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def _check_writable(p: Path, what: str) -> None:
    """ConfigError naming `p` unless a file can be created in its folder (a symlink's: its target's)."""
    directory = Path(os.path.realpath(p)).parent
    why = _unwritable(directory, p.name)
    if why is not None:
        raise ConfigError(f"{what} {p}: cannot write in its folder {directory} ({why})")


def check_folder(path: PathLike, what: str = "folder") -> Path:
    """Checks, before any work, that `path` is (or can be made) a folder files can be created in, without
    creating anything that is missing: ConfigError naming `what` if it, or the nearest part of it that
    exists, is not a folder, or no file can be created there (permissions, a read-only mount, /proc)."""
    p = Path(path)
    if not os.fspath(p):
        raise ConfigError(f"{what} {os.fspath(path)!r}: not a folder name")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p}: exists and is not a folder")
    base = p.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{what} {p}: cannot be created ({base} is not a folder)")
    why = _unwritable(base.resolve(), "probe")
    if why is not None:
        raise ConfigError(f"{what} {p}: cannot " + ("write in it" if base == p.absolute() else f"be created in {base}")
                          + f" ({why})")
    return p


def make_folder(path: PathLike, what: str = "folder") -> Path:
    """check_folder, then create `path` and its missing parents."""
    p = check_folder(path, what)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot create it ({e.strerror or e})") from None
    return p


def check_output(path: PathLike, *, force: bool = True, inputs: Iterable[PathLike] = (), what: str = "output",
                 writable: bool = True) -> Path:
    """Checks before anything is computed: `path` is not a folder, device, FIFO or socket, its folder
    exists and a file can be created in it (unless writable=False), it is not one of `inputs` nor a file
    this command has read (command_inputs; the same file under any name), and it does not exist unless
    `force`. Returns Path."""
    p = Path(path)
    if not os.fspath(p) or p.name in ("", ".", ".."):
        raise ConfigError(f"{what} {os.fspath(path)!r}: not a file name")
    if p.is_dir():
        raise ConfigError(f"{what} {p}: is a folder; give a file name")
    if p.is_symlink():  # written through (atomic_write): its target must be writable
        real = Path(os.path.realpath(p))
        try:
            os.stat(p)
        except FileNotFoundError:  # a dangling link: its target is created
            pass
        except OSError as e:  # a loop
            raise ConfigError(f"{what} {p}: a symlink that cannot be followed ({e.strerror or e})") from None
        if not real.parent.is_dir():
            raise ConfigError(f"{what} {p}: a symlink to {real}, whose folder {real.parent} does not exist")
    elif not p.resolve().parent.is_dir():
        raise ConfigError(f"{p.parent}: " + ("not a folder" if p.parent.exists() else "no such folder")
                          + f" for {what} {p.name}")
    try:
        st = os.stat(p)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {p}: is {_kind(st.st_mode)}; only regular files are written (give a file name)")
    for src in inputs:
        if src is not None and _same_file(p, Path(src)):
            raise ConfigError(f"{what} {p}: is an input of this command ({src}); write somewhere else")
    seen = _INPUTS.get()
    if st is not None and seen and (st.st_dev, st.st_ino) in seen:
        raise ConfigError(f"{what} {p}: is an input of this command ({seen[(st.st_dev, st.st_ino)]}); "
                          "write somewhere else")
    if st is not None and not force:
        raise ConfigError(f"{what} {p}: exists; pass --force to overwrite it")
    if writable:
        _check_writable(p, what)
    return p


_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp(?:\.d)?$")  # .d: private_folder's


def private_folder(tmp: PathLike, write: Callable[[str], Any]) -> None:
    """For an atomic_write content function whose library makes temporary files of its own beside the name it
    is given (safetensors' save_file: '.tmpXXXXXX', then a rename): `write` gets a name inside a folder of
    ours (`tmp` + ".d"), its result is moved to `tmp` and the folder removed; a killed writer's folder is
    removed by the next write to the destination, as its temporary file is."""
    folder = Path(os.fspath(tmp) + ".d")
    os.mkdir(folder, 0o700)
    try:
        inner = folder / "content"
        write(str(inner))
        os.replace(inner, tmp)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_stale_temps(directory: Path, name: str) -> None:
    """Remove temporary files of `name` left by writers that no longer run (killed mid-write)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _TMP.match(entry.name)
            if not m or m["name"] != name:
                continue
            pid = int(m["pid"])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                continue  # its writer is alive (or another user's process): leave it
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, OSError):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)


def _write_error(e: BaseException, tmp: Path) -> Optional[OSError]:
    """The OSError behind a failed write of `tmp`: `e` itself, or one a writer turned into its own error
    (torch.save writing to a file object raises RuntimeError "unexpected pos" from the file's OSError, e.g.
    ENOSPC); None when no error of the OS about that file is in `e`'s chain, and for an interrupt (Ctrl-C
    stays one) or far's own errors."""
    if not isinstance(e, Exception) or isinstance(e, FarError):
        return None
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp), tmp):
            return e
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path: PathLike, content: Union[bytes, str, Callable[[str], Any]], *, force: bool = True,
                 inputs: Iterable[PathLike] = ()) -> Path:
    """Write `path` atomically and return it.

    content: bytes, text (UTF-8), or a function that writes the file whose path it is given (e.g. one that
    opens it and torch.save's to the file object, whose OSError then stays visible). force=False refuses an
    existing `path`; `inputs` are files that must not be overwritten (check_output; nor is any file read
    inside command_inputs()). An existing destination must be a regular file; a symlink is written through
    (its target is replaced and the link kept). The temporary file is created with the umask's
    permissions (given back to it after `content` ran: a writer may have replaced the file with one of
    its own mode), fsynced, renamed over `path`; the folder is fsynced where the OS allows. An OSError
    about the temporary file names `path` instead."""
    p = check_output(path, force=force, inputs=inputs, writable=False)  # creating the temp file checks that
    # a symlink is written through (as cp and editors do): its target is replaced, the link stays; the
    # temporary file lies in the target's folder, so the rename never crosses file systems
    dest = Path(os.path.realpath(p))
    directory = dest.parent
    _remove_stale_temps(directory, dest.name)
    tmp = _temp_name(directory, dest.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask-respecting mode
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        if callable(content):
            content(str(tmp))
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with open(tmp, "wb") as f:
                f.write(data)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # e.g. safetensors' 0600
            with contextlib.suppress(OSError):  # some file systems have no modes to change
                os.chmod(tmp, mode)
        _fsync(tmp)
        check_output(p, force=force, inputs=inputs, writable=False)  # again: the destination may have changed
        os.replace(tmp, dest)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _write_error(e, tmp)
        if cause is not None:
            raise OSError(cause.errno, f"cannot write ({cause.strerror or cause})", os.fspath(p)) from e
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        _fsync(directory)
    return p


def strict_json(obj: Any) -> Any:
    """A copy of `obj` that strict JSON can hold: NaN/inf become the strings "nan", "inf", "-inf",
    tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: PathLike, obj: Any, *, force: bool = True, inputs: Iterable[PathLike] = (),
               indent: int = 2) -> Path:
    """`obj` as indented strict JSON (see strict_json), written atomically; the folder is created."""
    Path(os.path.realpath(path)).parent.mkdir(parents=True, exist_ok=True)  # realpath: a symlink loop is
    # refused by atomic_write with a clear message (Path.resolve raises RuntimeError)
    text = json.dumps(strict_json(obj), indent=indent, allow_nan=False, default=str) + "\n"
    return atomic_write(path, text, force=force, inputs=inputs)


def append_jsonl(path: PathLike, row: dict) -> None:
    """Append one JSON line (metrics logs: each line is complete or absent). The log must be a regular
    file (created if absent); a FIFO or device in its place is refused, never waited on."""
    if os.path.exists(path):
        check_regular(path, "log file")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o666)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path}: is {_kind(st.st_mode)}, not a regular file; cannot log to it")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "a")
    except BaseException:
        os.close(fd)
        raise
    with f:
        f.write(json.dumps(strict_json(row)) + "\n")
