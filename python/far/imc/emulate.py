"""far.imc.emulate: run a model's weight products on emulated ReRAM crossbars."""
from __future__ import annotations

import copy
import fnmatch
import itertools
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch.nn as nn

import far_kernels
from far.imc.far_block import EMULATED_LSTM_MAPPING, LSTM_MAPPINGS, UnrolledFARAttention
from far.imc.layers import CrossbarAttention, CrossbarGroupLinear, CrossbarLinear, QuantizedAttention
from far.models import attention_classes, attention_pool_classes
from far.nn import FARAttention

Patterns = Union[None, str, Sequence[str]]

KIND_LINEAR = "crossbar"  # a weight product on a crossbar
KIND_ATTENTION = "digital-quantized"  # activation x activation products, digital at input_bits
KIND_DYNAMIC = "crossbar-dynamic"  # activation x activation products, K and V written into crossbars per input
DYNAMIC_MODES = ("digital", "crossbar")


def _patterns(p: Patterns, what: str) -> Optional[list]:
    if p is None:
        return None
    pats = [p] if isinstance(p, str) else list(p) if isinstance(p, (list, tuple)) else None
    if pats is None or not all(isinstance(x, str) and x for x in pats):
        raise TypeError(f"{what} must be a glob pattern or a list of them, got {p!r}")
    return pats


def _check_mapping(lstm_mapping: str) -> None:
    if lstm_mapping not in LSTM_MAPPINGS:
        raise ValueError(f"lstm_mapping must be one of {', '.join(LSTM_MAPPINGS)}, got {lstm_mapping!r}")


_LSTM_PARTS = {"separate": ("w_ih", "w_hh"), "fused": ("lstm",)}  # UnrolledFARAttention's LSTM products


def _far_parts(lstm_mapping: str) -> tuple:
    return _LSTM_PARTS[lstm_mapping] + ("head_proj",)


def _far_product_names(name: str, m: FARAttention, lstm_mapping: str = EMULATED_LSTM_MAPPING) -> list:
    """Names UnrolledFARAttention will give the products of FAR block `name` (non-empty ones only)."""
    out = []
    for head in range(m.num_heads):
        for direction in (0, 1):
            if int(m.hidden_sizes[direction, head]) > 0:
                out += [f"{name}.{part}.{head}.{direction}" for part in _LSTM_PARTS[lstm_mapping]]
        if int(m.hidden_sizes[:, head].sum()) > 0:
            out.append(f"{name}.head_proj.{head}")
    return out


def emulation_targets(model: nn.Module, lstm_mapping: str = EMULATED_LSTM_MAPPING) -> list:
    """[(name, kind)] of everything far.imc.emulate can convert in `model`, in model order:
    every nn.Linear by module name (kind "crossbar"); inside a FARAttention `X` also its LSTM and
    head_proj products `X.w_ih.<head>.<dir>`, `X.w_hh.<head>.<dir>` (lstm_mapping "separate") or
    `X.lstm.<head>.<dir>` ("fused"), `X.head_proj.<head>` ("crossbar"); every timm Attention `X` itself
    ("digital-quantized": its q@k^T and attn@v). These are the names that emulate's include/exclude
    patterns match."""
    _check_mapping(lstm_mapping)
    attn_classes = attention_classes()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FARAttention):
            out += [(n, KIND_LINEAR) for n in _far_product_names(name, m, lstm_mapping)]
        elif isinstance(m, attn_classes):
            out.append((name, KIND_ATTENTION))
        elif type(m) is nn.Linear and m.in_features > 0 and m.out_features > 0:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if not isinstance(parent, nn.MultiheadAttention):  # MHA reads out_proj.weight directly
                out.append((name, KIND_LINEAR))
    return out


