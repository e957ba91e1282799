"""FAR: Function-preserving Attention Replacement — ViT attention replaced by multi-head BiLSTMs."""
from far.version import __version__
from far.models import FARAttention, ConversionReport, convert, count_params, create_model, far_modules, set_backend
from far.io import CheckpointError, load, read_config, save

__all__ = [
    "__version__",
    "CheckpointError",
    "FARAttention",
    "ConversionReport",
    "convert",
    "count_params",
    "create_model",
    "far_modules",
    "load",
    "read_config",
    "save",
    "set_backend",
]
