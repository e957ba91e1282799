"""Modules: FARAttention, the multi-head BiLSTM token mixer that replaces a ViT self-attention; taps that
record what each block's token mixer reads and hands to W_O; attention reuse (TReX-style)."""
from far.nn.far_attention import FARAttention
from far.nn.reuse import ReuseAttention, apply_reuse, reuse_plan
from far.nn.taps import MixerTaps, token_mixers

__all__ = ["FARAttention", "MixerTaps", "ReuseAttention", "apply_reuse", "reuse_plan", "token_mixers"]
