"""FAR: Function-preserving Attention Replacement — ViT attention replaced by multi-head BiLSTMs.

    model = far.create_model("fmnist_far_tiny", pretrained=True)         # the bundled zoo, offline
    student = far.distill(teacher, train_set, config=far.TrainConfig(epochs=1))
    pruned = far.prune(student, train_set, prune_ratio=0.3)
    far.evaluate(pruned, test_set)["accuracy"]
    far.predict(pruned, far.data.image_files(["photos/"], far.models.data_config(pruned)))["classes"]
    far.analyze(teacher, student, test_set)["blocks"]                    # fidelity per block, over depth, token maps
    far.save(pruned, "pruned.safetensors"); far.load("pruned.safetensors")
    far.load("pruned.safetensors", storage="ragged")                      # kept units only in memory
    far.export_onnx(pruned, "pruned.onnx")                                # needs onnx; far.interop: public checkpoints
"""
from far.analysis import analyze
from far.errors import BackendUnavailable, CheckpointError, ConfigError, DataError, FarError
from far.evaluate import evaluate, predict
from far.interop import export_onnx, import_public
from far.methods import distill, finetune, prune, reuse, train_classifier
from far.models import (ConversionReport, convert, count_params, create_model, far_modules, load, load_model,
                        save, set_backend, set_storage)
from far.checkpoint import read_config
from far.nn import FARAttention
from far.train import TrainConfig
from far.version import __version__

__all__ = [
    "__version__",
    "BackendUnavailable",
    "CheckpointError",
    "ConfigError",
    "ConversionReport",
    "DataError",
    "FARAttention",
    "FarError",
    "TrainConfig",
    "analyze",
    "convert",
    "count_params",
    "create_model",
    "distill",
    "evaluate",
    "export_onnx",
    "far_modules",
    "finetune",
    "import_public",
    "load",
    "load_model",
    "predict",
    "prune",
    "read_config",
    "reuse",
    "save",
    "set_backend",
    "set_storage",
    "train_classifier",
]
