"""Size/crop/aesthetic ADM vectors against diffusers' Timesteps embedding (FACTS.md §4, §5)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import Timesteps

from sdxl_nodes.sdxl_core.conditioning import (
    base_conditioning,
    base_vector,
    fourier_embed,
    refiner_conditioning,
    refiner_vector,
)
from sdxl_nodes.sdxl_core.errors import ConditioningError
from sdxl_nodes.sdxl_core.types import TextEmbedding

DIFFUSERS = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)


def _diffusers_vector(pooled: torch.Tensor, scalars: list[float]) -> torch.Tensor:
    emb = DIFFUSERS(torch.tensor(scalars, dtype=torch.float32))  # (n, 256)
    return torch.cat([pooled, emb.reshape(1, -1).expand(pooled.shape[0], -1)], dim=-1)


def test_fourier_equals_diffusers_and_formula():
    t = torch.tensor([0.0, 1.0, 2.5, 6.0, 512.0, 1024.0, 4096.0])
    got = fourier_embed(t)
    assert got.shape == (7, 256) and got.dtype == torch.float32
    torch.testing.assert_close(got, DIFFUSERS(t), rtol=0, atol=0)
    # cos first, then sin; frequency 1 at k = 0, 10000^(-1/128) at k = 1
    assert got[5, 0] == pytest.approx(math.cos(1024.0), abs=1e-4)
    assert got[5, 128] == pytest.approx(math.sin(1024.0), abs=1e-4)
    assert got[1, 1] == pytest.approx(math.cos(10000 ** (-1 / 128)), abs=1e-6)
    assert torch.equal(fourier_embed(torch.zeros(1))[0], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_base_vector_equals_diffusers():
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    got = base_vector(pooled, height=896, width=1152, crop_h=16, crop_w=48, target_height=1024, target_width=1024)
    assert got.shape == (2, 2816)
    expected = _diffusers_vector(pooled, [896, 1152, 16, 48, 1024, 1024])  # h, w, top, left, target h, w
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_refiner_vector_equals_diffusers():
    pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(1))
    got = refiner_vector(pooled, height=768, width=1344, crop_h=8, crop_w=0, aesthetic_score=2.5)
    assert got.shape == (1, 2560)
    torch.testing.assert_close(got, _diffusers_vector(pooled, [768, 1344, 8, 0, 2.5]), rtol=0, atol=0)


def test_comfyui_node_order_maps_to_h_first():
    """ComfyUI's widgets are width, height, crop_w, crop_h, target_width, target_height; the vector is h first."""
    text = TextEmbedding(crossattn=torch.zeros(1, 77, 2048), pooled=torch.zeros(1, 1280))
    cond = base_conditioning(text, width=1152, height=896, crop_w=48, crop_h=16, target_width=1024,
                             target_height=768)
    expected = _diffusers_vector(text.pooled, [896, 1152, 16, 48, 768, 1024])
    torch.testing.assert_close(cond.vector, expected, rtol=0, atol=0)
    assert cond.crossattn is text.crossattn


def test_defaults():
    text = TextEmbedding(crossattn=torch.zeros(1, 77, 1280), pooled=torch.ones(1, 1280))
    base = base_conditioning(text, width=1024, height=640)  # target defaults to the size, crop to 0
    torch.testing.assert_close(base.vector, _diffusers_vector(text.pooled, [640, 1024, 0, 0, 640, 1024]))
    ref = refiner_conditioning(text, width=1024, height=640)  # aesthetic 6.0, crop 0
    torch.testing.assert_close(ref.vector, _diffusers_vector(text.pooled, [640, 1024, 0, 0, 6.0]))


@pytest.mark.parametrize(("name", "value"), [
    ("height", float("nan")), ("width", -1), ("crop_h", float("inf")), ("crop_w", -0.5),
    ("target_height", float("-inf")), ("target_width", float("nan")),
])
def test_bad_base_sizes(name, value):
    kwargs = dict(height=1024, width=1024, crop_h=0, crop_w=0, target_height=1024, target_width=1024)
    kwargs[name] = value
    with pytest.raises(ConditioningError, match=f"{name} must be a finite number ≥ 0, got {value}"):
        base_vector(torch.zeros(1, 1280), **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_bad_aesthetic_score(value):
    with pytest.raises(ConditioningError, match=f"aesthetic_score must be a finite number ≥ 0, got {value}"):
        refiner_vector(torch.zeros(1, 1280), height=1024, width=1024, aesthetic_score=value)


@pytest.mark.parametrize("value", ["1024", None, True])
def test_non_number_size(value):
    with pytest.raises(ConditioningError, match=f"width must be a number, got {type(value).__name__}"):
        base_vector(torch.zeros(1, 1280), height=1024, width=value)


def test_pooled_must_be_2d():
    with pytest.raises(ConditioningError, match=r"pooled must be \[batch, width\], got shape \[1280\]"):
        base_vector(torch.zeros(1280), height=1024, width=1024)


def test_sizes_are_keyword_only():
    with pytest.raises(TypeError):
        base_vector(torch.zeros(1, 1280), 1024, 1024)  # type: ignore[misc]
