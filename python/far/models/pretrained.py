"""The index of the bundled model zoo: small checkpoints trained with `far train-teacher / distill /
prune / reuse` on Fashion-MNIST (the recipe is in the README and scripts/train_zoo.sh), shipped inside the
package (python/far/zoo/) and loadable offline:

    >>> far.create_model("fmnist_far_tiny", pretrained=True)     # or far.load(zoo_path(name))
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from far.checkpoint import DIGEST_KEY, read_config
from far.errors import CheckpointError, ConfigError

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

# The digest each shipped file carries (its config's "sha256", over the config and every tensor): zoo_path refuses a
# file without this one, so a zoo name always means the model this release ships, whose tensors far.load then checks
# against it. Retraining the zoo (scripts/train_zoo.sh) means re-pinning (tests/models/test_zoo.py checks the pins).
for _name, _digest in {
    "fmnist_deit_tiny": "d157a236dd5635a0509f2e35b7c1322cb7fd6c7f6032dfd9d9219f137bf57b5a",
    "fmnist_far_tiny": "3ab78a576841258bbb1480ca722c985852fe60cc96072d748cbf63dd1b4c599b",
    "fmnist_far_tiny_pruned": "d1c42aa9277ac0bd66038f776d28b47101b8517c9ed1ef3b513f41959524d9ec",
    "fmnist_far_tiny_xs": "5511041478a2be8006e01baaeb5c4ca381a8c7793f18ecc9f9638a2c36aeaa11",
    "fmnist_far_tiny_wide": "39c55940ea757f8974b6aba051febca0bc0f5498aaa23b8fef7cd160802bc4c9",
    "fmnist_far_tiny_nr": "e4e8addd076abd1df1116fa964117904bad76ab31d8e48621c5803d7822dc316",
    "fmnist_trex_tiny": "a19c0b581bb696ec534be030601d8c3702be491868d7d0945e5215e79f4135be",
}.items():
    ZOO[_name]["sha256"] = _digest


def zoo_path(name: str) -> Path:
    """Path of a bundled checkpoint: ConfigError for a name that is not in the zoo, FileNotFoundError
    when this installation lacks the file, CheckpointError when the file is not the one shipped (its config's
    sha256 is not ZOO[name]["sha256"]: edited, re-saved or replaced; a damaged file: as far.load says)."""
    if name not in ZOO:
        raise ConfigError(f"'{name}' is not in the model zoo; bundled: {', '.join(ZOO)}")
    path = ZOO_DIR / ZOO[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"the zoo checkpoint for '{name}' is missing from this installation ({path}); "
                                "reinstall far-engine from a complete checkout, or train it with the README's recipe")
    got = read_config(path).get(DIGEST_KEY)
    if got != ZOO[name]["sha256"]:
        raise CheckpointError(f"{path}: not the zoo checkpoint '{name}' this release of far ships ("
                              + (f"its sha256 {got[:8]}..." if got else "it has no sha256")
                              + f", the release's {ZOO[name]['sha256'][:8]}...): edited, re-saved or replaced; "
                              "reinstall far-engine, or give the file's path to load it as it is")
    return path
