"""far.export_onnx: a FAR ViT (timm VisionTransformer with FARAttention blocks, pruned or not) as an ONNX graph
for IMC toolchains, built node by node with onnx.helper (no tracing, so no exporter or onnxscript needed).

Mapping (opset 17):
  patch_embed            Conv, Reshape, Transpose (+ LayerNormalization if it has a norm)
  cls / dist / reg tokens  Expand to the batch, Concat; pos_embed: Add (none for pos_embed='none')
  LayerNorm              LayerNormalization (axis -1, the module's eps)
  Linear                 MatMul (+ Add of the bias)
  GELU                   0.5 x (1 + Erf(x / sqrt 2)) (tanh form for GELU(approximate="tanh"))
  FARAttention           pre_proj MatMul+Add; per head a Slice of its d channels (time-major [N, B, d]) and
                         ONNX LSTM ops: one direction="bidirectional" op when the head keeps as many forward
                         as backward units, else one "forward" and one "reverse" op (ONNX needs one
                         hidden_size per op); a direction with 0 units gets no op; gate rows permuted from
                         torch's (i, f, g, o) to ONNX's (i, o, f, c); B = [b_ih ‖ b_hh]. head_proj
                         MatMul+Add per head, Concat over heads, proj MatMul+Add.
  timm Attention         MatMul, Softmax, MatMul (for models that keep some attention blocks; no q/k norm,
                         no scale_norm, not gated)
  pooling, head          Gather (token) / ReduceMean (avg, prefix tokens included with pool_include_prefix),
                         fc_norm, head MatMul+Add; a distilled DeiT: (head(token 0) + head_dist(token 1)) / 2
Input "pixels" [B, C, H, W] float32, output "logits" [B, classes]; B is fixed or the symbolic "batch".
Blocks must be timm's pre-norm Block (a post-norm ResPostBlock or a parallel block is refused, not exported as
something else), the patch embedding a timm PatchEmbed.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from far.errors import ConfigError
from far.nn import FARAttention

OPSET = 17
INSTALL_HINT = "pip install onnx onnxruntime  (or: make deps)"


def require_onnx():
    """The onnx module, or a ConfigError saying how to install it."""
    try:
        import onnx
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the optional package onnx ({e}); install it: {INSTALL_HINT}") from e
    return onnx


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


class _Graph:
    def __init__(self, onnx):
        self.onnx = onnx
        self.h = onnx.helper
        self.nodes, self.inits, self.names = [], [], set()
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}__{self._n}"

    def const(self, base: str, array, dtype=np.float32) -> str:
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, base: Optional[str] = None, n_out: int = 1, **attrs):
        outs = [self.name(base or op_type) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, list(inputs), outs, name=self.name(base or op_type),
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    # ---- layers ----
    def linear(self, x: str, m: nn.Linear, base: str) -> str:
        y = self.op("MatMul", [x, self.const(f"{base}.weight_t", _np(m.weight).T)], base)
        if m.bias is not None:
            y = self.op("Add", [y, self.const(f"{base}.bias", _np(m.bias))], base)
        return y

    def layernorm(self, x: str, m: nn.Module, base: str) -> str:
        if isinstance(m, nn.Identity):
            return x
        if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
            raise ConfigError(f"{base}: {type(m).__name__} is not exportable (LayerNorm over the last axis only)")
        c = m.normalized_shape[0]
        w = _np(m.weight) if m.weight is not None else np.ones(c, np.float32)
        b = _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros(c, np.float32)
        return self.op("LayerNormalization", [x, self.const(f"{base}.weight", w), self.const(f"{base}.bias", b)],
                       base, axis=-1, epsilon=float(m.eps))

    def gelu(self, x: str, m: nn.Module, base: str) -> str:
        if not isinstance(m, nn.GELU):
            raise ConfigError(f"{base}: activation {type(m).__name__} is not exportable (nn.GELU only)")
        if m.approximate == "tanh":
            x3 = self.op("Mul", [x, self.op("Mul", [x, x], base)], base)
            inner = self.op("Add", [x, self.op("Mul", [x3, self.const("c", 0.044715)], base)], base)
            t = self.op("Tanh", [self.op("Mul", [inner, self.const("c", math.sqrt(2 / math.pi))], base)], base)
        else:
            t = self.op("Erf", [self.op("Div", [x, self.const("c", math.sqrt(2.0))], base)], base)
        half = self.op("Mul", [x, self.const("c", 0.5)], base)
        return self.op("Mul", [half, self.op("Add", [t, self.const("c", 1.0)], base)], base)

    def layerscale(self, x: str, m: nn.Module, base: str) -> str:
        if isinstance(m, nn.Identity):
            return x
        gamma = getattr(m, "gamma", None)
        if gamma is None:
            raise ConfigError(f"{base}: {type(m).__name__} is not exportable (Identity or timm LayerScale)")
        return self.op("Mul", [x, self.const(f"{base}.gamma", _np(gamma))], base)

    def mlp(self, x: str, m: nn.Module, base: str) -> str:
        from timm.layers import Mlp

        # timm's Mlp forward (fc1, act, fc2) only: GluMlp also has fc1, act and fc2 but gates one half of fc1's output
        if type(m).forward is not Mlp.forward or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            raise ConfigError(f"{base}: {type(m).__name__} is not exportable (timm Mlp: fc1, GELU, fc2)")
        return self.linear(self.gelu(self.linear(x, m.fc1, f"{base}.fc1"), m.act, f"{base}.act"), m.fc2, f"{base}.fc2")

    def far_attention(self, x: str, m: FARAttention, base: str) -> str:
        """x [B, N, C] -> [B, N, C_out]; every (head, direction) an ONNX LSTM (see the module doc)."""
        H, d = m.num_heads, m.head_dim
        xp = self.linear(x, m.pre_proj, f"{base}.pre_proj")  # [B, N, H*d]
        xt = self.op("Transpose", [xp], f"{base}.time_major", perm=[1, 0, 2])  # [N, B, H*d]
        order = (0, 3, 1, 2)  # ONNX (i, o, f, c) from torch's (i, f, g, o) blocks
        heads = []
        for h in range(H):
            hb = f"{base}.head{h}"
            xs = self.op("Slice", [xt, self.const("start", [h * d], np.int64), self.const("end", [(h + 1) * d], np.int64),
                                   self.const("axis", [2], np.int64)], hb)  # [N, B, d]
            ks = [int(m.hidden_sizes[r, h]) for r in (0, 1)]
            params = []
            for r in (0, 1):
                w_ih, w_hh, b_ih, b_hh = (t.detach() for t in m.lstm_params(r, h))
                k = ks[r]
                perm = lambda t: torch.cat([t.reshape(4, k, *t.shape[1:])[g] for g in order])  # noqa: E731
                params.append((_np(perm(w_ih)), _np(perm(w_hh)), np.concatenate([_np(perm(b_ih)), _np(perm(b_hh))])))
            outs = []
            if ks[0] == ks[1] and ks[0] > 0:
                k = ks[0]
                y = self.op("LSTM", [xs, self.const(f"{hb}.W", np.stack([p[0] for p in params])),
                                     self.const(f"{hb}.R", np.stack([p[1] for p in params])),
                                     self.const(f"{hb}.B", np.stack([p[2] for p in params]))],
                            f"{hb}.lstm_bidirectional", hidden_size=k, direction="bidirectional")  # [N, 2, B, k]
                y = self.op("Transpose", [y], hb, perm=[0, 2, 1, 3])  # [N, B, 2, k]
                outs.append(self.op("Reshape", [y, self.const("shape", [0, 0, 2 * k], np.int64)], hb))
            else:
                for r, direction in ((0, "forward"), (1, "reverse")):
                    if ks[r] == 0:
                        continue
                    w, rr, b = params[r]
                    y = self.op("LSTM", [xs, self.const(f"{hb}.W_{direction}", w[None]),
                                         self.const(f"{hb}.R_{direction}", rr[None]),
                                         self.const(f"{hb}.B_{direction}", b[None])],
                                f"{hb}.lstm_{direction}", hidden_size=ks[r], direction=direction)  # [N, 1, B, k]
                    outs.append(self.op("Squeeze", [y, self.const("axes", [1], np.int64)], hb))
            w, b = (t.detach() for t in m.head_proj_params(h))
            if outs:
                hcat = outs[0] if len(outs) == 1 else self.op("Concat", outs, hb, axis=2)  # [N, B, kf + kb]
                o = self.op("MatMul", [hcat, self.const(f"{hb}.head_proj.weight_t", _np(w).T)], hb)
                o = self.op("Add", [o, self.const(f"{hb}.head_proj.bias", _np(b))], hb)
            else:  # every unit of the head pruned: it emits its head_proj bias at every token
                o = self.op("Expand", [self.const(f"{hb}.head_proj.bias", _np(b)), self.op("Shape", [xs], hb)], hb)
            heads.append(o)
        cat = heads[0] if H == 1 else self.op("Concat", heads, f"{base}.heads", axis=2)  # [N, B, H*d]
        y = self.op("Transpose", [cat], f"{base}.batch_major", perm=[1, 0, 2])
        return self.linear(y, m.proj, f"{base}.proj")

    def attention(self, x: str, m: nn.Module, base: str) -> str:
        """timm Attention (no q/k norm, scale_norm or gate): softmax(q k^T * scale) v, proj."""
        for a in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(m, a, nn.Identity()), nn.Identity):
                raise ConfigError(f"{base}: attention with {a} is not exportable")
        if getattr(m, "gate", None) is not None:  # timm's gated=True: out * sigmoid(gate(x)) before proj
            raise ConfigError(f"{base}: gated attention (timm Attention gated=True) is not exportable")
        H, d = m.num_heads, m.head_dim
        qkv = self.linear(x, m.qkv, f"{base}.qkv")  # [B, N, 3*H*d]
        qkv = self.op("Reshape", [qkv, self.const("shape", [0, 0, 3, H, d], np.int64)], base)
        qkv = self.op("Transpose", [qkv], base, perm=[2, 0, 3, 1, 4])  # [3, B, H, N, d]
        q, k, v = (self.op("Gather", [qkv, self.const("idx", i, np.int64)], base, axis=0) for i in range(3))
        q = self.op("Mul", [q, self.const("scale", float(m.scale))], base)
        a = self.op("MatMul", [q, self.op("Transpose", [k], base, perm=[0, 1, 3, 2])], base)
        a = self.op("Softmax", [a], base, axis=-1)
        o = self.op("Transpose", [self.op("MatMul", [a, v], base)], base, perm=[0, 2, 1, 3])  # [B, N, H, d]
        o = self.op("Reshape", [o, self.const("shape", [0, 0, H * d], np.int64)], base)
        return self.linear(o, m.proj, f"{base}.proj")


def _check_model(model: nn.Module) -> None:
    from timm.models.vision_transformer import Block

    from far.models import attention_classes

    need = ("patch_embed", "blocks", "norm", "head", "pos_embed")
    if not all(hasattr(model, a) for a in need):
        raise ConfigError(f"{type(model).__name__} is not a timm VisionTransformer (needs {', '.join(need)})")
    pe = model.patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or not hasattr(pe, "img_size"):
        raise ConfigError(f"patch_embed {type(pe).__name__} is not exportable (a timm PatchEmbed: one Conv2d)")
    if getattr(model, "dist_token", None) is not None and (
            not isinstance(getattr(model, "head_dist", None), (nn.Linear, nn.Identity)) or model.global_pool != "token"):
        raise ConfigError("a distilled model is exportable with token pooling and a Linear head_dist only")
    if getattr(model, "dynamic_img_size", False):
        raise ConfigError("dynamic_img_size models are not exportable: build the model with a fixed image size")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg", ""):
        raise ConfigError(f"global_pool={model.global_pool!r} is not exportable (token or avg only)")
    for i, blk in enumerate(model.blocks):
        # the graph is Block's pre-norm x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x))): another forward (timm's
        # ResPostBlock: x + norm1(attn(x)); parallel blocks) would be exported as that, wrongly
        if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
            raise ConfigError(f"blocks.{i}: {type(blk).__name__} is not exportable: only timm's pre-norm Block "
                              "(x + attn(norm1(x)), x + mlp(norm2(x))) is")
        if not isinstance(blk.attn, (FARAttention, *attention_classes())):
            raise ConfigError(f"blocks.{i}.attn: {type(blk.attn).__name__} is not exportable")


def build_onnx(model: nn.Module, batch_size: Optional[int] = None):
    """The onnx.ModelProto of `model` (see the module doc); batch_size None = symbolic "batch"."""
    onnx = require_onnx()
    from far.models import unwrap

    model = unwrap(model)
    _check_model(model)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive int or None (dynamic), got {batch_size!r}")
    g = _Graph(onnx)
    pe = model.patch_embed
    conv = pe.proj
    in_chans = conv.in_channels
    img = tuple(pe.img_size)
    C = conv.out_channels
    x = "pixels"
    y = g.op("Conv", [x, g.const("patch_embed.proj.weight", _np(conv.weight))]
             + ([g.const("patch_embed.proj.bias", _np(conv.bias))] if conv.bias is not None else []),
             "patch_embed", kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
             pads=[conv.padding[0], conv.padding[1]] * 2 if not isinstance(conv.padding, str) else [0, 0, 0, 0])
    if getattr(pe, "flatten", True) is False or getattr(pe, "dynamic_img_pad", False):
        raise ConfigError("patch_embed without flatten or with dynamic padding is not exportable")
    y = g.op("Reshape", [y, g.const("shape", [0, C, -1], np.int64)], "patch_embed")
    y = g.op("Transpose", [y], "patch_embed", perm=[0, 2, 1])  # [B, L, C]
    y = g.layernorm(y, pe.norm, "patch_embed.norm")
    # prefix tokens and position embedding (timm _pos_embed, fixed size)
    batch = g.op("Slice", [g.op("Shape", [x], "batch"), g.const("s", [0], np.int64), g.const("e", [1], np.int64)],
                 "batch")
    prefix = []
    for attr in ("cls_token", "dist_token", "reg_token"):  # timm's order (a DeiT's distillation token second)
        t = getattr(model, attr, None)
        if t is not None:
            shape = g.op("Concat", [batch, g.const("shape", list(t.shape[1:]), np.int64)], attr, axis=0)
            prefix.append(g.op("Expand", [g.const(attr, _np(t)), shape], attr))
    pos = g.const("pos_embed", _np(model.pos_embed)) if model.pos_embed is not None else None  # pos_embed='none'
    if getattr(model, "no_embed_class", False):
        if pos is not None:
            y = g.op("Add", [y, pos], "pos_embed")
        if prefix:
            y = g.op("Concat", prefix + [y], "tokens", axis=1)
    else:
        if prefix:
            y = g.op("Concat", prefix + [y], "tokens", axis=1)
        if pos is not None:
            y = g.op("Add", [y, pos], "pos_embed")
    y = g.layernorm(y, getattr(model, "norm_pre", nn.Identity()), "norm_pre")
    for i, blk in enumerate(model.blocks):
        b = f"blocks.{i}"
        a = g.layernorm(y, blk.norm1, f"{b}.norm1")
        a = g.far_attention(a, blk.attn, f"{b}.attn") if isinstance(blk.attn, FARAttention) else \
            g.attention(a, blk.attn, f"{b}.attn")
        y = g.op("Add", [y, g.layerscale(a, getattr(blk, "ls1", nn.Identity()), f"{b}.ls1")], b)
        mm = g.mlp(g.layernorm(y, blk.norm2, f"{b}.norm2"), blk.mlp, f"{b}.mlp")
        y = g.op("Add", [y, g.layerscale(mm, getattr(blk, "ls2", nn.Identity()), f"{b}.ls2")], b)
    y = g.layernorm(y, model.norm, "norm")
    npt = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise ConfigError(f"head {type(model.head).__name__} is not exportable (Linear or Identity)")
    if getattr(model, "dist_token", None) is not None:  # DeiT distilled, at inference: the two heads' mean
        cls = g.op("Gather", [y, g.const("idx", 0, np.int64)], "pool", axis=1)
        dist = g.op("Gather", [y, g.const("idx", 1, np.int64)], "pool_dist", axis=1)
        if isinstance(model.head, nn.Linear):
            cls, dist = g.linear(cls, model.head, "head"), g.linear(dist, model.head_dist, "head_dist")
        y = g.op("Mul", [g.op("Add", [cls, dist], "head"), g.const("half", 0.5)], "head")
    else:
        if model.global_pool == "token":
            y = g.op("Gather", [y, g.const("idx", 0, np.int64)], "pool", axis=1)
        elif model.global_pool == "avg":  # over the patch tokens, or every token with pool_include_prefix
            start = 0 if getattr(model, "pool_include_prefix", False) else npt
            y = g.op("Slice", [y, g.const("s", [start], np.int64), g.const("e", [2**62], np.int64),
                               g.const("a", [1], np.int64)], "pool")
            y = g.op("ReduceMean", [y], "pool", axes=[1], keepdims=0)
        else:
            raise ConfigError("global_pool='' (no pooling) is not exportable: the graph's output is [B, classes]")
        y = g.layernorm(y, getattr(model, "fc_norm", nn.Identity()), "fc_norm")
        if isinstance(model.head, nn.Linear):
            y = g.linear(y, model.head, "head")
    g.nodes.append(onnx.helper.make_node("Identity", [y], ["logits"], name="output"))
    B = batch_size if batch_size is not None else "batch"
    out_dim = model.head.out_features if isinstance(model.head, nn.Linear) else C
    graph = onnx.helper.make_graph(
        g.nodes, "far_vit",
        [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, [B, in_chans, *img])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [B, out_dim])], g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="far", doc_string="FAR ViT: FARAttention blocks as ONNX LSTM ops")
    proto.ir_version = 8  # readable by onnxruntime and toolchains from 2021 on
    if _weight_bytes(proto) <= INLINE_LIMIT:  # a larger one cannot be serialized whole: checked by path once written
        onnx.checker.check_model(proto, full_check=True)
    return proto


# Protobuf cannot serialize a message of 2 GiB or more: graphs whose weights exceed this are written with their
# weights in a second file beside them (ONNX external data), which onnxruntime and onnx.load find by name.
INLINE_LIMIT = 2**31 - 2**26  # 2 GiB less 64 MiB for the graph itself


def _weight_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _externalize(proto, location: str) -> Callable[[str], None]:
    """Move the bytes of every initializer of 1 KiB or more out of `proto` into external-data references to
    `location` (64-byte aligned offsets); the small ones (shapes, indices) stay inline, where shape inference reads
    them, as in onnx's own writer. Returns a writer of the data file."""
    chunks, offset = [], 0
    for t in proto.graph.initializer:
        data = t.raw_data
        if len(data) < 1024:
            continue
        offset = -(-offset // 64) * 64
        chunks.append((offset, data))
        del t.external_data[:]
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        t.data_location = t.EXTERNAL
        t.ClearField("raw_data")
        offset += len(data)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for off, data in chunks:
                f.seek(off)
                f.write(data)
    return write


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], batch_size: Optional[int] = None, *,
                force: bool = True):
    """Write `model` (a timm ViT with FARAttention and/or attention blocks, float32 weights taken as they
    are, eval semantics: dropout and drop-path off) to `path` as ONNX opset 17, atomically; returns the
    onnx.ModelProto. batch_size: a fixed batch, or None for a symbolic one. Needs the optional package onnx.
    Weights above protobuf's 2 GiB limit (INLINE_LIMIT) go to `path` + ".data" beside the graph (ONNX external
    data; keep the two files together), written before the graph; if the graph cannot be written, a previous
    export's data file is put back (or a new one removed), so `path` and its data file still belong together."""
    onnx = require_onnx()  # a clear error if onnx is missing, before any work
    from far.utils.fs import atomic_write, check_output

    proto = build_onnx(model, batch_size)
    if _weight_bytes(proto) <= INLINE_LIMIT:
        atomic_write(path, proto.SerializeToString(), force=force)
        return proto
    data_path = Path(str(path) + ".data")
    check_output(path, force=force, writable=False)  # before the data file: no orphan beside a refused output
    write_data = _externalize(proto, data_path.name)
    graph = proto.SerializeToString()
    # The graph finds its data by name, so the new data file must be in place before the graph can be checked
    # and renamed over `path`. A previous export's data file is kept under a hard link meanwhile: if the graph
    # fails, it goes back, and the previous graph keeps the weights it was written with (one fixed name: a
    # link left by a killed export is replaced by the next one).
    backup = data_path.with_name(f".{data_path.name}.previous")
    kept, existed = False, os.path.lexists(data_path)
    if data_path.is_file() and not data_path.is_symlink():
        with contextlib.suppress(OSError):  # a file system without hard links: no rollback, as before
            if backup.exists():
                backup.unlink()
            os.link(data_path, backup)
            kept = True
    try:
        atomic_write(data_path, write_data, force=True)

        def write_graph(tmp: str) -> None:  # checked beside its data file before it replaces `path`
            with open(tmp, "wb") as f:
                f.write(graph)
            onnx.checker.check_model(tmp, full_check=True)
        atomic_write(path, write_graph, force=force)
    except BaseException:
        if kept:
            os.replace(backup, data_path)
            kept = False
        elif not existed:  # no data file before: none is left beside a graph that does not use it
            with contextlib.suppress(OSError):
                data_path.unlink()
        raise
    finally:
        if kept:
            with contextlib.suppress(OSError):
                backup.unlink()
    return proto
