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

What load accepts (everything else is a CheckpointError naming the file): a regular file (never a FIFO or
device); a safetensors header that is a JSON object of at most MAX_JSON_DEPTH levels, str -> str metadata,
tensors of known dtypes whose shape and data_offsets agree, one floating dtype (FLOAT_DTYPES) for all
floating tensors; a config whose every field has its type and range (check_config): architecture sizes
within ARCH_LIMITS, no timm loader kwargs (LOADER_KWARGS: a checkpoint never makes timm read another
file or the network), pretrained_cfg's data fields usable by far.data.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable, Optional

import torch

from far.errors import CheckpointError
from far.utils.fs import NotRegularFile, atomic_write, open_input, private_folder

FORMAT = "far-checkpoint"
FORMAT_VERSION = 1  # the newest version this build reads and the one it writes
CONFIG_KEY = "far_config"
DIGEST_KEY = "sha256"  # inside far_config; optional on load (hand-made files)
MAX_HEADER = 100_000_000  # safetensors' own limit
MAX_JSON_DEPTH = 32  # nesting levels of the header and of the config (real files use fewer than 8)
_LIST_LIMIT = 5

# Sane ranges of architecture sizes, wherever they come from (a checkpoint's architecture kwargs and FAR
# blocks, or command-line options such as --num-classes): far beyond any ViT, far below what exhausts memory.
ARCH_LIMITS = {
    "depth": (0, 64),
    "embed_dim": (1, 16384),
    "num_heads": (1, 256),
    "num_classes": (0, 100_000),
    "in_chans": (1, 64),
    "patch_size": (1, 1024),
    "img_size": (1, 16384),
    "reg_tokens": (0, 1024),
    "head_dim": (1, 16384),
    "hidden_size": (0, 16384),  # LSTM units per (head, direction)
    "mlp_ratio": (0, 64),
}
# timm.create_model arguments that read files or the network, or change what the model is: never from a file
LOADER_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                           "checkpoint_path", "cache_dir", "features_only", "feature_cfg", "out_indices"})
# safetensors dtype codes -> bytes per element; floating ones a model may be stored in
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
               "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        v, d = level.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            depth = max(depth, d)
            level.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return depth


def parse_json(path, text, what: str) -> Any:
    """json.loads with CheckpointError for bad text and for nesting deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise fail(path, f"corrupt {what}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(path, f"corrupt {what}: not valid JSON ({e})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise fail(path, f"corrupt {what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


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


def mismatches(expected: dict, got: dict) -> list:
    """What differs between two {name: shape} maps, as sentences: 'N missing tensor(s): ...', 'N unexpected
    tensor(s): ...', 'N mis-shaped tensor(s): NAME expected [..], got [..]' (empty when they agree)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k} expected {list(expected[k])}, got {list(got[k])}" for k in sorted(set(expected) & set(got))
              if tuple(expected[k]) != tuple(got[k])]
    out = []
    for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if names:
            out.append(f"{len(names)} {what} tensor(s): {name_list(names)}")
    return out


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

    atomic_write(path, lambda tmp: private_folder(tmp, lambda name: _save_file(tensors, name, header)), force=force)


def _save_file(tensors: dict, tmp: str, header: dict) -> None:
    """safetensors' save_file (it writes a '.tmpXXXXXX' of its own beside `tmp`, hence private_folder), whose
    failed writes (a full disk, a quota, EIO) are a SafetensorError saying "I/O error: <why> (os error N)" (Rust's
    io::Error): raised as that OSError, which atomic_write reports against the destination, as one error."""
    import re

    import safetensors.torch
    from safetensors import SafetensorError

    try:
        safetensors.torch.save_file(tensors, tmp, metadata=header)
    except SafetensorError as e:
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code)) from e


