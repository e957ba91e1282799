"""FAR checkpoints: one safetensors file per model, its config as JSON in the header. No pickle.

File layout (safetensors; header metadata is a str -> str map):
    __metadata__["far_config"]  JSON: {"format": "far-checkpoint", "format_version": 1, "far_version",
                                "architecture": {"timm_name", "kwargs"},
                                "far": {"blocks": [{"name", "num_heads", "head_dim", "hidden_sizes" [2][H]}]},
                                "pretrained_cfg": {...}, "metadata": {...user: teacher, training, pruning},
                                "sha256": hex digest of the rest of the config (JSON, sorted keys, no
                                spaces) and of every tensor (name, dtype, shape, bytes; by name)}
                                (the only metadata key, so files are byte-for-byte reproducible)
    tensors                     the model's state_dict, except that every FARAttention (prefix P) stores
                                FARAttention.compact_state() (kept units only) under P + "lstm.w_ih", ...
                                in place of its padded w_ih, w_hh, b_ih, b_hh, head_proj_weight/_bias.

    far.save(model, "m.safetensors", metadata={"teacher": "deit_tiny_patch16_224"})
    model = far.load("m.safetensors", device="cuda")   # eval() mode, model.far_checkpoint = config
    far.read_config("m.safetensors")                   # header only
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from typing import Any, Optional

import torch
import torch.nn as nn

FORMAT = "far-checkpoint"
FORMAT_VERSION = 1  # the newest version this build reads and the one it writes
CONFIG_KEY = "far_config"
DIGEST_KEY = "sha256"  # inside far_config; optional on load (hand-made files)
PADDED_KEYS = {  # FARAttention parameter -> its compact_state() key
    "w_ih": "lstm.w_ih", "w_hh": "lstm.w_hh", "b_ih": "lstm.b_ih", "b_hh": "lstm.b_hh",
    "head_proj_weight": "head_proj.weight", "head_proj_bias": "head_proj.bias",
}
_MAX_HEADER = 100_000_000  # safetensors' own limit
_LIST_LIMIT = 5


class CheckpointError(ValueError):
    """A FAR checkpoint is missing, unreadable, truncated, corrupt, of an unsupported version, or does
    not match the architecture its config names."""


# ---- JSON helpers ----
def _json_problem(value: Any, where: str) -> Optional[str]:
    """None if `value` is strict JSON (str-keyed dicts, lists/tuples, str, finite numbers, bool, None),
    else a message naming the first offending entry."""
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value} is not a finite number (JSON has no NaN/inf)"
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r} ({type(k).__name__})"
            problem = _json_problem(v, f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which is not JSON-serializable"


def _json_safe(value: Any):
    """A JSON-safe copy of a dict: tuples become lists, entries that are not strict JSON are dropped."""
    return {k: json.loads(json.dumps(v)) for k, v in value.items()
            if isinstance(k, str) and _json_problem(v, k) is None}


def _tuples(value: Any):
    """Inverse of _json_safe's list conversion: timm keeps input_size, mean, std, ... as tuples."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _names(names, limit: int = _LIST_LIMIT) -> str:
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- tensors ----
def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DataParallel / DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _far_modules(model: nn.Module):
    from far.models.convert import far_modules

    return far_modules(model)


def _checkpoint_tensors(model: nn.Module) -> dict:
    """{name: CPU tensor} as stored: state_dict with each FAR module's padded tensors replaced by its
    compact_state(); every tensor contiguous and owning its storage (safetensors refuses aliasing)."""
    state = model.state_dict()
    for prefix, module in ((name + ".", m) for name, m in _far_modules(model)):
        for param in PADDED_KEYS:
            state.pop(prefix + param, None)
        for key, t in module.compact_state().items():
            if prefix + key in state:
                raise ValueError(f"cannot save: '{prefix}{key}' is both a state_dict entry and a compact FAR tensor")
            state[prefix + key] = t
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if (not t.is_contiguous() or storage.nbytes() != t.numel() * t.element_size()
                or (ptr and ptr in seen)):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _digest(config: dict, tensors: dict) -> str:
    rest = {k: v for k, v in config.items() if k != DIGEST_KEY}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ---- save ----
