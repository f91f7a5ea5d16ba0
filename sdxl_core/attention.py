"""The one attention function every network here uses, over `F.scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head softmax attention with scale 1/√d; q (B, Tq, C), k/v (B, Tk, C) → (B, Tq, C).

    causal: query i attends to keys 0..i only (CLIP's text transformer).
    """
    q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=heads) for t in (q, k, v))  # (B, heads, T, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return rearrange(out, "b h t d -> b t (h d)")
