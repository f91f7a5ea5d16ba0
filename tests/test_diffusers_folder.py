"""Diffusers-format folders as checkpoints, and the diffusers↔SGM table checked against diffusers' own
single-file conversion in both directions.

SGM → diffusers: our table renames the tiny file's UNet/VAE exactly as `convert_ldm_*_checkpoint` does.
diffusers → SGM: a folder written by diffusers' `save_pretrained` (models made by its own conversion)
loads through our loader and runs exactly like the single file.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from test_hyperparameters import literal_clip_config
from test_parity_diffusers import diffusers_unet, sgm_yaml
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdxl_nodes.sdxl_core import checkpoint
from sdxl_nodes.sdxl_core.diffusers_keys import (
    unet_sgm_to_diffusers,
    vae_sgm_to_diffusers,
    vae_to_diffusers_tensor,
)
from sdxl_nodes.sdxl_core.errors import CheckpointError


def _diffusers_parts(path, cfg):
    sd = load_file(str(path))
    unet = diffusers_unet(cfg, sd)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(sgm_yaml(cfg), sd)
    vae = DiffusersVAE(**vcfg).eval()
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    parts = {"unet": unet, "vae": vae}
    g = CLIPTextModelWithProjection(literal_clip_config("clip_g", tiny=True)).eval()
    prefix = "conditioner.embedders.0.model." if cfg.is_refiner else "conditioner.embedders.1.model."
    conv = sfu.convert_open_clip_checkpoint(g, sd, prefix=prefix)
    conv.pop("text_model.embeddings.position_ids", None)
    g.load_state_dict(conv, strict=True)
    parts["text_encoder_2"] = g
    if not cfg.is_refiner:
        l = CLIPTextModel(literal_clip_config("clip_l", tiny=True)).eval()
        conv = {k: v for k, v in sfu.convert_ldm_clip_checkpoint(sd).items() if "position_ids" not in k}
        if not any(k.startswith("text_model.") for k in l.state_dict()):
            conv = {k.removeprefix("text_model."): v for k, v in conv.items()}
        l.load_state_dict(conv, strict=True)
        parts["text_encoder"] = l
    return sd, parts


def write_folder(folder, parts, variant=None):
    for name, model in parts.items():
        model.save_pretrained(folder / name, safe_serialization=True, variant=variant)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tiny_base, tiny_refiner, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for kind, ours in (("base", tiny_base), ("refiner", tiny_refiner)):
        sd, parts = _diffusers_parts(tiny_checkpoints[kind], ours.config)
        out[kind] = (write_folder(root / f"sdxl-{kind}", parts), sd, parts)
    return out


def test_sgm_to_diffusers_table_equals_diffusers_conversion(folders, tiny_base):
    """Catches any wrong row of the table (up-block order, mid block, resnet names, VAE attention shape)."""
    sd = folders["base"][1]
    cfg = tiny_base.config
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    ours = {unet_sgm_to_diffusers(cfg.unet)[k]: v for k, v in unet.items()}
    config = sfu.create_unet_diffusers_config_from_ldm(sgm_yaml(cfg), sd)
    # as in test_parity_diffusers: diffusers spots SDXL's size conditioning by full-size widths only
    config.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None,
                  projection_class_embeddings_input_dim=cfg.unet.adm_in_channels)
    theirs = sfu.convert_ldm_unet_checkpoint(sd, config)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    vae = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    ours = {vae_sgm_to_diffusers(cfg.vae)[k]: vae_to_diffusers_tensor(k, v) for k, v in vae.items()}
    theirs = sfu.convert_ldm_vae_checkpoint(sd, sfu.create_vae_diffusers_config_from_ldm(sgm_yaml(cfg), sd))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) and ours[k].shape == theirs[k].shape for k in theirs)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_folder_reads_as_the_single_file(folders, tiny_checkpoints, kind):
    """diffusers → SGM: every tensor of the folder, read in SGM names, equals the single file's."""
    folder, sd, _ = folders[kind]
    cfg, shapes = checkpoint.inspect_checkpoint(folder)
    assert cfg.kind == kind
    expected = {k: v for k, v in sd.items() if not k.endswith("position_ids") and k != "conditioner.embedders.1.model.logit_scale"
                and k != "conditioner.embedders.0.model.logit_scale"}
    assert set(shapes) == set(expected)
    with checkpoint.open_weights(folder) as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in expected.items())


def test_folder_outputs_equal_single_file(folders, tiny_checkpoints, tiny_base):
    folder = folders["base"][0]
    ours = checkpoint.load_checkpoint(folder)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0])
    ctx, y = torch.randn(1, 77, 96, generator=g), torch.randn(1, 64 + 6 * 256, generator=g)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    with torch.inference_mode():
        assert torch.equal(ours.unet(x, t, ctx, y), tiny_base.unet(x, t, ctx, y))
        assert torch.equal(ours.vae.decode(x), tiny_base.vae.decode(x))
        assert torch.equal(ours.clip_l(ids, output_hidden_states=True).hidden_states[-2],
                           tiny_base.clip_l(ids, output_hidden_states=True).hidden_states[-2])
        assert torch.equal(ours.clip_g(ids).text_embeds, tiny_base.clip_g(ids).text_embeds)


def test_fp16_variant_preferred(folders, tmp_path, tiny_base):
    _, _, parts = folders["base"]
    folder = write_folder(tmp_path / "with-variant", parts)
    half_unet = parts["unet"].to(torch.float16)
    half_unet.save_pretrained(folder / "unet", safe_serialization=True, variant="fp16")
    parts["unet"].to(torch.float32)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with checkpoint.open_weights(folder) as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert f.get_tensor("first_stage_model.decoder.conv_out.weight").dtype == torch.float32


def test_folder_problems_listed_in_one_error(folders, tmp_path):
    from safetensors.torch import save_file

    folder = write_folder(tmp_path / "broken", folders["base"][2])
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd.pop("conv_out.bias")
    sd["extra_block.weight"] = torch.zeros(1)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"1 missing: unet: out.2.bias.*1 unexpected: <not in the diffusers table>.unet.extra_block.weight"):
        checkpoint.inspect_checkpoint(folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"not a complete SDXL diffusers folder: .*vae: no diffusion_pytorch_model.safetensors"):
        checkpoint.inspect_checkpoint(folder)


def test_folder_listed_by_name_and_loaded_by_the_node(folders, tmp_path):
    import os
    import shutil

    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, environment

    models = tmp_path / "models" / "checkpoints"
    shutil.copytree(folders["refiner"][0], models / "my-refiner", copy_function=os.link)
    env = environment.configure(models_dir=tmp_path / "models", output_dir=tmp_path / "out")
    assert env.checkpoint_names() == ["my-refiner"]
    model, clip, vae = NODE_CLASS_MAPPINGS["SDXLCheckpointLoader"]().run("my-refiner")
    assert model.kind == "refiner" and clip.encoders().clip_l is None
    assert vae.load().decoder.conv_out.weight.shape[0] == 3
