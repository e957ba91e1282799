"""Modules of an emulated model: CrossbarLinear (a weight product on a ReRAM crossbar) and
QuantizedAttention (timm attention whose activation x activation products stay digital, quantized).

Semantics of the crossbar product are far_kernels.crossbar_matmul's (docs/design.md, "Crossbar
emulation"); these modules only hold programmed weights and route calls.
"""
from __future__ import annotations

import itertools
import zlib
from typing import Optional

import torch
import torch.nn as nn

import far_kernels
from far_kernels.ops.crossbar_matmul.program import exact_divisor, read_noise_key


def _recorded_range(rec: torch.Tensor, per_slice: bool, p_max: int) -> torch.Tensor:
    """The ADC range from the recorded max |partial sum| per weight slice rec [S]: rec itself (per_slice) or its
    max, with p_max wherever that is 0 (nothing but zero partial sums seen; per layer: in every slice)."""
    r = rec.clone() if per_slice else rec.max()
    return torch.where(r > 0, r, torch.full_like(r, float(p_max)))


class CrossbarLinear(nn.Module):
    """nn.Linear whose product runs on an emulated crossbar: y = crossbar_matmul(x, W) + bias.

    The weight is programmed once (far_kernels.program_crossbar: quantized, bit-sliced, programming
    noise and stuck-at cells fixed by cfg.seed) and reused for every call; the bias is added digitally
    in full precision. The float weight is not kept.

    Args:
        programmed: a far_kernels ProgrammedCrossbar of a [out_features, in_features] weight.
        cfg: the far_kernels.CrossbarConfig it was programmed with.
        bias: [out_features] or None.
        backend: crossbar_matmul backend (None = env FAR_BACKEND / auto).
    Shapes: x [..., in_features] -> [..., out_features].

    With cfg.adc_range == "calibrated" the ADC range is `adc_range` (a scalar, or one value per weight
    slice; kept on the programmed crossbar, so it follows .to()), set by far.imc.calibrate or
    set_adc_range. Build from a layer with `from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, programmed, cfg, bias: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg
        self.backend = backend
        self.programmed = programmed
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"CrossbarLinear: bias must have shape [{out_features}], got {list(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("_anchor", torch.empty(0, device=programmed.device),
                             persistent=False)  # follows .to(device); the programmed state follows it
        self.layer_name = ""  # set by far.imc.emulate, for messages
        self._calib: Optional[torch.Tensor] = None  # running max |partial sum| while calibrating

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg, backend: Optional[str] = None) -> "CrossbarLinear":
        """Program `linear`'s weight on a crossbar (`linear` itself is not changed)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"CrossbarLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, cfg, backend=backend)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], cfg,
                    backend: Optional[str] = None) -> "CrossbarLinear":
        """Program weight [N, K] (bias [N] or None)."""
        if not isinstance(cfg, far_kernels.CrossbarConfig):
            raise TypeError(f"cfg must be a far_kernels.CrossbarConfig, got {type(cfg).__name__}")
        if weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"CrossbarLinear: weight must be a non-empty [N, K] matrix, got {list(weight.shape)}")
        with torch.no_grad():
            programmed = far_kernels.program_crossbar(weight.detach(), cfg)
        n, k = weight.shape
        return cls(k, n, programmed, cfg, bias=None if bias is None else bias.detach(), backend=backend)

    # ---- device moves: the programmed cells follow the module ----
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.programmed = self.programmed.to(self._anchor.device)
        return self

    @property
    def num_weight_slices(self) -> int:
        return self.cfg.n_weight_slices

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def begin_calibration(self) -> None:
        """Start recording the largest |partial sum| per weight slice of every read (far.imc.calibrate);
        meanwhile the layer runs as an uncalibrated ADC would (range p_max)."""
        self._calib = torch.zeros(self.num_weight_slices, dtype=torch.float32, device=self.device)

    def end_calibration(self, per_slice: Optional[bool]) -> Optional[torch.Tensor]:
        """Stop recording. per_slice True/False: set the ADC range to what was recorded (one value per
        weight slice, or their max; p_max where only zeros were seen) and return it; None: discard."""
        rec, self._calib = self._calib, None
        if rec is None or per_slice is None:
            return None
        r = _recorded_range(rec, per_slice, self.cfg.p_max)
        self.set_adc_range(r)
        return r  # [S] per slice (also for S = 1: the crossbar stores a one-value range as a scalar), else a scalar

    @property
    def adc_range(self) -> Optional[torch.Tensor]:
        """The calibrated ADC range (None until calibrated)."""
        return self.programmed.adc_range

    def set_adc_range(self, r) -> None:
        """ADC range for adc_range="calibrated": a positive scalar or one value per weight slice."""
        r = torch.as_tensor(r, dtype=torch.float32, device=self._anchor.device).detach().clone()
        if r.dim() > 1 or (r.dim() == 1 and r.numel() not in (1, self.num_weight_slices)):
            raise ValueError(f"{self.layer_name or 'CrossbarLinear'}: adc_range must be a scalar or have "
                             f"{self.num_weight_slices} values (one per weight slice), got shape {list(r.shape)}")
        if not torch.isfinite(r).all() or (r <= 0).any():
            raise ValueError(f"{self.layer_name or 'CrossbarLinear'}: adc_range must be finite and > 0, got {r.tolist()}")
        self.programmed.adc_range = r.reshape(()) if r.numel() == 1 else r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.layer_name or 'CrossbarLinear'}: expected x [..., {self.in_features}], "
                             f"got {list(x.shape)}")
        cfg = self.cfg
        if self._calib is not None:  # calibrating: record ranges, run as an uncalibrated ("max") ADC would
            p = far_kernels.crossbar_partial_sum_absmax(x, self.programmed).to(self._calib.device, torch.float32)
            torch.maximum(self._calib, p, out=self._calib)
            if cfg.adc_range == "calibrated":  # "max" itself (exact integer codes), as the grouped products do;
                cfg = cfg.replace(adc_range="max")  # a calibrated range of p_max rounds p·L/p_max in fp32 instead
        elif cfg.adc_range == "calibrated" and self.adc_range is None:
            raise RuntimeError(f"{self.layer_name or 'CrossbarLinear'}: adc_range='calibrated' needs ranges; run "
                               "far.imc.calibrate(model, data) first (or use adc_range 'max'/'granular')")
        return far_kernels.crossbar_matmul(x, self.programmed, cfg, bias=self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        c = self.cfg
        adc = "no ADC" if c.adc_bits is None else f"adc {c.adc_bits}b {c.adc_range}"
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"w{c.weight_bits}b/{c.cell_bits}b-cells x{self.num_weight_slices}, in {c.input_bits}b/dac {c.dac_bits}b, "
             f"{adc}, tile_rows={c.tile_rows}")
        if c.adc_range == "calibrated":
            s += ", calibrated" if self.adc_range is not None else ", NOT calibrated"
        return s


