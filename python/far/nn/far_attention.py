"""FARAttention: a multi-head bidirectional LSTM in place of a ViT self-attention.

forward(x [B, N, C]) = proj(concat_h head_proj_h(BiLSTM_h(pre_proj(x)[..., head h]))), exactly what
torch.nn.LSTM(bidirectional=True) per head would give with the parameters lstm_params(dir, head).

Storage is compact per head (no dense block-diagonal masks), in one of two layouts (`storage`):
- "padded" (default): every (head, direction) keeps its own [4n, d] / [4n, n] weights, padded to n = the
  block's widest (direction, head), so that all heads run as one batched GEMM and one scan launch.
  Padded units have exactly zero weights, biases and head_proj columns; they stay zero under training
  (their gradients are exactly zero) and the kernels skip them. Pruning (masks that shrink
  hidden_sizes in place) needs this layout.
- "ragged": kept units only, concatenated over (head, direction) exactly as a checkpoint stores them
  (parameters lstm.w_ih [S4k, d], lstm.w_hh [S4k^2], lstm.b_ih / lstm.b_hh [S4k], head_proj.weight
  [d, Sk], head_proj.bias [H, d]; so state_dict() is the checkpoint's layout). Memory holds exactly the
  kept parameters; each forward gathers the padded operands the kernels take (one index_select per
  tensor, differentiable), which lives only for that call. bench/bench_padding.py measures both.
set_storage() converts in place; far.models.set_storage / far.load(storage=...) do it for a model.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import far_kernels

STORAGES = ("padded", "ragged")


class RaggedParams(nn.Module):
    """The holder of a ragged FAR block's lstm.* or head_proj.* parameters (no forward of its own)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{name} {list(p.shape)}" for name, p in self.named_parameters())


def as_hidden_sizes(hidden_sizes, num_heads: int, head_dim: int) -> torch.Tensor:
    """`hidden_sizes` (None: head_dim everywhere; an int; a [2, H] table) as a CPU int64 [2, num_heads] tensor;
    ValueError for fractions, negatives or another shape."""
    if hidden_sizes is None:
        return torch.full((2, num_heads), head_dim, dtype=torch.int64)
    raw = torch.as_tensor(hidden_sizes)
    # 2.7 would become 2; inf, nan and 1e20 would become int64's minimum
    whole = raw.isfinite() & (raw == raw.round()) & (raw.abs() < 2.0**63) if raw.is_floating_point() else True
    if raw.dtype == torch.bool or raw.is_complex() or not bool(torch.as_tensor(whole).all()):
        raise ValueError(f"hidden_sizes must be whole numbers of units, got {raw.tolist()}")
    hs = raw.to(torch.int64).cpu()
    if hs.dim() == 0:
        hs = hs.expand(2, num_heads)
    if tuple(hs.shape) != (2, num_heads):
        raise ValueError(f"hidden_sizes must be an int or have shape [2, num_heads] = [2, {num_heads}], got {list(hs.shape)}")
    if (hs < 0).any():
        raise ValueError(f"hidden_sizes must be >= 0, got {hs.tolist()}")
    return hs.clone().contiguous()


