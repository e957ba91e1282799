"""The architecture of any timm ViT, read from the model itself, so that far.save can record it and
far.load rebuild it exactly.

    describe(model)        -> {"timm_name": ..., "kwargs": {...}}: the timm model name when the model
                              knows it (pretrained_cfg["architecture"]), else VIT_CLASS; the kwargs are
                              the VisionTransformer arguments read from the modules (img_size, patch_size,
                              in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, num_classes,
                              class_token, reg_tokens, no_embed_class, init_values, global_pool, fc_norm,
                              pre_norm, dynamic_img_size, ...)
    instantiate(name, kw)  -> the attention model (timm.create_model(name, pretrained=False, **kw), or
                              timm's VisionTransformer(**kw) for VIT_CLASS); never reads a file or the network
    check_rebuilds(model, arch)  ConfigError unless instantiate(arch) (on the meta device) has the model's
                              structure outside its FAR / reuse blocks: the same state_dict names and shapes,
                              the same module classes and settings (LayerNorm eps, GELU approximation, ...)
    input_size(model)      -> (C, H, W) the model's patch embedding takes

Only what describe() cannot express (a custom class, another block or MLP type, a norm layer with another
eps, ...) is refused, by check_rebuilds, with the first difference named.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from far.errors import ConfigError

VIT_CLASS = "VisionTransformer"  # architecture name of a ViT built from timm's class directly (no model name)
LAYERSCALE_INIT = 1e-5  # init_values recorded for a trained LayerScale (its gammas come from the file)
# modules that only act in training, or hold nothing: not part of the structure compared
_TRAINING_ONLY = ("Dropout", "DropPath", "PatchDropout", "Identity")
# attributes that change what a module computes without showing in its parameters
_ATTRS = ("global_pool", "num_prefix_tokens", "num_reg_tokens", "has_class_token", "no_embed_class",
          "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "strict_img_size", "flatten", "output_fmt",
          "num_heads", "head_dim", "scale", "eps", "approximate", "inplace", "img_size", "patch_size")


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def input_size(model: nn.Module) -> Optional[tuple]:
    """(C, H, W) of the model's patch embedding, or None for a model without one."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    if size is None or not isinstance(getattr(proj, "in_channels", None), int):
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (proj.in_channels, int(h), int(w))


def _pair(v) -> object:
    v = tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))
    return v[0] if v[0] == v[1] else list(v)


def _is(module, name: str) -> bool:
    return type(module).__name__ == name


def _mixer(block: nn.Module) -> nn.Module:
    return getattr(block, "attn", None)


def _act_name(act: nn.Module) -> Optional[str]:
    """timm's name of an activation module's class when it is not VisionTransformer's default GELU."""
    from timm.layers import get_act_layer

    if type(act) is nn.GELU and act.approximate == "none":
        return None
    for name in ("gelu_tanh", "quick_gelu", "silu", "relu", "gelu"):
        try:
            cls = get_act_layer(name)
        except Exception:  # noqa: BLE001 - a name this timm does not know
            continue
        if isinstance(cls, type) and type(act) is cls and getattr(act, "approximate", "none") == getattr(
                cls(), "approximate", "none"):
            return name
    return "unknown"


def describe(model: nn.Module) -> dict:
    """{"timm_name", "kwargs"} that rebuild `model`'s architecture (see the module docstring); ConfigError
    for a model that is not a timm VisionTransformer (check_rebuilds verifies the result)."""
    import timm

    vit = _vit_class()
    if not isinstance(model, vit):
        raise ConfigError(f"cannot record the architecture of {type(model).__module__}.{type(model).__qualname__}: "
                          "far.save rebuilds timm VisionTransformer models (built by timm.create_model or "
                          "timm.models.vision_transformer.VisionTransformer(...)); for another class set "
                          ".far_arch = {'timm_name': <a timm model name>, 'kwargs': {...}} yourself")
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    name = pcfg.get("architecture") if isinstance(pcfg, dict) else None
    if not (isinstance(name, str) and timm.is_model(name)):
        name = VIT_CLASS
    if type(model) is not vit and name == VIT_CLASS:
        raise ConfigError(f"cannot record the architecture of {type(model).__qualname__}: a subclass of timm's "
                          "VisionTransformer without a timm model name (pretrained_cfg['architecture'])")
    blocks = list(model.blocks)
    if not blocks:
        raise ConfigError(f"cannot record the architecture of {type(model).__name__}: it has no blocks")
    size = input_size(model)
    if size is None:
        raise ConfigError(f"cannot record the architecture of {type(model).__name__}: no patch_embed.proj")
    pe, b0 = model.patch_embed, blocks[0]
    attns = [_mixer(b) for b in blocks if type(_mixer(b)).__name__ == "Attention"]  # unconverted blocks
    mixer = _mixer(b0)
    embed_dim = int(model.embed_dim)
    kw = {"img_size": _pair(size[1:]), "patch_size": _pair(pe.patch_size), "in_chans": size[0],
          "num_classes": int(model.num_classes), "global_pool": model.global_pool, "embed_dim": embed_dim,
          "depth": len(blocks), "num_heads": int(mixer.num_heads)}
    fc1 = getattr(getattr(b0, "mlp", None), "fc1", None)
    if isinstance(fc1, nn.Linear):
        hidden = fc1.out_features
        ratio = hidden / embed_dim
        if int(embed_dim * ratio) != hidden:  # float rounding: timm takes int(dim * mlp_ratio)
            ratio = math.nextafter(ratio, math.inf)
        kw["mlp_ratio"] = ratio
    kw["qkv_bias"] = attns[0].qkv.bias is not None if attns else True  # a FAR block has no qkv
    if attns and not isinstance(getattr(attns[0], "q_norm", nn.Identity()), nn.Identity):
        kw["qk_norm"] = True
    proj = getattr(mixer, "proj", None)
    if isinstance(proj, nn.Linear) and proj.bias is None:
        kw["proj_bias"] = False
    gamma = getattr(getattr(b0, "ls1", None), "gamma", None)  # a LayerScale's, or a reuse tap's that replaced it
    if gamma is not None:
        gamma = gamma.detach()
        first = float(gamma.flatten()[0]) if gamma.numel() and gamma.device.type != "meta" else 0.0
        kw["init_values"] = (float(f"{first:.6g}") if first != 0 and bool((gamma == first).all())
                             else LAYERSCALE_INIT)  # float32 printed short
    kw["class_token"] = model.cls_token is not None
    if model.pos_embed is None:
        kw["pos_embed"] = "none"
    kw["no_embed_class"] = bool(model.no_embed_class)
    kw["reg_tokens"] = int(model.num_reg_tokens)
    kw["pre_norm"] = not isinstance(model.norm_pre, nn.Identity)
    final = not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity))
    if not final:
        kw["final_norm"] = False
    kw["fc_norm"] = not isinstance(model.fc_norm, nn.Identity)
    if getattr(model, "pool_include_prefix", False) and model.global_pool != "prr":
        kw["pool_include_prefix"] = True
    kw["dynamic_img_size"] = bool(model.dynamic_img_size)
    if getattr(pe, "dynamic_img_pad", False):
        kw["dynamic_img_pad"] = True
    act = getattr(getattr(b0, "mlp", None), "act", None)
    if act is not None and _act_name(act) not in (None, "unknown"):
        kw["act_layer"] = _act_name(act)
    return {"timm_name": name, "kwargs": kw}


