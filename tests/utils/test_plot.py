"""far.utils.plot.grouped_bars with missing data: NaN / inf / None / 0 draw no bar, the figure is still written."""
import math
import warnings

import pytest

from far.utils import plot

pytestmark = pytest.mark.skipif(plot.pyplot() is None, reason="matplotlib is not installed")


@pytest.mark.parametrize("vals", [[math.nan], [math.nan, math.inf], [None, 0.0], [math.nan, 2.0]],
                         ids=["nan", "nan-inf", "none-zero", "nan-and-a-value"])
def test_missing_values_draw_no_bar(tmp_path, vals, monkeypatch):
    """An all-NaN series on the log axis made matplotlib refuse the whole figure ('Data cannot be log-scaled')."""
    heights = []
    real_bar = plot.pyplot().Axes.bar
    monkeypatch.setattr(plot.pyplot().Axes, "bar", lambda ax, x, h, *a, **k: heights.append(list(h))
                        or real_bar(ax, x, h, *a, **k))
    out = tmp_path / "bars.png"
    labels = [f"g{i}" for i in range(len(vals))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'no positive values' on a log axis without bars
        assert plot.grouped_bars(out, labels, {"s": vals}, "ms", "t") == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert heights == [[v if v is not None and math.isfinite(v) else 0 for v in vals]]


def test_a_series_of_the_wrong_length_is_refused(tmp_path):
    """matplotlib broadcasts a single value over every group: a wrong chart, no error."""
    with pytest.raises(ValueError, match="series 's' has 1 values for 2 labels"):
        plot.grouped_bars(tmp_path / "x.png", ["a", "b"], {"s": [1.0]}, "ms", "t")
    assert not (tmp_path / "x.png").exists()


def test_no_series_writes_an_empty_chart_without_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot.grouped_bars(tmp_path / "e.png", [], {}, "ms", "t") == str(tmp_path / "e.png")
