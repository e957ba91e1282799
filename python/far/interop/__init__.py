"""Interop: the FAR authors' public checkpoints in, ONNX out.

    public.py       import_public (whole public-code models), public_attention = FARAttention.from_public
                    (one MultiHeadLstm / ParallelLSTM module), read_public (their files)
    onnx_export.py  export_onnx / build_onnx: a FAR ViT as an ONNX graph with one LSTM op per (head, direction)
"""
from far.interop.onnx_export import INSTALL_HINT, build_onnx, export_onnx, require_onnx
from far.interop.public import PRUNED_MODES, PublicImportReport, import_public, public_attention, read_public
from far.nn import FARAttention

# FARAttention.from_public(state_dict_or_file, prefix="", num_heads=None, pruned="exact", ...): bound here
# because far.nn sits below this package (far.nn cannot import it).
FARAttention.from_public = staticmethod(public_attention)

__all__ = ["INSTALL_HINT", "PRUNED_MODES", "PublicImportReport", "build_onnx", "export_onnx", "import_public",
           "public_attention", "read_public", "require_onnx"]
