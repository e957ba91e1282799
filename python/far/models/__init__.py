from far.models.convert import ConversionReport, convert, count_params, far_modules, set_backend
from far.models.far_attention import FARAttention
from far.models.registry import create_model

__all__ = ["FARAttention", "ConversionReport", "convert", "count_params", "create_model", "far_modules", "set_backend"]
