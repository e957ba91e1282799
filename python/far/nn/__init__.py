"""Modules: FARAttention, the multi-head BiLSTM token mixer that replaces a ViT self-attention, and
taps that record what each block's token mixer reads and hands to W_O."""
from far.nn.far_attention import FARAttention
from far.nn.taps import MixerTaps, token_mixers

__all__ = ["FARAttention", "MixerTaps", "token_mixers"]
