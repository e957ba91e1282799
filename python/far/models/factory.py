"""Models from names and files: the one resolver, create_model, and save/load of checkpoints.

A model spec (what every `far` command calls MODEL) is resolved in this order:
    1. an existing file      -> a checkpoint, far.load
    2. a zoo name            -> the bundled trained checkpoint (python/far/zoo/), far.load
    3. a timm model name     -> far.create_model (random init unless pretrained=True; timm's download path),
       or "timm:NAME"           the same, explicitly (never a file or zoo name); with weights=FILE
                                (far distill --teacher-weights) the architecture's weights come from a
                                local file instead (far.models.weights), never the network

far.save records the architecture of any timm VisionTransformer (far.models.arch: the timm name when
known, else timm's VisionTransformer class, with the constructor kwargs read from the modules), so
far.load rebuilds models from timm.create_model, converted in full or in part (far.convert(blocks=...)).
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import far_kernels
from far import checkpoint
from far.errors import ConfigError, DataError, FarError
from far.models import arch as archs
from far.models import registry  # noqa: F401 - registers the fmnist_* architectures with timm
from far.models.convert import convert, far_modules, set_backend, set_storage, unwrap
from far.models.weights import load_weights
from far.models.pretrained import ZOO, zoo_path
from far.nn import FARAttention, apply_reuse, reuse_plan
from far.nn.far_attention import STORAGES
from far.utils.env import as_device
from far.version import __version__


TIMM_PREFIX = "timm:"


def data_config(model: nn.Module) -> dict:
    """What `model` expects of its data (for far.data.make_dataset): its pretrained_cfg (input_size,
    mean, std, interpolation, crop_pct, architecture) with num_classes and input_size taken from the model
    itself (timm keeps a model's default pretrained_cfg when it is built at another img_size: a DINOv2
    built at 224 still says 518), and mean/std fitted to its input channels (_fit_channels)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if getattr(model, "num_classes", None) is not None:
        cfg["num_classes"] = int(model.num_classes)
    size = archs.input_size(unwrap(model))
    if size is not None:
        cfg["input_size"] = size
        _fit_channels(cfg, size[0])
    return cfg


def _fit_channels(cfg: dict, chans: int) -> dict:
    """`cfg`'s mean/std (a pretrained_cfg) fitted in place to `chans` input channels, as timm adapts pretrained
    weights to another in_chans (timm.models.adapt_input_conv): one channel sums the filters of all of them
    (a gray image seen as R = G = B), so it takes the mean of the values; more channels repeat them in turn,
    as a single value is repeated (timm.data.resolve_data_config). A timm ViT built with in_chans=1 keeps
    its default cfg's 3 ImageNet values otherwise."""
    for key in ("mean", "std"):
        v = cfg.get(key)
        if (isinstance(v, (tuple, list)) and v and len(v) != chans
                and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v)):
            v = tuple(float(x) for x in v)
            cfg[key] = (sum(v) / len(v),) if chans == 1 else tuple(v[i % len(v)] for i in range(chans))
    return cfg


