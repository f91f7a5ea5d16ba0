"""Architecture configs for SDXL 1.0 base and refiner, and tiny presets for tests.

Numbers come from Stability's `configs/inference/sd_xl_{base,refiner}.yaml` (generative-models) and
ComfyUI's `comfy/supported_models.py`; see ../shared/sdxl/FACTS.md §2, §3, §6, §13.
"""

from __future__ import annotations

from dataclasses import dataclass

SIZE_EMBED_DIM = 256  # every size/crop/aesthetic scalar is a 256-dim Fourier embedding
LATENT_SCALE = 0.13025  # SDXL VAE scale factor; no shift (unlike Playground 2.5)
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
BOS_TOKEN = 49406
EOS_TOKEN = 49407


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int
    channel_mult: tuple[int, ...]
    # transformer blocks per SpatialTransformer at each level; 0 = that level has no attention
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int
    adm_in_channels: int  # pooled text width + n_scalars * 256
    num_head_channels: int = 64  # heads = channels // num_head_channels
    num_res_blocks: int = 2
    in_channels: int = 4
    out_channels: int = 4

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int
    layers: int
    heads: int
    mlp_width: int
    activation: str  # "quick_gelu" (CLIP-L) or "gelu" (OpenCLIP bigG, exact erf)
    projection_dim: int | None  # bigG has a text projection; CLIP-L's is not in the file
    pad_token: int  # CLIP-L pads with EOS 49407, bigG with 0 ("!")
    vocab_size: int = VOCAB_SIZE
    max_length: int = CONTEXT_LENGTH


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    scale_factor: float = LATENT_SCALE


@dataclass(frozen=True)
class SDXLConfig:
    """One checkpoint's architecture: which networks it carries and their sizes."""

    kind: str  # "base" or "refiner"
    unet: UNetConfig
    vae: VAEConfig
    clip_l: TextEncoderConfig | None  # base only
    clip_g: TextEncoderConfig
    n_size_scalars: int  # base: h, w, top, left, target_h, target_w; refiner: h, w, top, left, ascore

    @property
    def is_refiner(self) -> bool:
        return self.kind == "refiner"

    @property
    def context_dim(self) -> int:
        return self.unet.context_dim


CLIP_L = TextEncoderConfig(
    width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu", projection_dim=None,
    pad_token=EOS_TOKEN,
)
CLIP_G = TextEncoderConfig(
    width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280, pad_token=0,
)

BASE = SDXLConfig(
    kind="base",
    unet=UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 2, 10),  # yaml says [1, 2, 10] but level 0 has no attention
        transformer_depth_middle=10,
        context_dim=768 + 1280,  # CLIP-L first, then bigG
        adm_in_channels=1280 + 6 * SIZE_EMBED_DIM,  # 2816
    ),
    vae=VAEConfig(),
    clip_l=CLIP_L,
    clip_g=CLIP_G,
    n_size_scalars=6,
)

REFINER = SDXLConfig(
    kind="refiner",
    unet=UNetConfig(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(0, 4, 4, 0),  # yaml: depth 4 at attention levels 1 and 2 only
        transformer_depth_middle=4,
        context_dim=1280,  # bigG only
        adm_in_channels=1280 + 5 * SIZE_EMBED_DIM,  # 2560
    ),
    vae=VAEConfig(),
    clip_l=None,
    clip_g=CLIP_G,
    n_size_scalars=5,
)

# Tiny presets (FACTS.md §13): same key names, block counts and tensor ranks; widths shrunk to
# multiples of 32 (GroupNorm(32)); vocabulary and context length unchanged.
TINY_CLIP_L = TextEncoderConfig(
    width=32, layers=3, heads=2, mlp_width=64, activation="quick_gelu", projection_dim=None, pad_token=EOS_TOKEN,
)
TINY_CLIP_G = TextEncoderConfig(
    width=64, layers=3, heads=2, mlp_width=128, activation="gelu", projection_dim=64, pad_token=0,
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2))

TINY_BASE = SDXLConfig(
    kind="base",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 1, 2),
        transformer_depth_middle=2,
        context_dim=TINY_CLIP_L.width + TINY_CLIP_G.width,
        adm_in_channels=TINY_CLIP_G.projection_dim + 6 * SIZE_EMBED_DIM,
        num_head_channels=32,
    ),
    vae=TINY_VAE,
    clip_l=TINY_CLIP_L,
    clip_g=TINY_CLIP_G,
    n_size_scalars=6,
)

TINY_REFINER = SDXLConfig(
    kind="refiner",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(0, 1, 1, 0),
        transformer_depth_middle=1,
        context_dim=TINY_CLIP_G.width,
        adm_in_channels=TINY_CLIP_G.projection_dim + 5 * SIZE_EMBED_DIM,
        num_head_channels=32,
    ),
    vae=TINY_VAE,
    clip_l=None,
    clip_g=TINY_CLIP_G,
    n_size_scalars=5,
)

PRESETS = {"base": BASE, "refiner": REFINER, "tiny_base": TINY_BASE, "tiny_refiner": TINY_REFINER}