def fake_quantize(x: torch.Tensor, bits: int, dim=None) -> torch.Tensor:
    """Symmetric quantization to `bits` (sign + bits-1 magnitude bits), returned dequantized:
    s = max|x| / (2^(bits-1) - 1) over `dim` (None = the whole tensor; int or tuple = those axes,
    one scale per remaining index), x_q = round_half_even(x / s) (already within range), x_q * s.
    All-zero slices stay zero; an empty tensor is returned as it is (no scale to take)."""
    L = 2 ** (bits - 1) - 1
    if x.numel() == 0:  # amax over no element (dim=None: the whole tensor) is an error in torch
        return x.clone()
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    s = amax / exact_divisor(L, amax)  # an IEEE quotient on a GPU too (ATen's CUDA x / number uses 1/number)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / safe).clamp_(-L, L) * s


class QuantizedAttention(nn.Module):
    """timm `Attention` with its activation x activation products kept digital but quantized.

    The weight products (qkv, proj, and the optional gate) are the original submodules (CrossbarLinear
    after far.imc.emulate). q, k, v and the softmax probabilities are quantized symmetrically to
    `bits` with scales outside each product's reduction axis, so each product is an integer matmul
    times scales: "row" = q and k per token (per head), v per channel over the tokens, probabilities
    per query row; "tensor" = one scale per tensor (the whole batch). Quantization and products run in fp32 (a
    bf16/fp16 model gets them rounded once to its dtype). The 1/sqrt(d) scale, mask and
    softmax are digital in full precision. Probabilities are in [0, 1], so the sign bit is unused.
    """

    def __init__(self, attn: nn.Module, bits: int = 8, scale: str = "row") -> None:
        super().__init__()
        if scale not in ("row", "tensor"):
            raise ValueError(f"scale must be 'row' or 'tensor', got {scale!r}")
        if bits < 2:
            raise ValueError(f"bits must be >= 2, got {bits}")
        self.bits = bits
        self.scale_mode = scale
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.train(attn.training)

    def _q(self, t: torch.Tensor, dim) -> torch.Tensor:
        return fake_quantize(t, self.bits, None if self.scale_mode == "tensor" else dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, d]
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self._scores(q, k) * self.scale  # [B, H, N, N]
        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            attn = attn.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        o = self._mix(attn, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        o = self.norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))

    # Both products quantize and multiply in fp32 and return the operands' dtype, as a CrossbarLinear does: in bf16 or
    # fp16, x / s rounds before round() and puts values on other levels than the design's fp32 quantizer.
    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q @ k^T of [B, H, N, d] tensors (before the 1/sqrt(d) scale)."""
        return (self._q(q.float(), -1) @ self._q(k.float(), -1).transpose(-2, -1)).to(q.dtype)

    def _mix(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """p @ v: probabilities [B, H, N, N], values [B, H, N, d]."""
        return (self._q(p.float(), -1) @ self._q(v.float(), -2)).to(p.dtype)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, act_bits={self.bits}, scale={self.scale_mode}"


class CrossbarAttention(QuantizedAttention):
    """timm `Attention` whose dynamic products are written into crossbars for every input, as a ReRAM chip
    without a digital attention unit must do: per image and head, K [N, d] is programmed as a weight
    (rows = tokens, one output per key) and read by q, giving q k^T; V^T [d, N] is programmed and read by
    the softmax probabilities, giving p v. Programming uses cfg's weight quantization (weight_bits, per
    key / per value channel for weight_scale="channel"), cell slicing, programming noise and stuck-at
    faults; reads use the input quantizer, DAC slicing, tiles, ADC and read noise
    (far_kernels.program_stacked + crossbar_matmul_group: every image and head in one call). Scale, mask
    and softmax stay digital in full precision.

    Every call programs afresh with new noise; the sequence is reproducible from `seed` (the product's
    far.imc.layer_seed). Without noise each product equals far_kernels.crossbar_matmul_ref on K (or V^T)
    programmed alone. With adc_range="calibrated" both products get one range per weight slice, recorded
    by far.imc.calibrate over the calibration data (the K and V of each input differ, so the range is the
    product's, not a member's)."""

    def __init__(self, attn: nn.Module, cfg, seed: int = 0, backend: Optional[str] = None) -> None:
        if not isinstance(cfg, far_kernels.CrossbarConfig):
            raise TypeError(f"cfg must be a far_kernels.CrossbarConfig, got {type(cfg).__name__}")
        super().__init__(attn, bits=cfg.input_bits, scale=cfg.input_scale)
        self.cfg, self.seed, self.backend = cfg, int(seed), backend
        self.calls = 0
        self.adc_ranges = {"qk": None, "pv": None}
        self._calib: Optional[dict] = None
        self.layer_name = ""
        dev = next(itertools.chain(attn.parameters(), attn.buffers()), torch.empty(0)).device
        self.register_buffer("_anchor", torch.empty(0, device=dev), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def begin_calibration(self) -> None:
        self._calib = {k: torch.zeros(self.cfg.n_weight_slices) for k in ("qk", "pv")}

    def end_calibration(self, per_slice):
        rec, self._calib = self._calib, None
        if rec is None or per_slice is None:
            return None
        out = {}
        for k, r in rec.items():
            self.adc_ranges[k] = _recorded_range(r, per_slice, self.cfg.p_max)
            out[f"{self.layer_name}.{k}" if self.layer_name else k] = self.adc_ranges[k].clone()
        return out

    def _product(self, x: torch.Tensor, w: torch.Tensor, which: str) -> torch.Tensor:
        """x [B, H, M, K] read through w [B, H, N, K] programmed per (image, head): [B, H, M, N]."""
        B, H, M, K = x.shape
        N = w.shape[2]
        if B * M == 0:  # no image or query: nothing to write or read (program_stacked takes no empty stack)
            return x.new_zeros(B, H, M, N)
        j = 0 if which == "qk" else 1
        key = read_noise_key(self.seed, 2 * self.calls + j)
        cfg = self.cfg.replace(seed=key)
        grp = far_kernels.program_stacked(w.reshape(B * H, N, K), cfg)
        xs = x.reshape(B * H, M, K)
        if self._calib is not None:
            stat = far_kernels.crossbar_partial_sum_absmax_group(xs, grp).amax(0).float().cpu()
            torch.maximum(self._calib[which], stat, out=self._calib[which])
            if cfg.adc_range == "calibrated":
                cfg = cfg.replace(adc_range="max")
        elif cfg.adc_range == "calibrated":
            r = self.adc_ranges[which]
            if r is None:
                raise RuntimeError(f"{self.layer_name or 'CrossbarAttention'}: adc_range='calibrated' needs ranges; "
                                   "run far.imc.calibrate(model, data) first")
            r = r.to(x.device)
            for m in grp.members:
                m.adc_range = r
        return far_kernels.crossbar_matmul_group(xs, grp, cfg, backend=self.backend).view(B, H, M, N)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        out = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        self.calls += 1
        return out

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self._product(q, k, "qk")

    def _mix(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._product(p, v.transpose(-2, -1), "pv")

    def extra_repr(self) -> str:
        c = self.cfg
        adc = "no ADC" if c.adc_bits is None else f"adc {c.adc_bits}b {c.adc_range}"
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, K and V written per input: "
                f"w{c.weight_bits}b/{c.cell_bits}b-cells, in {c.input_bits}b/dac {c.dac_bits}b, {adc}")


class GroupLinear(nn.Module):
    """G independent linear maps applied together (digital): y[g] = x[g] @ W_g.T + b_g, members of different
    sizes zero-padded to the largest. x [G, M, K] -> [G, M, N]. `member_names` name each member (the
    product names far.imc.emulate selects). Becomes a CrossbarGroupLinear under emulation."""

    def __init__(self, names, weights, biases=None):
        super().__init__()
        weights = [w.detach() for w in weights]
        if not weights or len(names) != len(weights):
            raise ValueError("GroupLinear: one name per weight, at least one")
        self.member_names = list(names)
        self.sizes = [tuple(w.shape) for w in weights]
        N, K = max(n for n, _ in self.sizes), max(k for _, k in self.sizes)
        ref = weights[0]
        w = torch.zeros(len(weights), N, K, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(len(weights), N, dtype=ref.dtype, device=ref.device)
        for g, wt in enumerate(weights):
            w[g, :wt.shape[0], :wt.shape[1]] = wt
            if biases is not None and biases[g] is not None:
                b[g, :wt.shape[0]] = biases[g].detach()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False) if biases is not None else None

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def member_weight(self, g: int):
        n, k = self.sizes[g]
        return self.weight[g, :n, :k], None if self.bias is None else self.bias[g, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2).to(x.dtype))
        return torch.baddbmm(self.bias.unsqueeze(1).to(x.dtype), x, self.weight.transpose(1, 2).to(x.dtype))

    def extra_repr(self) -> str:
        return f"members={len(self.sizes)}, sizes={self.sizes}, bias={self.bias is not None}"


class CrossbarGroupLinear(nn.Module):
    """A GroupLinear whose selected members run on emulated crossbars together (one
    far_kernels.crossbar_matmul_group call), the others digitally. Same contract: x [G, M, K] -> [G, M, N].

    Each emulated member is programmed once with its own seed (`seeds`), so members get independent
    programming noise and faults. Read noise is keyed by `read_seed` (default: derived from `seeds`), one per
    group, so no two groups of a model (W_hh of two blocks, say) read the same draws. With cfg.adc_range ==
    "calibrated" every member has its own range."""

    def __init__(self, glinear: GroupLinear, cfg, emulated, seeds, backend: Optional[str] = None,
                 read_seed: Optional[int] = None):
        super().__init__()
        if not isinstance(cfg, far_kernels.CrossbarConfig):
            raise TypeError(f"cfg must be a far_kernels.CrossbarConfig, got {type(cfg).__name__}")
        if read_seed is None:
            read_seed = read_noise_key(cfg.seed, zlib.crc32(",".join(map(str, seeds)).encode()))
        self.cfg, self.backend = cfg.replace(seed=int(read_seed)), backend
        self.member_names = list(glinear.member_names)
        self.sizes = list(glinear.sizes)
        self.emulated = [bool(e) for e in emulated]
        self.sel = [g for g, e in enumerate(self.emulated) if e]
        self.dig = [g for g, e in enumerate(self.emulated) if not e]
        with torch.no_grad():
            self.group = far_kernels.program_group([glinear.member_weight(g)[0] for g in self.sel], cfg,
                                                   seeds=[seeds[g] for g in self.sel]) if self.sel else None
        self.weight = nn.Parameter(glinear.weight.detach().clone(), requires_grad=False)  # the digital members'
        self.bias = None if glinear.bias is None else nn.Parameter(glinear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("_anchor", torch.empty(0, device=self.weight.device), persistent=False)
        self._calib: Optional[torch.Tensor] = None  # [G_sel, S] running max |partial sum| while calibrating
        self.layer_name = ""

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.group is not None and self.group.device != self._anchor.device:
            self.group = self.group.to(self._anchor.device)
        return self

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def crossbar_names(self) -> list:
        return [self.member_names[g] for g in self.sel]

    def begin_calibration(self) -> None:
        self._calib = torch.zeros(len(self.sel), self.cfg.n_weight_slices, dtype=torch.float32, device=self.device)

    def end_calibration(self, per_slice):
        """Stop recording; per_slice True/False: every emulated member's ADC range from what it saw (p_max where
        only zeros were seen), returned as {member name: r}; None: discard."""
        rec, self._calib = self._calib, None
        if rec is None or per_slice is None:
            return None
        out = {}
        for row, g in zip(rec, self.sel):
            r = _recorded_range(row, per_slice, self.cfg.p_max)
            self.group.members[self.sel.index(g)].adc_range = r
            out[self.member_names[g]] = r.clone()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, M, K = x.shape
        if G != len(self.sizes) or K != self.weight.shape[2]:
            raise ValueError(f"{self.layer_name or 'CrossbarGroupLinear'}: expected x [{len(self.sizes)}, M, "
                             f"{self.weight.shape[2]}], got {list(x.shape)}")
        y = x.new_zeros(G, M, self.weight.shape[1])
        if self.dig:
            d = torch.tensor(self.dig, device=x.device)
            w = self.weight[d].transpose(1, 2).to(x.dtype)
            y[d] = torch.bmm(x[d], w) if self.bias is None else torch.baddbmm(self.bias[d].unsqueeze(1).to(x.dtype),
                                                                             x[d], w)
        if self.sel:
            s = torch.tensor(self.sel, device=x.device)
            xs = x[s][:, :, :self.group.K]
            if self._calib is not None:  # calibrating: record, run as an uncalibrated ("max") ADC would
                stat = far_kernels.crossbar_partial_sum_absmax_group(xs, self.group)
                torch.maximum(self._calib, stat.to(self._calib.device), out=self._calib)
                cfg = self.cfg.replace(adc_range="max") if self.cfg.adc_range == "calibrated" else self.cfg
            else:
                if self.cfg.adc_range == "calibrated" and any(m.adc_range is None for m in self.group.members):
                    raise RuntimeError(f"{self.layer_name or 'CrossbarGroupLinear'}: adc_range='calibrated' needs "
                                       "ranges; run far.imc.calibrate(model, data) first")
                cfg = self.cfg
            bias = None if self.bias is None else self.bias[s][:, :self.group.N]
            ys = far_kernels.crossbar_matmul_group(xs, self.group, cfg, bias=bias, backend=self.backend)
            y[s, :, :self.group.N] = ys.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"members={len(self.sizes)} ({len(self.sel)} on crossbars), adc {c.adc_bits}b {c.adc_range}, "
                f"w{c.weight_bits}b/{c.cell_bits}b-cells, in {c.input_bits}b/dac {c.dac_bits}b")
