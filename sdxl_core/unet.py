"""The SDXL UNet (base and refiner), with Stability's SGM attribute names.

Module and `Sequential` index names equal the keys under `model.diffusion_model.` in
`sd_xl_base_1.0.safetensors` / `sd_xl_refiner_1.0.safetensors`, so the official files load with zero
renames. References: SGM `sgm/modules/diffusionmodules/openaimodel.py` (UNetModel, ResBlock),
`sgm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock, GEGLU); FACTS.md §2.

Shapes: x (B, 4, h, w) latent, timesteps (B,) integer table index as float, context (B, T, C_ctx)
text tokens, y (B, adm) pooled text + size embeddings. Output: predicted noise eps (B, 4, h, w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first then sin, no frequency shift (SGM `timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) that normalises fp16 inputs in fp32 on the CPU (SGM GroupNorm32: fp16 statistics
    overflow there). CUDA's group_norm kernel already accumulates fp16 statistics in fp32, so on a GPU
    the input stays fp16 and the two extra passes over the activations are saved (ComfyUI does the same)."""

    def forward(self, x):
        if x.dtype == torch.float16 and x.device.type != "cuda":
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


def res_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels, eps=1e-5)  # ResBlock/out norms: eps 1e-5


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # size: the skip connection's (h, w), so sides that are not multiples of 8 latent pixels
        # (e.g. 1000 px → 125) come back to the right size, as ComfyUI's output_shape does
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class ResBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(res_norm(ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, ch_out))
        # index 2 is SGM's Dropout(0): a parameter-free slot kept so the conv stays at index 3
        self.out_layers = nn.Sequential(res_norm(ch_out), nn.SiLU(), nn.Identity(), nn.Conv2d(ch_out, ch_out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # broadcast over H, W
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())  # index 1: SGM's Dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # first half value, second half gate
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # 1: Dropout

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        # registration order = the checkpoint's key order: attn1, ff, attn2, norm1..3
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, depth: int, context_dim: int, head_channels: int):
        super().__init__()
        self.norm = GroupNorm32(32, ch, eps=1e-6)  # eps 1e-6 here, unlike ResBlock's 1e-5
        self.proj_in = nn.Linear(ch, ch)
        heads = ch // head_channels
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(ch, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, HW, C)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self.proj_out(t)
        return x + rearrange(t, "b (h w) c -> b c h w", h=h, w=w)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks get the embedding and SpatialTransformers the context."""

    def forward(self, x, emb, context, output_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, ted, hc, ctx = cfg.model_channels, cfg.time_embed_dim, cfg.num_head_channels, cfg.context_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        def level_block(ch_in, ch_out, depth):
            layers = [ResBlock(ch_in, ch_out, ted)]
            if depth:
                layers.append(SpatialTransformer(ch_out, depth, ctx, hc))
            return layers

        # 1. Encoder: conv, then per level num_res_blocks (ResBlock [+ transformer]) and a Downsample
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        n_levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(*level_block(ch, mult * mc, cfg.transformer_depth[level])))
                ch = mult * mc
                skip_channels.append(ch)
            if level != n_levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        # 2. Middle: ResBlock, transformer, ResBlock
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, ted), SpatialTransformer(ch, cfg.transformer_depth_middle, ctx, hc), ResBlock(ch, ch, ted)
        )

        # 3. Decoder: per level (deepest first) num_res_blocks + 1 blocks, each taking one skip;
        #    the last block of every level but the top one ends with an Upsample
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(n_levels)):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = level_block(ch + skip_channels.pop(), mult * mc, cfg.transformer_depth[level])
                ch = mult * mc
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(res_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in: its weights', or the one ops.manual_cast set."""
        return getattr(self, "compute_dtype", None) or self.out[2].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        x, context, y = x.to(dtype), context.to(dtype), y.to(dtype)
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y)  # (B, 4·mc)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
