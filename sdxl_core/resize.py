"""Resizing latents and images as ComfyUI's LatentUpscale / ImageScale nodes do (``comfy.utils.common_upscale``).

Tensors are [B, C, H, W]. Methods: ``nearest-exact``, ``bilinear``, ``area``, ``bicubic`` (torch
``interpolate`` with its defaults, align_corners off), ``bislerp`` (latents: spherical interpolation
of each pixel's channel vector, first along the width, then along the height) and ``lanczos``
(images: PIL's Lanczos on 8-bit pixels). ``crop="center"`` first cuts the input to the target's
aspect ratio, centred.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import SDXLError

LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")


class ResizeError(SDXLError, ValueError):
    """An unknown method or an impossible size."""


def _slerp_rows(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows of a [N, C] and b [N, C] interpolated by t [N, 1] on the sphere, norms interpolated linearly."""
    channels = a.shape[-1]
    norm_a = torch.norm(a, dim=-1, keepdim=True)
    norm_b = torch.norm(b, dim=-1, keepdim=True)
    unit_a = a / norm_a
    unit_b = b / norm_b
    unit_a[norm_a.expand(-1, channels) == 0.0] = 0.0
    unit_b[norm_b.expand(-1, channels) == 0.0] = 0.0
    cos = (unit_a * unit_b).sum(1)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    out = (torch.sin((1.0 - t.squeeze(1)) * angle) / sin).unsqueeze(1) * unit_a \
        + (torch.sin(t.squeeze(1) * angle) / sin).unsqueeze(1) * unit_b
    out *= (norm_a * (1.0 - t) + norm_b * t).expand(-1, channels)
    same = cos > 1 - 1e-5  # (almost) the same direction: keep a
    out[same] = a[same]
    opposite = cos < 1e-5 - 1  # opposite directions: plain linear interpolation
    out[opposite] = (a * (1.0 - t) + b * t)[opposite]
    return out


def _neighbours(n_old: int, n_new: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each new position: (fraction, left index, right index) from a bilinear resize of the index ramp."""
    ramp = torch.arange(n_old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)
    pos = torch.nn.functional.interpolate(ramp, size=(1, n_new), mode="bilinear")
    frac = pos - pos.floor()
    left = pos.to(torch.int64)
    ramp_right = torch.arange(n_old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1) + 1
    ramp_right[:, :, :, -1] -= 1
    right = torch.nn.functional.interpolate(ramp_right, size=(1, n_new), mode="bilinear").to(torch.int64)
    return frac, left, right


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize [B, C, H, W] to (height, width) by slerping channel vectors between neighbours."""
    dtype = samples.dtype
    x = samples.float()
    n, c, h, w = x.shape

    frac, left, right = _neighbours(w, width, x.device)
    left, right = left.expand(n, c, h, -1), right.expand(n, c, h, -1)
    frac = frac.expand(n, 1, h, -1)
    a = x.gather(-1, left).movedim(1, -1).reshape(-1, c)
    b = x.gather(-1, right).movedim(1, -1).reshape(-1, c)
    x = _slerp_rows(a, b, frac.movedim(1, -1).reshape(-1, 1)).reshape(n, h, width, c).movedim(-1, 1)

    frac, left, right = _neighbours(h, height, x.device)
    left = left.reshape(1, 1, -1, 1).expand(n, c, -1, width)
    right = right.reshape(1, 1, -1, 1).expand(n, c, -1, width)
    frac = frac.reshape(1, 1, -1, 1).expand(n, 1, -1, width)
    a = x.gather(-2, left).movedim(1, -1).reshape(-1, c)
    b = x.gather(-2, right).movedim(1, -1).reshape(-1, c)
    x = _slerp_rows(a, b, frac.movedim(1, -1).reshape(-1, 1)).reshape(n, height, width, c).movedim(-1, 1)
    return x.to(dtype)


def lanczos(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL Lanczos on each image quantised to 8 bits (as ComfyUI), back to float in 0..1."""
    out = []
    for image in images:
        arr = np.clip(255.0 * image.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8)
        resized = Image.fromarray(arr).resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.array(resized).astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(images.device, images.dtype)


def center_crop_to_aspect(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Cut [.., H, W] to the aspect ratio width:height, centred (rounding as ComfyUI)."""
    old_w, old_h = x.shape[-1], x.shape[-2]
    old_aspect, new_aspect = old_w / old_h, width / height
    dx = dy = 0
    if old_aspect > new_aspect:
        dx = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        dy = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x.narrow(-2, dy, old_h - 2 * dy).narrow(-1, dx, old_w - 2 * dx)


def resize(x: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """[B, C, H, W] → [B, C, height, width] with one of the methods above."""
    if method not in LATENT_METHODS + IMAGE_METHODS:
        raise ResizeError(f"unknown upscale_method {method!r}; expected one of "
                          f"{', '.join(dict.fromkeys(LATENT_METHODS + IMAGE_METHODS))}")
    if crop not in CROP_METHODS:
        raise ResizeError(f"unknown crop {crop!r}; expected one of {', '.join(CROP_METHODS)}")
    if width < 1 or height < 1:
        raise ResizeError(f"cannot resize to {width}×{height}; both sides must be at least 1")
    if crop == "center":
        x = center_crop_to_aspect(x, width, height)
    if method == "bislerp":
        return bislerp(x, width, height)
    if method == "lanczos":
        return lanczos(x, width, height)
    return torch.nn.functional.interpolate(x, size=(height, width), mode=method)
