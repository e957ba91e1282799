"""Checks of an API caller's numeric settings (one message shape: '<name> must be a finite number ...')."""
from __future__ import annotations

import math
from typing import Optional

from far.errors import ConfigError


def finite_number(name: str, value, low: Optional[float] = None, strict: bool = False) -> None:
    """ConfigError unless `value` is a finite int or float (not a bool) and, with `low`, >= low (> low when
    `strict`). NaN passes no comparison and inf most: both are refused by name."""
    try:  # an int beyond float's range is no usable setting: isfinite raises OverflowError on it
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        ok = False
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        try:
            shown = repr(value)
        except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
            shown = f"an int of {value.bit_length()} bits"
        raise ConfigError(f"{name} must be a finite number{bound}, got {shown}")
