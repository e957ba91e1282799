"""The dispatcher when the extension is missing: pure-Python paths keep working, and asking for
cpp/cuda raises one clear message with the install command."""
import pytest
import torch

import far_kernels
from far_kernels import BackendUnavailable, bilstm_scan
from far_kernels import dispatch


@pytest.fixture
def no_extension(monkeypatch):
    msg = "far_kernels._C could not be imported (No module named 'far_kernels._C'); " + dispatch.INSTALL_HINT
    monkeypatch.setattr(dispatch, "lib", None)
    monkeypatch.setattr(dispatch, "EXT_ERROR", msg)
    monkeypatch.setattr(dispatch, "ext_has_cuda", lambda: False)
    return msg


def test_missing_extension_is_one_clear_message(no_extension):
    gx, w = torch.randn(1, 2, 3, 2, 8), torch.randn(1, 2, 8, 2)
    hs = [[2], [1]]
    assert bilstm_scan(gx, w, hs).shape == (1, 2, 3, 2, 2)  # auto falls back to the reference
    for backend in ("cpp", "cuda"):
        with pytest.raises(BackendUnavailable, match="pip install --no-build-isolation -e ."):
            bilstm_scan(gx, w, hs, backend=backend)
    report = far_kernels.backend_report("cpu")
    assert report["torch"] is None and "far_kernels._C could not be imported" in report["cpp"]


def test_extension_without_cuda_says_so(monkeypatch):
    if dispatch.lib is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(dispatch, "ext_has_cuda", lambda: False)
    assert "built without CUDA kernels" in dispatch.backend_reason("cuda", "cpu")


def test_select_is_the_one_rule():
    """Explicit > env > auto; auto takes the reference for gradients and float64 and skips backends whose
    per-call limits refuse the call; an explicit backend that cannot run says why (one exception type)."""
    calls = []
    op = dispatch.Op("toy", {"torch": lambda x: x + 1, "cpp": lambda x, out: calls.append("cpp") or x + 2,
                             "cuda": None, "triton": None},
                     limits={"cpp": lambda x: "too big" if x.numel() > 3 else None})
    small, big = torch.zeros(2), torch.zeros(5)
    cpp = "cpp" if far_kernels.backend_reason("cpp") is None else "torch"
    assert dispatch.select(op, None, "cpu", torch.float32, False, (small,)) == cpp
    assert dispatch.select(op, None, "cpu", torch.float32, False, (big,)) == "torch"  # auto: a limit, no error
    assert dispatch.select(op, None, "cpu", torch.float32, True, (small,)) == "torch"  # gradient
    assert dispatch.select(op, None, "cpu", torch.float64, False, (small,)) == "torch"  # fp64
    assert dispatch.select(op, "torch", "cpu", torch.float64, True) == "torch"
    if cpp == "cpp":
        for kw, why in (({"args": (big,)}, "too big"), ({"needs_grad": True}, "inference-only"),
                        ({"dtype": torch.float64}, "computes in fp32")):
            with pytest.raises(BackendUnavailable, match=why):
                dispatch.select(op, "cpp", "cpu", **kw)
        assert torch.equal(dispatch.run(op, (small,), backend=None, device="cpu", dtype=torch.float32,
                                        needs_grad=False), small + 2) and calls == ["cpp"]
    with pytest.raises(BackendUnavailable, match="toy has no cuda implementation"):
        dispatch.select(op, "cuda", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.select(op, "fast", "cpu")


@pytest.mark.parametrize("env", ["", "  "])
def test_empty_far_backend_counts_as_unset(monkeypatch, env):
    """`FAR_BACKEND= cmd` is how a shell clears the variable for one command: auto, not "unknown backend ''";
    an empty argument is still an error."""
    monkeypatch.setenv("FAR_BACKEND", env)
    assert dispatch.requested_backend() == "auto"
    assert dispatch.requested_backend("torch") == "torch"
    with pytest.raises(ValueError, match="unknown backend ''"):
        dispatch.requested_backend("")
