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
    monkeypatch.setattr(dispatch, "_C", None)
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
    if dispatch._C is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(dispatch, "ext_has_cuda", lambda: False)
    assert "built without CUDA kernels" in dispatch.backend_reason("cuda", "cpu")
