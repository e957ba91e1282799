"""Our own small re-creation of the public code's dense attention layout (github.com/aliothren/FAR,
modeling/architectures.py MultiHeadLstm and ParallelLSTM, the latter made by modeling/multi2parallel.py): the
state-dict keys and tensor shapes as they are, built from torch.nn.LSTM and block-diagonal masks. No code of theirs
is copied."""
import sys
import types

import torch
import torch.nn as nn


def head_block_mask(rows: int, cols: int, heads: int, gates: int) -> torch.Tensor:
    """1 where head h's `rows` rows (in each of `gates` gate blocks) meet head h's `cols` columns."""
    m = torch.zeros(gates * heads * rows, heads * cols)
    for g in range(gates):
        for h in range(heads):
            r0 = g * heads * rows + h * rows
            m[r0:r0 + rows, h * cols:(h + 1) * cols] = 1
    return m


class DenseMultiHeadLstm(nn.Module):
    """pre_proj -> one bidirectional nn.LSTM(C, C) with block-diagonal (per-head) weights -> head_proj
    Linear(2C, C) masked to [fwd block-diag | bwd block-diag] -> post_proj. forward returns the tensor
    (theirs also returns the head_proj output as a second value)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        d = dim // heads
        self.heads = heads
        self.pre_proj = nn.Linear(dim, dim)
        self.lstm = nn.LSTM(dim, dim, bidirectional=True, batch_first=True)
        self.head_proj = nn.Linear(2 * dim, dim)
        self.post_proj = nn.Linear(dim, dim)
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("weight"):
                    p.mul_(head_block_mask(d, d, heads, 4))
            hm = head_block_mask(d, d, heads, 1)
            self.head_proj.weight.mul_(torch.cat([hm, hm], dim=1))

    def prune_units(self, direction: int, units, zero_bias: bool = False) -> None:
        """What their prune.py does to hidden units (global indices in [0, C)) of one direction: zero the
        4 gate rows of weight_ih and weight_hh and the weight_hh column; biases (and head_proj) stay unless
        zero_bias, which also zeroes the unit's b_g (tanh(b_g) = 0: the unit emits exactly 0)."""
        sfx = "_l0_reverse" if direction else "_l0"
        C = self.lstm.hidden_size
        with torch.no_grad():
            for u in units:
                rows = [g * C + u for g in range(4)]
                getattr(self.lstm, "weight_ih" + sfx)[rows] = 0
                getattr(self.lstm, "weight_hh" + sfx)[rows] = 0
                getattr(self.lstm, "weight_hh" + sfx)[:, u] = 0
                if zero_bias:
                    getattr(self.lstm, "bias_ih" + sfx)[2 * C + u] = 0
                    getattr(self.lstm, "bias_hh" + sfx)[2 * C + u] = 0

    def forward(self, x, attn_mask=None, is_causal=False):  # timm's Block passes the two keywords
        return self.post_proj(self.head_proj(self.lstm(self.pre_proj(x))[0]))


class ParallelHeadsLstm(nn.Module):
    """The hardware form: pre_proj, lstms.{h} = nn.LSTM(C/H, d, bidirectional), head_projs.{h} Linear(2d, d),
    post_proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        d = dim // heads
        self.pre_proj = nn.Linear(dim, dim)
        self.lstms = nn.ModuleList([nn.LSTM(d, d, bidirectional=True, batch_first=True) for _ in range(heads)])
        self.head_projs = nn.ModuleList([nn.Linear(2 * d, d) for _ in range(heads)])
        self.post_proj = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.pre_proj(x)
        parts = x.chunk(len(self.lstms), dim=-1)
        return self.post_proj(torch.cat([hp(l(p)[0]) for l, hp, p in zip(self.lstms, self.head_projs, parts)], -1))


def public_vit(heads: int = 3, depth: int = 2, dim: int = 48, seed: int = 0, num_classes: int = 5):
    """A tiny timm ViT whose blocks hold DenseMultiHeadLstm as `attn` (keys as their BlockWithOutput:
    norm1, attn.*, norm2, mlp.*)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=dim, depth=depth, num_heads=heads,
                          num_classes=num_classes)
    for blk in m.blocks:
        blk.attn = DenseMultiHeadLstm(dim, heads)
    with torch.no_grad():  # nonzero tokens and position embeddings (timm starts some at 0)
        m.cls_token.normal_(0, 0.5)
        m.pos_embed.normal_(0, 0.5)
    return m.eval()


def as_their_module(cls, module_name: str = "modeling.architectures"):
    """A copy of class `cls` that pickles as `module_name`.<cls name> (their classes' pickle path), and a
    function that makes that module unimportable again."""
    mod = types.ModuleType(module_name)
    parent = types.ModuleType(module_name.split(".")[0])
    sys.modules[parent.__name__] = parent
    sys.modules[module_name] = mod
    new = type(cls.__name__, (cls,), {"__module__": module_name})
    new.__qualname__ = cls.__name__
    setattr(mod, cls.__name__, new)

    def forget():
        sys.modules.pop(module_name, None)
        sys.modules.pop(parent.__name__, None)

    return new, forget