class FARAttention(nn.Module):
    """Multi-head BiLSTM token mixer with the interface of timm's Attention.

    Args:
        dim: input channels C.
        num_heads: H.
        head_dim: d (default C // H); the LSTM of each head reads d channels and head_proj maps
            [forward n ‖ backward n] back to d.
        hidden_sizes: int or [2, H] ints, units per (direction, head) (default d). Pruned heads
            may differ; 0 is allowed.
        dim_out: output channels of proj (default C).
        proj_bias, proj_drop: as timm's Attention.
        backend: scan backend for this module ("torch", "cpp", "cuda", "triton", "auto"); None =
            env FAR_BACKEND, else auto.
        storage: "padded" (default) or "ragged" (kept units only; see the module docstring).
    Shapes: x [B, N, C] -> [B, N, dim_out].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: Optional[int] = None,
        hidden_sizes=None,
        dim_out: Optional[int] = None,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        backend: Optional[str] = None,
        storage: str = "padded",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        for name, v in (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"FARAttention: {name} must be an int >= 1, got {v!r}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim")
            head_dim = dim // num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self._hidden_sizes = as_hidden_sizes(hidden_sizes, num_heads, head_dim)  # CPU int64 [2, H]
        if backend is not None:  # a typo is an error now, not at the first forward
            far_kernels.dispatch.requested_backend(backend)
        self.backend = backend
        self.storage = "padded"
        self.pre_proj = nn.Linear(dim, self.attn_dim, **dd)
        for name, shape in self._padded_shapes().items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **dd)))
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_lstm_parameters()
        self.set_storage(storage)  # the same initial values in either layout

    def __setstate__(self, state: dict) -> None:  # a module pickled before hidden_sizes became a property
        if "hidden_sizes" in state:
            state["_hidden_sizes"] = state.pop("hidden_sizes")
        super().__setstate__(state)

    # ---- sizes and padding ----
    @property
    def hidden_sizes(self) -> torch.Tensor:
        """CPU int64 [2, H]: the units kept per (direction 0 = forward / 1 = backward, head)."""
        return self._hidden_sizes

    @hidden_sizes.setter
    def hidden_sizes(self, value) -> None:
        """Set in padded storage only, within the padded width (a pruning mask shrinks it in place: the units
        beyond are padding). A ragged block's tensors hold exactly its kept units: changing the sizes there
        would make the forward read the wrong rows, so it is refused (set_storage("padded") first)."""
        hs = as_hidden_sizes(value, self.num_heads, self.head_dim)
        if "_hidden_sizes" in self.__dict__ and self.storage == "ragged" and not torch.equal(hs, self._hidden_sizes):
            raise ValueError("hidden_sizes of a block in ragged storage cannot change (its tensors hold exactly "
                             "the kept units): set_storage('padded') first")
        if "_parameters" in self.__dict__ and self._parameters.get("w_hh") is not None and hs.numel() and \
                int(hs.max()) > self.width:
            raise ValueError(f"hidden_sizes {hs.tolist()} exceed the padded width {self.width}")
        self._hidden_sizes = hs

    def _padded_shapes(self) -> dict:
        """{padded parameter: shape} at the current width n (head_proj_weight's columns: [fwd n | bwd n])."""
        H, d, n = self.num_heads, self.head_dim, self.width
        return {"w_ih": (H, 2, 4 * n, d), "w_hh": (H, 2, 4 * n, n), "b_ih": (H, 2, 4 * n), "b_hh": (H, 2, 4 * n),
                "head_proj_weight": (H, d, 2 * n), "head_proj_bias": (H, d)}

    @property
    def width(self) -> int:
        """n: the padded number of units per (direction, head): max of hidden_sizes when built or
        compacted (and always in storage "ragged", whose gathered operands have this width); larger while a
        pruning mask shrinks hidden_sizes in place (far.methods.prune)."""
        w_hh = self._parameters.get("w_hh") if "_parameters" in self.__dict__ else None
        if w_hh is not None:
            return int(w_hh.shape[-1])
        return int(self.hidden_sizes.max()) if self.hidden_sizes.numel() else 0

    def unit_mask(self) -> torch.Tensor:
        """[H, 2, n] bool: True for kept units."""
        units = torch.arange(self.width)
        return (units < self.hidden_sizes[..., None]).permute(1, 0, 2)

    def num_lstm_params(self, hidden_sizes=None, split: bool = False):
        """Parameters of the LSTMs and head_proj counting kept units only (what a compact store holds), for
        this module's hidden_sizes or the given [2, H] ones; split=True: (LSTMs, head_proj)."""
        d = self.head_dim
        k = self.hidden_sizes if hidden_sizes is None else torch.as_tensor(hidden_sizes, dtype=torch.int64)
        lstm = int((4 * k * d + 4 * k * k + 8 * k).sum())
        head_proj = int(d * k.sum()) + self.num_heads * d
        return (lstm, head_proj) if split else lstm + head_proj

    # ---- storage ----
    def lstm_storage(self) -> dict:
        """{compact key: the parameter holding it} in this module's layout: the padded [H, 2, 4n, d], ...
        tensors (storage "padded") or the ragged lstm.* / head_proj.* ones (storage "ragged")."""
        if self.storage == "ragged":  # attributes, not get_parameter: torch.func.functional_call swaps in tensors
            return {key: operator.attrgetter(key)(self) for key in self.COMPACT_KEYS.values()}
        return {key: getattr(self, name) for name, key in self.COMPACT_KEYS.items()}

    def set_storage(self, storage: str) -> "FARAttention":
        """Convert in place to storage "padded" or "ragged" (same values, same forward). The parameters are
        new objects: build optimizers after this call (ordinary tensors even when called under
        torch.inference_mode, so they can still be trained). Returns self."""
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        if storage == self.storage:
            return self
        with torch.inference_mode(False), torch.no_grad():
            return self._set_storage(storage)

    def _set_storage(self, storage: str) -> "FARAttention":
        state = self.compact_state()
        grad = {key: p.requires_grad for key, p in self.lstm_storage().items()}
        if storage == "ragged":
            for name in self.COMPACT_KEYS:
                delattr(self, name)
            self.storage = "ragged"
            self.lstm, self.head_proj = RaggedParams(), RaggedParams()
            for key, t in state.items():
                owner, leaf = key.split(".")
                getattr(self, owner).register_parameter(leaf, nn.Parameter(t.clone(), requires_grad=grad[key]))
        else:
            del self.lstm, self.head_proj
            self.storage = "padded"
            shapes = self._padded_shapes()
            for name, key in self.COMPACT_KEYS.items():
                t = state[key]
                setattr(self, name, nn.Parameter(t.new_zeros(shapes[name]), requires_grad=grad[key]))
            self.load_compact_state(state)
        return self

    def _gather_index(self, device) -> tuple:
        """(rows [H*2*4n], w_hh entries [H*2*4n*n], head_proj columns [H*2*n]): for every padded position, its
        index in the ragged tensor, or the ragged length (a zero appended there) for a padded unit."""
        hs = self.hidden_sizes
        key = (str(device), tuple(hs.flatten().tolist()))
        cache = self.__dict__.setdefault("_gather_cache", {})
        if key not in cache:
            with torch.inference_mode(False):  # a cache built under inference_mode must serve training too
                cache.clear()
                cache[key] = self._build_gather_index(device)
        return cache[key]

    def _build_gather_index(self, device) -> tuple:
        hs = self.hidden_sizes
        n = self.width
        k = hs.t()  # [H, 2]: (head, direction), the ragged order
        u = torch.arange(n)
        kept = u < k[..., None]  # [H, 2, n]

        def starts(sizes):  # exclusive cumulative sum over (head, direction), head-major
            flat = sizes.reshape(-1)
            return (torch.cumsum(flat, 0) - flat).view(sizes.shape)

        k4 = k[:, :, None, None]
        row_in = torch.arange(4)[None, None, :, None] * k4 + u  # [H, 2, 4, n]: gate row within the block
        rows = torch.where(kept[:, :, None, :], starts(4 * k)[:, :, None, None] + row_in, int(4 * k.sum()))
        ent = starts(4 * k * k)[:, :, None, None, None] + row_in[..., None] * k4[..., None] + u
        ent = torch.where(kept[:, :, None, :, None] & kept[:, :, None, None, :], ent, int((4 * k * k).sum()))
        first = torch.stack((torch.zeros_like(k[:, 0]), k[:, 0]), 1)  # backward columns follow forward ones
        cols = torch.where(kept, starts(k.sum(1))[:, None, None] + first[..., None] + u, int(k.sum()))
        return tuple(t.reshape(-1).to(device) for t in (rows, ent, cols))

    def padded_params(self) -> tuple:
        """(w_ih [H, 2, 4n, d], w_hh [H, 2, 4n, n], b_ih [H, 2, 4n], b_hh [H, 2, 4n], head_proj_weight [H, d, 2n],
        head_proj_bias [H, d]) in the kernels' padded layout: the parameters themselves (storage "padded") or
        gathered from the ragged ones (differentiable; zero at padded units)."""
        if self.storage == "padded":
            return self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.head_proj_weight, self.head_proj_bias
        H, d, n = self.num_heads, self.head_dim, self.width
        lstm, hp = self.lstm, self.head_proj
        rows, ent, cols = self._gather_index(lstm.w_ih.device)

        def gather(t, index, dim=0):
            pad = list(t.shape)
            pad[dim] = 1
            return torch.cat((t, t.new_zeros(pad)), dim).index_select(dim, index)

        return (gather(lstm.w_ih, rows).view(H, 2, 4 * n, d), gather(lstm.w_hh, ent).view(H, 2, 4 * n, n),
                gather(lstm.b_ih, rows).view(H, 2, 4 * n), gather(lstm.b_hh, rows).view(H, 2, 4 * n),
                gather(hp.weight, cols, 1).view(d, H, 2 * n).permute(1, 0, 2).contiguous(), hp.bias)

    @torch.no_grad()
    def zero_padding_(self) -> None:
        """Set every parameter entry that belongs to a padded (not kept) unit to exactly 0 (storage "ragged"
        has none)."""
        if self.storage == "ragged":
            return
        m = self.unit_mask().to(self.w_ih.device)  # [H, 2, n]
        H, n = self.num_heads, self.width
        gate_rows = m.unsqueeze(2).expand(H, 2, 4, n).reshape(H, 2, 4 * n)
        # masked_fill, not a multiply: NaN or inf left in padding would stay NaN (0 * inf)
        self.w_ih.masked_fill_(~gate_rows[..., None], 0)
        self.w_hh.masked_fill_(~(gate_rows[..., None] & m[:, :, None, :]), 0)
        self.b_ih.masked_fill_(~gate_rows, 0)
        self.b_hh.masked_fill_(~gate_rows, 0)
        self.head_proj_weight.masked_fill_(~m.reshape(H, 1, 2 * n), 0)

    @torch.no_grad()
    def reset_lstm_parameters(self) -> None:
        """torch.nn.LSTM's init (U(-1/sqrt(n), 1/sqrt(n))) for the LSTMs, nn.Linear's for head_proj."""
        n = max(self.width, 1)
        bound = 1.0 / math.sqrt(n)
        tensors = list(self.lstm_storage().values())
        for p in tensors[:4]:
            p.uniform_(-bound, bound)
        fan_in = max(int(self.hidden_sizes.sum(0).max()), 1)
        bound = 1.0 / math.sqrt(fan_in)
        for p in tensors[4:]:
            p.uniform_(-bound, bound)
        self.zero_padding_()

    # ---- the per-head contract ----
    def _check_index(self, direction: int, head: int) -> int:
        if direction not in (0, 1):
            raise ValueError(f"direction must be 0 (forward) or 1 (backward), got {direction}")
        if not 0 <= head < self.num_heads:
            raise ValueError(f"head must be in [0, {self.num_heads}), got {head}")
        return int(self.hidden_sizes[direction, head])

    def _ragged_start(self, direction: int, head: int) -> tuple:
        """(first row of w_ih / b_ih, first entry of flat w_hh) of one (head, direction) in the ragged layout."""
        before = self.hidden_sizes.t().reshape(-1)[:2 * head + direction]
        return int(4 * before.sum()), int((4 * before * before).sum())

    def lstm_params(self, direction: int, head: int):
        """(w_ih [4k, d], w_hh [4k, k], b_ih [4k], b_hh [4k]) of one (direction, head), k = kept units,
        in torch.nn.LSTM layout and gate order (i, f, g, o)."""
        k = self._check_index(direction, head)
        if self.storage == "ragged":
            r, f = self._ragged_start(direction, head)
            lstm = self.lstm
            return (lstm.w_ih[r:r + 4 * k], lstm.w_hh[f:f + 4 * k * k].view(4 * k, k), lstm.b_ih[r:r + 4 * k],
                    lstm.b_hh[r:r + 4 * k])
        n, d = self.width, self.head_dim
        w_ih = self.w_ih[head, direction].view(4, n, d)[:, :k].reshape(4 * k, d)
        w_hh = self.w_hh[head, direction].view(4, n, n)[:, :k, :k].reshape(4 * k, k)
        b_ih = self.b_ih[head, direction].view(4, n)[:, :k].reshape(4 * k)
        b_hh = self.b_hh[head, direction].view(4, n)[:, :k].reshape(4 * k)
        return w_ih, w_hh, b_ih, b_hh

    def head_proj_params(self, head: int):
        """(w [d, k_fwd + k_bwd], b [d]) of head_proj for one head; input = [forward h ‖ backward h]."""
        kf = self._check_index(0, head)
        kb = self._check_index(1, head)
        if self.storage == "ragged":
            c = int(self.hidden_sizes[:, :head].sum())
            return self.head_proj.weight[:, c:c + kf + kb], self.head_proj.bias[head]
        n = self.width
        w = self.head_proj_weight[head]
        return torch.cat((w[:, :kf], w[:, n:n + kb]), dim=1), self.head_proj_bias[head]

    @torch.no_grad()
    def set_lstm_params(self, direction: int, head: int, w_ih, w_hh, b_ih, b_hh) -> None:
        """Write one (direction, head)'s LSTM parameters (torch.nn.LSTM layout, k = kept units)."""
        k = self._check_index(direction, head)
        n, d = self.width, self.head_dim
        for name, t, shape in (("w_ih", w_ih, (4 * k, d)), ("w_hh", w_hh, (4 * k, k)),
                               ("b_ih", b_ih, (4 * k,)), ("b_hh", b_hh, (4 * k,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"set_lstm_params(direction={direction}, head={head}): {name} must be "
                                 f"{list(shape)}, got {list(t.shape)}")
        if self.storage == "ragged":
            for dst, src in zip(self.lstm_params(direction, head), (w_ih, w_hh, b_ih, b_hh)):
                dst.copy_(src)
            return
        self.w_ih[head, direction].view(4, n, d)[:, :k] = w_ih.view(4, k, d)
        self.w_hh[head, direction].view(4, n, n)[:, :k, :k] = w_hh.view(4, k, k)
        self.b_ih[head, direction].view(4, n)[:, :k] = b_ih.view(4, k)
        self.b_hh[head, direction].view(4, n)[:, :k] = b_hh.view(4, k)

    @torch.no_grad()
    def set_head_proj_params(self, head: int, w, b) -> None:
        kf = self._check_index(0, head)
        kb = self._check_index(1, head)
        n, d = self.width, self.head_dim
        if tuple(w.shape) != (d, kf + kb) or tuple(b.shape) != (d,):
            raise ValueError(f"set_head_proj_params(head={head}): expected w [{d}, {kf + kb}] and b [{d}], "
                             f"got {list(w.shape)} and {list(b.shape)}")
        if self.storage == "ragged":
            for dst, src in zip(self.head_proj_params(head), (w, b)):
                dst.copy_(src)
            return
        self.head_proj_weight[head, :, :kf] = w[:, :kf]
        self.head_proj_weight[head, :, n:n + kb] = w[:, kf:]
        self.head_proj_bias[head] = b

    # ---- compact (kept units only) form, for checkpoints ----
    COMPACT_KEYS = {  # padded parameter -> its key in compact_state() (and in checkpoints)
        "w_ih": "lstm.w_ih", "w_hh": "lstm.w_hh", "b_ih": "lstm.b_ih", "b_hh": "lstm.b_hh",
        "head_proj_weight": "head_proj.weight", "head_proj_bias": "head_proj.bias",
    }

    def compact_shapes(self) -> dict:
        """Shapes of compact_state()'s tensors for the current hidden_sizes."""
        k = self.hidden_sizes
        rows = int(4 * k.sum())
        return {"lstm.w_ih": (rows, self.head_dim), "lstm.w_hh": (int((4 * k * k).sum()),),
                "lstm.b_ih": (rows,), "lstm.b_hh": (rows,),
                "head_proj.weight": (self.head_dim, int(k.sum())), "head_proj.bias": (self.num_heads, self.head_dim)}

    def compact_state(self) -> dict:
        """Kept-unit parameters of the LSTMs and head_proj, concatenated over (head, direction),
        head-major: w_ih [Σ4k, d], w_hh flat [Σ4k²] (each [4k, k] row-major), b_ih/b_hh [Σ4k],
        head_proj.weight [d, Σ_h (k_fwd + k_bwd)], head_proj.bias [H, d]. Storage "ragged": the parameters
        themselves, detached (no copy)."""
        if self.storage == "ragged":
            return {key: p.detach() for key, p in self.lstm_storage().items()}
        parts = {key: [] for key in list(self.COMPACT_KEYS.values())[:5]}
        for head in range(self.num_heads):
            for direction in (0, 1):
                w_ih, w_hh, b_ih, b_hh = self.lstm_params(direction, head)
                parts["lstm.w_ih"].append(w_ih)
                parts["lstm.w_hh"].append(w_hh.reshape(-1))
                parts["lstm.b_ih"].append(b_ih)
                parts["lstm.b_hh"].append(b_hh)
            parts["head_proj.weight"].append(self.head_proj_params(head)[0])
        out = {key: torch.cat(v, dim=1 if key == "head_proj.weight" else 0).detach().contiguous()
               for key, v in parts.items()}
        out["head_proj.bias"] = self.head_proj_bias.detach().contiguous()
        return out

    @torch.no_grad()
    def load_compact_state(self, state: dict, prefix: str = "") -> None:
        """Inverse of compact_state (shapes checked first; nothing is written on a mismatch)."""
        shapes = self.compact_shapes()
        for key, shape in shapes.items():
            if key not in state:
                raise KeyError(f"missing tensor '{prefix}{key}'")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"tensor '{prefix}{key}' has shape {list(state[key].shape)}, expected "
                                 f"{list(shape)} for hidden_sizes {self.hidden_sizes.tolist()}")
        if self.storage == "ragged":
            for key, p in self.lstm_storage().items():
                p.copy_(state[key])
            return
        self.zero_padding_()
        d = self.head_dim
        r = f = hp = 0
        for head in range(self.num_heads):
            for direction in (0, 1):
                k = int(self.hidden_sizes[direction, head])
                self.set_lstm_params(direction, head, state["lstm.w_ih"][r:r + 4 * k],
                                     state["lstm.w_hh"][f:f + 4 * k * k].view(4 * k, k),
                                     state["lstm.b_ih"][r:r + 4 * k], state["lstm.b_hh"][r:r + 4 * k])
                r += 4 * k
                f += 4 * k * k
            kk = int(self.hidden_sizes[:, head].sum())
            self.set_head_proj_params(head, state["head_proj.weight"][:, hp:hp + kk], state["head_proj.bias"][head])
            hp += kk
        assert d == self.head_dim

    # ---- forward ----
    def _check_input(self, x: torch.Tensor, attn_mask, is_causal) -> None:
        if attn_mask is not None:
            raise ValueError("FARAttention has no attention matrix to mask: attn_mask must be None "
                             "(a BiLSTM reads every token; drop masked tokens before the model instead)")
        if is_causal:
            raise ValueError("FARAttention is bidirectional: is_causal=True is not supported")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FARAttention expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"FARAttention expects x of shape [B, N, C={self.dim}], got {list(x.shape)}")
        # the LSTM's own weights, not pre_proj.weight: far.imc.emulate may have put pre_proj on a crossbar
        # (a CrossbarLinear keeps no float weight) while the BiLSTM stays digital
        w = next(iter(self.lstm_storage().values()))
        if x.device != w.device:
            raise ValueError(f"FARAttention: x is on {x.device} but the module is on {w.device}")
        if x.dtype != w.dtype and not (torch.is_autocast_enabled(x.device.type) and x.is_floating_point()):
            raise TypeError(f"FARAttention: x is {x.dtype} but the module is {w.dtype}; cast one of them "
                            "(e.g. model.to(x.dtype)) or use torch.autocast")

    def token_mix(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Everything but the output projection: x [B, N, C] -> the concatenated head_proj outputs
        [B, N, H*d] (the input of proj, W_O), i.e. what a timm Attention computes before W_O."""
        self._check_input(x, None, False)
        B, N, _ = x.shape
        H, d, n = self.num_heads, self.head_dim, self.width
        xh = self.pre_proj(x)  # [B, N, H*d]
        w_ih, w_hh, b_ih, b_hh, hp_w, hp_b = self.padded_params()
        if n == 0:  # every unit pruned: each head outputs its head_proj bias
            return hp_b.reshape(1, 1, H * d).expand(B, N, H * d).to(x.dtype)
        h = far_kernels.bilstm_fused_scan(xh, w_ih, b_ih + b_hh, w_hh, self.hidden_sizes,
                                          backend=backend if backend is not None else self.backend)  # [H, B, N, 2, n]
        o = torch.baddbmm(hp_b.unsqueeze(1), h.reshape(H, B * N, 2 * n), hp_w.transpose(1, 2))  # [H, B*N, d]
        return o.view(H, B, N, d).permute(1, 2, 0, 3).reshape(B, N, H * d)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                backend: Optional[str] = None) -> torch.Tensor:
        """x [B, N, C] -> proj(token_mix(x)) [B, N, dim_out]. backend: this call's BiLSTM backend (default:
        the module's `backend`, else env FAR_BACKEND, else auto); far_kernels.bilstm_fused_scan chooses and
        runs it (a differentiable torch.lstm per head when a gradient is required)."""
        self._check_input(x, attn_mask, is_causal)
        return self.proj_drop(self.proj(self.token_mix(x, backend)))

    @torch.no_grad()
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Obviously-right forward: a Python loop over heads, directions and time with the per-head
        parameters (lstm_params, head_proj_params), in float64. Returns x.dtype. For tests."""
        self._check_input(x, None, False)
        f64 = torch.float64
        xh = F.linear(x.to(f64), self.pre_proj.weight.to(f64),
                      None if self.pre_proj.bias is None else self.pre_proj.bias.to(f64))
        B, N, _ = x.shape
        d = self.head_dim
        heads = []
        for head in range(self.num_heads):
            xs = xh[..., head * d:(head + 1) * d]
            outs = []
            for direction in (0, 1):
                w_ih, w_hh, b_ih, b_hh = (t.to(f64) for t in self.lstm_params(direction, head))
                k = w_hh.shape[1]
                h = xs.new_zeros(B, k)
                c = xs.new_zeros(B, k)
                hs = [None] * N
                order = range(N) if direction == 0 else reversed(range(N))
                for t in order:
                    i, f, g, o = (xs[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    hs[t] = h
                outs.append(torch.stack(hs, dim=1) if N else xs.new_zeros(B, 0, k))
            w, b = self.head_proj_params(head)
            heads.append(torch.cat(outs, dim=-1) @ w.to(f64).T + b.to(f64))
        o = torch.cat(heads, dim=-1)
        y = F.linear(o, self.proj.weight.to(f64), None if self.proj.bias is None else self.proj.bias.to(f64))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        hs = self.hidden_sizes.tolist()
        extra = ", storage=ragged" if self.storage == "ragged" else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, hidden_sizes={hs}{extra}"