def unemulated_products(model: nn.Module) -> list:
    """[(name, detail)] of the activation x activation products far.imc.emulate cannot map, which stay digital in
    full precision: q@k^T and attn@v inside timm's attention pools (VisionTransformer global_pool "map":
    AttentionPoolLatent, "prr": AttentionPoolPrr; their Linears are emulation targets like any other)."""
    return [(name, f"q@k^T and attn@v of {type(m).__name__}: not emulated, digital in full precision")
            for name, m in model.named_modules() if isinstance(m, attention_pool_classes())]


def select_targets(model: nn.Module, include: Patterns = None, exclude: Patterns = None,
                   lstm_mapping: str = EMULATED_LSTM_MAPPING) -> tuple:
    """(chosen [(name, kind)], skipped [name]) of emulation_targets(model, lstm_mapping) under include/exclude
    glob patterns (see emulate). Raises ValueError for a pattern that matches no target, or an empty choice."""
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    targets = emulation_targets(model, lstm_mapping)
    if not targets:
        raise ValueError(f"{type(model).__name__} has nothing to emulate (no nn.Linear, FAR block or attention)")
    names = [n for n, _ in targets]
    for what, pats in (("include", inc), ("exclude", exc)):
        for p in pats or ():
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                examples = ", ".join(names[:4] + (["..."] if len(names) > 4 else []))
                other = [part for m, parts in _LSTM_PARTS.items() if m != lstm_mapping for part in parts if part in p]
                hint = (f"; with lstm_mapping={lstm_mapping!r} an LSTM's products are "
                        + " and ".join(f"X.{q}.<head>.<dir>" for q in _LSTM_PARTS[lstm_mapping])) if other else ""
                raise ValueError(f"{what} pattern {p!r} matches no emulatable layer (names look like {examples}; "
                                 f"list them with far.imc.emulation_targets(model){hint})")

    def selected(n: str) -> bool:
        return ((inc is None or any(fnmatch.fnmatchcase(n, p) for p in inc))
                and not any(fnmatch.fnmatchcase(n, p) for p in exc or ()))

    chosen = [(n, k) for n, k in targets if selected(n)]
    if not chosen:
        raise ValueError(f"include {inc} / exclude {exc} leave no layer to emulate")
    return chosen, [n for n in names if not selected(n)]


