"""The compiled extension far_kernels._C, or the reason it is missing (one place for that message)."""
from __future__ import annotations

INSTALL_HINT = "reinstall with the extension: `pip install --no-build-isolation -e .` from the repository root"

try:
    from far_kernels import _C  # type: ignore[attr-defined]

    EXT_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    EXT_ERROR = f"far_kernels._C could not be imported ({e}); {INSTALL_HINT}"


def ext_has_cuda() -> bool:
    return _C is not None and bool(_C.has_cuda())
