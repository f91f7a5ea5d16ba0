"""Tiled VAE decode/encode: the blending is exact for a per-pixel map, and full-image tiles are the identity."""

from __future__ import annotations

import pytest
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


# --- interrupt inside the VAE (issue 10, item 8) --------------------------------------------------


class _StopAfter:
    """A should_stop that says "stop" on its n-th poll; counts polls."""

    def __init__(self, n):
        self.n, self.polls = n, 0

    def __call__(self):
        self.polls += 1
        return self.polls >= self.n


def test_tiled_decode_stops_at_the_next_tile(tiny_refiner):
    # Catches a tiled decode that never polls (the interrupt took 32 s inside a 2048² decode): a
    # 24×24 latent in 8-pixel tiles is 16 tiles; a stop requested during tile 3 must end it there.
    from sdxl_nodes.sdxl_core.errors import Cancelled

    vae = tiny_refiner.vae
    calls = []
    real_decode = vae.decode

    def counting_decode(t, should_stop=None):
        calls.append(t.shape)
        return real_decode(t, should_stop)

    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(3))
    per_tile = 1 + len(vae.decoder.up)  # once before each tile, once per decoder level inside it
    stop = _StopAfter(2 * per_tile + 2)  # "stop" arrives inside tile 3 (its first decoder level)
    vae.decode = counting_decode
    try:
        with torch.inference_mode(), pytest.raises(Cancelled):
            decode_tiled(vae, z, tile=8, overlap=2, should_stop=stop)  # 16 tiles
    finally:
        del vae.decode
    assert len(calls) == 3


def test_whole_decode_and_encode_poll_between_levels(tiny_refiner):
    # Catches a whole-image decode/encode that cannot be stopped between its resolution levels.
    from sdxl_nodes.sdxl_core.errors import Cancelled

    vae = tiny_refiner.vae
    levels = len(vae.decoder.up)
    with torch.inference_mode():
        stop = _StopAfter(2)
        with pytest.raises(Cancelled, match="VAE decode"):
            vae.decode(torch.zeros(1, 4, 4, 4), should_stop=stop)
        assert stop.polls == 2
        never = _StopAfter(10**9)
        vae.decode(torch.zeros(1, 4, 4, 4), should_stop=never)
        assert never.polls == levels
        stop = _StopAfter(1)
        with pytest.raises(Cancelled, match="VAE encode"):
            vae.encode(torch.zeros(1, 3, 32, 32), should_stop=stop)


def test_vae_decode_node_turns_a_stop_into_the_hosts_interrupt(tiny_refiner, monkeypatch):
    # Through the node: our executor's reporter says "interrupted" → the node raises the executor's
    # Interrupted (the run ends as interrupted, not as an error) after one tile, not after all of them.
    from sdxl_nodes.nodes import images
    from sdxl_nodes.runtime.executor import Interrupted

    class Reporter:
        polls = 0
        preview_method = "default"

        @property
        def interrupted(self):
            Reporter.polls += 1
            return Reporter.polls > 1

        def check_interrupted(self):
            if self.interrupted:
                raise Interrupted("stop")

    class Handle:
        def load(self):
            return tiny_refiner.vae

    monkeypatch.setattr(images, "TILE_ABOVE_LATENT_PIXELS", 0)  # tiled from the first latent pixel
    with pytest.raises(Interrupted):
        images.VAEDecode().run(Handle(), {"samples": torch.zeros(1, 4, 160, 160)}, progress=Reporter())
    assert Reporter.polls <= 4


def test_tiled_polls_before_every_tile():
    # Catches a tile loop without its own poll (a decoder that never polls could then not be stopped).
    from sdxl_nodes.sdxl_core.errors import Cancelled

    calls = []

    def fn(t):
        calls.append(1)
        return F.interpolate(t[:, :3], scale_factor=8, mode="nearest")

    stop = _StopAfter(3)
    with pytest.raises(Cancelled, match="tiled VAE"):
        tiled(fn, torch.zeros(1, 4, 40, 40), 16, 4, 8, 3, should_stop=stop)
    assert len(calls) == 2 and stop.polls == 3


def test_tiles_follow_comfyuis_positions_and_feathered_weights():
    # Hand derivation of ComfyUI's tiled_scale on one row of 11 pixels, tile 6, overlap 2, scale 1:
    # tiles start at range(0, 11 - 2, 6 - 2) = 0, 4, 8 (the last one 3 wide, not moved back to 5);
    # weights (t + 1) / 2 at both ends of every tile: [.5, 1, 1, 1, 1, .5] and [.5, 1, .5] for the short one.
    # Each tile's output is its mean (pixel value = column index): 2.5, 6.5, 9.0.
    # catches: the last tile aligned to the end, borders not feathered, ramps of the wrong length or start
    x = torch.arange(11, dtype=torch.float32).view(1, 1, 1, 11).repeat(1, 1, 4, 1)

    def tile_mean(t):
        return torch.full_like(t, float(t.mean()))

    row = tiled(tile_mean, x, 6, 2, 1, 1)[0, 0, 0]
    a, b, c = 2.5, 6.5, 9.0
    want = torch.tensor([a, a, a, a, (a + 0.5 * b) / 1.5, (0.5 * a + b) / 1.5, b, b,
                         (b + 0.5 * c) / 1.5, (0.5 * b + c) / 1.5, c])
    assert torch.allclose(row, want, atol=1e-6), row


def test_three_pass_tiled_decode_uses_comfyuis_three_tilings():
    # ComfyUI VAE.decode_tiled_ with tile 8, overlap 2 on a 12×12 latent (derived by hand from its code):
    # (H, W) tiles (16, 4): H fits, W starts range(0, 10, 2) → 5 tiles of 12×4; then (4, 16): 5 tiles of 4×12;
    # then (8, 8): starts 0, 6 each way → 8×8, 8×6, 6×8, 6×6. The result is the mean of the three passes.
    # catches: a pass missing or with H and W swapped, the mean taken over two passes
    from sdxl_nodes.sdxl_core.vae import decode_tiled_3

    shapes = []

    class Spy:
        def decode(self, t, should_stop=None):
            shapes.append(tuple(t.shape[-2:]))
            return torch.nn.functional.interpolate(t[:, :3], scale_factor=8, mode="nearest")

    z = torch.randn(1, 4, 12, 12)
    out = decode_tiled_3(Spy(), z, tile=8, overlap=2)
    assert shapes == [(12, 4)] * 5 + [(4, 12)] * 5 + [(8, 8), (8, 6), (6, 8), (6, 6)]
    # a pointwise decoder: each pass reconstructs it exactly, so the mean does too
    assert torch.allclose(out, torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest"), atol=1e-5)