def _config(model: nn.Module, metadata: Optional[dict]) -> dict:
    import far

    arch = getattr(model, "far_arch", None)
    if not (isinstance(arch, dict) and isinstance(arch.get("timm_name"), str)
            and isinstance(arch.get("kwargs", {}), dict)):
        raise ValueError(f"cannot save {type(model).__name__}: it has no valid .far_arch. Models must be built "
                         "with far.create_model(...) or have .far_arch = {'timm_name': <timm model name>, "
                         "'kwargs': {<timm.create_model kwargs>}} set, so that far.load can rebuild them")
    kwargs = dict(arch.get("kwargs", {}))
    problem = _json_problem(kwargs, "model.far_arch['kwargs']")
    if problem:
        raise ValueError(f"cannot save: {problem}; far.load rebuilds the model from these kwargs")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict (or None), got {type(metadata).__name__}")
    problem = _json_problem(metadata, "metadata")
    if problem:
        raise ValueError(f"metadata must be JSON-serializable: {problem}")
    blocks = [{"name": name, "num_heads": m.num_heads, "head_dim": m.head_dim,
               "hidden_sizes": m.hidden_sizes.tolist()} for name, m in _far_modules(model)]
    pcfg = getattr(model, "pretrained_cfg", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "far_version": far.__version__,
        "architecture": {"timm_name": arch["timm_name"], "kwargs": json.loads(json.dumps(kwargs))},
        "far": {"blocks": blocks},
        "pretrained_cfg": _json_safe(pcfg) if isinstance(pcfg, dict) else {},
        "metadata": json.loads(json.dumps(metadata)),
    }


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(model: nn.Module, path, metadata: Optional[dict] = None) -> None:
    """Write `model` (built by far.create_model, FAR-converted or a plain timm teacher) to one
    safetensors file at `path`, atomically: a temp file in the same directory, fsync, os.replace.
    On any error the temp file is removed and an existing file at `path` is left as it was.

    Args:
        model: a model with .far_arch (set by far.create_model); torch.compile / DDP wrappers are unwrapped.
        path: destination file (conventionally *.safetensors).
        metadata: JSON-serializable dict stored with the config (teacher, training, pruning info).
    Only kept LSTM units are stored, so pruned models give physically smaller files.
    """
    model = _unwrap(model)
    path = os.fspath(path)
    config = _config(model, metadata)  # validates before anything touches the disk
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to '{path}': it is a directory")
    tensors = _checkpoint_tensors(model)
    config[DIGEST_KEY] = _digest(config, tensors)
    header = {CONFIG_KEY: json.dumps(config, separators=(",", ":"), allow_nan=False)}

    import safetensors.torch

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask-respecting mode
        safetensors.torch.save_file(tensors, tmp, metadata=header)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        _fsync(directory)


