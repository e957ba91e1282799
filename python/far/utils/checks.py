"""Checks of an API caller's numeric settings (one message shape: '<name> must be a finite number ...')."""
from __future__ import annotations

import math
from typing import Optional

from far.errors import ConfigError


def finite_number(name: str, value, low: Optional[float] = None, strict: bool = False) -> None:
    """ConfigError unless `value` is a finite int or float (not a bool) and, with `low`, >= low (> low when
    `strict`). NaN passes no comparison and inf most: both are refused by name."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{name} must be a finite number{bound}, got {value!r}")
