"""Tiled VAE decode/encode: the blending is exact for a per-pixel map, and full-image tiles are the identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdxl_nodes.sdxl_core.vae import decode_tiled, tiled


def test_tiled_blend_reconstructs_a_pointwise_map_exactly():
    x = torch.randn(2, 4, 37, 53, generator=torch.Generator().manual_seed(0))

    def upsample(t):  # any map whose output pixel depends only on its own input pixel
        return F.interpolate(t[:, :3] * 2 + 1, scale_factor=8, mode="nearest")

    full = upsample(x)
    for tile, overlap in ((16, 4), (20, 8), (64, 16)):
        out = tiled(upsample, x, tile, overlap, 8, 3)
        assert out.shape == full.shape
        assert torch.allclose(out, full, atol=1e-5), (tile, overlap)


def test_tiled_downscale_for_encode():
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1))

    def pool(t):
        return F.avg_pool2d(t, 8).repeat(1, 2, 1, 1)[:, :4]

    assert torch.allclose(tiled(pool, x, 32, 16, 1 / 8, 4), pool(x), atol=1e-5)


def test_decode_tiled_equals_decode_when_one_tile_covers_it(tiny_refiner):
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.allclose(decode_tiled(tiny_refiner.vae, z, tile=64), tiny_refiner.vae.decode(z), atol=1e-6)
