"""The SDXL VAE (AutoencoderKL, f=8, 4 latent channels), with SGM attribute names.

Names equal the keys under `first_stage_model.` in the official files. References: SGM
`sgm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock) and
`sgm/models/autoencoder.py`; FACTS.md §6. Latents here are RAW (ComfyUI's LATENT convention): the
0.13025 scale is applied by the sampler, not by encode/decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .accel import sdpa_backends
from .attention import attention
from .config import VAEConfig
from .errors import Cancelled
from .unet import Upsample  # nearest ×2 + conv3×3, the same module (and key names) as the UNet's


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)  # every VAE GroupNorm: eps 1e-6


class ResnetBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.norm1 = norm(ch_in)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.norm2 = norm(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, 1×1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x)
        q, k, v = (rearrange(f(t), "b c h w -> b (h w) c") for f in (self.q, self.k, self.v))  # (B, HW, C)
        out = rearrange(attention(q, k, v, heads=1), "b (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: pad right and bottom only


class Level(nn.Module):
    """One resolution: `block` ResnetBlocks and an optional `downsample`/`upsample` (SGM names)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # attn_resolutions is empty for SDXL: parameter-free
        if resample is not None:
            setattr(self, resample_name, resample)


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, ch_out in enumerate(chs):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, ch_out))
                ch = ch_out
            last = i == len(chs) - 1
            self.down.append(Level(blocks, None if last else Downsample(ch), "downsample"))
        self.mid = Mid(ch)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x, should_stop=None):
        h = self.conv_in(x)
        for level in self.down:
            _poll(should_stop, "VAE encode")
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        _poll(should_stop, "VAE encode")
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        ch = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        levels = []
        for i in reversed(range(len(chs))):  # deepest first; stored so that up[i] is level i
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, chs[i]))
                ch = chs[i]
            levels.insert(0, Level(blocks, Upsample(ch) if i else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z, should_stop=None):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            _poll(should_stop, "VAE decode")
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode: pixels in [-1, 1] (B, 3, H, W) → raw latent (posterior mean) (B, 4, H/8, W/8).
    decode: raw latent → pixels in about [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in: its weights', or the one ops.manual_cast set."""
        return getattr(self, "compute_dtype", None) or self.quant_conv.weight.dtype

    def encode(self, pixels: torch.Tensor, should_stop=None) -> torch.Tensor:
        with sdpa_backends(self.quant_conv.weight.device):
            moments = self.quant_conv(self.encoder(pixels.to(self.dtype), should_stop))
        return moments[:, : self.cfg.embed_dim].float()  # posterior mode = mean; logvar unused

    def decode(self, latent: torch.Tensor, should_stop=None) -> torch.Tensor:
        with sdpa_backends(self.quant_conv.weight.device):
            return self.decoder(self.post_quant_conv(latent.to(self.dtype)), should_stop).float()


def _poll(should_stop, what: str) -> None:
    """Interrupt hook: `should_stop()` is polled between resolution levels and between tiles."""
    if should_stop is not None and should_stop():
        raise Cancelled(f"{what} stopped by the caller")


def _feather(n: int, feather: int) -> torch.Tensor:
    """1-D tile weights: ramps of `feather` samples, (t + 1) / feather, at both ends of every tile.

    Image borders are ramped too; the division by the summed weights makes that exact (ComfyUI
    ``comfy.utils.tiled_scale_multidim``). The factors are multiplied in in the same order, so where the
    two ramps meet the weights are the same floats. No ramp when `feather` >= n.
    """
    w = torch.ones(n)
    if 0 < feather < n:
        for t in range(feather):
            a = (t + 1) / feather
            w[t] *= a
            w[n - 1 - t] *= a
    return w


def tiled(fn, x: torch.Tensor, tile: int | tuple[int, int], overlap: int, scale: float, out_channels: int,
          should_stop=None) -> torch.Tensor:
    """Apply `fn` (encode or decode) to overlapping tiles of x (B, C, H, W) and blend the results.

    ComfyUI's tiling (``tiled_scale``): `tile` is (H, W) input pixels (or one int for both), tiles start
    every ``tile - overlap`` below ``size - overlap`` (the last ones may be shorter), each image of the
    batch on its own; outputs are scaled by `scale` (8 for decode, 1/8 for encode), weighted by
    :func:`_feather` over ``round(overlap * scale)`` and averaged. An image that fits one tile is passed
    whole. `should_stop()` is polled before every tile (raises :class:`Cancelled`).
    """
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    b, _, h, w = x.shape
    out_h, out_w = round(h * scale), round(w * scale)
    feather = round(overlap * scale)
    out = torch.empty(b, out_channels, out_h, out_w)
    ys = range(0, h - overlap, th - overlap) if h > th else [0]
    xs = range(0, w - overlap, tw - overlap) if w > tw else [0]
    for i in range(b):
        s = x[i : i + 1]
        if h <= th and w <= tw:
            _poll(should_stop, "tiled VAE")
            out[i : i + 1] = fn(s).float().cpu()
            continue
        acc = torch.zeros(1, out_channels, out_h, out_w)
        weight = torch.zeros(1, 1, out_h, out_w)
        for y in ys:
            for x0 in xs:
                _poll(should_stop, "tiled VAE")
                py, px = max(0, min(h - overlap, y)), max(0, min(w - overlap, x0))
                piece = fn(s[:, :, py : py + min(th, h - py), px : px + min(tw, w - px)]).float().cpu()
                ph, pw = piece.shape[-2:]
                m = (_feather(ph, feather)[:, None] * _feather(pw, feather)[None, :])[None, None]
                oy, ox = round(py * scale), round(px * scale)
                acc[:, :, oy : oy + ph, ox : ox + pw] += piece * m
                weight[:, :, oy : oy + ph, ox : ox + pw] += m
        out[i : i + 1] = acc / weight
    return out


def decode_tiled(vae: AutoencoderKL, latent: torch.Tensor, tile: int = 64, overlap: int = 16,
                 should_stop=None) -> torch.Tensor:
    """Decode a raw latent in tiles of `tile` latent pixels (peak memory independent of image size)."""
    return tiled(lambda t: vae.decode(t, should_stop), latent, tile, overlap, 8, 3, should_stop)


def encode_tiled(vae: AutoencoderKL, pixels: torch.Tensor, tile: int = 512, overlap: int = 64,
                 should_stop=None) -> torch.Tensor:
    """Encode pixels in [-1, 1] in tiles of `tile` pixels (multiples of 8)."""
    return tiled(lambda t: vae.encode(t, should_stop), pixels, tile, overlap, 1 / 8, vae.cfg.embed_dim, should_stop)


def _check_tiles(tile: int, overlap: int) -> None:
    if tile // 2 - overlap <= 0:
        raise ValueError(f"tile overlap {overlap} must be smaller than half the tile ({tile} → {tile // 2}); "
                         "lower the overlap or raise the tile size")


def decode_tiled_3(vae: AutoencoderKL, latent: torch.Tensor, tile: int = 64, overlap: int = 16,
                   should_stop=None) -> torch.Tensor:
    """ComfyUI's tiled decode (``VAE.decode_tiled_``): the mean of three tilings of the latent, tiles of
    (2·tile, tile/2), (tile/2, 2·tile) and (tile, tile) latent pixels (H, W), summed in that order."""
    _check_tiles(tile, overlap)

    def f(t):
        return vae.decode(t, should_stop)

    return (tiled(f, latent, (tile * 2, tile // 2), overlap, 8, 3, should_stop)
            + tiled(f, latent, (tile // 2, tile * 2), overlap, 8, 3, should_stop)
            + tiled(f, latent, (tile, tile), overlap, 8, 3, should_stop)) / 3.0


def encode_tiled_3(vae: AutoencoderKL, pixels: torch.Tensor, tile: int = 512, overlap: int = 64,
                   should_stop=None) -> torch.Tensor:
    """ComfyUI's tiled encode (``VAE.encode_tiled_``): the mean of three tilings of pixels in [-1, 1],
    (tile, tile), (tile/2, 2·tile) and (2·tile, tile/2) pixels (H, W), summed in that order."""
    _check_tiles(tile, overlap)

    def f(t):
        return vae.encode(t, should_stop)

    z = tiled(f, pixels, (tile, tile), overlap, 1 / 8, vae.cfg.embed_dim, should_stop)
    z += tiled(f, pixels, (tile // 2, tile * 2), overlap, 1 / 8, vae.cfg.embed_dim, should_stop)
    z += tiled(f, pixels, (tile * 2, tile // 2), overlap, 1 / 8, vae.cfg.embed_dim, should_stop)
    z /= 3.0
    return z
