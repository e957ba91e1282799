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
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's
                kwargs.pop(key, None)
            args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=embed_dim,
                        depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True)
            args.update(kwargs)
            model = VisionTransformer(**args)
            model.pretrained_cfg = _fmnist_cfg(  # follows the kwargs (classes, channels, size)
                architecture=name, num_classes=args["num_classes"],
                input_size=(args["in_chans"], args["img_size"], args["img_size"]))
            if pretrained:
                _load_zoo_weights(model, name)
            return model

        fn.__name__ = name
        fn.__doc__ = f"DeiT-style ViT for Fashion-MNIST: embed {embed_dim}, depth {depth}, {num_heads} heads, patch 4."
        return fn

    from timm.models import is_model

    for name, e, dp, h in (("fmnist_deit_tiny", 96, 4, 3), ("fmnist_deit_small", 192, 6, 3)):
        if not is_model(name):
            register_model(make(name, e, dp, h))


def _load_zoo_weights(model: nn.Module, name: str) -> None:
    """Weights of the bundled zoo checkpoint `name` into `model` (timm's pretrained=True, offline).
    A different num_classes keeps the backbone and leaves the new classifier freshly initialized."""
    from far.io import load
    from far.models.zoo import ZOO, zoo_path

    if name not in ZOO:
        raise RuntimeError(f"{name}: no pretrained weights are bundled; use far.load(PATH) on a checkpoint you trained")
    state = load(zoo_path(name)).state_dict()
    head = [k for k in state if k.startswith("head.")]
    if getattr(model, "num_classes", None) != state["head.weight"].shape[0]:
        for k in head:
            state.pop(k)
    own = model.state_dict()
    bad = [k for k in state if k in own and own[k].shape != state[k].shape]
    if bad:
        raise RuntimeError(f"{name}: the bundled weights do not fit these model arguments ({', '.join(bad[:3])} "
                           "differ in shape); build it with the default arguments")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(head):
        raise RuntimeError(f"{name}: bundled weights mismatch: {result.missing_keys[:3]} {result.unexpected_keys[:3]}")


_register_fmnist()


def create_model(name: str, pretrained: bool = False, far: Optional[bool] = None, hidden_sizes=None,
                 backend: Optional[str] = None, **kwargs) -> nn.Module:
    """Build `name` and, with far=True, convert every attention to FARAttention.

    name: any timm ViT name (e.g. deit_tiny_patch16_224; pretrained=True takes timm's download path),
        fmnist_deit_tiny / fmnist_deit_small, or a zoo FAR name (fmnist_far_tiny, fmnist_far_tiny_pruned).
    pretrained: for zoo names, the bundled checkpoint (offline), returned as trained: the zoo teacher
        stays an attention model unless far=True is given (then its LSTMs are new and untrained).
    far: convert to FAR (default: True, except for a pretrained zoo model, which is returned as stored).
    kwargs go to timm.create_model."""
    import timm

    from far.models.convert import convert
    from far.models.zoo import ZOO, zoo_path

    if name in ZOO and not timm.is_model(name):  # FAR zoo models: the architecture lives in the checkpoint
        from far.io import _build, load, read_config

        if kwargs or hidden_sizes is not None or far is False:
            raise ValueError(f"'{name}' is a bundled FAR checkpoint: it takes no model arguments, hidden_sizes "
                             "or far=False (use fmnist_deit_tiny for the attention architecture)")
        path = zoo_path(name)
        model = load(path, backend=backend) if pretrained else _build(str(path), read_config(path))
        if not pretrained and backend is not None:
            from far.models.convert import set_backend

            set_backend(model, backend)
        return model
    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}'; timm ViT names (e.g. deit_tiny_patch16_224), "
                         f"fmnist_deit_tiny / fmnist_deit_small, or the zoo: {', '.join(ZOO)}")
    if far is None:
        far = not (pretrained and name in ZOO)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    model.far_arch = {"timm_name": name, "kwargs": dict(kwargs)}
    if far:
        convert(model, hidden_sizes=hidden_sizes, backend=backend)
    return model
