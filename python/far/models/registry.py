"""Model names: timm architectures (converted on request) and our small Fashion-MNIST ViTs.

`far.create_model(name)` builds a timm model (`pretrained=True` takes timm's real download path,
for users with a network) and converts it to FAR unless `far=False`.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


def _fmnist_cfg(**kw):
    return {"input_size": (1, 28, 28), "mean": FMNIST_MEAN, "std": FMNIST_STD, "num_classes": 10,
            "interpolation": "bilinear", "crop_pct": 1.0, **kw}


def _register_fmnist():
    """timm-style entry points for DeiT-style ViTs on 28x28x1 images, patch 4 (49 tokens + CLS)."""
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    def make(name, embed_dim, depth, num_heads):
        def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
            if pretrained:
                raise RuntimeError(f"{name}: no pretrained weights are bundled in this build; "
                                   "use far.load(PATH) on a checkpoint you trained")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's
                kwargs.pop(key, None)
            args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=embed_dim,
                        depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True)
            args.update(kwargs)
            model = VisionTransformer(**args)
            model.pretrained_cfg = _fmnist_cfg(  # follows the kwargs (classes, channels, size)
                architecture=name, num_classes=args["num_classes"],
                input_size=(args["in_chans"], args["img_size"], args["img_size"]))
            return model

        fn.__name__ = name
        fn.__doc__ = f"DeiT-style ViT for Fashion-MNIST: embed {embed_dim}, depth {depth}, {num_heads} heads, patch 4."
        return fn

    from timm.models import is_model

    for name, e, dp, h in (("fmnist_deit_tiny", 96, 4, 3), ("fmnist_deit_small", 192, 6, 3)):
        if not is_model(name):
            register_model(make(name, e, dp, h))


_register_fmnist()


def create_model(name: str, pretrained: bool = False, far: bool = True, hidden_sizes=None,
                 backend: Optional[str] = None, **kwargs) -> nn.Module:
    """Build `name` (any timm ViT name, e.g. deit_tiny_patch16_224, or fmnist_deit_tiny) and, with
    far=True, convert every attention to FARAttention. kwargs go to timm.create_model."""
    import timm

    from far.models.convert import convert

    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}'; timm ViT names (e.g. deit_tiny_patch16_224) or "
                         "fmnist_deit_tiny / fmnist_deit_small")
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    model.far_arch = {"timm_name": name, "kwargs": dict(kwargs)}
    if far:
        convert(model, hidden_sizes=hidden_sizes, backend=backend)
    return model
