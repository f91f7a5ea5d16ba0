"""Plain data carried between sdxl_core steps (and, wrapped by nodes, between graph nodes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextEmbedding:
    """An encoded prompt pair, before size/crop conditioning.

    crossattn: [B, 77*k, context_dim] penultimate hidden states (CLIP-L ++ bigG for the base, bigG
    alone for the refiner), token weights already applied.
    pooled: [B, pooled_dim] bigG pooled projection of the first chunk.
    """

    crossattn: torch.Tensor
    pooled: torch.Tensor
    kind: str = ""  # "base" or "refiner": which checkpoint's encoders made it (checked when wiring)


@dataclass
class Conditioning:
    """What the UNet receives besides the latent: context tokens and the ADM vector.

    crossattn: [B, T, context_dim]; vector: [B, adm_in_channels] (2816 base, 2560 refiner).
    """

    crossattn: torch.Tensor
    vector: torch.Tensor
    kind: str = ""  # "base" or "refiner": which UNet this conditioning fits
