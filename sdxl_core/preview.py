"""Cheap live previews: a latent projected to RGB with a fixed linear map (no VAE).

The factors are SDXL's latent→RGB approximation (ComfyUI `comfy/latent_formats.py`, class SDXL),
applied to the sampler's model-space x0 prediction (raw latent × 0.13025).
"""

from __future__ import annotations

import torch

SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_to_rgb(x0: torch.Tensor, index: int = 0) -> torch.Tensor:
    """x0 (B, 4, h, w) in model space → uint8 image (h, w, 3) of batch item `index`, on the CPU."""
    factors = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = x0[index].detach().float().cpu().permute(1, 2, 0) @ factors + bias  # (h, w, 3) in about [-1, 1]
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
