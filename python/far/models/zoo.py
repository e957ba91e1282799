"""The bundled model zoo: small checkpoints trained with `far train-teacher / distill / prune` on
Fashion-MNIST (the recipe is in the README), shipped inside the package and loadable offline:

    >>> far.create_model("fmnist_far_tiny", pretrained=True)     # or far.load(far.zoo_path(name))
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"

ZOO: Dict[str, dict] = {
    "fmnist_deit_tiny": {"file": "fmnist_deit_tiny.safetensors", "kind": "teacher",
                         "description": "DeiT-style ViT (attention), embed 96, depth 4, 3 heads, patch 4"},
    "fmnist_far_tiny": {"file": "fmnist_far_tiny.safetensors", "kind": "far",
                        "description": "FAR student of fmnist_deit_tiny (every attention a 3-head BiLSTM)"},
    "fmnist_far_tiny_pruned": {"file": "fmnist_far_tiny_pruned.safetensors", "kind": "far",
                               "description": "fmnist_far_tiny after structured pruning and compaction"},
}


def is_zoo_model(name: str) -> bool:
    return name in ZOO


def zoo_path(name: str) -> Path:
    """Path of a bundled checkpoint; FileNotFoundError (with the names) if it is not bundled."""
    if name not in ZOO:
        raise ValueError(f"'{name}' is not in the model zoo; bundled: {', '.join(ZOO)}")
    path = ZOO_DIR / ZOO[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"the zoo checkpoint for '{name}' is missing from this installation ({path}); "
                                "reinstall far-engine from a complete checkout, or train it with the README's recipe")
    return path


def checkpoint_file(spec: str) -> Optional[Path]:
    """`spec` as a checkpoint file: the path itself if it exists, else the bundled file of a zoo name,
    else None (a folder is returned as is: far.load says what is wrong with it)."""
    path = Path(spec)
    if path.exists():
        return path
    return zoo_path(spec) if spec in ZOO else None


def available() -> Dict[str, Path]:
    """{name: path} of the zoo checkpoints present in this installation."""
    return {n: ZOO_DIR / e["file"] for n, e in ZOO.items() if (ZOO_DIR / e["file"]).is_file()}
