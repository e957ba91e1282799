"""The index of the bundled model zoo: small checkpoints trained with `far train-teacher / distill /
prune / reuse` on Fashion-MNIST (the recipe is in the README and scripts/train_zoo.sh), shipped inside the
package (python/far/zoo/) and loadable offline:

    >>> far.create_model("fmnist_far_tiny", pretrained=True)     # or far.load(zoo_path(name))
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from far.errors import ConfigError

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"

ZOO: Dict[str, dict] = {
    "fmnist_deit_tiny": {"file": "fmnist_deit_tiny.safetensors", "kind": "teacher",
                         "description": "DeiT-style ViT (attention), embed 96, depth 4, 3 heads, patch 4"},
    "fmnist_far_tiny": {"file": "fmnist_far_tiny.safetensors", "kind": "far",
                        "description": "FAR student of fmnist_deit_tiny (every attention a 3-head BiLSTM)"},
    "fmnist_far_tiny_pruned": {"file": "fmnist_far_tiny_pruned.safetensors", "kind": "far",
                               "description": "fmnist_far_tiny after structured pruning and compaction"},
    "fmnist_far_tiny_xs": {"file": "fmnist_far_tiny_xs.safetensors", "kind": "far",
                           "description": "fmnist_far_tiny pruned to a budget (token mixers <= 0.78x the teacher "
                                          "attention's parameters) and distilled again"},
    "fmnist_far_tiny_wide": {"file": "fmnist_far_tiny_wide.safetensors", "kind": "far",
                             "description": "FAR student of fmnist_deit_tiny with block 2 widened to 56 units per head "
                                            "and direction (n = d = 32 elsewhere): every block's isolated cosine >= 0.95"},
    "fmnist_far_tiny_nr": {"file": "fmnist_far_tiny_nr.safetensors", "kind": "far",
                           "description": "fmnist_far_tiny after 3 epochs of noise-aware distillation (--weight-noise "
                                          "0.06 on every weight matrix): robust to crossbar read noise"},
    "fmnist_trex_tiny": {"file": "fmnist_trex_tiny.safetensors", "kind": "reuse",
                         "description": "TReX-style attention reuse of fmnist_deit_tiny (far reuse, an 850 us "
                                        "latency budget: one encoder reuses its predecessor's attention)"},
}


def zoo_path(name: str) -> Path:
    """Path of a bundled checkpoint: ConfigError for a name that is not in the zoo, FileNotFoundError
    when this installation lacks the file."""
    if name not in ZOO:
        raise ConfigError(f"'{name}' is not in the model zoo; bundled: {', '.join(ZOO)}")
    path = ZOO_DIR / ZOO[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"the zoo checkpoint for '{name}' is missing from this installation ({path}); "
                                "reinstall far-engine from a complete checkout, or train it with the README's recipe")
    return path
