"""CLIP's text transformer in plain PyTorch: SDXL's CLIP ViT-L/14 and OpenCLIP ViT-bigG/14.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP, §2.4 and Fig. 3: a causal pre-LN transformer read out at the EOS token);
open_clip `model.py` `TextTransformer` (bigG, exact gelu); transformers `modeling_clip.py`
(the module names used here). The two encoders differ only in their numbers and activation
(`config.TextEncoderConfig`): CLIP-L uses quick_gelu `x·σ(1.702x)`, bigG the exact (erf) gelu, and
only bigG has a text projection.

Module names are transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` names with the
`text_model.` level (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N.
self_attn.q_proj.weight`, `text_projection.weight`…): the layout CLIP-L is stored in inside SDXL
checkpoints and diffusers folders, which `clip.py` maps bigG's open_clip layout onto. The output
keeps transformers' field names (`hidden_states`, `last_hidden_state`, `pooler_output`,
`text_embeds`), so code written against those models reads these unchanged. Every layer is a plain
`nn.Linear` / `nn.LayerNorm` / `nn.Embedding`, so `ops.manual_cast` swaps in its casting versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import EOS_TOKEN, TextEncoderConfig

LAYER_NORM_EPS = 1e-5  # both encoders (open_clip's nn.LayerNorm default, transformers' layer_norm_eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's gelu approximation, which CLIP-L was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass(frozen=True)
class CLIPTextOutput:
    """What one forward gives, in transformers' field names.

    last_hidden_state: the last block's output after the final LayerNorm (B, T, D).
    pooler_output: `last_hidden_state` at each row's first EOS token (B, D).
    text_embeds: `pooler_output` through the text projection (B, P); None without a projection (CLIP-L).
    hidden_states: with `output_hidden_states=True`, the embeddings' output then every block's output,
        none of them normed (1 + layers tensors of (B, T, D)); else None.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    text_embeds: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _embedding(rows: int, width: int) -> nn.Embedding:
    """An nn.Embedding without its random init (the loader fills it): the default init, normal_, run on
    `meta` costs about 1.5 s of torch's one-time set-up per process."""
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = _embedding(cfg.max_length, cfg.width)  # learned, one row per position

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if token_embeds is None:
            token_embeds = self.token_embedding(input_ids)  # (B, T, D)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]  # (1, T)
        return token_embeds + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.num_heads = cfg.heads
        # transformers' order (k, v, q, out): state-dict order only, which the loaders never rely on
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # causal: each token sees itself and the tokens before it (CLIP reads out at EOS)
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, causal=True))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {cfg.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, the blocks and the final LayerNorm (transformers' `text_model`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)


class CLIPTextModel(nn.Module):
    """One SDXL text encoder: `CLIPTextModel(CLIP_L)` or `CLIPTextModel(CLIP_G)` (with the projection)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        # bigG's projection: open_clip's `x @ text_projection`, stored as a Linear weight (its transpose)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.text_model.embeddings.token_embedding = embedding

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False, *,
                token_embeds: torch.Tensor | None = None) -> CLIPTextOutput:
        """input_ids (B, T ≤ 77) → CLIPTextOutput.

        token_embeds (B, T, D): the token embeddings to use instead of looking `input_ids` up (a prompt
        with textual-inversion vectors spliced in); positions are added to them all the same, and
        `input_ids` still say where the EOS token is.
        """
        tm = self.text_model
        x = tm.embeddings(input_ids, token_embeds)  # (B, T, D)
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = tm.final_layer_norm(x)
        # the first EOS of each row (the pad token may be EOS too: CLIP-L pads with it); a row with
        # no EOS reads position 0, as transformers does
        eos = (input_ids == EOS_TOKEN).int().argmax(dim=-1)  # (B,)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, D)
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            text_embeds=None if self.text_projection is None else self.text_projection(pooled),
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )
