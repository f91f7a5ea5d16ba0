"""LoRA and VAE loader nodes in graphs: patch state across runs, caching, schemas, standalone VAE files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, environment
from sdxl_nodes.nodes.comfy_core import loras as core_loras
from sdxl_nodes.nodes.environment import NodeInputError
from sdxl_nodes.runtime.executor import Executor
from sdxl_nodes.sdxl_core import checkpoint

DATA = Path(__file__).resolve().parent / "data"
BASE = "sd_xl_base_1.0.safetensors"


def _kohya(path, seed, sd_unet, sd_te):
    """A small kohya LoRA on two UNet attention weights and one CLIP-L projection."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", sd_unet["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"]),
                    ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v", sd_unet["middle_block.1.transformer_blocks.0.attn2.to_v.weight"]),
                    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", sd_te)):
        out[name + ".lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g)
        out[name + ".lora_down.weight"] = torch.randn(4, w.shape[1], generator=g)
        out[name + ".alpha"] = torch.tensor(4.0)
    save_file(out, str(path))


@pytest.fixture()
def env(tmp_path, tiny_checkpoints):
    models = tmp_path / "models"
    for sub in ("checkpoints", "loras", "vae"):
        (models / sub).mkdir(parents=True)
    os.link(tiny_checkpoints["base"], models / "checkpoints" / BASE)
    ck = checkpoint.load_checkpoint(tiny_checkpoints["base"])
    te = next(v for k, v in ck.clip_l.state_dict().items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    _kohya(models / "loras" / "style.safetensors", 1, ck.unet.state_dict(), te)
    return environment.configure(models_dir=models, output_dir=tmp_path / "out")


def _graph(lora: dict | None, seed=1):
    g = {
        "1": {"class_type": "SDXLCheckpointLoader", "inputs": {"ckpt_name": BASE}},
        "2": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["L", 1] if lora else ["1", 1], "text_g": "a cat", "text_l": "a cat"}},
        "3": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["1", 1], "text_g": "", "text_l": ""}},
        "4": {"class_type": "SDXLSizeCropConditioning", "inputs": {"text": ["2", 0], "width": 64, "height": 64, "crop_w": 0,
                                                                   "crop_h": 0, "target_width": 64, "target_height": 64}},
        "5": {"class_type": "SDXLSizeCropConditioning", "inputs": {"text": ["3", 0], "width": 64, "height": 64, "crop_w": 0,
                                                                   "crop_h": 0, "target_width": 64, "target_height": 64}},
        "6": {"class_type": "SDXLEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "SDXLBaseSampler", "inputs": {"model": ["L", 0] if lora else ["1", 0], "positive": ["4", 0],
                                                          "negative": ["5", 0], "latent": ["6", 0], "seed": seed, "steps": 2,
                                                          "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                                                          "denoise_end": 1.0}},
        "8": {"class_type": "SDXLVAEDecode", "inputs": {"vae": ["1", 2], "samples": ["7", 0]}},
        "9": {"class_type": "SDXLPreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if lora:
        g["L"] = {"class_type": "SDXLLoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], **lora}}
    return g


def _run(executor, prompt) -> torch.Tensor:
    captured = {}
    orig = NODE_CLASS_MAPPINGS["SDXLVAEDecode"].run

    def spy(self, vae, samples, **hidden):
        out = orig(self, vae, samples, **hidden)
        captured["image"] = out[0].clone()
        return out

    NODE_CLASS_MAPPINGS["SDXLVAEDecode"].run = spy
    try:
        result = executor.execute(prompt, "p")
    finally:
        NODE_CLASS_MAPPINGS["SDXLVAEDecode"].run = orig
    assert result.status == "success", result.error
    return captured.get("image"), result


def test_graph_changes_between_runs(env):
    """Catches: a cached patched network reused after the LoRA node is removed, a strength change that
    re-reads the checkpoint or the LoRA file, patches applied twice when a cached LoRA node replays."""
    ex = Executor(NODE_CLASS_MAPPINGS)
    plain, _ = _run(ex, _graph(None))
    loads = env.manager.loads
    lora = {"lora_name": "style.safetensors", "strength_model": 1.0, "strength_clip": 1.0}
    with_lora, _ = _run(ex, _graph(lora))
    assert not torch.equal(with_lora, plain)
    stronger, r = _run(ex, _graph({**lora, "strength_model": 2.0}))
    assert not torch.equal(stronger, with_lora) and "1" in r.cached
    assert env.manager.lora_reads == 1 and env.manager.loads == loads  # nothing re-read but patched tensors
    again, _ = _run(ex, _graph(lora, seed=1))  # back to strength 1: same pixels as the first LoRA run
    assert torch.equal(again, with_lora)
    removed, _ = _run(ex, _graph(None))
    assert torch.equal(removed, plain)
    assert env.manager.loads == loads


def test_strength_zero_node_returns_its_inputs(env):
    model, clip = NODE_CLASS_MAPPINGS["SDXLCheckpointLoader"]().run(BASE)[:2]
    m2, c2 = NODE_CLASS_MAPPINGS["SDXLLoraLoader"]().run(model, clip, "style.safetensors", 0.0, 0.0)
    assert m2 is model and c2 is clip
    m3, c3 = core_loras.LoraLoader().run(model, clip, "style.safetensors", 0.5, 0.0)
    assert m3.patches[0][1] == 0.5 and c3.patches[0][1] == 0.0 and m3.path == model.path
    (m4,) = core_loras.LoraLoaderModelOnly().run(m3, "style.safetensors", 1.5)
    assert [s for _, s in m4.patches] == [0.5, 1.5]  # chained: applied in order


def test_missing_lora_names_the_folders(env):
    model, clip = NODE_CLASS_MAPPINGS["SDXLCheckpointLoader"]().run(BASE)[:2]
    with pytest.raises(NodeInputError, match=r"loras file 'nope.safetensors' not found in .*models/loras"):
        NODE_CLASS_MAPPINGS["SDXLLoraLoader"]().run(model, clip, "nope.safetensors", 1.0, 1.0)
    assert env.model_names("loras") == ["style.safetensors"]


def test_core_schemas_match_comfyui():
    """Input names, order, types, ranges and outputs as ComfyUI v0.8's /object_info (vendored subset)."""
    recorded = json.loads((DATA / "object_info_loras.json").read_text())
    for cls in core_loras.NODES:
        want = recorded[cls.SCHEMA.id]
        got = cls.INPUT_TYPES()["required"]
        assert list(got) == want["input_order"]["required"]
        for name, spec in want["input"]["required"].items():
            if isinstance(spec[0], list):
                assert isinstance(got[name][0], list)
            else:
                assert got[name][0] == spec[0]
            opts = spec[1] if len(spec) > 1 else {}
            for k in ("default", "min", "max", "step"):
                assert got[name][1].get(k) == opts.get(k), (cls.SCHEMA.id, name, k)
        assert list(cls.RETURN_TYPES) == want["output"] and list(cls.RETURN_NAMES) == want["output_name"]
        assert (cls.CATEGORY, cls.SCHEMA.display_name) == (want["category"], want["display_name"])


# ---------------------------------------------------------------------------------------------- VAE files


def test_vae_files_sgm_and_diffusers_layout(env, tiny_checkpoints):
    """A VAE saved alone (SGM keys) and converted by diffusers' own code (diffusers keys) both load and
    decode like the checkpoint's VAE. Catches: a wrong entry in the diffusers→SGM VAE table, attention
    matrices not reshaped, up-block order reversed."""
    from diffusers.loaders import single_file_utils as sfu
    from test_parity_diffusers import sgm_yaml

    from sdxl_nodes.sdxl_core.config import TINY_BASE

    sd = load_file(str(tiny_checkpoints["base"]))
    sgm = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(sgm, str(env.model_dirs("vae")[0] / "sgm_vae.safetensors"))
    cfg = sfu.create_vae_diffusers_config_from_ldm(sgm_yaml(TINY_BASE), sd)
    dif = sfu.convert_ldm_vae_checkpoint(sd, cfg)
    assert any("mid_block.attentions.0.to_q" in k for k in dif)
    save_file({k: v.contiguous() for k, v in dif.items()}, str(env.model_dirs("vae")[0] / "diffusers_vae.safetensors"))

    ref = checkpoint.load_checkpoint(tiny_checkpoints["base"]).vae
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ref.decode(z)
        for name in ("sgm_vae.safetensors", "diffusers_vae.safetensors"):
            (vae,) = NODE_CLASS_MAPPINGS["SDXLVAELoader"]().run(name)
            got = vae.load().decode(z)
            assert torch.equal(got, want), name
    assert env.model_names("vae") == ["diffusers_vae.safetensors", "sgm_vae.safetensors"]


def test_vae_file_errors_and_fp16_fix_detection(env, tiny_checkpoints, tmp_path):
    vae_dir = env.model_dirs("vae")[0]
    shutil.copy(tiny_checkpoints["base"], vae_dir / "whole.safetensors")
    with pytest.raises(NodeInputError, match="full checkpoint .* not a VAE file"):
        NODE_CLASS_MAPPINGS["SDXLVAELoader"]().run("whole.safetensors")
    sd = {k[len("first_stage_model."):]: v for k, v in load_file(str(tiny_checkpoints["base"])).items()
          if k.startswith("first_stage_model.")}
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, str(vae_dir / "broken.safetensors"))
    with pytest.raises(NodeInputError, match=r"1 missing: decoder.conv_out.bias \| 1 unexpected: decoder.extra.weight"):
        NODE_CLASS_MAPPINGS["SDXLVAELoader"]().run("broken.safetensors")
    sd.pop("decoder.extra.weight")
    sd["decoder.conv_out.bias"] = torch.zeros(3)
    for name, fix in (("sdxl_vae.safetensors", False), ("sdxl-vae-fp16-fix.safetensors", True),
                      ("sdxl_vae_FP16_fix.safetensors", True)):
        save_file(sd, str(vae_dir / name))
        info, _ = checkpoint.inspect_vae(vae_dir / name)
        assert info.fp16_fix is fix, name
    folder = tmp_path / "vae_folder"
    folder.mkdir()
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"force_upcast": False}))
    assert checkpoint.inspect_vae(folder / "diffusion_pytorch_model.safetensors")[0].fp16_fix
    (folder / "config.json").write_text(json.dumps({"force_upcast": True}))
    assert not checkpoint.inspect_vae(folder / "diffusion_pytorch_model.safetensors")[0].fp16_fix
    # the CPU never runs a VAE in fp16, fp16-fix or not
    info, _ = checkpoint.inspect_vae(vae_dir / "sdxl-vae-fp16-fix.safetensors")
    from sdxl_nodes.sdxl_core.ops import compute_dtype  # stored as the file is, computed in fp32
    assert compute_dtype(env.manager.options.device, env.manager.vae_dtype(info)) == torch.float32


@pytest.mark.parametrize("bf16", [True, False])
def test_vae_dtype_on_cuda(monkeypatch, bf16):
    """The choice the manager makes on a GPU (no GPU needed to make it): the fp16-fix VAE in fp16, what it
    was made for; the original SDXL VAE never in fp16 (it overflows there), bf16 where the GPU has it,
    else fp32. Catches: the fp16-fix flag ignored, fp16 for the original VAE."""
    from types import SimpleNamespace

    from sdxl_nodes.sdxl_core.memory import ModelManager, RuntimeOptions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    fake = SimpleNamespace(options=RuntimeOptions(device="cuda"))
    fix, plain = SimpleNamespace(fp16_fix=True), SimpleNamespace(fp16_fix=False)
    assert ModelManager.vae_dtype(fake, fix) == torch.float16
    assert ModelManager.vae_dtype(fake, plain) == (torch.bfloat16 if bf16 else torch.float32)