# ---- read and validate ----
def read_header(path) -> dict:
    """The safetensors header as a dict, with clear messages for missing, truncated and corrupt files:
    a regular file, a header JSON object (bounded size and depth), str -> str metadata, and for every
    tensor a known dtype, a shape of ints >= 0 and data_offsets that hold exactly its bytes within the file."""
    try:
        with open_input(path, "checkpoint file") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(path, f"truncated or not a safetensors file: {size} bytes, fewer than the "
                                 "8-byte header length that starts every safetensors file")
            head = f.read(8)
            # a pickle starts 0x80 <protocol 2..5>; a safetensors header length may too, but its JSON follows
            pickled = head[:1] == b"\x80" and 2 <= head[1] <= 5 and f.read(1) != b"{"
            f.seek(8)
            if head.startswith(b"PK\x03\x04") or pickled:
                raise CheckpointError(
                    f"{path} is not a safetensors file; it is a torch checkpoint ({'a zip archive' if head[:1] == b'P' else 'a pickle'}"
                    "). FAR checkpoints are written by far.save; the weights of a timm architecture are read with "
                    f"far.create_model('timm:NAME', weights='{path}') or `far distill --teacher timm:NAME "
                    f"--teacher-weights {path}`")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > MAX_HEADER:
                raise CheckpointError(f"{path} is not a safetensors file, or it is truncated: the header length "
                                      f"field says {n} bytes but the file has {size - 8} after it")
            raw = f.read(n)
    except FileNotFoundError:
        raise fail(path, "no such file") from None
    except IsADirectoryError:
        raise fail(path, "is a directory (folder), not a regular checkpoint file") from None
    except NotRegularFile as e:  # "PATH: is a named pipe (FIFO), not a regular checkpoint file", ...
        if os.path.isdir(path):
            raise fail(path, "is a directory (folder), not a regular checkpoint file") from None
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise fail(path, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(path, f"corrupt safetensors header (not valid UTF-8 JSON: {e}); truncated or "
                         "damaged file, or not a safetensors file") from None
    header = parse_json(path, text, "safetensors header")
    if not isinstance(header, dict):
        raise fail(path, "corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise fail(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    ends = []
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end):
                raise ValueError
        except (TypeError, KeyError, IndexError, ValueError):
            raise fail(path, f"corrupt safetensors header: entry '{name}' has no valid data_offsets") from None
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise fail(path, f"corrupt safetensors header: entry '{name}' has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(v) and v >= 0 for v in shape)):
            raise fail(path, f"corrupt safetensors header: entry '{name}' has an invalid shape {shape!r}")
        if math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
            raise fail(path, f"corrupt safetensors header: entry '{name}' ({dtype} {shape}) does not fit its "
                             f"{end - begin} bytes of data")
        ends.append(end)
    if data < max(ends, default=0):
        raise fail(path, f"truncated: the header describes {max(ends)} bytes of tensor data but only "
                         f"{data} are present")
    floats = {}
    for name, entry in header.items():
        if name != "__metadata__" and entry["dtype"].startswith(("F", "BF")):
            floats.setdefault(entry["dtype"], name)
    if any(d not in FLOAT_DTYPES for d in floats):
        bad = next(d for d in floats if d not in FLOAT_DTYPES)
        raise fail(path, f"tensor '{floats[bad]}' has dtype {bad}; models are stored in one of "
                         f"{', '.join(FLOAT_DTYPES)}")
    if len(floats) > 1:
        raise fail(path, "tensors of mixed floating dtypes (" + ", ".join(f"{d}: e.g. {t}" for d, t in floats.items())
                   + "); a far checkpoint stores every floating tensor in one dtype")
    return header


def tensor_entries(header: dict) -> dict:
    """{name: (safetensors dtype code, shape tuple)} of a header read by read_header."""
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _in_range(key: str, v) -> bool:
    lo, hi = ARCH_LIMITS[key]
    return (_is_num(v) if key == "mlp_ratio" else _is_int(v)) and lo <= v <= hi


def _arch_problem(kwargs: dict) -> Optional[str]:
    """None if architecture kwargs are usable, else what is wrong with the first bad one."""
    for key, v in kwargs.items():
        if key in LOADER_KWARGS:
            return f"architecture kwarg '{key}' is not allowed in a checkpoint (it would make timm load weights)"
        if key in ("img_size", "patch_size") and isinstance(v, list):  # a pair: [H, W]
            if not (len(v) == 2 and all(_in_range(key, x) for x in v)):
                return f"architecture kwarg {key} must be an int or [H, W] in {list(ARCH_LIMITS[key])}, got {v!r}"
        elif key in ARCH_LIMITS:
            if not _in_range(key, v):
                return f"architecture kwarg {key} must be {'a number' if key == 'mlp_ratio' else 'an int'} in " \
                       f"{list(ARCH_LIMITS[key])}, got {v!r}"
        elif isinstance(v, float) and not math.isfinite(v):
            return f"architecture kwarg {key} is not a finite number"
        elif isinstance(v, dict) or (isinstance(v, list) and (len(v) > 16 or any(isinstance(x, (dict, list)) for x in v))):
            return f"architecture kwarg {key} must be a number, string, bool, null or a short flat list, got {v!r:.80}"
    return None


def _pretrained_cfg_problem(pcfg: dict) -> Optional[str]:
    """None if the fields far.data uses (input_size, mean, std, num_classes, interpolation, crop_pct,
    architecture) have usable types and ranges, else the first problem."""
    size = pcfg.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 3 and _in_range("in_chans", size[0])
                                 and all(_in_range("img_size", v) for v in size[1:])):
        return f"pretrained_cfg.input_size must be [C, H, W] ints (C <= {ARCH_LIMITS['in_chans'][1]}, " \
               f"H, W <= {ARCH_LIMITS['img_size'][1]}), got {size!r:.80}"
    for key in ("mean", "std"):
        v = pcfg.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and 1 <= len(v) <= ARCH_LIMITS["in_chans"][1] and all(_is_num(x) for x in v)):
            return f"pretrained_cfg.{key} must be a list of finite numbers, got {v!r:.80}"
        if key == "std" and any(x <= 0 for x in v):
            return f"pretrained_cfg.std must be > 0 (images are divided by it), got {v!r:.80}"
        if size is not None and len(v) not in (1, size[0]):
            return f"pretrained_cfg.{key} has {len(v)} values for {size[0]} input channel(s)"
    if "num_classes" in pcfg and not _in_range("num_classes", pcfg["num_classes"]):
        return f"pretrained_cfg.num_classes must be an int in {list(ARCH_LIMITS['num_classes'])}, " \
               f"got {pcfg['num_classes']!r:.80}"
    for key in ("interpolation", "architecture"):
        if pcfg.get(key) is not None and not isinstance(pcfg[key], str):
            return f"pretrained_cfg.{key} must be a string, got {pcfg[key]!r:.80}"
    crop = pcfg.get("crop_pct")
    if crop is not None and not (_is_num(crop) and 0 < crop <= 10):
        return f"pretrained_cfg.crop_pct must be a number in (0, 10], got {crop!r:.80}"
    return None


