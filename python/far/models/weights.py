"""A timm architecture's weights from a local file: what `far.create_model("timm:NAME", weights=FILE)` and
`far distill --teacher-weights FILE` read. Never the network.

    read_state_dict(path)          {name: tensor} of a .safetensors file or a torch state dict (torch.load
                                   with weights_only=True: tensors and plain containers only, no code),
                                   unwrapped from the usual checkpoint dicts ({"model": ...},
                                   {"state_dict": ...}, {"teacher": ...}, ...) and prefixes (module., backbone.)
    load_weights(model, path)      into `model` (timm's checkpoint_filter_fn first for a VisionTransformer:
                                   the original DINOv2 / DeiT key names, position embeddings resized to the
                                   model's img_size); a classifier the model does not have (num_classes=0) is
                                   dropped; anything else missing, unexpected or mis-shaped is one ConfigError
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from far import checkpoint
from far.errors import CheckpointError, ConfigError
from far.utils.fs import NotRegularFile, open_input

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "student", "net", "params")
PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.")
ZIP_MAGIC = b"PK\x03\x04"


def _kind(path: str) -> str:
    """"torch" (a zip archive or a legacy pickle), "safetensors" (a header length that fits), else "unknown"."""
    try:
        with open_input(path, "weights file") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except NotRegularFile as e:
        raise ConfigError(str(e)) from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such weights file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a weights file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    # a pickle starts 0x80 <protocol 2..5>; so may a safetensors header length, but its JSON header follows
    if head.startswith(ZIP_MAGIC) or (head[:1] == b"\x80" and 2 <= head[1] <= 5 and head[8:9] != b"{"):
        return "torch"
    if len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "unknown"


def _unwrap(obj, path: str) -> dict:
    for _ in range(4):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj)):
        raise ConfigError(f"{path}: not a state dict (expected a dict of tensors, or one inside "
                          f"{{{', '.join(repr(k) for k in WRAPPER_KEYS[:3])}, ...: ...}}), got {type(obj).__name__}"
                          + (f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else ""))
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConfigError(f"{path}: the state dict holds no tensors")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path) -> dict:
    """{name: CPU tensor} of a weights file (see the module docstring); ConfigError naming the file otherwise."""
    path = os.fspath(path)
    kind = _kind(path)
    if kind == "torch":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling refused or a damaged archive
            raise ConfigError(f"{path}: cannot read it as a torch state dict with weights_only=True "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); save the weights with "
                              "torch.save(model.state_dict(), FILE) or as .safetensors") from None
        return _unwrap(obj, path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            meta = checkpoint.read_header(path).get("__metadata__") or {}
            state = load_file(path, device="cpu")
        except (CheckpointError, SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
        if checkpoint.CONFIG_KEY in meta:
            raise ConfigError(f"{path}: a FAR checkpoint; give it as MODEL (far.load), not as a weights file")
        return _unwrap(state, path)
    raise ConfigError(f"{path} is not a safetensors file; nor a torch checkpoint (zip archive or pickle). "
                      "Weights files are .safetensors or torch.save(state_dict) files")


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load the weights file at `path` into `model` (in place; returns it). See the module docstring."""
    path = os.fspath(path)
    state = read_state_dict(path)
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as e:  # noqa: BLE001 - timm's conversions assume its own layouts
            raise ConfigError(f"{path}: timm's checkpoint_filter_fn cannot adapt these weights to the model "
                              f"({type(e).__name__}: {e})") from None
    own = model.state_dict()
    if getattr(model, "num_classes", None) == 0:  # a backbone: the file's classifier has nowhere to go
        state = {k: v for k, v in state.items() if not (k.startswith("head.") and k not in own)}
    problems = checkpoint.mismatches({k: tuple(v.shape) for k, v in own.items()},  # expected: the model's
                                     {k: tuple(v.shape) for k, v in state.items()})  # got: the file's
    if problems:
        hint = ""
        if any("head." in p for p in problems):
            hint = " (another classifier size? set num_classes to the file's, or 0 for none)"
        name = (getattr(model, "far_arch", None) or {}).get("timm_name") or type(model).__name__
        raise ConfigError(f"{path}: the weights do not fit {name}: " + "; ".join(problems) + hint
                          + "; check the architecture kwargs (img_size, patch_size, embed_dim, depth, ...)")
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    model.far_weights = str(Path(path))
    return model


__all__ = ["load_weights", "read_state_dict"]