def check_input(model: nn.Module, shape, what: str = "the data", hint: Optional[str] = None) -> None:
    """ConfigError unless images of `shape` ([C, H, W] or [B, C, H, W]) fit `model`'s patch embedding
    (the clear form of timm's AssertionError 'Input height (518) doesn't match model (224)'); `hint` ends
    the message (default: how to load data that fits)."""
    want = archs.input_size(unwrap(model))
    got = tuple(int(v) for v in shape)[-3:]
    if want is None or len(got) != 3:
        return
    pe = unwrap(model).patch_embed
    dynamic = getattr(unwrap(model), "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True)
    if got[0] != want[0] or (not dynamic and got[1:] != want[1:]):
        m = unwrap(model)
        name = (getattr(m, "far_arch", None) or {}).get("timm_name") or \
            (getattr(m, "pretrained_cfg", None) or {}).get("architecture") or type(m).__name__
        raise ConfigError(f"{what} has {got[1]}x{got[2]}x{got[0]} images but {name} takes "
                          f"{want[1]}x{want[2]}x{want[0]} "
                          "(its img_size and in_chans); " + (hint or "load the data with far.data.make_dataset(..., "
                          "far.models.data_config(model)) or build the model with img_size / in_chans that fit"))


def top1(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class of each row of `logits` [..., K]; -1 where the row holds NaN/inf (its argmax would
    name a class, not an answer): such a row agrees with no label and no other prediction."""
    finite = torch.isfinite(logits).all(dim=-1)
    return torch.where(finite, logits.argmax(dim=-1), torch.full_like(finite, -1, dtype=torch.int64))


def check_labels(model: nn.Module, y: torch.Tensor, what: str = "the data") -> None:
    """DataError if an integer label of `y` is at or beyond `model`'s num_classes (labels < 0 mark unlabeled
    images and pass; so does a model without a classifier or soft float targets)."""
    classes = getattr(unwrap(model), "num_classes", None)
    if isinstance(classes, int) and classes > 0 and not y.is_floating_point() and bool((y >= classes).any()):
        raise DataError(f"{what}: label {int(y.max())} is outside the model's {classes} classes "
                        f"[0, {classes - 1}] (labels < 0 mark unlabeled images)")


def is_far(model: nn.Module) -> bool:
    """True when `model` has at least one FAR block."""
    return bool(far_modules(model))


# ---- create ----
def _check_sizes(name: str, kwargs: dict) -> None:
    """ConfigError for a timm kwarg outside checkpoint.ARCH_LIMITS (depth, embed_dim, num_heads, img_size, ...),
    before timm allocates anything: depth=100000 would run away, embed_dim=-1 fail deep inside torch."""
    for key, (lo, hi) in checkpoint.ARCH_LIMITS.items():
        v = kwargs.get(key)
        if v is None:
            continue
        kind = numbers.Real if key == "mlp_ratio" else numbers.Integral
        values = v if key in ("img_size", "patch_size") and isinstance(v, (tuple, list)) and len(v) == 2 else [v]
        if not all(isinstance(x, kind) and not isinstance(x, bool) and lo <= x <= hi for x in values):
            raise ConfigError(f"cannot build {name}: {key} must be {'a number' if key == 'mlp_ratio' else 'an int'} "
                              f"in [{lo}, {hi}], got {v!r}")


def create_model(name: str, pretrained: bool = False, far: Optional[bool] = None, hidden_sizes=None,
                 backend: Optional[str] = None, *, weights=None, blocks=None, pre_proj_init: str = "v",
                 **kwargs) -> nn.Module:
    """Build `name` and, with far=True, convert its attention to FARAttention.

    name: any timm ViT name (e.g. deit_tiny_patch16_224; pretrained=True takes timm's download path),
        "timm:NAME" (the same), fmnist_deit_tiny / fmnist_deit_small, or a zoo FAR name (fmnist_far_tiny,
        fmnist_far_tiny_pruned, fmnist_far_tiny_xs, fmnist_far_tiny_wide, fmnist_far_tiny_nr; fmnist_trex_tiny is
        attention reuse).
    pretrained: for zoo names, the bundled checkpoint (offline), returned as trained: the zoo teacher
        stays an attention model unless far=True is given (then its LSTMs are new and untrained).
    weights: a local weights file for a timm name (.safetensors, or a torch state dict read with
        weights_only=True; far.models.weights.load_weights), loaded before conversion; no network.
    far: convert to FAR (default: True, except for a pretrained zoo model or weights, returned as stored).
    blocks, pre_proj_init: far.convert's (convert only these blocks; pre_proj from "v" or "random").
    kwargs go to timm.create_model (e.g. img_size=224, num_classes=0)."""
    import timm

    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        name = name[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            raise ConfigError(f"timm:{name}: no timm model of that name (timm {timm.__version__}); e.g. "
                              "timm:deit_tiny_patch16_224, timm:vit_small_patch14_dinov2")
    if weights is not None:
        if pretrained:
            raise ConfigError("give pretrained=True (timm's download) or weights=FILE (a local file), not both")
        if name in ZOO and not timm.is_model(name):
            raise ConfigError(f"'{name}' is a bundled FAR checkpoint with its own weights; weights=FILE is for "
                              "timm architectures")
    if name in ZOO and not timm.is_model(name):  # FAR zoo models: the architecture lives in the checkpoint
        if kwargs or hidden_sizes is not None or far is False or blocks is not None or pre_proj_init != "v":
            raise ConfigError(f"'{name}' is a bundled FAR checkpoint: it takes no model arguments, hidden_sizes, "
                              "blocks, pre_proj_init or far=False (use fmnist_deit_tiny for the attention "
                              "architecture)")
        path = zoo_path(name)
        if pretrained:
            return load(path, backend=backend)
        return set_backend(build(checkpoint.read_config(path), path), backend)
    if not timm.is_model(name):
        raise ConfigError(f"unknown model '{name}'; timm ViT names (e.g. deit_tiny_patch16_224), "
                          f"fmnist_deit_tiny / fmnist_deit_small, or the zoo: {', '.join(ZOO)}")
    if far is None:
        far = not ((pretrained and name in ZOO) or weights is not None)
    bad = sorted(set(kwargs) & checkpoint.LOADER_KWARGS) if weights is not None else []
    if bad:
        raise ConfigError(f"model kwargs {', '.join(bad)} make timm read files; with weights=FILE give none")
    _check_sizes(name, kwargs)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except FarError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # kwargs timm's constructor refuses
        raise ConfigError(f"cannot build {name} with {kwargs}: {' '.join(str(e).split()) or type(e).__name__}") \
            from None
    model.far_arch = {"timm_name": name, "kwargs": dict(kwargs)}
    if weights is not None:
        load_weights(model, weights)
    if far:
        convert(model, hidden_sizes=hidden_sizes, backend=backend, blocks=blocks, pre_proj_init=pre_proj_init)
    elif blocks is not None or hidden_sizes is not None:
        raise ConfigError("blocks / hidden_sizes size a FAR conversion; with far=False there is none")
    return model


def build(config: dict, path="<config>") -> nn.Module:
    """The architecture a (validated) checkpoint config describes, with fresh weights."""
    import timm

    arch, blocks = config["architecture"], config["far"]["blocks"]
    name = arch["timm_name"]
    if not (timm.is_model(name) or name == archs.VIT_CLASS):
        raise checkpoint.fail(path, f"unknown architecture '{name}' (not a timm model in this environment; "
                                    f"timm {timm.__version__})")
    try:
        model = archs.instantiate(name, arch["kwargs"])
        model.far_arch = {"timm_name": name, "kwargs": dict(arch["kwargs"])}
        if blocks:  # by name: a partial FAR model converts only these
            convert(model, hidden_sizes=[b["hidden_sizes"] for b in blocks], blocks=[b["name"] for b in blocks])
        reuse = config.get("reuse")
        if reuse:
            apply_reuse(model, {int(i): j for i, j in reuse["plan"].items()}, kind=reuse["transform"])
    except Exception as e:
        raise checkpoint.fail(path, f"cannot rebuild architecture '{name}' with kwargs {arch['kwargs']} and "
                                    f"{len(blocks)} FAR block(s){' and attention reuse' if config.get('reuse') else ''}: "
                                    f"{type(e).__name__}: {e}") from e
    got = [(n, m.num_heads, m.head_dim) for n, m in far_modules(model)]
    want = [(b["name"], b["num_heads"], b["head_dim"]) for b in blocks]
    if got != want:
        diff = next((f"block {i}: config {w}, model {g}" for i, (w, g) in enumerate(zip(want, got)) if w != g),
                    f"config has {len(want)} FAR blocks, the model {len(got)}")
        raise checkpoint.fail(path, f"FAR blocks (name, num_heads, head_dim) in the config do not match the "
                                    f"rebuilt '{name}': {diff}")
    return model


# ---- save ----
def stored_tensors(model: nn.Module) -> dict:
    """{name: tensor} as a checkpoint stores them: the state_dict with each FAR block's padded tensors
    replaced by its compact_state() (kept units only)."""
    state = model.state_dict()
    for prefix, module in ((name + ".", m) for name, m in far_modules(model)):
        for param in (*FARAttention.COMPACT_KEYS, *FARAttention.COMPACT_KEYS.values()):  # padded or ragged
            state.pop(prefix + param, None)
        for key, t in module.compact_state().items():
            if prefix + key in state:
                raise ValueError(f"cannot save: '{prefix}{key}' is both a state_dict entry and a compact FAR tensor")
            state[prefix + key] = t
    return state


def _config(model: nn.Module, metadata: Optional[dict]) -> dict:
    emulated = next((name for name, m in model.named_modules() if type(m).__module__.startswith("far.imc.")), None)
    if emulated is not None:
        raise ConfigError(f"cannot save an emulated model (far.imc.emulate put '{emulated or '<root>'}' on "
                          "crossbars; far.load rebuilds digital models only): save the model before emulating it, "
                          "and emulate the loaded one")
    arch = getattr(model, "far_arch", None)
    described = arch is None
    if described:  # any timm ViT (timm.create_model, VisionTransformer(...)): read from its modules
        arch = archs.describe(model)
    if not (isinstance(arch, dict) and isinstance(arch.get("timm_name"), str)
            and isinstance(arch.get("kwargs", {}), dict)):
        raise ConfigError(f"cannot save {type(model).__name__}: its .far_arch is not valid. It must be "
                         "{'timm_name': <timm model name>, 'kwargs': {<timm.create_model kwargs>}} so that far.load "
                         "can rebuild the model (or delete it: far.save reads a timm ViT's architecture itself)")
    kwargs = dict(arch.get("kwargs", {}))
    problem = checkpoint.json_problem(kwargs, "model.far_arch['kwargs']")
    if problem:
        raise ConfigError(f"cannot save: {problem}; far.load rebuilds the model from these kwargs")
    # a recorded .far_arch is checked too: the model may have changed since (e.g. timm's reset_classifier);
    # a reuse (TReX) model is not: its taps on the source blocks are structure the architecture does not describe
    if described or not reuse_plan(model):
        archs.check_rebuilds(model, {"timm_name": arch["timm_name"], "kwargs": kwargs},
                             type(model).__name__ + ("" if described else " (from its .far_arch; delete it to have "
                                                     "far.save read the architecture from the model)"))
    if metadata is None:  # what the model's run recorded, else what the file it was loaded from held
        metadata = getattr(model, "far_metadata", None) or (getattr(model, "far_checkpoint", None) or {}).get(
            "metadata") or {}
    if not isinstance(metadata, dict):
        raise ConfigError(f"metadata must be a dict (or None), got {type(metadata).__name__}")
    problem = checkpoint.json_problem(metadata, "metadata")
    if problem:
        raise ConfigError(f"metadata must be JSON-serializable: {problem}")
    blocks = [{"name": name, "num_heads": m.num_heads, "head_dim": m.head_dim,
               "hidden_sizes": m.hidden_sizes.tolist()} for name, m in far_modules(model)]
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = archs.input_size(model)
    if size is not None:  # what the rebuilt model takes, whatever timm's default cfg said
        pcfg["input_size"] = size
        _fit_channels(pcfg, size[0])
    if isinstance(getattr(model, "num_classes", None), int):
        pcfg["num_classes"] = model.num_classes
    plan = reuse_plan(model)
    extra = {"reuse": {"plan": {str(i): j for i, j in sorted(plan.items())},
                       "transform": getattr(model, "far_reuse_transform", "ln-linear-gelu")}} if plan else {}
    return {**extra,
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "far_version": __version__,
        "architecture": {"timm_name": arch["timm_name"], "kwargs": json.loads(json.dumps(kwargs))},
        "far": {"blocks": blocks},
        "pretrained_cfg": checkpoint.json_safe(pcfg),
        "metadata": json.loads(json.dumps(metadata)),
    }


def save(model: nn.Module, path, metadata: Optional[dict] = None, *, force: bool = True) -> None:
    """Write `model` (built by far.create_model, FAR-converted or a plain timm teacher) to one
    safetensors file at `path`, atomically (far.utils.fs.atomic_write): on any error an existing file
    at `path` is left as it was.

    Args:
        model: a timm VisionTransformer, attention or FAR (all blocks or some): its architecture is
            .far_arch (set by far.create_model) or else read from the model (far.models.arch.describe,
            checked to rebuild it); torch.compile / DDP wrappers are unwrapped.
        path: destination file (conventionally *.safetensors).
        metadata: JSON-serializable dict stored with the config (teacher, training, pruning info);
            default: the model's `far_metadata` (what far.distill, far.prune, ... record), else the metadata
            of the file far.load read it from (a load -> save round trip keeps it), else {}.
        force: False refuses to overwrite an existing file.
    Only kept LSTM units are stored, so pruned models give physically smaller files.
    """
    model = unwrap(model)
    path = os.fspath(path)
    config = _config(model, metadata)  # validates before anything touches the disk
    tensors = stored_tensors(model)
    floats = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            floats.setdefault(t.dtype, name)
    if len(floats) > 1:  # far.load refuses such a file
        raise ConfigError("cannot save a model of mixed floating dtypes (" + ", ".join(
            f"{str(d).replace('torch.', '')}: e.g. {n}" for d, n in floats.items()) + "); a far checkpoint stores "
            "every floating tensor in one dtype: cast the model first, e.g. model.float()")
    checkpoint.write(path, tensors, config, force=force)


# ---- load ----
def _expected(model: nn.Module) -> tuple[dict, dict]:
    """({stored name: (shape, dtype of the model's tensor)}, {FAR prefix: module})."""
    state = model.state_dict()
    blocks = {name + ".": m for name, m in far_modules(model)}
    for prefix, m in blocks.items():
        for param, key in FARAttention.COMPACT_KEYS.items():
            dtype = state.pop(prefix + param).dtype
            state[prefix + key] = (m.compact_shapes()[key], dtype)
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in state.items()}, blocks


def _check_tensors(path: str, tensors: dict, expected: dict, arch: str) -> None:
    problems = checkpoint.mismatches({k: shape for k, (shape, _) in expected.items()},
                                     {k: tuple(t.shape) for k, t in tensors.items()})
    dtypes = []
    for name in sorted(set(expected) & set(tensors)):
        (shape, dtype), t = expected[name], tensors[name]
        if tuple(t.shape) == tuple(shape) and (dtype.is_floating_point != t.dtype.is_floating_point
                                               or (not dtype.is_floating_point and dtype != t.dtype)):
            dtypes.append(f"{name} expected {'a floating dtype' if dtype.is_floating_point else dtype}, got {t.dtype}")
    if dtypes:
        problems.append(f"{len(dtypes)} tensor(s) with the wrong dtype: {checkpoint.name_list(dtypes)}")
    if problems:
        raise checkpoint.fail(path, f"tensors do not match '{arch}' with the config's hidden sizes: "
                                    + "; ".join(problems))


def _set_dtype(t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        t.data = t.data.to(dtype)


def _size_check(path: str):
    """checkpoint.read's precheck: before any tensor is read or the model built, build the config's timm
    architecture on the meta device (no memory) and refuse configs that describe far more values than the
    file stores (resource bombs: a 2 MB file saying depth 3000 or embed_dim 120000, or a FAR block whose
    padded width is far beyond its other heads' kept units). Coarse by design,
    with generous slack: the exact name/shape/dtype comparison follows on the real model."""
    def check(config: dict, entries: dict) -> None:
        import math

        import timm

        arch, blocks = config["architecture"], config["far"]["blocks"]
        if not (timm.is_model(arch["timm_name"]) or arch["timm_name"] == archs.VIT_CLASS):
            return  # build() reports it
        try:
            with torch.device("meta"):
                teacher = archs.instantiate(arch["timm_name"], arch["kwargs"])
        except Exception as e:  # noqa: BLE001 - any failure to build is the file's problem
            raise checkpoint.fail(path, f"cannot rebuild architecture '{arch['timm_name']}' with kwargs "
                                        f"{arch['kwargs']}: {type(e).__name__}: {e}") from None
        prefixes = tuple(b["name"] + "." for b in blocks)
        state = teacher.state_dict()
        total = sum(t.numel() for t in state.values())  # what building the model allocates, FAR blocks aside
        needed = sum(t.numel() for k, t in state.items() if not k.startswith(prefixes)) if prefixes else total
        for b in blocks:  # what load allocates: each FAR block padded to its widest (head, direction), not
            # its kept units (one head of 256 keeping 1024 units, the rest none, is 512x what the file stores)
            H, d, n = b["num_heads"], b["head_dim"], max(max(row, default=0) for row in b["hidden_sizes"])
            needed += H * 2 * 4 * n * (d + n + 2) + H * d * (2 * n + 1)
        stored = sum(math.prod(shape) for _, shape in entries.values())
        if needed > 2 * stored + 2**20 or total > 4 * stored + 2**24:
            raise checkpoint.fail(path, f"the config describes a model of at least {needed:,} values "
                                        f"('{arch['timm_name']}' with kwargs {arch['kwargs']} and {len(blocks)} FAR "
                                        f"block(s)) but the file stores {stored:,}: config and tensors do not match")
    return check


def load(path, device="cpu", backend: Optional[str] = None, storage: str = "padded") -> nn.Module:
    """Rebuild and return the model saved by far.save, in eval() mode, on `device`.

    Args:
        path: a file written by far.save.
        device: where the model goes (tensors are read on the CPU first).
        backend: scan backend for every FAR block (far.set_backend); None = env FAR_BACKEND / auto.
        storage: "padded" (default) or "ragged" (kept units only in memory: far.models.set_storage).
    The config is attached as `model.far_checkpoint`; `model.pretrained_cfg` comes from the file.
    Parameter dtypes (e.g. bfloat16) are those stored. Raises CheckpointError (a ValueError) naming
    the problem for missing, truncated, corrupt, wrong-version or mismatching files.
    """
    path = os.fspath(path)
    if storage not in STORAGES:
        raise ConfigError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    device = as_device(device)  # a device this machine cannot use: a ConfigError, before reading
    if backend is not None:  # a typo, or a backend that cannot run on `device`, fails before the file is read
        far_kernels.dispatch.select(far_kernels.ops.bilstm_fused_scan.OP, backend, device)
    config, tensors = checkpoint.read(path, precheck=_size_check(path))
    model = build(config, path)
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floating) == 1:  # e.g. a bfloat16 model: non-persistent buffers follow too
        model.to(floating.pop())
    expected, blocks = _expected(model)
    _check_tensors(path, tensors, expected, config["architecture"]["timm_name"])
    checkpoint.check_digest(path, config, tensors)  # last: structural errors say more
    with torch.no_grad():
        for prefix, m in blocks.items():
            part = {key: tensors.pop(prefix + key) for key in FARAttention.COMPACT_KEYS.values()}
            for param, key in FARAttention.COMPACT_KEYS.items():
                _set_dtype(getattr(m, param), part[key].dtype)
            m.load_compact_state(part, prefix=prefix)
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, t in tensors.items():
            if name in own:
                _set_dtype(own[name], t.dtype)
        result = model.load_state_dict(tensors, strict=False)
    padded = {prefix + param for prefix in blocks for param in FARAttention.COMPACT_KEYS}
    if result.unexpected_keys or set(result.missing_keys) != padded:
        stray = sorted(set(result.missing_keys) - padded) + list(result.unexpected_keys)
        raise checkpoint.fail(path, f"state_dict mismatch after loading: {checkpoint.name_list(stray)}")
    pcfg = config.get("pretrained_cfg") or {}
    if pcfg:
        model.pretrained_cfg = checkpoint.tuples(pcfg)
        if hasattr(model, "default_cfg"):
            model.default_cfg = model.pretrained_cfg
    model.far_checkpoint = config
    if backend is not None:
        set_backend(model, backend)
    set_storage(model, storage)
    return model.to(device).eval()


# ---- the one resolver ----
@dataclass(frozen=True)
class ModelSpec:
    """A resolved MODEL argument: kind "file" | "zoo" | "timm"; path (the checkpoint file, for file and
    zoo); name (the text given)."""
    kind: str
    name: str
    path: Optional[Path] = None

    @property
    def origin(self) -> str:
        return {"file": "checkpoint", "zoo": "zoo checkpoint", "timm": "timm architecture"}[self.kind]


def resolve(spec) -> ModelSpec:
    """What a MODEL argument names: "timm:NAME" a timm model; else an existing file, else a zoo name, else
    a timm model name (ConfigError for anything else, and for a folder)."""
    import timm

    text = os.fspath(spec)
    if text.startswith(TIMM_PREFIX):
        name = text[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            raise ConfigError(f"{text}: no timm model named '{name}' (timm {timm.__version__}); e.g. "
                              "timm:deit_tiny_patch16_224, timm:vit_small_patch14_dinov2"
                              + _did_you_mean(name, timm.list_models()))
        return ModelSpec("timm", name)
    path = Path(text)
    if path.exists():
        if path.is_dir():
            raise ConfigError(f"{text}: is a folder; give a checkpoint file or a model name")
        return ModelSpec("file", text, path)
    if text in ZOO:
        return ModelSpec("zoo", text, zoo_path(text))
    if timm.is_model(text):
        return ModelSpec("timm", text)
    raise ConfigError(f"{text}: no such checkpoint file, zoo name ({', '.join(ZOO)}) or timm model name "
                      "(e.g. deit_tiny_patch16_224)" + _did_you_mean(text, [*ZOO, *timm.list_models()]))


def _did_you_mean(text: str, names) -> str:
    """'; did you mean NAME?' for the closest of `names` to a mistyped `text` (difflib), else ''."""
    import difflib

    close = difflib.get_close_matches(text, names, n=1, cutoff=0.8)
    return f"; did you mean {close[0]}?" if close else ""


def load_model(spec, *, device="cpu", backend: Optional[str] = None, far: Optional[bool] = None,
               pretrained: bool = False, weights=None, model_kwargs: Optional[dict] = None,
               storage: str = "padded") -> tuple[nn.Module, ModelSpec]:
    """(model, resolved spec) for a MODEL argument (see resolve). Checkpoints (file, zoo) load as
    saved, in eval mode; `far`, `pretrained`, `weights` (a local weights file: then pretrained is
    ignored and nothing is downloaded) and `model_kwargs` (timm.create_model's) apply to timm names
    only (far.create_model; far=None converts). storage: FAR blocks "padded" or "ragged" (set_storage)."""
    ref = spec if isinstance(spec, ModelSpec) else resolve(spec)
    if ref.kind == "timm":
        model = create_model(ref.name, pretrained=pretrained and weights is None, far=True if far is None else far,
                             backend=backend, weights=weights, **(model_kwargs or {}))
        return set_storage(model, storage).to(device).eval(), ref
    if weights is not None or model_kwargs:
        raise ConfigError(f"{ref.name}: a {ref.origin} has its architecture and weights; weights files and model "
                          "kwargs go with timm names (timm:NAME)")
    return load(ref.path, device=device, backend=backend, storage=storage), ref