def check_config(path, raw: Optional[str]) -> dict:
    """The config parsed from its JSON text and validated (structure and types); CheckpointError otherwise."""
    if raw is None:
        raise fail(path, f"not a FAR checkpoint: the safetensors metadata has no '{CONFIG_KEY}' entry "
                         "(a plain safetensors file? FAR checkpoints are written by far.save)")
    if not isinstance(raw, str):
        raise fail(path, f"corrupt '{CONFIG_KEY}' metadata: expected a JSON string, got {type(raw).__name__}")
    config = parse_json(path, raw, f"'{CONFIG_KEY}' metadata")
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

    is_int = _is_int
    need(isinstance(config.get("far_version", ""), str), f"far_version must be a string, got "
                                                          f"{config.get('far_version')!r:.80}")
    arch = config.get("architecture")
    need(isinstance(arch, dict) and isinstance(arch.get("timm_name"), str) and isinstance(arch.get("kwargs"), dict),
         f"architecture must be {{'timm_name': str, 'kwargs': dict}}, got {arch!r:.200}")
    problem = _arch_problem(arch["kwargs"])
    need(problem is None, str(problem))
    far_cfg = config.get("far")
    need(isinstance(far_cfg, dict) and isinstance(far_cfg.get("blocks"), list), "far.blocks must be a list")
    need(len(far_cfg["blocks"]) <= ARCH_LIMITS["depth"][1], f"far.blocks has {len(far_cfg['blocks'])} entries, "
                                                            f"more than {ARCH_LIMITS['depth'][1]}")
    names = set()
    for i, b in enumerate(far_cfg["blocks"]):
        need(isinstance(b, dict) and isinstance(b.get("name"), str) and is_int(b.get("num_heads"))
             and is_int(b.get("head_dim")), f"far.blocks[{i}] needs name (str), num_heads and head_dim (int)")
        need(b["name"] not in names, f"far.blocks[{i}]: block name {b['name']!r} appears twice")
        names.add(b["name"])
        need(_in_range("num_heads", b["num_heads"]) and _in_range("head_dim", b["head_dim"]),
             f"far.blocks[{i}] ({b['name']}): num_heads must lie in {list(ARCH_LIMITS['num_heads'])} and head_dim in "
             f"{list(ARCH_LIMITS['head_dim'])}, got {b['num_heads']} and {b['head_dim']}")
        hs = b.get("hidden_sizes")
        need(isinstance(hs, list) and len(hs) == 2
             and all(isinstance(r, list) and len(r) == b["num_heads"] and all(is_int(k) and k >= 0 for k in r)
                     for r in hs),
             f"far.blocks[{i}] ({b['name']}): hidden_sizes must be [2][num_heads={b['num_heads']}] ints >= 0, "
             f"got {hs!r:.200}")
        need(all(k <= ARCH_LIMITS["hidden_size"][1] for r in hs for k in r),
             f"far.blocks[{i}] ({b['name']}): hidden sizes must be <= {ARCH_LIMITS['hidden_size'][1]}, got {hs!r:.200}")
    reuse = config.get("reuse")
    if reuse is not None:
        need(isinstance(reuse, dict) and isinstance(reuse.get("plan"), dict) and isinstance(reuse.get("transform"), str)
             and all(isinstance(k, str) and k.isdigit() and len(k) <= 6 and is_int(v) and 0 <= v < int(k)
                     for k, v in reuse["plan"].items()),
             f"reuse must be {{'plan': {{'block': earlier source block}}, 'transform': str}}, got {reuse!r:.200}")
    pcfg = config.get("pretrained_cfg", {})
    need(isinstance(pcfg, dict), "pretrained_cfg must be a dict")
    problem = _pretrained_cfg_problem(pcfg)
    need(problem is None, str(problem))
    need(isinstance(config.get("metadata", {}), dict), "metadata must be a dict")
    want = config.get(DIGEST_KEY, "0" * 64)
    need(isinstance(want, str) and len(want) == 64 and all(c in "0123456789abcdef" for c in want),
         f"{DIGEST_KEY} must be 64 lowercase hex digits, got {want!r:.80}")
    return config


