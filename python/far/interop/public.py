"""Import checkpoints of the FAR authors' public code (github.com/aliothren/FAR, modeling/) into FARAttention.

What their code stores (facts read from modeling/architectures.py, train.py, prune.py at commit b174acb;
none of their code is used here):

  dense form, class MultiHeadLstm (what training and pruning produce), under `blocks.{i}.attn.`:
    pre_proj.weight [C, C], pre_proj.bias [C]
    lstm.weight_ih_l0 [4Ht, C], lstm.weight_hh_l0 [4Ht, Ht], lstm.bias_ih_l0 / bias_hh_l0 [4Ht]
    lstm.*_l0_reverse (the backward direction), one torch.nn.LSTM(bidirectional=True, batch_first=True)
    head_proj.weight [Ht, 2Ht] (columns [forward Ht | backward Ht]), head_proj.bias [Ht]
    post_proj.weight [C, Ht], post_proj.bias [C]  (the attention's own proj, W_O)
  with Ht = C = H * d. Head h owns input channels h*d:(h+1)*d and, in every gate block g (i, f, g, o),
  the rows g*Ht + h*d + j; weight_ih / weight_hh / head_proj are block-diagonal over heads (masks applied
  at init, gradients masked in training), so the off-head entries are exactly 0.
  Pruning (prune.py) zeroes a unit's 4 gate rows of weight_ih and weight_hh and its weight_hh column,
  per direction; it leaves the unit's biases and its head_proj column alone, so a pruned unit still
  emits an input-independent h_t = sigmoid(b_o) tanh(c_t), c_t = sigmoid(b_f) c_{t-1} + sigmoid(b_i) tanh(b_g).
  No mask is saved: the pattern of zeros is the pruning record.

  hardware form, class ParallelLSTM (modeling/architectures.py; multi2parallel.py converts to it): pre_proj,
  lstms.{h} (one nn.LSTM(C/H, d, bidirectional=True) per head), head_projs.{h} Linear(2d, d), post_proj.

  files: torch.save of the whole pickled model (train/prune results; unpickling needs their classes) or
  of {"model": state_dict, "optimizer", ..., "args": argparse.Namespace} (training checkpoints).
  The blocks are their BlockWithOutput: norm1, attn, norm2, mlp (no layer scale) in a timm VisionTransformer.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from far.errors import CheckpointError, ConfigError
from far.nn import FARAttention

PRUNED_MODES = ("exact", "mask")
_ATTN_RE = re.compile(r"^(.*?)(pre_proj\.weight)$")


# ---------------------------------------------------------------- reading files
class _Stub:
    """Stands in for a class of the public code that is not importable here: keeps the pickled state."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _StubPickle:
    """A pickle module for torch.load whose Unpickler replaces classes it cannot import by _Stub."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return type(name, (_Stub,), {"__module__": f"far.interop.stub.{module}"})

    load = staticmethod(pickle.load)


def _module_state(obj, prefix: str = "", out: Optional[dict] = None, depth: int = 0) -> dict:
    """state_dict of a (possibly stubbed) pickled nn.Module, walking _parameters/_buffers/_modules."""
    out = {} if out is None else out
    d = getattr(obj, "__dict__", {})
    if depth > 64:
        raise CheckpointError("pickled model nests modules more than 64 deep")
    for group in ("_parameters", "_buffers"):
        for k, v in (d.get(group) or {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v.detach()
    for k, m in (d.get("_modules") or {}).items():
        if m is not None:
            _module_state(m, f"{prefix}{k}.", out, depth + 1)
    return out


def read_public(source, *, allow_pickle: bool = False) -> dict:
    """{key: tensor} of a public-code checkpoint: a state_dict, an nn.Module, a training-checkpoint dict
    ({"model": ...}, {"state_dict": ...}, {"model_state_dict": ...}) or a file holding any of them.
    A `module.` (DistributedDataParallel) prefix is removed. Files load with torch.load(weights_only=True);
    pickled whole models and checkpoints with an argparse.Namespace need allow_pickle=True (unpickling can
    run code: only for files you trust); classes of their code that are not importable become stand-ins."""
    obj = source
    if isinstance(source, (str, os.PathLike)):
        from far.utils.fs import open_input

        path = os.fspath(source)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file")
        with open_input(path, "checkpoint file") as f:
            data = f.read()
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any refusal of the safe loader
            what = _not_a_pickle(data, e)
            if what is not None:  # unpickling cannot help: say what the file is instead
                raise CheckpointError(f"{path}: {what}") from e
            if not allow_pickle:
                raise CheckpointError(
                    f"{path}: not a plain tensor checkpoint ({_short(e)}); the public code "
                    "saves whole pickled models (torch.save(model)): if you trust the file, pass "
                    "allow_pickle=True (far import-public: --allow-pickle)") from e
            try:
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_StubPickle)
            except Exception as e2:  # noqa: BLE001
                raise CheckpointError(f"{path}: cannot unpickle: {type(e2).__name__}: {e2}") from e2
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise CheckpointError("checkpoint dict has no tensors and none of the keys 'model', 'state_dict', "
                                  f"'model_state_dict' (keys: {sorted(map(str, obj))[:10]})")
    if isinstance(obj, nn.Module) or (not isinstance(obj, dict) and hasattr(obj, "__dict__")):
        obj = _module_state(obj)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"expected a state_dict or a model, got {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        sd[k[len("module."):] if k.startswith("module.") else k] = v.detach()
    return sd


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _not_a_pickle(data: bytes, error: Exception) -> Optional[str]:
    """What a file torch.load(weights_only=True) refused is, when it is not a pickle that unpickling
    (allow_pickle) could read: a safetensors file (a far checkpoint or not), a truncated or corrupt torch.save
    file (a zip archive, or the legacy format: a pickle stream), an empty file, or neither a zip nor a pickle.
    None: a whole pickle (an intact zip archive, or a pickle stream not cut short) that the safe loader refused."""
    if not data:
        return "an empty file, not a checkpoint"
    if len(data) >= 9 and data[8:9] == b"{":  # safetensors: 8-byte little-endian header length, then JSON
        return _safetensors_kind(data)
    if data[:2] == b"PK":  # torch.save's format: a zip archive with data.pkl and the tensors' bytes
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            return (f"a truncated or corrupt torch.save file (it starts as a zip archive but does not open as one: "
                    f"{_short(e)}); copy or save it again")
        if bad is not None:
            return f"a corrupt torch.save file (its zip member {bad} fails its CRC check); copy or save it again"
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):  # e.g. numpy's .npz
            return (f"a zip archive, not a torch.save file (no data.pkl; members {names[:3]}"
                    + (" ..." if len(names) > 3 else "") + ")")
        return None
    if data[:1] == b"\x80":  # a pickle stream (protocol 2+: torch.save's legacy format)
        if data[2:3] != b"\x8a":  # torch.save's legacy stream starts with its magic number, a pickled long
            return "a plain pickle (pickle.dump), not a torch.save file; torch.load cannot read it"
        if isinstance(error, (EOFError, struct.error)) or re.search(r"EOF|truncated", str(error)):
            return (f"a truncated or corrupt torch.save file (legacy pickle format: {_short(error)}); copy or "
                    "save it again")
        return None
    return f"not a torch.save checkpoint: neither a zip archive nor a pickle (it starts with {data[:8]!r})"


def _safetensors_kind(data: bytes) -> str:
    """What a file that looks like safetensors (header length, then '{') is: a far checkpoint, another
    safetensors file, or a truncated / corrupt one."""
    from far.checkpoint import CONFIG_KEY

    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        return (f"a truncated safetensors file (its header length says {n} bytes, {len(data) - 8} follow); "
                "not a torch.save checkpoint")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        return "a safetensors file with a corrupt header (not a JSON object); not a torch.save checkpoint"
    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
            and isinstance(e["data_offsets"][1], int)]
    if 8 + n + max(ends, default=0) > len(data):
        return (f"a truncated safetensors file (its tensors need {8 + n + max(ends)} bytes, the file has "
                f"{len(data)}); not a torch.save checkpoint")
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and CONFIG_KEY in meta:
        return ("already a far checkpoint (safetensors, written by far.save): use it directly (far eval / far info "
                "FILE, far.load), there is nothing to import")
    return ("a safetensors file, not a torch.save checkpoint of the public code: read its tensors with "
            "safetensors.torch.load_file and pass that dict to far.import_public")


# ---------------------------------------------------------------- one attention module
@dataclass
class PublicImportReport:
    """What import_public / from_public did per module: name, layout, heads, hidden_sizes [2][H], masked units
    (zero weights) per direction and head, masked units kept because they still reach the output ("exact"),
    and bound: max |change| of the module's output that dropping live masked units may cause ("mask")."""

    rows: list = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    @property
    def bound(self) -> float:
        return max([r["bound"] for r in self.rows] + [0.0])

    def table(self) -> str:
        lines = []
        for r in self.rows:
            lines.append(f"{r['name'] or '<module>'}: {r['layout']}, {r['num_heads']} heads x d {r['head_dim']}, "
                         f"hidden fwd {r['hidden_sizes'][0]} bwd {r['hidden_sizes'][1]}, masked units "
                         f"{r['masked']}, kept live {r['kept_live']}, dropped live {r['dropped_live']}"
                         + (f" (output change <= {r['bound']:.3g})" if r["bound"] else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _layout(sd: dict, prefix: str) -> str:
    if prefix + "lstm.weight_ih_l0" in sd:
        return "dense"
    if prefix + "lstms.0.weight_ih_l0" in sd:
        return "parallel"
    raise CheckpointError(f"'{prefix}': no public FAR attention here (expected '{prefix}lstm.weight_ih_l0' "
                          f"(MultiHeadLstm) or '{prefix}lstms.0.weight_ih_l0' (ParallelLSTM))")


def _get(sd: dict, key: str, shape=None) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"missing tensor '{key}'")
    t = sd[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor '{key}' has shape {list(t.shape)}, expected {list(shape)}")
    return t


def _heads_from_dense(sd: dict, prefix: str, num_heads: Optional[int]) -> int:
    """num_heads given (checked), or the largest head count whose block-diagonal pattern the weights obey."""
    w_ih = _get(sd, prefix + "lstm.weight_ih_l0")
    if w_ih.dim() != 2 or w_ih.shape[0] % 4:
        raise CheckpointError(f"tensor '{prefix}lstm.weight_ih_l0' has shape {list(w_ih.shape)}, expected [4 * hidden, C]")
    ht = w_ih.shape[0] // 4
    c = w_ih.shape[1]
    for sfx in ("_l0", "_l0_reverse"):  # every shape first: the pattern checks index by them
        _get(sd, prefix + "lstm.weight_ih" + sfx, (4 * ht, c))
        _get(sd, prefix + "lstm.weight_hh" + sfx, (4 * ht, ht))
    _get(sd, prefix + "head_proj.weight", (ht, 2 * ht))
    cands = [num_heads] if num_heads else [h for h in range(min(ht, c), 0, -1) if ht % h == 0 and c % h == 0]
    worst = {}
    for h in cands:
        if ht % h or c % h:
            raise ConfigError(f"'{prefix}': num_heads={h} does not divide hidden {ht} and input {c}")
        off = _off_block(sd, prefix, h)
        if off == 0.0:
            return h
        worst[h] = off
    h = cands[0]
    raise CheckpointError(f"'{prefix}': the LSTM weights are not block-diagonal over num_heads={h} heads (max "
                          f"|off-head weight| {worst[h]:.3g}); not a multi-head LSTM of that many heads"
                          + ("" if num_heads else " for any head count") + ": pass the right num_heads")


def _head_mask(rows_per_head: int, cols_per_head: int, heads: int, gates: int) -> torch.Tensor:
    """[gates*heads*rows, heads*cols] bool: True where head h's rows meet head h's columns (gate-major rows)."""
    eye = torch.eye(heads, dtype=torch.bool)
    m = eye.repeat_interleave(rows_per_head, 0).repeat_interleave(cols_per_head, 1)
    return m.repeat(gates, 1)


def _off_block(sd: dict, prefix: str, h: int) -> float:
    worst = 0.0
    for sfx in ("_l0", "_l0_reverse"):
        w_ih = _get(sd, prefix + "lstm.weight_ih" + sfx)
        w_hh = _get(sd, prefix + "lstm.weight_hh" + sfx)
        ht, c = w_ih.shape[0] // 4, w_ih.shape[1]
        for w, cols in ((w_ih, c // h), (w_hh, ht // h)):
            m = _head_mask(ht // h, cols, h, 4)
            worst = max(worst, float(w.detach().abs().masked_fill(m, 0).max()))
    w = _get(sd, prefix + "head_proj.weight")
    ht = w.shape[0]
    m = torch.cat([_head_mask(ht // h, ht // h, h, 1)] * 2, dim=1)
    return max(worst, float(w.detach().abs().masked_fill(m, 0).max()))


def _per_head(sd: dict, prefix: str, layout: str, num_heads: Optional[int]):
    """(H, d, C, pre (w, b), post (w, b), lstm[h][dir] = (w_ih [4d, d], w_hh [4d, d], b_ih, b_hh),
    head_proj[h] = (w [d, 2d], b [d])) in float64."""
    f64 = torch.float64
    if layout == "dense":
        H = _heads_from_dense(sd, prefix, num_heads)
        if prefix + "lstm.weight_ih_l1" in sd:
            raise ConfigError(f"'{prefix}': a {2}-layer LSTM; FARAttention holds one layer per head and direction")
        ht, c = _get(sd, prefix + "lstm.weight_ih_l0").shape
        ht //= 4
        if ht != c:
            raise ConfigError(f"'{prefix}': LSTM hidden size {ht} differs from the input width {c}; FARAttention's "
                              "heads read and emit head_dim channels each (hidden = input = H * d)")
        d = ht // H
        lstm = []
        for h in range(H):
            per_dir = []
            for sfx in ("_l0", "_l0_reverse"):
                w_ih = _get(sd, prefix + "lstm.weight_ih" + sfx, (4 * ht, c)).to(f64)
                w_hh = _get(sd, prefix + "lstm.weight_hh" + sfx, (4 * ht, ht)).to(f64)
                b_ih = _get(sd, prefix + "lstm.bias_ih" + sfx, (4 * ht,)).to(f64)
                b_hh = _get(sd, prefix + "lstm.bias_hh" + sfx, (4 * ht,)).to(f64)
                rows = torch.cat([torch.arange(g * ht + h * d, g * ht + (h + 1) * d) for g in range(4)])
                cols = slice(h * d, (h + 1) * d)
                per_dir.append((w_ih[rows][:, cols], w_hh[rows][:, cols], b_ih[rows], b_hh[rows]))
            lstm.append(per_dir)
        hw = _get(sd, prefix + "head_proj.weight", (ht, 2 * ht)).to(f64)
        hb = _get(sd, prefix + "head_proj.bias", (ht,)).to(f64)
        head_proj = [(torch.cat([hw[h * d:(h + 1) * d, h * d:(h + 1) * d],
                                 hw[h * d:(h + 1) * d, ht + h * d:ht + (h + 1) * d]], dim=1), hb[h * d:(h + 1) * d])
                     for h in range(H)]
    else:
        H = 0
        while prefix + f"lstms.{H}.weight_ih_l0" in sd:
            H += 1
        if num_heads and num_heads != H:
            raise ConfigError(f"'{prefix}': num_heads={num_heads} but the checkpoint has {H} per-head LSTMs")
        deep = [h for h in range(H) if prefix + f"lstms.{h}.weight_ih_l1" in sd]
        if deep:
            raise ConfigError(f"'{prefix}lstms.{deep[0]}': a multi-layer LSTM; FARAttention holds one layer per head "
                              "and direction")
        d = _get(sd, prefix + "lstms.0.weight_hh_l0").shape[1]
        c = _get(sd, prefix + "pre_proj.weight").shape[0]
        if c != H * d:
            raise ConfigError(f"'{prefix}': per-head LSTM input {c}/{H} differs from its hidden size {d}; FARAttention "
                              "heads read and emit head_dim channels each")
        lstm = [[tuple(_get(sd, f"{prefix}lstms.{h}.{n}{sfx}", s).to(f64)
                       for n, s in (("weight_ih", (4 * d, c // H)), ("weight_hh", (4 * d, d)),
                                    ("bias_ih", (4 * d,)), ("bias_hh", (4 * d,))))
                 for sfx in ("_l0", "_l0_reverse")] for h in range(H)]
        head_proj = [(_get(sd, f"{prefix}head_projs.{h}.weight", (d, 2 * d)).to(f64),
                      _get(sd, f"{prefix}head_projs.{h}.bias", (d,)).to(f64)) for h in range(H)]
        c = H * d
    def bias(key: str, n: int):  # optional, but of the right shape (copy_ would broadcast a [1] one)
        return _get(sd, prefix + key, (n,)) if prefix + key in sd else None

    pre = (_get(sd, prefix + "pre_proj.weight", (c, c)), bias("pre_proj.bias", c))
    pw = _get(sd, prefix + "post_proj.weight")
    if pw.dim() != 2 or pw.shape[1] != c:
        raise CheckpointError(f"tensor '{prefix}post_proj.weight' has shape {list(pw.shape)}, expected [*, {c}]")
    post = (pw, bias("post_proj.bias", pw.shape[0]))
    return H, d, c, pre, post, lstm, head_proj


def _unit_bound(b: torch.Tensor, d: int) -> torch.Tensor:
    """|h_t| bound of units with zero weights from their summed biases b [4d] (i, f, g, o): c_t is a
    geometric sum, |c_t| <= sigmoid(b_i)|tanh(b_g)| / (1 - sigmoid(b_f)), |h_t| <= sigmoid(b_o) tanh(|c|)."""
    bi, bf, bg, bo = b.view(4, d)
    c = torch.sigmoid(bi) * torch.tanh(bg).abs() / (1 - torch.sigmoid(bf)).clamp_min(1e-300)
    return torch.sigmoid(bo) * torch.tanh(c)


def public_attention(source, prefix: str = "", *, num_heads: Optional[int] = None, pruned: str = "exact",
                     dtype: torch.dtype = torch.float32, report: Optional[PublicImportReport] = None,
                     allow_pickle: bool = False) -> FARAttention:
    """One public attention module (MultiHeadLstm or ParallelLSTM, see the module doc) as a FARAttention
    that computes the same function: source = its state_dict / module / file, or a whole model's with
    `prefix` (e.g. "blocks.3.attn.").

    num_heads: the head count (default: the largest the block-diagonal weights allow; ParallelLSTM: its count).
    pruned: which units with zero LSTM weights (their pruning) to drop. "exact" drops a unit only when that
        changes nothing (it reaches neither the other units nor head_proj, or its tanh(b_g) is 0) and keeps
        the others as units with zero weights; "mask" drops every such unit (hidden sizes from the pruning
        pattern, the compact form their paper counts) and records in `report` a bound on the output change
        (their pruned units still emit sigmoid(b_o) tanh(c_t) from their biases).
    """
    if pruned not in PRUNED_MODES:
        raise ConfigError(f"pruned must be one of {PRUNED_MODES}, got {pruned!r}")
    sd = read_public(source, allow_pickle=allow_pickle)  # a dict of tensors too: its `module.` prefix removed
    layout = _layout(sd, prefix)
    H, d, c, pre, post, lstm, head_proj = _per_head(sd, prefix, layout, num_heads)
    keep = torch.ones(2, H, d, dtype=torch.bool)
    masked = [[0] * H for _ in range(2)]
    kept_live = dropped_live = 0
    bound_ch = torch.zeros(H * d, dtype=torch.float64)  # per head_proj output channel
    for h in range(H):
        w_hp = head_proj[h][0]
        for r in range(2):
            w_ih, w_hh, b_ih, b_hh = lstm[h][r]
            rows_zero = ((w_ih.view(4, d, d) == 0).all(2) & (w_hh.view(4, d, d) == 0).all(2)).all(0)  # [d]
            col_zero = (w_hh == 0).all(0)  # feeds no unit of its own LSTM
            hp_zero = (w_hp[:, r * d:(r + 1) * d] == 0).all(0)
            b = b_ih + b_hh
            silent = torch.tanh(b.view(4, d)[2]) == 0
            dead = rows_zero & ((col_zero & hp_zero) | silent)
            live = rows_zero & ~dead
            masked[r][h] = int(rows_zero.sum())
            if pruned == "mask":
                keep[r, h] = ~rows_zero
                dropped_live += int(live.sum())
                # a dropped live unit's h_t reaches head_proj (directly) and, via w_hh columns, kept units;
                # the bound covers the direct path and refuses the other (not bounded here)
                if bool((live & ~col_zero).any()):
                    raise ConfigError(f"'{prefix}': pruned units with nonzero recurrent columns (direction {r}, head "
                                      f"{h}) feed kept units; use pruned='exact'")
                bound_ch[h * d:(h + 1) * d] += (w_hp[:, r * d:(r + 1) * d].abs() * _unit_bound(b, d)
                                                 * live).sum(1)
            else:
                keep[r, h] = ~dead
                kept_live += int(live.sum())
    hidden = keep.sum(-1)
    far = FARAttention(c, num_heads=H, head_dim=d, hidden_sizes=hidden, dim_out=post[0].shape[0],
                       proj_bias=post[1] is not None, dtype=dtype)
    with torch.no_grad():
        far.pre_proj.weight.copy_(pre[0])
        if pre[1] is None:
            raise CheckpointError(f"'{prefix}pre_proj': no bias; FARAttention's pre_proj has one")
        far.pre_proj.bias.copy_(pre[1])
        far.proj.weight.copy_(post[0])
        if post[1] is not None:
            far.proj.bias.copy_(post[1])
        far.zero_padding_()
        for h in range(H):
            cols = []
            for r in range(2):
                k = keep[r, h]
                rows = k.repeat(4)
                w_ih, w_hh, b_ih, b_hh = lstm[h][r]
                far.set_lstm_params(r, h, w_ih[rows].to(dtype), w_hh[rows][:, k].to(dtype), b_ih[rows].to(dtype),
                                    b_hh[rows].to(dtype))
                cols.append(head_proj[h][0][:, r * d:(r + 1) * d][:, k])
            far.set_head_proj_params(h, torch.cat(cols, 1).to(dtype), head_proj[h][1].to(dtype))
    bound = float((post[0].to(torch.float64).abs() @ bound_ch).max()) if dropped_live else 0.0
    if report is not None:
        report.add(name=prefix.rstrip("."), layout="MultiHeadLstm" if layout == "dense" else "ParallelLSTM",
                   num_heads=H, head_dim=d, hidden_sizes=hidden.tolist(), masked=masked, kept_live=kept_live,
                   dropped_live=dropped_live, bound=bound)
    return far


# ---------------------------------------------------------------- whole models
def _vit_kwargs(sd: dict, num_heads: int) -> dict:
    """timm VisionTransformer kwargs recovered from a state_dict's shapes."""
    pw = _get(sd, "patch_embed.proj.weight")
    embed_dim, in_chans, p, p2 = pw.shape
    if p != p2:
        raise ConfigError(f"non-square patches {p}x{p2} are not supported")
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    if depth == 0:
        raise CheckpointError("no 'blocks.0.norm1.weight': not a timm ViT state_dict")
    if "dist_token" in sd or "head_dist.weight" in sd:
        raise ConfigError("distilled DeiT (dist_token / head_dist) is not supported: import a non-distilled DeiT")
    class_token = "cls_token" in sd
    n_reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    pos = _get(sd, "pos_embed")
    prefix_tokens = int(class_token) + n_reg
    patches = pos.shape[1] - prefix_tokens
    side = math.isqrt(patches)
    if side * side != patches:
        raise ConfigError(f"pos_embed holds {pos.shape[1]} tokens: not a square patch grid plus {prefix_tokens} "
                          "prefix tokens")
    hidden = _get(sd, "blocks.0.mlp.fc1.weight").shape[0]
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:  # float rounding: timm takes int(dim * mlp_ratio), as far.models.arch
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    # timm gives a model an fc_norm in place of the final norm only for average pooling: a class token with
    # fc_norm and no norm is a MAE/BEiT-style fine-tune that averages the patch tokens
    avg_with_cls = "fc_norm.weight" in sd and "norm.weight" not in sd
    kw = {"img_size": side * p, "patch_size": p, "in_chans": in_chans, "embed_dim": embed_dim, "depth": depth,
          "num_heads": num_heads, "mlp_ratio": mlp_ratio, "class_token": class_token,
          "global_pool": "token" if class_token and not avg_with_cls else "avg", "fc_norm": "fc_norm.weight" in sd,
          "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0}
    if n_reg:
        kw["reg_tokens"] = n_reg
    return kw


def import_public(source, *, num_heads: Optional[int] = None, pruned: str = "exact", allow_pickle: bool = False,
                  arch: str = "deit_base_patch16_224", backend: Optional[str] = None):
    """A public-code model (their timm ViT whose blocks hold MultiHeadLstm or ParallelLSTM attentions; a
    state_dict, module or file, see read_public) as a far model (timm VisionTransformer with FARAttention
    blocks, saveable with far.save). Every block must be replaced (the models their training ends with).
    Shapes give the architecture; LayerNorm eps is timm's (1e-6, as DeiT's). `arch` is the timm name that
    far.save records and far.load rebuilds from (with the recovered kwargs). The per-block import record
    (PublicImportReport) is at model.far_public_import. For pruned see public_attention."""
    from far.models import create_model

    sd = read_public(source, allow_pickle=allow_pickle)
    report = PublicImportReport()
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    plain = [i for i in range(depth) if f"blocks.{i}.attn.qkv.weight" in sd]
    if plain:
        raise ConfigError(f"blocks {plain} still hold attention (qkv): only fully replaced models import whole; "
                          "import single blocks with far.interop.public_attention(sd, 'blocks.N.attn.')")
    mods = [public_attention(sd, f"blocks.{i}.attn.", num_heads=num_heads, pruned=pruned, report=report)
            for i in range(depth)]
    if not mods:
        raise CheckpointError("no 'blocks.0.norm1.weight': not a timm ViT state_dict")
    heads = {m.num_heads for m in mods}
    if len(heads) != 1:
        raise CheckpointError(f"blocks disagree on the head count ({sorted(heads)}); pass num_heads")
    kwargs = _vit_kwargs(sd, heads.pop())
    model = create_model(arch, pretrained=False, far=True, hidden_sizes=[m.hidden_sizes.tolist() for m in mods],
                         backend=backend, **kwargs)
    rest = {k: v for k, v in sd.items() if not re.match(r"blocks\.\d+\.attn\.", k)}
    own = model.state_dict()
    wrong = [f"{k} {list(v.shape)} (rebuilt: {list(own[k].shape)})" for k, v in rest.items()
             if k in own and v.shape != own[k].shape]
    if wrong:  # load_state_dict would raise its RuntimeError; the shapes come from blocks.0 and the embeddings
        raise CheckpointError(f"the state_dict does not fit the rebuilt {arch} {kwargs}: tensors of other shapes "
                              f"{wrong[:8]}")
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not re.match(r"blocks\.\d+\.attn\.", k)]
    if missing or unexpected:
        raise CheckpointError(f"the state_dict does not fit the rebuilt {arch} {kwargs}: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}")
    for blk, m in zip(model.blocks, mods):
        blk.attn.load_state_dict(m.state_dict())
    model.far_public_import = report
    model.far_metadata = {"imported_from": "aliothren/FAR public checkpoint", "pruned": pruned,
                          "public_import": report.rows}
    return model.eval()
