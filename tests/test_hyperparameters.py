"""Every full-size hyperparameter pinned against a source that is not our config module.

* UNet and VAE: Stability's published SGM inference yamls (`configs/inference/sd_xl_base.yaml`,
  `sd_xl_refiner.yaml`), written out literally below, turned into module configs by diffusers' own
  single-file code (`create_unet_diffusers_config_from_ldm`, `create_vae_diffusers_config_from_ldm`);
  our networks are built on `meta` and their real structure (heads per attention, widths, depths) is
  compared with that.
* Text encoders: `CLIPTextConfig`s written literally from the released configs (openai
  clip-vit-large-patch14 for CLIP-L; SDXL's `text_encoder_2/config.json`, i.e. OpenCLIP bigG, for bigG),
  compared with the structure of the model our builder really gives (widths, depths, heads, activation, eps).

`literal_clip_config` is also the reference config of the text-encoder parity tests.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig

from sdxl_nodes.sdxl_core import config as C
from sdxl_nodes.sdxl_core.clip import build_text_encoder
from sdxl_nodes.sdxl_core.unet import CrossAttention, SpatialTransformer, UNetModel
from sdxl_nodes.sdxl_core.vae import AutoencoderKL

# Stability's yamls, the parts that describe the networks (generative-models, configs/inference/)
SGM_BASE_YAML = {"model": {"params": {
    "scale_factor": 0.13025,
    "network_config": {"params": {
        "adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
        "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2,
        "channel_mult": [1, 2, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
        "transformer_depth": [1, 2, 10], "context_dim": 2048, "spatial_transformer_attn_type": "softmax-xformers",
    }},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }}},
}}}
SGM_REFINER_YAML = {"model": {"params": {
    "scale_factor": 0.13025,
    "network_config": {"params": {
        "adm_in_channels": 2560, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
        "out_channels": 4, "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
        "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280],
        "spatial_transformer_attn_type": "softmax-xformers",
    }},
    "first_stage_config": SGM_BASE_YAML["model"]["params"]["first_stage_config"],
}}}


def literal_clip_config(kind: str, tiny: bool = False) -> CLIPTextConfig:
    """The released text-encoder configs, written out (tiny: the same with the test widths/depths)."""
    if kind == "clip_l":  # openai/clip-vit-large-patch14, text_config
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        tiny_sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
    else:  # stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                             num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                             layer_norm_eps=1e-5, projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        tiny_sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
                      "projection_dim": 64}
    if tiny:
        for k, v in tiny_sizes.items():
            setattr(cfg, k, v)
    cfg._attn_implementation = "sdpa"
    return cfg


def _structure(model) -> dict:
    """The numbers a built text encoder really uses, read off its modules, in CLIPTextConfig's names."""
    tm = model.text_model
    layers = tm.encoder.layers
    return {
        "vocab_size": tm.embeddings.token_embedding.num_embeddings,
        "hidden_size": tm.embeddings.token_embedding.embedding_dim,
        "intermediate_size": {m.mlp.fc1.out_features for m in layers},
        "num_hidden_layers": len(layers),
        "num_attention_heads": {m.self_attn.num_heads for m in layers},
        "max_position_embeddings": tm.embeddings.position_embedding.num_embeddings,
        "hidden_act": {m.mlp.activation for m in layers},
        "layer_norm_eps": {n.eps for m in layers for n in (m.layer_norm1, m.layer_norm2)} | {tm.final_layer_norm.eps},
    }


@pytest.mark.parametrize("name,ours,tiny", [("clip_l", C.CLIP_L, False), ("clip_g", C.CLIP_G, False),
                                            ("clip_l", C.TINY_CLIP_L, True), ("clip_g", C.TINY_CLIP_G, True)])
def test_text_encoder_hyperparameters(name, ours, tiny):
    """Catches: bigG's exact gelu replaced by quick_gelu, layer_norm_eps changed, a width/depth/heads typo."""
    with torch.device("meta"):
        model = build_text_encoder(ours)
    want = literal_clip_config(name, tiny)
    got = _structure(model)
    want_values = {f: ({getattr(want, f)} if isinstance(v, set) else getattr(want, f)) for f, v in got.items()}
    diffs = {f: (got[f], want_values[f]) for f in got if got[f] != want_values[f]}
    assert not diffs, f"{name}: ours vs released config: {diffs}"
    if name == "clip_g":
        assert model.text_projection.weight.shape == (want.projection_dim, want.hidden_size)
    else:
        assert model.text_projection is None  # CLIP-L's projection is not in SDXL's files


