"""far_kernels.benchmark.time_fn: settings that would time nothing are refused before any call (they failed with
an IndexError after the warm-up), reps=None makes the one warm-up call its estimate needs, and the warm-up's
bookkeeping is linear in its calls. Counted with a fake clock, never timed."""
import builtins

import pytest

from far_kernels import benchmark
from far_kernels.benchmark import time_fn

TICK_MS = 2.0 ** -10  # the fake clock's time per call: sums of it are exact


@pytest.fixture
def fake_clock(monkeypatch):
    """Every call 'takes' TICK_MS; returns the list that counts the calls of fn."""
    calls = []
    monkeypatch.setattr(benchmark, "_one_call_ms", lambda fn, device: calls.append(fn()) or TICK_MS)
    return calls


@pytest.mark.parametrize("kw", [dict(reps=0), dict(reps=-3), dict(max_reps=0), dict(min_reps=0, min_time_s=0)],
                         ids=["reps0", "reps-negative", "max_reps0", "min_reps0-no-time"])
def test_settings_that_time_nothing_are_refused_before_any_call(kw, fake_clock):
    with pytest.raises(ValueError, match="no call would be timed"):
        time_fn(lambda: None, warmup_s=0.0, **kw)
    assert fake_clock == []


def test_call_counts_without_warm_up(fake_clock):
    st = time_fn(lambda: None, reps=3, warmup=0, warmup_s=0.0)
    assert (st["runs"], st["warmup_runs"], len(fake_clock), st["times_ms"]) == (3, 0, 3, [TICK_MS] * 3)
    fake_clock.clear()
    st = time_fn(lambda: None, warmup=0, warmup_s=0.0, min_reps=2, min_time_s=0.0)  # the estimate needs 1 call
    assert (st["runs"], st["warmup_runs"], len(fake_clock)) == (2, 1, 3)


def test_warm_up_bookkeeping_is_linear(monkeypatch, fake_clock):
    """A fast fn needs many warm-up calls, and the loop summed the whole list after each one: quadratic (a no-op
    fn's default 0.2 s warm-up ran for many minutes). Count the elements `sum` visits."""
    visited = []
    monkeypatch.setattr(benchmark, "sum", lambda xs: visited.append(len(xs)) or builtins.sum(xs), raising=False)
    st = time_fn(lambda: None, reps=2, warmup_s=4096 * TICK_MS / 1e3)
    assert st["warmup_runs"] == 4096 and len(fake_clock) == 4098
    assert sum(visited) <= 2 * len(fake_clock), f"sum visited {sum(visited)} elements for {len(fake_clock)} calls"