# ---- read and validate ----
def _fail(path: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def _read_header(path: str) -> dict:
    """The safetensors header as a dict, with clear messages for missing, truncated and corrupt files."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _fail(path, f"truncated or not a safetensors file: {size} bytes, fewer than the "
                                  "8-byte header length that starts every safetensors file")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8 or n > _MAX_HEADER:
                raise _fail(path, f"truncated or not a safetensors file: the header length field says {n} "
                                  f"bytes but the file has {size - 8} after it")
            raw = f.read(n)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a checkpoint file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"corrupt safetensors header (not valid UTF-8 JSON: {e}); truncated or "
                          "damaged file, or not a safetensors file") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)")
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            ends.append(int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise _fail(path, f"corrupt safetensors header: entry '{name}' has no valid data_offsets") from None
    data = size - 8 - n
    if data < max(ends, default=0):
        raise _fail(path, f"truncated: the header describes {max(ends)} bytes of tensor data but only "
                          f"{data} are present")
    return header


def _check_config(path: str, raw: Optional[str]) -> dict:
    if raw is None:
        raise _fail(path, f"not a FAR checkpoint: the safetensors metadata has no '{CONFIG_KEY}' entry "
                          "(a plain safetensors file? FAR checkpoints are written by far.save)")
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise _fail(path, f"corrupt '{CONFIG_KEY}' metadata: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail(path, f"corrupt '{CONFIG_KEY}' metadata: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise _fail(path, f"wrong format {config.get('format')!r} in '{CONFIG_KEY}', expected {FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(path, f"invalid format_version {version!r}; this build reads format_version {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise _fail(path, f"format_version {version} is newer than this build of far supports "
                          f"(format_version {FORMAT_VERSION}, far {_far_version()}); upgrade far to load it")

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise _fail(path, f"invalid '{CONFIG_KEY}': {what}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    arch = config.get("architecture")
    need(isinstance(arch, dict) and isinstance(arch.get("timm_name"), str) and isinstance(arch.get("kwargs"), dict),
         f"architecture must be {{'timm_name': str, 'kwargs': dict}}, got {arch!r}")
    far_cfg = config.get("far")
    need(isinstance(far_cfg, dict) and isinstance(far_cfg.get("blocks"), list), "far.blocks must be a list")
    for i, b in enumerate(far_cfg["blocks"]):
        need(isinstance(b, dict) and isinstance(b.get("name"), str) and is_int(b.get("num_heads"))
             and is_int(b.get("head_dim")), f"far.blocks[{i}] needs name (str), num_heads and head_dim (int)")
        hs = b.get("hidden_sizes")
        need(isinstance(hs, list) and len(hs) == 2
             and all(isinstance(r, list) and len(r) == b["num_heads"] and all(is_int(k) and k >= 0 for k in r)
                     for r in hs),
             f"far.blocks[{i}] ({b['name']}): hidden_sizes must be [2][num_heads={b['num_heads']}] ints >= 0, "
             f"got {hs!r}")
    need(isinstance(config.get("pretrained_cfg", {}), dict), "pretrained_cfg must be a dict")
    need(isinstance(config.get("metadata", {}), dict), "metadata must be a dict")
    need(isinstance(config.get(DIGEST_KEY, ""), str), f"{DIGEST_KEY} must be a hex string")
    return config


def _far_version() -> str:
    from far.version import __version__

    return __version__


def read_config(path) -> dict:
    """The checkpoint's config (format, architecture, FAR blocks with hidden sizes, pretrained_cfg, user
    metadata), read from the header only and validated; raises CheckpointError like far.load."""
    path = os.fspath(path)
    meta = _read_header(path).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise _fail(path, "corrupt safetensors header: __metadata__ is not a JSON object")
    return _check_config(path, meta.get(CONFIG_KEY))


def _build(path: str, config: dict) -> nn.Module:
    import timm

    from far.models.registry import create_model

    arch, blocks = config["architecture"], config["far"]["blocks"]
    name = arch["timm_name"]
    if not timm.is_model(name):
        raise _fail(path, f"unknown architecture '{name}' (not a timm model in this environment; "
                          f"timm {timm.__version__})")
    try:
        model = create_model(name, pretrained=False, far=bool(blocks),
                             hidden_sizes=[b["hidden_sizes"] for b in blocks] if blocks else None, **arch["kwargs"])
    except Exception as e:
        raise _fail(path, f"cannot rebuild architecture '{name}' with kwargs {arch['kwargs']} and "
                          f"{len(blocks)} FAR block(s): {type(e).__name__}: {e}") from e
    got = [(n, m.num_heads, m.head_dim) for n, m in _far_modules(model)]
    want = [(b["name"], b["num_heads"], b["head_dim"]) for b in blocks]
    if got != want:
        diff = next((f"block {i}: config {w}, model {g}" for i, (w, g) in enumerate(zip(want, got)) if w != g),
                    f"config has {len(want)} FAR blocks, the model {len(got)}")
        raise _fail(path, f"FAR blocks (name, num_heads, head_dim) in the config do not match the rebuilt "
                          f"'{name}': {diff}")
    return model


def _expected(model: nn.Module) -> tuple[dict, dict]:
    """({stored name: (shape, dtype of the model's tensor)}, {FAR prefix: module})."""
    state = model.state_dict()
    far = {name + ".": m for name, m in _far_modules(model)}
    for prefix, m in far.items():
        for param, key in PADDED_KEYS.items():
            dtype = state.pop(prefix + param).dtype
            state[prefix + key] = (m.compact_shapes()[key], dtype)
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in state.items()}, far


def _check_tensors(path: str, tensors: dict, expected: dict, arch: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes, dtypes = [], []
    for name in sorted(set(expected) & set(tensors)):
        (shape, dtype), t = expected[name], tensors[name]
        if tuple(t.shape) != shape:
            shapes.append(f"{name} expected {list(shape)}, got {list(t.shape)}")
        elif dtype.is_floating_point != t.dtype.is_floating_point or (not dtype.is_floating_point and dtype != t.dtype):
            dtypes.append(f"{name} expected {'a floating dtype' if dtype.is_floating_point else dtype}, got {t.dtype}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped tensor(s): {_names(shapes)}")
    if dtypes:
        problems.append(f"{len(dtypes)} tensor(s) with the wrong dtype: {_names(dtypes)}")
    if problems:
        raise _fail(path, f"tensors do not match '{arch}' with the config's hidden sizes: " + "; ".join(problems))


def _set_dtype(t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        t.data = t.data.to(dtype)


def load(path, device="cpu", backend: Optional[str] = None) -> nn.Module:
    """Rebuild and return the model saved by far.save, in eval() mode, on `device`.

    Args:
        path: a file written by far.save.
        device: where the model goes (tensors are read on the CPU first).
        backend: scan backend for every FAR block (far.set_backend); None = env FAR_BACKEND / auto.
    The config is attached as `model.far_checkpoint`; `model.pretrained_cfg` comes from the file.
    Parameter dtypes (e.g. bfloat16) are those stored. Raises CheckpointError (a ValueError) naming
    the problem for missing, truncated, corrupt, wrong-version or mismatching files.
    """
    path = os.fspath(path)
    if backend is not None:
        from far_kernels.ops.bilstm_scan import OP as SCAN_OP

        # a typo, or an explicitly requested backend that cannot run on `device`, fails before the file is read
        SCAN_OP.resolve(backend, device)
    read_config(path)  # header checks with clear messages, then the config itself

    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise _fail(path, f"corrupt safetensors file: {type(e).__name__}: {e}") from e
    config = _check_config(path, meta.get(CONFIG_KEY))
    model = _build(path, config)
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floating) == 1:  # e.g. a bfloat16 model: non-persistent buffers follow too
        model.to(floating.pop())
    expected, far = _expected(model)
    _check_tensors(path, tensors, expected, config["architecture"]["timm_name"])
    digest = config.get(DIGEST_KEY)
    if digest is not None and digest != _digest(config, tensors):  # last: structural errors say more
        raise _fail(path, f"corrupt file: the {DIGEST_KEY} checksum of the config and tensors does not match "
                          "(damaged tensor data, or a header edited by hand: drop its 'sha256' to skip the check)")
    with torch.no_grad():
        for prefix, m in far.items():
            part = {key: tensors.pop(prefix + key) for key in PADDED_KEYS.values()}
            for param, key in PADDED_KEYS.items():
                _set_dtype(getattr(m, param), part[key].dtype)
            m.load_compact_state(part, prefix=prefix)
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, t in tensors.items():
            if name in own:
                _set_dtype(own[name], t.dtype)
        result = model.load_state_dict(tensors, strict=False)
    padded = {prefix + param for prefix in far for param in PADDED_KEYS}
    if result.unexpected_keys or set(result.missing_keys) != padded:
        stray = sorted(set(result.missing_keys) - padded) + list(result.unexpected_keys)
        raise _fail(path, f"state_dict mismatch after loading: {_names(stray)}")

    pcfg = config.get("pretrained_cfg") or {}
    if pcfg:
        model.pretrained_cfg = _tuples(pcfg)
        if hasattr(model, "default_cfg"):
            model.default_cfg = model.pretrained_cfg
    model.far_checkpoint = config
    if backend is not None:
        from far.models.convert import set_backend

        set_backend(model, backend)
    return model.to(device).eval()


__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "load", "read_config", "save"]
