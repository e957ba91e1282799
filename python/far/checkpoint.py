"""The FAR checkpoint file format: one safetensors file, its config as versioned JSON in the header.
No pickle. This module knows files, configs and tensors; building models from them is far.models'.

File layout (safetensors; header metadata is a str -> str map):
    __metadata__["far_config"]  JSON: {"format": "far-checkpoint", "format_version": 1, "far_version",
                                "architecture": {"timm_name", "kwargs"},
                                "far": {"blocks": [{"name", "num_heads", "head_dim", "hidden_sizes" [2][H]}]},
                                "reuse" (optional): {"plan": {"<block>": source block}, "transform": kind},
                                "pretrained_cfg": {...}, "metadata": {...user: teacher, training, pruning},
                                "sha256": hex digest of the rest of the config (JSON, sorted keys, no
                                spaces) and of every tensor (name, dtype, shape, bytes; by name)}
                                (the only metadata key, so files are byte-for-byte reproducible)
    tensors                     the model's state_dict, except that every FAR block (prefix P) stores its
                                kept units only, under P + "lstm.w_ih", ... in place of its padded
                                P + "w_ih", ... (far.nn.FARAttention.COMPACT_KEYS maps one to the other).

    write(path, tensors, config)        atomically, digest added
    read_config(path)                   header only, validated
    config, tensors = read(path)        validated structure (check_digest(path, config, tensors) after)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Optional

import torch

from far.errors import CheckpointError
from far.utils.fs import atomic_write

FORMAT = "far-checkpoint"
FORMAT_VERSION = 1  # the newest version this build reads and the one it writes
CONFIG_KEY = "far_config"
DIGEST_KEY = "sha256"  # inside far_config; optional on load (hand-made files)
MAX_HEADER = 100_000_000  # safetensors' own limit
_LIST_LIMIT = 5


# ---- JSON helpers ----
def json_problem(value: Any, where: str) -> Optional[str]:
    """None if `value` is strict JSON (str-keyed dicts, lists/tuples, str, finite numbers, bool, None),
    else a message naming the first offending entry."""
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value} is not a finite number (JSON has no NaN/inf)"
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = json_problem(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r} ({type(k).__name__})"
            problem = json_problem(v, f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which is not JSON-serializable"


def json_safe(value: dict) -> dict:
    """A JSON-safe copy of a dict: tuples become lists, entries that are not strict JSON are dropped."""
    return {k: json.loads(json.dumps(v)) for k, v in value.items()
            if isinstance(k, str) and json_problem(v, k) is None}


def tuples(value: Any):
    """Inverse of json_safe's list conversion: timm keeps input_size, mean, std, ... as tuples."""
    if isinstance(value, list):
        return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    return value


def name_list(names, limit: int = _LIST_LIMIT) -> str:
    """'a, b, c (+2 more)'."""
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def fail(path, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


# ---- digest and write ----
def digest(config: dict, tensors: dict) -> str:
    """sha256 of the config (without its own digest) and of every tensor's name, dtype, shape and bytes."""
    rest = {k: v for k, v in config.items() if k != DIGEST_KEY}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def owned_cpu_tensors(state: dict) -> dict:
    """{name: CPU tensor}, each contiguous and owning its storage (safetensors refuses aliasing)."""
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


def write(path, tensors: dict, config: dict, *, force: bool = True) -> None:
    """Write a checkpoint atomically (far.utils.fs.atomic_write): `tensors` ({name: tensor}) and
    `config` (a dict with every key but the digest, which is added here). The config is checked with
    the same rules as on load before anything touches the disk."""
    path = os.fspath(path)
    config = {k: v for k, v in config.items() if k != DIGEST_KEY}
    problem = json_problem(config, "config")
    if problem:
        raise CheckpointError(f"cannot save: {problem}")
    check_config(path, json.dumps(config))  # what we write, we can read
    tensors = owned_cpu_tensors(tensors)
    config[DIGEST_KEY] = digest(config, tensors)
    header = {CONFIG_KEY: json.dumps(config, separators=(",", ":"), allow_nan=False)}

    import safetensors.torch

    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header), force=force)


