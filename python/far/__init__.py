"""FAR: Function-preserving Attention Replacement — ViT attention replaced by multi-head BiLSTMs."""
from far.version import __version__
from far.models import FARAttention, ConversionReport, convert, count_params, create_model, far_modules, set_backend

__all__ = [
    "__version__",
    "FARAttention",
    "ConversionReport",
    "convert",
    "count_params",
    "create_model",
    "far_modules",
    "set_backend",
]
