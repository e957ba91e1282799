"""far.utils.checks.finite_number: every value that is no usable number is a ConfigError naming the setting."""
import pytest

from far.errors import ConfigError
from far.utils.checks import finite_number


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, "1", None, 10 ** 400, -10 ** 400,
                                   10 ** 5000], ids=["nan", "inf", "-inf", "bool", "str", "None", "1e400", "-1e400",
                                                     "1e5000"])
def test_non_numbers_are_refused_by_name(value):
    """An int beyond float's range used to escape as math.isfinite's OverflowError (no setting named)."""
    with pytest.raises(ConfigError, match=r"^lr must be a finite number, got "):
        finite_number("lr", value)


@pytest.mark.parametrize("value,low,strict,ok", [(0, 0, False, True), (0, 0, True, False), (-1, 0, False, False),
                                                 (2.5, None, False, True), (-2.5, None, False, True)])
def test_bounds(value, low, strict, ok):
    if ok:
        finite_number("w", value, low, strict)
    else:
        with pytest.raises(ConfigError, match=r"^w must be a finite number >"):
            finite_number("w", value, low, strict)