@dataclass
class EmulationReport:
    """What far.imc.emulate converted: rows (name, kind, detail) and the config."""

    cfg: object
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # names matched by no include / by an exclude
    lstm_mapping: str = EMULATED_LSTM_MAPPING  # how FAR blocks' LSTMs were mapped (far.imc.far_block)
    unemulated: list = field(default_factory=list)  # (name, detail): products emulate cannot map (digital, fp)

    def table(self) -> str:
        w = max([len(r[0]) for r in self.rows + self.unemulated] + [5])
        lines = [f"{'layer':<{w}}  {'kind':<17}  detail"]
        lines += [f"{n:<{w}}  {k:<17}  {d}" for n, k, d in self.rows]
        lines += [f"{n:<{w}}  {'not emulated':<17}  {d}" for n, d in self.unemulated]
        lines.append(f"{len(self.rows)} emulated ({sum(r[1] == KIND_LINEAR for r in self.rows)} crossbar products), "
                     f"{len(self.skipped)} left digital in full precision"
                     + (f"; {len(self.unemulated)} attention pool(s) whose q@k^T and attn@v emulate cannot map, "
                        "digital in full precision" if self.unemulated else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def _named(name: str, build):
    """build(), its ValueError (e.g. a weight holding NaN) prefixed with the product's name."""
    try:
        return build()
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def emulate(model: nn.Module, cfg, include: Patterns = None, exclude: Patterns = None, *,
            inplace: bool = False, backend: Optional[str] = None, dynamic: str = "digital",
            lstm_mapping: str = EMULATED_LSTM_MAPPING) -> nn.Module:
    """A copy of `model` (the input is left untouched unless inplace=True) whose weight products run
    on emulated ReRAM crossbars with the far_kernels.CrossbarConfig `cfg`.

    What becomes a crossbar (far.imc.CrossbarLinear, weights programmed once here, bias digital):
      - every nn.Linear (qkv, proj, mlp.fc1/fc2, head, and FAR's pre_proj);
      - in FAR blocks: the LSTMs' input products W_ih x (per head and direction), the recurrent
        product h_{t-1} W_hh^T (evaluated per time step through the crossbar, the previous step's h
        as input), and head_proj (per head). Such a block becomes an UnrolledFARAttention.
        lstm_mapping="fused" instead reads one product [W_ih | W_hh] per step on [x_t; h_{t-1}] (one input
        scale, one ADC conversion per output for both: far.imc.cost's default mapping; names X.lstm.*).
    Attention's activation x activation products q@k^T and attn@v (`dynamic`):
      - "digital" (default): on a digital unit, quantized symmetrically to cfg.input_bits
        (QuantizedAttention; cfg.input_scale chooses per-row or per-tensor scales);
      - "crossbar": K and V written into crossbars for every input, with cfg's programming noise and
        faults, and read with its DAC, ADC and read noise (CrossbarAttention);
      the 1/sqrt(d) scale and softmax stay digital in full precision.
    What stays digital:
      - the q@k^T and attn@v inside timm's attention pools (global_pool "map", "prr"): not emulated, in full
        precision, listed in the report's `unemulated` (far.imc.unemulated_products); their Linears are emulated;
      - LSTM gate nonlinearities and the cell update, biases, LayerNorm, GELU, residuals, the
        patch-embedding convolution, in full precision.

    include / exclude: glob patterns (fnmatch, `*` also crosses dots) on the names listed by
    far.imc.emulation_targets(model), e.g. exclude="head" keeps the classifier digital,
    include="*.w_hh.*" emulates only FAR's recurrent products. A pattern that matches nothing is an
    error (a typo would otherwise emulate everything). Unselected layers stay as they were.
    backend: crossbar_matmul backend for every CrossbarLinear (None = env FAR_BACKEND / auto).

    The result's `imc_emulation` attribute is an EmulationReport. With cfg.adc_range == "calibrated",
    run far.imc.calibrate(result, data) before using it. Emulated models are for evaluation; they are
    not saved by far.save (save the float model and emulate after loading).
    """
    if not isinstance(cfg, far_kernels.CrossbarConfig):
        raise TypeError(f"cfg must be a far_kernels.CrossbarConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dynamic not in DYNAMIC_MODES:
        raise ValueError(f"dynamic must be one of {', '.join(DYNAMIC_MODES)}, got {dynamic!r}")
    _check_mapping(lstm_mapping)
    if backend is not None:  # a typo is an error here, not at the first forward
        far_kernels.dispatch.requested_backend(backend)
    already = [n for n, m in model.named_modules() if isinstance(m, (CrossbarLinear, CrossbarGroupLinear,
                                                                      QuantizedAttention, UnrolledFARAttention))]
    if already:
        raise ValueError(f"the model is already emulated ({already[0]} is {type(model.get_submodule(already[0])).__name__}); "
                         "emulate the float model")
    if type(model) is nn.Linear:
        raise ValueError("emulate converts the layers inside a model; for a single nn.Linear use "
                         "far.imc.CrossbarLinear.from_linear(linear, cfg)")
    chosen, skipped = select_targets(model, include, exclude, lstm_mapping)
    meta = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"{meta} is on the meta device (no values): crossbars are programmed from the weights' "
                         "values; load the weights first (e.g. load_state_dict(..., assign=True))")
    if not inplace:
        model = copy.deepcopy(model)
    report = EmulationReport(cfg=cfg, skipped=skipped, lstm_mapping=lstm_mapping, unemulated=unemulated_products(model))
    chosen_names = {n for n, _ in chosen}
    grouped: set = set()  # product names that live inside a group (not modules of their own)
    new: list = []  # (name, module): all built before the model changes, so a failure (inplace) leaves it intact
    # 1. FAR blocks with a selected inner product -> grouped products; selected members of each group on crossbars
    for name, m in list(model.named_modules()):
        if isinstance(m, FARAttention) and chosen_names.intersection(_far_product_names(name, m, lstm_mapping)):
            u = UnrolledFARAttention(m, lstm_mapping)
            new.append((name, u))
            for part in _far_parts(lstm_mapping):
                glin = getattr(u, part, None)
                if glin is None:
                    continue
                full = [f"{name}.{part}.{member}" for member in glin.member_names]
                chosen_here = [n in chosen_names for n in full]
                grouped.update(full)
                if not any(chosen_here):
                    continue
                xg = _named(f"{name}.{part}", lambda: CrossbarGroupLinear(
                    glin, cfg, chosen_here, [layer_seed(cfg.seed, n) for n in full], backend=backend,
                    read_seed=layer_seed(cfg.seed, f"{name}.{part}")))
                xg.member_names = full
                xg.layer_name = f"{name}.{part}"
                xg.train(glin.training)
                setattr(u, part, xg)
                for n, (N_g, K_g), on in zip(full, glin.sizes, chosen_here):
                    if on:
                        report.rows.append((n, KIND_LINEAR, f"{K_g} -> {N_g}, {cfg.n_weight_slices} weight slices, "
                                                            f"{-(-K_g // cfg.tile_rows)} tile(s), grouped"))
    # 2. selected Linears -> crossbars; selected attentions -> digital quantized products
    for name, kind in chosen:
        if name in grouped:
            continue
        m = model.get_submodule(name)
        if kind == KIND_LINEAR:
            xb = _named(name, lambda: CrossbarLinear.from_linear(m, cfg.replace(seed=layer_seed(cfg.seed, name)),
                                                                 backend=backend))
            xb.layer_name = name
            xb.train(m.training)
            new.append((name, xb))
            report.rows.append((name, kind, f"{xb.in_features} -> {xb.out_features}, {xb.num_weight_slices} weight "
                                            f"slices, {-(-xb.in_features // cfg.tile_rows)} tile(s)"))
        elif dynamic == "crossbar":
            xa = CrossbarAttention(m, cfg, seed=layer_seed(cfg.seed, name), backend=backend)
            xa.layer_name = name
            new.append((name, xa))
            report.rows.append((name, KIND_DYNAMIC, f"K [N, {xa.head_dim}] and V^T [{xa.head_dim}, N] written per "
                                                    f"image and head, {cfg.n_weight_slices} weight slices"))
        else:
            new.append((name, QuantizedAttention(m, bits=cfg.input_bits, scale=cfg.input_scale)))
            report.rows.append((name, kind, f"q, k, v, softmax at {cfg.input_bits} bits ({cfg.input_scale} scales)"))
    for name, module in new:  # parents before children: a child is set inside its parent's replacement
        _set(model, name, module)
    model.imc_emulation = report
    return model


def crossbar_layers(model: nn.Module) -> list:
    """[(name, CrossbarLinear)] of an emulated model, in model order (grouped products: crossbar_groups)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CrossbarLinear)]


def crossbar_attentions(model: nn.Module) -> list:
    """[(name, CrossbarAttention)] of an emulated model (dynamic="crossbar"), in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CrossbarAttention)]


def crossbar_groups(model: nn.Module) -> list:
    """[(name, CrossbarGroupLinear)] of an emulated model, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CrossbarGroupLinear)]


def crossbar_products(model: nn.Module) -> list:
    """Names of every weight product an emulated model runs on crossbars (grouped members included)."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, CrossbarLinear):
            out.append(n)
        elif isinstance(m, CrossbarGroupLinear):
            out += m.crossbar_names
    return out


def layer_seed(seed: int, name: str) -> int:
    """The programming seed of product `name` under cfg.seed `seed`: every crossbar gets its own noise and faults
    (the same name and seed give the same cells in every run)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (1 << 62)
