"""Our UNet, VAE and text encoders vs diffusers/transformers on the same tiny random weights (fp32).

The reference networks are diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers'
CLIP models, filled through diffusers' own single-file conversion functions
(`diffusers.loaders.single_file_utils`), with configs derived by diffusers from an SGM-style yaml.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from test_hyperparameters import literal_clip_config  # the released configs, written out (issue 11)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdxl_nodes.sdxl_core.unet import timestep_embedding

REL_TOL = 1e-5


def sgm_yaml(cfg) -> dict:
    """The SGM inference yaml (as a dict) that describes this config, the way Stability writes it."""
    u, v = cfg.unet, cfg.vae
    depth = list(u.transformer_depth)
    depth[0] = depth[1]  # level 0 has no attention: SGM's yaml lists a value there that is never used
    return {
        "model": {
            "params": {
                "scale_factor": v.scale_factor,
                "network_config": {
                    "params": {
                        "adm_in_channels": u.adm_in_channels, "num_classes": "sequential", "in_channels": 4,
                        "out_channels": 4, "model_channels": u.model_channels, "attention_resolutions": [4, 2],
                        "num_res_blocks": u.num_res_blocks, "channel_mult": list(u.channel_mult),
                        "num_head_channels": u.num_head_channels, "use_linear_in_transformer": True,
                        "transformer_depth": depth if not cfg.is_refiner else u.transformer_depth_middle,
                        "context_dim": u.context_dim,
                    }
                },
                "first_stage_config": {
                    "params": {"ddconfig": {"ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks,
                                            "z_channels": v.z_channels, "in_channels": 3, "out_ch": 3}}
                },
            }
        }
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_unet(cfg, sd) -> UNet2DConditionModel:
    config = sfu.create_unet_diffusers_config_from_ldm(sgm_yaml(cfg), sd)
    # diffusers recognises SDXL's size conditioning by the full-size context widths (2048/1280);
    # the tiny model has the same structure, so ask for the same "text_time" embedding explicitly
    config.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    config["projection_class_embeddings_input_dim"] = cfg.unet.adm_in_channels
    model = UNet2DConditionModel(**config)
    converted = sfu.convert_ldm_unet_checkpoint(sd, config)
    missing, unexpected = model.load_state_dict(converted, strict=True), None
    del missing, unexpected
    return model.eval()


@pytest.mark.parametrize("kind,hw", [("base", (16, 24)), ("refiner", (16, 24)), ("base", (13, 21)),
                                     ("refiner", (125, 9))])
def test_unet_matches_diffusers(kind, hw, tiny_checkpoints, tiny_base, tiny_refiner):
    """(13, 21) and (125, 9): sides that are not multiples of the UNet's total downsampling (e.g. 1000 px)."""
    ours = tiny_base if kind == "base" else tiny_refiner
    cfg = ours.config
    ref = diffusers_unet(cfg, load_file(str(tiny_checkpoints[kind])))

    g = torch.Generator().manual_seed(0)
    b, n_tok = 2, 77 * 2
    x = torch.randn(b, 4, *hw, generator=g)
    t = torch.tensor([999.0, 421.0])
    ctx = torch.randn(b, n_tok, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(b, cfg.clip_g.projection_dim, generator=g)
    sizes = (torch.tensor([[1024.0, 768, 0, 16, 1024, 1024], [896, 1152, 32, 0, 832, 1216]]) if kind == "base"
             else torch.tensor([[1024.0, 768, 0, 16, 6.0], [896, 1152, 32, 0, 2.5]]))
    y = torch.cat([pooled, timestep_embedding(sizes.flatten(), 256).reshape(b, -1)], dim=1)

    with torch.inference_mode():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        got = ours.unet(x, t, ctx, y)
    err = rel_err(got, want)
    print(f"UNet {kind}: max abs {(got - want).abs().max().item():.3e}, rel {err:.3e}")
    assert err <= REL_TOL


def test_vae_decode_and_encode_match_diffusers(tiny_checkpoints, tiny_base):
    sd = load_file(str(tiny_checkpoints["base"]))
    config = sfu.create_vae_diffusers_config_from_ldm(sgm_yaml(tiny_base.config), sd)
    ref = DiffusersVAE(**config).eval()
    ref.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, config), strict=True)

    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 12, 10, generator=g)
    img = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    with torch.inference_mode():
        dec_err = rel_err(tiny_base.vae.decode(z), ref.decode(z).sample)
        enc_err = rel_err(tiny_base.vae.encode(img), ref.encode(img).latent_dist.mode())
    print(f"VAE decode rel {dec_err:.3e}, encode rel {enc_err:.3e}")
    assert dec_err <= REL_TOL and enc_err <= REL_TOL


def _hf_keys(sd: dict, model) -> dict:
    """diffusers writes transformers-4 names ('text_model.*'); transformers 5's CLIPTextModel drops the level."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def test_text_encoders_match_diffusers_conversion(tiny_checkpoints, tiny_base, tiny_refiner):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 49406, (3, 77), generator=g)
    ids[:, 0] = 49406
    ids[0, 10:] = 49407  # CLIP-L style padding with EOS
    ids[1, 5] = 49407
    ids[1, 6:] = 0  # bigG style padding with 0
    ids[2, -1] = 49407
    for ours, kind in ((tiny_base, "base"), (tiny_refiner, "refiner")):
        sd = load_file(str(tiny_checkpoints[kind]))
        cfg = ours.config
        ref_g = CLIPTextModelWithProjection(literal_clip_config("clip_g", tiny=True)).eval()
        prefix = "conditioner.embedders.0.model." if cfg.is_refiner else "conditioner.embedders.1.model."
        conv = sfu.convert_open_clip_checkpoint(ref_g, sd, prefix=prefix)
        conv.pop("text_model.embeddings.position_ids", None)
        ref_g.load_state_dict(_hf_keys(conv, ref_g), strict=True)
        with torch.inference_mode():
            a = ours.clip_g(ids, output_hidden_states=True)
            b = ref_g(ids, output_hidden_states=True)
        err_h = rel_err(a.hidden_states[-2], b.hidden_states[-2])
        err_p = rel_err(a.text_embeds, b.text_embeds)
        print(f"bigG {kind}: penultimate rel {err_h:.3e}, pooled rel {err_p:.3e}")
        assert err_h <= REL_TOL and err_p <= REL_TOL
        # pooling takes the first EOS (row 1 has EOS at 5 followed by 0-padding); last_hidden_state
        # already went through final_layer_norm
        assert torch.allclose(a.text_embeds[1], ours.clip_g.text_projection(a.last_hidden_state[1, 5]), atol=1e-5)

    sd = load_file(str(tiny_checkpoints["base"]))
    ref_l = CLIPTextModel(literal_clip_config("clip_l", tiny=True)).eval()
    conv = sfu.convert_ldm_clip_checkpoint(sd)
    conv = {k: v for k, v in conv.items() if "position_ids" not in k}
    ref_l.load_state_dict(_hf_keys(conv, ref_l), strict=True)
    with torch.inference_mode():
        err = rel_err(tiny_base.clip_l(ids, output_hidden_states=True).hidden_states[-2],
                      ref_l(ids, output_hidden_states=True).hidden_states[-2])
    print(f"CLIP-L penultimate rel {err:.3e}")
    assert err <= REL_TOL