def _diffusers_unet_config(yaml):
    return sfu.create_unet_diffusers_config_from_ldm(yaml, {}, image_size=1024)


def _heads_per_level(unet: UNetModel) -> dict[str, list[int]]:
    """Attention heads of the first transformer of each down level, the middle, and each up level."""
    out: dict[str, list[int]] = {"down": [], "mid": [], "up": []}
    for name, mod in unet.named_modules():
        if isinstance(mod, SpatialTransformer):
            heads = {m.heads for m in mod.modules() if isinstance(m, CrossAttention)}
            assert len(heads) == 1
            side = "down" if name.startswith("input") else "mid" if name.startswith("middle") else "up"
            out[side].append(heads.pop())
    return out


@pytest.mark.parametrize("cfg,yaml", [(C.BASE, SGM_BASE_YAML), (C.REFINER, SGM_REFINER_YAML)], ids=["base", "refiner"])
def test_unet_hyperparameters_match_sgm_yaml_via_diffusers(cfg, yaml):
    """Catches: num_head_channels 64 → 32 (heads double, no shape changes), transformer depth, widths,
    context width, ADM width. Heads are read from the built modules, not from our config."""
    d = _diffusers_unet_config(yaml)
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    u = cfg.unet
    assert [u.model_channels * m for m in u.channel_mult] == list(d["block_out_channels"])
    assert u.num_res_blocks == d["layers_per_block"]
    assert (u.in_channels, u.out_channels) == (d["in_channels"], d["out_channels"])
    assert u.context_dim == d["cross_attention_dim"]
    assert u.adm_in_channels == d["projection_class_embeddings_input_dim"]
    assert C.SIZE_EMBED_DIM == d["addition_time_embed_dim"]
    # attention at the levels diffusers gives cross-attention blocks, with its depths
    levels = [i for i, t in enumerate(d["down_block_types"]) if t.startswith("CrossAttn")]
    depth = d["transformer_layers_per_block"]
    depth = [depth] * len(levels) if isinstance(depth, int) else [depth[i] for i in levels]
    assert [i for i, t in enumerate(u.transformer_depth) if t] == levels
    assert [u.transformer_depth[i] for i in levels] == depth
    # heads: diffusers' `attention_head_dim` holds heads per level (SGM: channels // num_head_channels)
    heads = d["attention_head_dim"]
    heads = [heads] * len(d["block_out_channels"]) if isinstance(heads, int) else list(heads)
    got = _heads_per_level(unet)
    want_down = [heads[i] for i in levels for _ in range(u.num_res_blocks)]
    assert got["down"] == want_down
    assert got["mid"] == [heads[-1]]
    assert got["up"] == [heads[i] for i in reversed(levels) for _ in range(u.num_res_blocks + 1)]
    # every transformer block of a level really has the yaml's depth
    n_blocks = sum(len(m.transformer_blocks) for m in unet.modules() if isinstance(m, SpatialTransformer))
    n_mid = len(unet.middle_block[1].transformer_blocks)
    assert n_blocks - n_mid == sum(u.transformer_depth[i] * (2 * u.num_res_blocks + 1) for i in levels)


@pytest.mark.parametrize("cfg,yaml", [(C.BASE, SGM_BASE_YAML), (C.REFINER, SGM_REFINER_YAML)], ids=["base", "refiner"])
def test_vae_hyperparameters_match_sgm_yaml_via_diffusers(cfg, yaml):
    d = sfu.create_vae_diffusers_config_from_ldm(yaml, {}, image_size=1024)
    v = cfg.vae
    assert [v.ch * m for m in v.ch_mult] == list(d["block_out_channels"])
    assert v.num_res_blocks == d["layers_per_block"]
    assert v.z_channels == d["latent_channels"] and v.in_channels == d["in_channels"]
    assert v.scale_factor == d["scaling_factor"] == C.LATENT_SCALE
    with torch.device("meta"):
        vae = AutoencoderKL(v)
    assert len(vae.encoder.down) == len(d["down_block_types"])
    assert all(len(level.block) == v.num_res_blocks for level in vae.encoder.down)
    assert all(len(level.block) == v.num_res_blocks + 1 for level in vae.decoder.up)
    assert vae.encoder.mid.attn_1.norm.eps == 1e-6 and vae.encoder.down[0].block[0].norm1.eps == 1e-6
