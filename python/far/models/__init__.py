"""Models: timm ViTs converted to FAR, the Fashion-MNIST architectures, the zoo, checkpoints.

    convert.py     far.convert: every timm Attention (or some blocks') -> FARAttention (and the parameter report)
    arch.py        the architecture of any timm ViT read from the model (what far.save records)
    weights.py     a timm architecture's weights from a local .safetensors / torch file
    registry.py    timm entry points fmnist_deit_tiny / fmnist_deit_small
    pretrained.py  the bundled zoo's index
    factory.py     create_model, save/load, and the one MODEL resolver (file | zoo name | timm name)
"""
from far.models.convert import (ConversionReport, attention_classes, attention_pool_classes, convert, count_params,
                                far_modules, far_param_count, mixer_params, param_counts, parse_blocks, set_backend,
                                set_storage)
from far.models.factory import (ModelSpec, build, check_input, create_model, data_config, is_far, load, load_model,
                                resolve, save, stored_tensors, unwrap)
from far.models.weights import load_weights, read_state_dict
from far.models.pretrained import ZOO, zoo_path

__all__ = ["ConversionReport", "ModelSpec", "ZOO", "attention_classes", "attention_pool_classes", "build",
           "check_input", "convert", "count_params", "create_model", "data_config", "far_modules", "far_param_count",
           "is_far", "load", "load_model", "load_weights", "mixer_params", "param_counts", "parse_blocks",
           "read_state_dict", "resolve", "save", "set_backend", "set_storage", "stored_tensors", "unwrap", "zoo_path"]
