"""Modules: FARAttention, the multi-head BiLSTM token mixer that replaces a ViT self-attention."""
from far.nn.far_attention import FARAttention

__all__ = ["FARAttention"]
