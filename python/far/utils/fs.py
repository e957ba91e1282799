"""Files: the one atomic writer, strict JSON.

Every file the project writes (checkpoints, training state, JSON results, figures) goes through
atomic_write: the content is written to a uniquely named temporary file in the destination's
folder, flushed to disk, then renamed over the destination. A failure at any point removes the
temporary file and leaves an existing destination as it was."""
from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Union

from far.errors import ConfigError

PathLike = Union[str, os.PathLike]


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


def check_output(path: PathLike, *, force: bool = True, inputs: Iterable[PathLike] = (), what: str = "output") -> Path:
    """Checks before anything is computed: `path` is not a folder, its folder exists, it is not one
    of `inputs` (the same file under any name), and it does not exist unless `force`. Returns Path."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p}: is a folder; give a file name")
    if not p.resolve().parent.is_dir():
        raise ConfigError(f"{p.parent}: no such folder for {what} {p.name}")
    for src in inputs:
        if src is not None and _same_file(p, Path(src)):
            raise ConfigError(f"{what} {p}: is an input of this command ({src}); write somewhere else")
    if p.exists() and not force:
        raise ConfigError(f"{what} {p}: exists; pass --force to overwrite it")
    return p


def atomic_write(path: PathLike, content: Union[bytes, str, Callable[[str], Any]], *, force: bool = True,
                 inputs: Iterable[PathLike] = ()) -> Path:
    """Write `path` atomically and return it.

    content: bytes, text (UTF-8), or a function that writes the file whose path it is given (e.g.
    `lambda tmp: torch.save(obj, tmp)`). force=False refuses an existing `path`; `inputs` are files
    that must not be overwritten (check_output). The temporary file is created with the umask's
    permissions, fsynced, renamed over `path`; the folder is fsynced where the OS allows."""
    p = check_output(path, force=force, inputs=inputs)
    directory = p.resolve().parent
    tmp = directory / f".{p.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask-respecting mode
        if callable(content):
            content(str(tmp))
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with open(tmp, "wb") as f:
                f.write(data)
        _fsync(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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
    Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(strict_json(obj), indent=indent, allow_nan=False, default=str) + "\n"
    return atomic_write(path, text, force=force, inputs=inputs)


def append_jsonl(path: PathLike, row: dict) -> None:
    """Append one JSON line (metrics logs: each line is complete or absent)."""
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(row)) + "\n")
