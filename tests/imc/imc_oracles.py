"""Independent oracles for the far.imc tests: DESIGN.md's quantizers (fp32 math, round half to even)
and quantized products in float64, written from the spec, not from far_kernels' code."""
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


def quantize_rows(t: torch.Tensor, bits: int, per_row: bool):
    """t [M, K] -> (t_q [M, K] float64 integers, s [M] float64) with s = max|t| / (2^(bits-1) - 1) per
    row (or over the tensor), computed in fp32 as the spec says."""
    t32 = t.detach().float()
    L = 2 ** (bits - 1) - 1
    a = t32.abs().amax(dim=1) if per_row else t32.abs().amax().expand(t32.shape[0])
    s = a / L
    div = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(t32 / div[:, None]).clamp(-L, L)
    return q.double(), s.double()


def exact_product(x: torch.Tensor, w: torch.Tensor, cfg, bias=None) -> torch.Tensor:
    """The exactness law's right side in float64: s_x * s_w * (x_q @ w_q.T) + bias, x [..., K], w [N, K]."""
    lead = x.shape[:-1]
    xq, sx = quantize_rows(x.reshape(-1, x.shape[-1]), cfg.input_bits, cfg.input_scale == "row")
    wq, sw = quantize_rows(w, cfg.weight_bits, cfg.weight_scale == "channel")
    y = (xq @ wq.T) * sx[:, None] * sw[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*lead, w.shape[0])


def tiny_vit(**kw) -> nn.Module:
    """A 2-block ViT on 8x8x1 images (patch 4: 4 tokens + CLS), 3 classes: fast on a CPU."""
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2,
                mlp_ratio=2.0, qkv_bias=True)
    args.update(kw)
    return VisionTransformer(**args).eval()
