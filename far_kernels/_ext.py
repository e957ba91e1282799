"""The compiled extension far_kernels._C, or the reason it is missing (one place for that message).

`lib` is the extension module (None when it could not be imported); ops call its functions."""
from __future__ import annotations

INSTALL_HINT = "reinstall with the extension: `pip install --no-build-isolation -e .` from the repository root"

try:
    from far_kernels import _C as lib  # type: ignore[attr-defined]

    EXT_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    lib = None
    EXT_ERROR = f"far_kernels._C could not be imported ({e}); {INSTALL_HINT}"


def ext_has_cuda() -> bool:
    return lib is not None and bool(lib.has_cuda())