def instantiate(name: str, kwargs: dict) -> nn.Module:
    """The attention model of a recorded architecture, freshly initialised (see the module docstring)."""
    import timm

    if name == VIT_CLASS:
        kw = dict(kwargs)
        if isinstance(kw.get("img_size"), list):
            kw["img_size"] = tuple(kw["img_size"])
        if isinstance(kw.get("patch_size"), list):
            kw["patch_size"] = tuple(kw["patch_size"])
        return _vit_class()(**kw)
    if not timm.is_model(name):
        raise ConfigError(f"unknown architecture '{name}' (not a timm model in this environment; "
                          f"timm {timm.__version__}, nor {VIT_CLASS})")
    return timm.create_model(name, pretrained=False, **kwargs)


def _skipped(model: nn.Module) -> tuple:
    """Name prefixes of the token mixers that are not timm attention (FAR blocks, reuse blocks): their
    structure is the checkpoint's far / reuse sections', not the architecture's."""
    from far.models.convert import attention_classes

    from far.nn.reuse import AttentionTap

    classes = attention_classes()
    out = []
    for i, b in enumerate(getattr(model, "blocks", [])):
        m = _mixer(b)
        if m is not None and not isinstance(m, classes):
            out.append(f"blocks.{i}.attn")
        if isinstance(getattr(b, "ls1", None), AttentionTap):  # a reuse source: far.load's apply_reuse puts it back
            out.append(f"blocks.{i}.ls1")
    return tuple(out)


def _under(name: str, prefixes: tuple) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _attr(v):
    if isinstance(v, torch.Tensor):
        return None
    if isinstance(v, (list, tuple)):
        return tuple(_attr(x) for x in v)
    return v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__


def signature(model: nn.Module, skip: tuple) -> tuple:
    """(state_dict names and shapes, module classes and settings) outside the `skip` prefixes."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _under(k, skip)}
    mods = {}
    for name, m in model.named_modules():
        if _under(name, skip) or type(m).__name__ in _TRAINING_ONLY:
            continue
        mods[name] = (type(m).__name__,) + tuple((a, _attr(getattr(m, a))) for a in _ATTRS if hasattr(m, a))
    return shapes, mods


def check_rebuilds(model: nn.Module, arch: dict, what: str) -> None:
    """ConfigError naming the first difference unless `arch` rebuilds `model` (outside its FAR / reuse blocks)."""
    skip = _skipped(model)
    try:
        with torch.device("meta"):
            twin = instantiate(arch["timm_name"], arch["kwargs"])
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the kwargs do not build
        raise ConfigError(f"cannot save {what}: rebuilding '{arch['timm_name']}' with {arch['kwargs']} fails: "
                          f"{type(e).__name__}: {e}") from None
    (s1, m1), (s2, m2) = signature(model, skip), signature(twin, skip)
    diff = None
    for k in sorted(set(s1) | set(s2)):
        if s1.get(k) != s2.get(k):
            diff = f"tensor {k}: model {s1.get(k, 'absent')}, rebuilt {s2.get(k, 'absent')}"
            break
    if diff is None:
        for k in list(m1) + [k for k in m2 if k not in m1]:
            if m1.get(k) != m2.get(k):
                diff = f"module {k or '<root>'}: model {m1.get(k, 'absent')}, rebuilt {m2.get(k, 'absent')}"
                break
    if diff is not None:
        raise ConfigError(f"cannot save {what}: its architecture cannot be rebuilt from timm "
                          f"('{arch['timm_name']}' with {arch['kwargs']} differs: {diff}); far.save handles timm "
                          "VisionTransformer models whose layers its constructor arguments describe")


__all__ = ["LAYERSCALE_INIT", "VIT_CLASS", "check_rebuilds", "describe", "input_size", "instantiate", "signature"]