# ---- read and validate ----
def read_header(path) -> dict:
    """The safetensors header as a dict, with clear messages for missing, truncated and corrupt files."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(path, f"truncated or not a safetensors file: {size} bytes, fewer than the "
                                 "8-byte header length that starts every safetensors file")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8 or n > MAX_HEADER:
                raise fail(path, f"truncated or not a safetensors file: the header length field says {n} "
                                 f"bytes but the file has {size - 8} after it")
            raw = f.read(n)
    except FileNotFoundError:
        raise fail(path, "no such file") from None
    except IsADirectoryError:
        raise fail(path, "is a directory, not a checkpoint file") from None
    except OSError as e:
        raise fail(path, f"cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(path, f"corrupt safetensors header (not valid UTF-8 JSON: {e}); truncated or "
                         "damaged file, or not a safetensors file") from None
    if not isinstance(header, dict):
        raise fail(path, "corrupt safetensors header (not a JSON object)")
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            ends.append(int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise fail(path, f"corrupt safetensors header: entry '{name}' has no valid data_offsets") from None
    data = size - 8 - n
    if data < max(ends, default=0):
        raise fail(path, f"truncated: the header describes {max(ends)} bytes of tensor data but only "
                         f"{data} are present")
    return header


def check_config(path, raw: Optional[str]) -> dict:
    """The config parsed from its JSON text and validated (structure and types); CheckpointError otherwise."""
    if raw is None:
        raise fail(path, f"not a FAR checkpoint: the safetensors metadata has no '{CONFIG_KEY}' entry "
                         "(a plain safetensors file? FAR checkpoints are written by far.save)")
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise fail(path, f"corrupt '{CONFIG_KEY}' metadata: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise fail(path, f"corrupt '{CONFIG_KEY}' metadata: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise fail(path, f"wrong format {config.get('format')!r} in '{CONFIG_KEY}', expected {FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(path, f"invalid format_version {version!r}; this build reads format_version {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        from far.version import __version__

        raise fail(path, f"format_version {version} is newer than this build of far supports "
                         f"(format_version {FORMAT_VERSION}, far {__version__}); upgrade far to load it")

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise fail(path, f"invalid '{CONFIG_KEY}': {what}")

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
    reuse = config.get("reuse")
    if reuse is not None:
        need(isinstance(reuse, dict) and isinstance(reuse.get("plan"), dict) and isinstance(reuse.get("transform"), str)
             and all(isinstance(k, str) and k.isdigit() and is_int(v) and 0 <= v < int(k)
                     for k, v in reuse["plan"].items()),
             f"reuse must be {{'plan': {{'block': earlier source block}}, 'transform': str}}, got {reuse!r}")
    need(isinstance(config.get("pretrained_cfg", {}), dict), "pretrained_cfg must be a dict")
    need(isinstance(config.get("metadata", {}), dict), "metadata must be a dict")
    need(isinstance(config.get(DIGEST_KEY, ""), str), f"{DIGEST_KEY} must be a hex string")
    return config


def read_config(path) -> dict:
    """The checkpoint's config (format, architecture, FAR blocks with hidden sizes, pretrained_cfg, user
    metadata), read from the header only and validated; raises CheckpointError."""
    path = os.fspath(path)
    meta = read_header(path).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise fail(path, "corrupt safetensors header: __metadata__ is not a JSON object")
    return check_config(path, meta.get(CONFIG_KEY))


def read(path) -> tuple[dict, dict]:
    """(config, {name: CPU tensor}) of a checkpoint, the header and config validated; the digest is
    checked separately (check_digest), after the caller's structural checks, which say more."""
    path = os.fspath(path)
    read_config(path)  # header checks with clear messages, then the config itself
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise fail(path, f"corrupt safetensors file: {type(e).__name__}: {e}") from e
    return check_config(path, meta.get(CONFIG_KEY)), tensors


def check_digest(path, config: dict, tensors: dict) -> None:
    """CheckpointError if the config's digest (when present) does not match the config and tensors."""
    want = config.get(DIGEST_KEY)
    if want is not None and want != digest(config, tensors):
        raise fail(path, f"corrupt file: the {DIGEST_KEY} checksum of the config and tensors does not match "
                         "(damaged tensor data, or a header edited by hand: drop its 'sha256' to skip the check)")


__all__ = ["CONFIG_KEY", "DIGEST_KEY", "FORMAT", "FORMAT_VERSION", "check_config",
           "check_digest", "digest", "read", "read_config", "read_header", "write"]
