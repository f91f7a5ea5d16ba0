"""The one table between diffusers' module names and Stability's SGM names (ours), for the UNet and VAE.

diffusers' `UNet2DConditionModel` and `AutoencoderKL` hold the same tensors as SGM's UNet and VAE
under other names (and the VAE's mid-attention as Linear instead of 1×1 Conv). Everything in this
package that meets diffusers names — diffusers-format folders, diffusers/PEFT LoRAs, kohya LoRAs
named after the diffusers UNet, standalone VAE files in diffusers layout — goes through the tables
below, which are generated from our configs by walking the same block structure both libraries
share. The text encoders need no table: a diffusers folder stores them in transformers' layout,
which is the layout of our modules.

References for the structure (read, not copied): diffusers `models/unets/unet_2d_blocks.py`
(`CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`), SGM
`sgm/modules/diffusionmodules/openaimodel.py`, and `tests/test_diffusers_folder.py`, which checks
both directions against diffusers' own single-file conversion.
"""

from __future__ import annotations

import functools

from .config import UNetConfig, VAEConfig

# ResBlock: SGM sub-module → diffusers sub-module
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_TOP = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# VAE ResnetBlock / mid attention: SGM → diffusers
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.norm_out": "encoder.conv_norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.norm_out": "decoder.conv_norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def _unet_modules(cfg: UNetConfig) -> dict[str, str]:
    """SGM module prefix → diffusers module prefix, for every block of the UNet."""
    m = dict(_UNET_TOP)
    n_levels = len(cfg.channel_mult)

    def resnet(sgm: str, dif: str) -> None:
        for a, b in _UNET_RESNET.items():
            m[f"{sgm}.{a}"] = f"{dif}.{b}"

    # 1. Encoder: input_blocks 1.. are (ResBlock [, transformer]) per res block, then a downsampler
    n = 1
    for level in range(n_levels):
        for i in range(cfg.num_res_blocks):
            resnet(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}")
            if cfg.transformer_depth[level]:
                m[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{i}"
            n += 1
        if level != n_levels - 1:
            m[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            n += 1
    # 2. Middle
    resnet("middle_block.0", "mid_block.resnets.0")
    m["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    # 3. Decoder: diffusers' up_blocks[0] is SGM's deepest level
    n = 0
    for up, level in enumerate(reversed(range(n_levels))):
        for i in range(cfg.num_res_blocks + 1):
            resnet(f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{i}")
            slot = 1
            if cfg.transformer_depth[level]:
                m[f"output_blocks.{n}.1"] = f"up_blocks.{up}.attentions.{i}"
                slot = 2
            if level and i == cfg.num_res_blocks:
                m[f"output_blocks.{n}.{slot}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            n += 1
    return m


def _vae_modules(cfg: VAEConfig) -> dict[str, str]:
    m = dict(_VAE_TOP)
    n_levels = len(cfg.ch_mult)

    def resnet(sgm: str, dif: str) -> None:
        for a, b in _VAE_RESNET.items():
            m[f"{sgm}.{a}"] = f"{dif}.{b}"

    for side in ("encoder", "decoder"):
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        for a, b in _VAE_ATTN.items():
            m[f"{side}.mid.attn_1.{a}"] = f"{side}.mid_block.attentions.0.{b}"
    for level in range(n_levels):
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}")
        if level != n_levels - 1:
            m[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
    for up, level in enumerate(reversed(range(n_levels))):  # decoder.up[0] is the deepest level in SGM
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}")
        if level:
            m[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return m


def _rename(key: str, modules: dict[str, str]) -> str | None:
    """Rename `key` by its longest matching module prefix; None when no prefix matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            return modules[prefix] + "." + ".".join(parts[cut:])
    return None


@functools.lru_cache(maxsize=8)
def unet_sgm_to_diffusers(cfg: UNetConfig) -> dict[str, str]:
    """Every UNet parameter: SGM key (relative to `model.diffusion_model.`) → diffusers key."""
    import torch

    from .unet import UNetModel

    with torch.device("meta"):
        keys = UNetModel(cfg).state_dict().keys()
    modules = _unet_modules(cfg)
    out = {}
    for k in keys:
        d = _rename(k, modules)
        if d is None:
            raise KeyError(f"internal: no diffusers name for UNet key {k}")
        out[k] = d
    return out


@functools.lru_cache(maxsize=8)
def vae_sgm_to_diffusers(cfg: VAEConfig) -> dict[str, str]:
    """Every VAE parameter: SGM key (relative to `first_stage_model.`) → diffusers key."""
    import torch

    from .vae import AutoencoderKL

    with torch.device("meta"):
        keys = AutoencoderKL(cfg).state_dict().keys()
    modules = _vae_modules(cfg)
    out = {}
    for k in keys:
        d = _rename(k, modules)
        if d is None:
            raise KeyError(f"internal: no diffusers name for VAE key {k}")
        out[k] = d
    return out


def is_vae_attention_matrix(sgm_key: str) -> bool:
    """SGM stores the VAE mid-attention q/k/v/proj_out as 1×1 convs [C, C, 1, 1]; diffusers as Linear [C, C]."""
    return ".mid.attn_1." in sgm_key and sgm_key.endswith(".weight") and ".norm." not in sgm_key


def vae_to_sgm_tensor(sgm_key: str, t):
    """A diffusers VAE tensor in the shape SGM (our module) expects."""
    return t[:, :, None, None] if is_vae_attention_matrix(sgm_key) and t.ndim == 2 else t


def vae_to_diffusers_tensor(sgm_key: str, t):
    return t[:, :, 0, 0] if is_vae_attention_matrix(sgm_key) and t.ndim == 4 else t
