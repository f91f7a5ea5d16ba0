"""Loading real-layout files: dtypes, community extras, and one clear error for every kind of bad file."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_nodes.sdxl_core.checkpoint import load_checkpoint, read_shapes, write_random_checkpoint
from sdxl_nodes.sdxl_core.config import TINY_BASE, TINY_REFINER
from sdxl_nodes.sdxl_core.errors import CheckpointError


def test_detects_base_and_refiner(tiny_base, tiny_refiner):
    assert tiny_base.kind == "base" and tiny_base.clip_l is not None
    assert tiny_refiner.kind == "refiner" and tiny_refiner.clip_l is None
    assert tiny_refiner.unet.cfg.context_dim == TINY_REFINER.clip_g.width


def test_writer_is_deterministic(tmp_path):
    a = write_random_checkpoint(tmp_path / "a.safetensors", TINY_REFINER, seed=7)
    b = write_random_checkpoint(tmp_path / "b.safetensors", TINY_REFINER, seed=7)
    c = write_random_checkpoint(tmp_path / "c.safetensors", TINY_REFINER, seed=8)
    ta, tb, tc = load_file(str(a)), load_file(str(b)), load_file(str(c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_into_any_dtype(tmp_path, dtype):
    path = write_random_checkpoint(tmp_path / "h.safetensors", TINY_BASE, seed=3, dtype=dtype)
    ckpt = load_checkpoint(path, unet_dtype=torch.bfloat16, text_dtype=torch.float32, vae_dtype=torch.float32)
    assert ckpt.unet.dtype == torch.bfloat16 and ckpt.vae.dtype == torch.float32
    assert next(ckpt.clip_g.parameters()).dtype == torch.float32
    assert all(t.device.type == "cpu" for t in ckpt.clip_l.buffers())  # no buffer left on meta
    stored = load_file(str(path))["model.diffusion_model.out.2.weight"]
    assert torch.equal(ckpt.unet.out[2].weight, stored.to(torch.bfloat16))


def test_community_superset_keys_are_ignored(tmp_path, tiny_checkpoints):
    sd = load_file(str(tiny_checkpoints["refiner"]))
    sd["alphas_cumprod"] = torch.rand(1000)
    sd["model_ema.decay"] = torch.tensor(0.999)
    path = tmp_path / "community.safetensors"
    save_file(sd, str(path))
    assert load_checkpoint(path).kind == "refiner"


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg  # every message names the file
    return msg


def test_unknown_extra_key_is_reported(tmp_path, tiny_checkpoints):
    sd = load_file(str(tiny_checkpoints["refiner"]))
    sd["model.diffusion_model.lora_up.weight"] = torch.zeros(2, 2)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    msg = _error(path)
    assert "1 unexpected" in msg and "lora_up.weight" in msg


def test_missing_and_misshaped_tensors_are_listed_in_one_error(tmp_path, tiny_checkpoints):
    sd = load_file(str(tiny_checkpoints["base"]))
    del sd["first_stage_model.decoder.conv_out.bias"]
    del sd["conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"]
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    msg = _error(path)
    assert "2 missing" in msg and "decoder.conv_out.bias" in msg and "layer_norm1.weight" in msg
    assert "1 wrong shape" in msg and "out.2.bias [5] (expected [4])" in msg


def test_truncated_file(tmp_path, tiny_checkpoints):
    data = tiny_checkpoints["refiner"].read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(path).lower()
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:100])
    assert "truncated" in _error(tiny).lower()


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my prompt notes, not a model\n" * 10)
    assert "not a safetensors file" in _error(path)


def test_pickled_ckpt_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    raw = tmp_path / "model.ckpt"
    raw.write_bytes(pickle.dumps(Evil(), protocol=2))
    assert "pickle" in _error(raw)
    zipped = tmp_path / "model_zip.ckpt"
    with zipfile.ZipFile(zipped, "w") as zf:  # torch.save's zip container
        zf.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    assert "pickle" in _error(zipped)
    assert not marker.exists()


@pytest.mark.parametrize("ctx,family", [(768, "Stable Diffusion 1.x"), (1024, "Stable Diffusion 2.x")])
def test_sd1_and_sd2_checkpoints_are_named(tmp_path, ctx, family):
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, ctx),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(ctx),
    }
    path = tmp_path / "v1-5-pruned.safetensors"
    save_file(sd, str(path))
    assert family in _error(path)


def test_missing_file_and_folder(tmp_path):
    assert "not found" in _error(tmp_path / "nope.safetensors")
    assert "folder" in _error(tmp_path)


def test_read_shapes_reads_header_only(tiny_checkpoints):
    shapes = read_shapes(tiny_checkpoints["base"])
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (128, TINY_BASE.unet.adm_in_channels)
