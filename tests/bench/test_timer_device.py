"""The timers on a CUDA device other than the current one (`--device cuda:1`, which bench_imc_eval's --help offers):
torch.cuda.Event.record() and torch.cuda._sleep() act on the CURRENT device's stream, so events recorded that way
bracket nothing of the work on cuda:1 (times near 0). Emulated on the CPU: torch.cuda's stream, event and device
calls are replaced by fakes that remember the device each acts on (current device 0, work asked on 1)."""
import pytest
import torch

import far_kernels.benchmark as benchmark
from conftest import load_bench


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"current": 0, "recorded": []}

    def index(device):
        return state["current"] if device is None or torch.device(device).index is None else torch.device(device).index

    def current_stream(device=None):
        return ("stream", index(device))

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            state["recorded"].append((stream or current_stream())[1])

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    class Device:  # torch.cuda.device(d): current device d inside
        def __init__(self, device):
            self.idx, self.prev = index(device), None

        def __enter__(self):
            self.prev, state["current"] = state["current"], self.idx

        def __exit__(self, *exc):
            state["current"] = self.prev

    for name, value in (("current_stream", current_stream), ("Event", Event), ("device", Device),
                        ("current_device", lambda: state["current"]), ("synchronize", lambda device=None: None),
                        ("empty_cache", lambda: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    return state


def test_time_fn_records_its_events_on_the_devices_stream(fake_cuda):
    benchmark.time_fn(lambda: None, device="cuda:1", reps=3, warmup=1, warmup_s=0.0)
    assert fake_cuda["recorded"] and set(fake_cuda["recorded"]) == {1}


def test_time_variants_runs_the_gpu_timer_on_its_device(fake_cuda, monkeypatch):
    common = load_bench("common")
    seen = []

    class Timer:  # stands in for GpuTimer: where its events and sleeps would go
        method, k, host_ms = "events", 1, 0.0

        def __init__(self, fn, device, graphs=True):
            seen.append(torch.cuda.current_device())

        def warm(self, reps):
            seen.append(torch.cuda.current_device())
            return [1.0] * reps

        cold = warm

    monkeypatch.setattr(common, "GpuTimer", Timer)
    res = common.time_variants({"a": lambda: None}, "cuda:1", rounds=2, reps=2)
    assert res["a"]["ms"] == 1.0 and seen and set(seen) == {1}
    assert torch.cuda.current_device() == 0  # restored
