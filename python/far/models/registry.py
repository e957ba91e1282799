"""timm registrations: DeiT-style ViTs for Fashion-MNIST (28x28x1 images, patch 4: 49 tokens + CLS).

    timm.create_model("fmnist_deit_tiny", pretrained=True)   # the bundled zoo teacher's weights, offline
"""
from __future__ import annotations

import torch.nn as nn
from timm.models import is_model, register_model
from timm.models.vision_transformer import VisionTransformer

from far import checkpoint
from far.data import FMNIST_MEAN, FMNIST_STD
from far.errors import CheckpointError, ConfigError
from far.models.pretrained import ZOO, zoo_path

FMNIST_ARCHS = {"fmnist_deit_tiny": (96, 4, 3), "fmnist_deit_small": (192, 6, 3)}  # embed, depth, heads


def fmnist_cfg(**kw) -> dict:
    """The pretrained_cfg of the Fashion-MNIST ViTs (timm keys), updated with `kw`."""
    return {"input_size": (1, 28, 28), "mean": FMNIST_MEAN, "std": FMNIST_STD, "num_classes": 10,
            "interpolation": "bilinear", "crop_pct": 1.0, **kw}


def load_zoo_weights(model: nn.Module, name: str) -> None:
    """The bundled zoo teacher `name`'s weights into `model` (timm's pretrained=True, offline). A
    different num_classes keeps the backbone and leaves the new classifier freshly initialized."""
    if name not in ZOO:
        raise ConfigError(f"{name}: no pretrained weights are bundled; use far.load(PATH) on a checkpoint you trained")
    path = zoo_path(name)
    config, state = checkpoint.read(path)
    checkpoint.check_digest(path, config, state)
    if config["far"]["blocks"]:
        raise CheckpointError(f"{path}: the zoo entry '{name}' is a FAR model, not the attention architecture")
    head = [k for k in state if k.startswith("head.")]
    if getattr(model, "num_classes", None) != state["head.weight"].shape[0]:
        for k in head:
            state.pop(k)
    own = model.state_dict()
    bad = [k for k in state if k in own and own[k].shape != state[k].shape]
    if bad:
        raise ConfigError(f"{name}: the bundled weights do not fit these model arguments ({', '.join(bad[:3])} "
                          "differ in shape); build it with the default arguments")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(head):
        raise CheckpointError(f"{name}: bundled weights mismatch: {result.missing_keys[:3]} {result.unexpected_keys[:3]}")


def _entry_point(name: str, embed_dim: int, depth: int, num_heads: int):
    def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's
            kwargs.pop(key, None)
        args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=embed_dim,
                    depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True)
        args.update(kwargs)
        model = VisionTransformer(**args)
        h, w = (int(v) for v in model.patch_embed.img_size)  # timm's (H, W) of an int or a pair
        model.pretrained_cfg = fmnist_cfg(  # follows the kwargs (classes, channels, size)
            architecture=name, num_classes=args["num_classes"], input_size=(args["in_chans"], h, w))
        if pretrained:
            load_zoo_weights(model, name)
        return model

    fn.__name__ = name
    fn.__doc__ = f"DeiT-style ViT for Fashion-MNIST: embed {embed_dim}, depth {depth}, {num_heads} heads, patch 4."
    return fn


for _name, (_e, _d, _h) in FMNIST_ARCHS.items():
    if not is_model(_name):
        register_model(_entry_point(_name, _e, _d, _h))
