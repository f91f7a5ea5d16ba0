"""Size, crop and aesthetic-score conditioning: the ADM vector `y` SDXL's UNet receives (FACTS.md §4, §5).

Every scalar is embedded separately with a 256-dim sinusoidal embedding (cos half first, then sin,
max period 10000, no frequency shift, float32: sgm `timestep_embedding`, ComfyUI `Timestep`) and
appended after the pooled bigG vector, in sgm's order:

* base    [pooled | h | w | crop_top | crop_left | target_h | target_w]  → 1280 + 6·256 = 2816
* refiner [pooled | h | w | crop_top | crop_left | aesthetic_score]      → 1280 + 5·256 = 2560

Heights come before widths here, while ComfyUI's nodes take `width, height, crop_w, crop_h,
target_width, target_height`; ComfyUI's `crop_h` is the top offset and `crop_w` the left one. To
keep the two orders from being mixed up, every size argument below is keyword-only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import SIZE_EMBED_DIM
from .errors import ConditioningError
from .types import Conditioning, TextEmbedding

MAX_PERIOD = 10_000.0


def fourier_embed(values: torch.Tensor | Sequence[float], dim: int = SIZE_EMBED_DIM,
                  max_period: float = MAX_PERIOD) -> torch.Tensor:
    """Scalars [N] → [N, dim] float32: [cos(t·f_0..f_{h−1}), sin(t·f_0..f_{h−1})], f_k = max_period^(−k/h), h = dim/2."""
    if dim % 2:
        raise ValueError(f"fourier_embed: dim must be even, got {dim}")
    t = torch.as_tensor(values).float().reshape(-1)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _check_scalars(**values: float) -> list[float]:
    out = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConditioningError(f"{name} must be a number, got {type(value).__name__}: {value!r:.80}")
        if not math.isfinite(value) or value < 0:
            raise ConditioningError(f"{name} must be a finite number ≥ 0, got {value}")
        out.append(float(value))
    return out


def _vector(pooled: torch.Tensor, scalars: list[float]) -> torch.Tensor:
    if pooled.ndim != 2:
        raise ConditioningError(f"pooled must be [batch, width], got shape {list(pooled.shape)}")
    emb = fourier_embed(torch.tensor(scalars, dtype=torch.float32, device=pooled.device))  # (n, 256)
    emb = emb.reshape(1, -1).expand(pooled.shape[0], -1)  # (B, n·256), same sizes for every row
    return torch.cat([pooled.float(), emb], dim=-1)


def base_vector(pooled: torch.Tensor, *, height: float, width: float, crop_h: float = 0, crop_w: float = 0,
                target_height: float | None = None, target_width: float | None = None) -> torch.Tensor:
    """Base ADM vector [B, P + 6·256] (2816 for SDXL): pooled, then h, w, crop_h (top), crop_w (left), target h, w.

    height/width: the "original size" (ComfyUI `height`, `width`); crop_h/crop_w: the crop's top and left
    offsets; target_*: default to height/width. All in pixels, finite and ≥ 0.
    """
    target_height = height if target_height is None else target_height
    target_width = width if target_width is None else target_width
    scalars = _check_scalars(height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                             target_height=target_height, target_width=target_width)
    return _vector(pooled, scalars)


def refiner_vector(pooled: torch.Tensor, *, height: float, width: float, crop_h: float = 0, crop_w: float = 0,
                   aesthetic_score: float = 6.0) -> torch.Tensor:
    """Refiner ADM vector [B, P + 5·256] (2560 for SDXL): pooled, then h, w, crop_h (top), crop_w (left), score.

    sgm uses aesthetic 6.0 for the positive and 2.5 for the negative prompt (ComfyUI's `ascore`).
    """
    scalars = _check_scalars(height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                             aesthetic_score=aesthetic_score)
    return _vector(pooled, scalars)


def base_conditioning(text: TextEmbedding, *, width: float = 1024, height: float = 1024, crop_w: float = 0,
                      crop_h: float = 0, target_width: float | None = None,
                      target_height: float | None = None) -> Conditioning:
    """ComfyUI CLIPTextEncodeSDXL's sizes (same names) + an encoded prompt → base Conditioning."""
    vector = base_vector(text.pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                         target_height=target_height, target_width=target_width)
    return Conditioning(crossattn=text.crossattn, vector=vector)


def refiner_conditioning(text: TextEmbedding, *, width: float = 1024, height: float = 1024,
                         aesthetic_score: float = 6.0, crop_w: float = 0, crop_h: float = 0) -> Conditioning:
    """ComfyUI CLIPTextEncodeSDXLRefiner (`ascore`, `width`, `height`; crop 0) + a prompt → refiner Conditioning."""
    vector = refiner_vector(text.pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                            aesthetic_score=aesthetic_score)
    return Conditioning(crossattn=text.crossattn, vector=vector)