def read_config(path) -> dict:
    """The checkpoint's config (format, architecture, FAR blocks with hidden sizes, pretrained_cfg, user
    metadata), read from the header only and validated; raises CheckpointError."""
    path = os.fspath(path)
    return _config_of(path, read_header(path))


def _config_of(path, header: dict) -> dict:
    return check_config(path, (header.get("__metadata__") or {}).get(CONFIG_KEY))


def read(path, precheck: Optional[Callable[[dict, dict], None]] = None) -> tuple[dict, dict]:
    """(config, {name: CPU tensor}) of a checkpoint, the header and config validated; the digest is
    checked separately (check_digest), after the caller's structural checks, which say more.

    precheck(config, {name: (dtype code, shape)}) runs after the header and config are validated and
    before any tensor data is read (far.load refuses configs that describe far more than the file holds)."""
    path = os.fspath(path)
    header = read_header(path)  # header checks with clear messages, then the config itself
    config = _config_of(path, header)
    if precheck is not None:
        precheck(config, tensor_entries(header))
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - whatever safetensors finds wrong is a damaged file
        raise fail(path, f"corrupt safetensors file: {type(e).__name__}: {e}") from None
    if meta != header.get("__metadata__", {}) or {k: (_ST_DTYPES.get(t.dtype), tuple(t.shape))
                                                    for k, t in tensors.items()} != tensor_entries(header):
        raise fail(path, "the file changed while it was read (or safetensors read it differently); try again")
    return config, tensors


_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
              torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.float64: "F64"}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def check_digest(path, config: dict, tensors: dict) -> None:
    """CheckpointError if the config's digest (when present) does not match the config and tensors."""
    want = config.get(DIGEST_KEY)
    if want is not None and want != digest(config, tensors):
        raise fail(path, f"corrupt file: the {DIGEST_KEY} checksum of the config and tensors does not match "
                         "(damaged tensor data, or a header edited by hand: drop its 'sha256' to skip the check)")


__all__ = ["ARCH_LIMITS", "CONFIG_KEY", "DIGEST_KEY", "FORMAT", "FORMAT_VERSION", "LOADER_KWARGS", "check_config",
           "check_digest", "digest", "read", "read_config", "read_header", "tensor_entries", "write"]
