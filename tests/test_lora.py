"""LoRA patching against diffusers' `load_lora_weights` (PEFT) and hand derivations, on tiny random weights.

The reference never sees our LoRA code: diffusers reads the same kohya / PEFT file written here,
converts the names itself and runs the LoRA as separate PEFT layers (unmerged), while we patch the
weights. Equal outputs mean the same weights were patched with the same scale.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from safetensors.torch import load_file, save_file
from test_hyperparameters import literal_clip_config
from test_parity_diffusers import diffusers_unet, rel_err
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdxl_nodes.sdxl_core import checkpoint
from sdxl_nodes.sdxl_core.config import TINY_BASE
from sdxl_nodes.sdxl_core.lora import LoraError, load_lora
from sdxl_nodes.sdxl_core.memory import ModelManager
from sdxl_nodes.sdxl_core.unet import timestep_embedding

TOL = 1e-5
RANK = 4


# ---------------------------------------------------------------------------------------------- files


def _pair(g, out_dim, in_dim, rank=RANK, conv=None):
    """(up, down) with sizeable values so that a wrong scale or a missed layer shows."""
    if conv:
        return 0.3 * torch.randn(out_dim, rank, 1, 1, generator=g), 0.3 * torch.randn(rank, in_dim, *conv, generator=g)
    return 0.3 * torch.randn(out_dim, rank, generator=g), 0.3 * torch.randn(rank, in_dim, generator=g)


# (kohya SGM name, module key in our UNet) — attention, feed-forward, proj_in/out, a 3×3 conv (LoCon)
UNET_TARGETS = [
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0",
    "middle_block.1.transformer_blocks.1.ff.net.0.proj",
    "output_blocks.2.1.transformer_blocks.0.ff.net.2",
    "output_blocks.0.1.proj_in",
    "input_blocks.7.1.proj_out",
    "input_blocks.1.0.in_layers.2",  # 3×3 conv of a ResBlock: LoCon
]
TE_TARGETS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1", "encoder.layers.2.self_attn.out_proj"]


def write_kohya(path, unet_sd, te1_sd, te2_sd, seed=0, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, weight):
        conv = tuple(weight.shape[2:]) if weight.ndim == 4 else None
        up, down = _pair(g, weight.shape[0], weight.shape[1], conv=conv)
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    for t in UNET_TARGETS:
        add("lora_unet_" + t.replace(".", "_"), unet_sd[t + ".weight"])
    for prefix, te in (("lora_te1_", te1_sd), ("lora_te2_", te2_sd)):
        for t in TE_TARGETS:
            add(prefix + "text_model_" + t.replace(".", "_"), te["text_model." + t + ".weight"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return sd


def write_peft(path, unet_dif_sd, te1_sd, te2_sd, seed=1):
    """diffusers' own saved layout: unet.<diffusers name>.lora_A/B, text_encoder(_2).…; no alpha (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
             "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_q",
             "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
             "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2",
             "up_blocks.1.attentions.0.proj_out"]
    for n in names:
        w = unet_dif_sd[n + ".weight"]
        up, down = _pair(g, w.shape[0], w.shape[1])
        sd[f"unet.{n}.lora_A.weight"], sd[f"unet.{n}.lora_B.weight"] = down, up
    for prefix, te in (("text_encoder.", te1_sd), ("text_encoder_2.", te2_sd)):
        for t in TE_TARGETS:
            w = te["text_model." + t + ".weight"]
            up, down = _pair(g, w.shape[0], w.shape[1])
            sd[f"{prefix}text_model.{t}.lora_A.weight"], sd[f"{prefix}text_model.{t}.lora_B.weight"] = down, up
    save_file(sd, str(path))
    return sd


# ---------------------------------------------------------------------------------------------- references


class _Pipe(StableDiffusionXLLoraLoaderMixin):
    """Just the three networks diffusers' SDXL LoRA loader patches."""

    hf_device_map = None
    components: dict = {}

    def __init__(self, unet, te1, te2):
        self.unet, self.text_encoder, self.text_encoder_2 = unet, te1, te2


def _canon(sd):
    return {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v for k, v in sd.items()}


def _reference_pipe(path):
    """diffusers UNet + transformers encoders filled from the tiny checkpoint by diffusers' own conversion."""
    from diffusers.loaders import single_file_utils as sfu

    sd = load_file(str(path))
    unet = diffusers_unet(TINY_BASE, sd)
    te1 = CLIPTextModel(literal_clip_config("clip_l", tiny=True)).eval()
    conv = {k: v for k, v in sfu.convert_ldm_clip_checkpoint(sd).items() if "position_ids" not in k}
    te1.load_state_dict(_to_model(conv, te1), strict=True)
    te2 = CLIPTextModelWithProjection(literal_clip_config("clip_g", tiny=True)).eval()
    conv = sfu.convert_open_clip_checkpoint(te2, sd, prefix="conditioner.embedders.1.model.")
    conv.pop("text_model.embeddings.position_ids", None)
    te2.load_state_dict(_to_model(conv, te2), strict=True)
    return _Pipe(unet, te1, te2)


def _to_model(sd, model):
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, TINY_BASE.unet.context_dim, generator=g)
    pooled = torch.randn(1, TINY_BASE.clip_g.projection_dim, generator=g)
    sizes = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    y = torch.cat([pooled, timestep_embedding(sizes.flatten(), 256).reshape(1, -1)], dim=1)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return x, t, ctx, pooled, sizes, y, ids


def _ours_vs_reference(manager, ckpt, lora_path, strength=1.0):
    cfg, _ = manager.inspect(ckpt)
    x, t, ctx, pooled, sizes, y, ids = _inputs()
    with torch.inference_mode():
        plain = manager.get(ckpt, "unet")(x, t, ctx, y)
    lp = manager.lora(lora_path, cfg)
    stack = ((lp, strength),)
    unet = manager.get(ckpt, "unet", stack)
    te1 = manager.get(ckpt, "clip_l", stack)
    te2 = manager.get(ckpt, "clip_g", stack)
    pipe = _reference_pipe(ckpt)
    pipe.load_lora_weights(str(lora_path))
    with torch.inference_mode():
        got = unet(x, t, ctx, y)
        want = pipe.unet(x, t, encoder_hidden_states=ctx,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        errs = {"unet": rel_err(got, want), "unet_changed": rel_err(want, plain)}
        for name, ours, ref in (("te1", te1, pipe.text_encoder), ("te2", te2, pipe.text_encoder_2)):
            a = ours(ids, output_hidden_states=True).hidden_states[-2]
            b = ref(ids, output_hidden_states=True).hidden_states[-2]
            errs[name] = rel_err(a, b)
    return errs


@pytest.fixture(scope="module")
def manager():
    """One manager for the module: every test asks for an explicit LoRA stack, so the patch state left by
    one test is exactly what the next must undo (as between runs of a changing graph)."""
    return ModelManager()


@pytest.fixture(scope="module")
def base_sd(tiny_checkpoints, manager):
    """Our module state dicts of the tiny base (unet, clip_l, clip_g), in transformers' text_model.* form."""
    m = manager
    p = tiny_checkpoints["base"]
    out = {part: {k: v.clone() for k, v in m.get(p, part).state_dict().items()} for part in ("unet", "clip_l", "clip_g")}
    return {part: (sd if part == "unet" else _canon(sd)) for part, sd in out.items()}


def test_kohya_equals_diffusers(tiny_checkpoints, base_sd, manager, tmp_path):
    """Catches: alpha/rank scale wrong or missing, te1/te2 swapped, a kohya SGM name mapped to the wrong
    block, LoCon conv reshaped wrongly, patches cast to fp16 before adding."""
    path = tmp_path / "kohya.safetensors"
    write_kohya(path, base_sd["unet"], base_sd["clip_l"], base_sd["clip_g"])
    errs = _ours_vs_reference(manager, tiny_checkpoints["base"], path)
    print(errs)
    assert errs["unet_changed"] > 1e-2  # the LoRA really changes the output
    assert errs["unet"] <= TOL and errs["te1"] <= TOL and errs["te2"] <= TOL


def test_peft_equals_diffusers(tiny_checkpoints, base_sd, manager, tmp_path):
    """Catches: diffusers→SGM table errors (up_blocks order, mid block, to_out.0), lora_A/lora_B swapped."""
    from sdxl_nodes.sdxl_core.diffusers_keys import unet_sgm_to_diffusers

    dif = {unet_sgm_to_diffusers(TINY_BASE.unet)[k]: v for k, v in base_sd["unet"].items()}
    path = tmp_path / "peft.safetensors"
    write_peft(path, dif, base_sd["clip_l"], base_sd["clip_g"])
    errs = _ours_vs_reference(manager, tiny_checkpoints["base"], path)
    print(errs)
    assert errs["unet_changed"] > 1e-2
    assert errs["unet"] <= TOL and errs["te1"] <= TOL and errs["te2"] <= TOL


# ---------------------------------------------------------------------------------------------- hand derivations


def _one_weight_lora(path, name, tensors, alpha=None):
    sd = {f"{name}.{k}": v for k, v in tensors.items()}
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))


def _patched(m, ckpt, path, key, part="unet", strength=1.0):
    cfg, _ = m.inspect(ckpt)
    before = m.get(ckpt, part).state_dict()[key].clone()
    after = m.get(ckpt, part, ((m.lora(path, cfg), strength),)).state_dict()[key].clone()
    return before, after


def test_loha_hand_derivation(tiny_checkpoints, manager, tmp_path):
    """ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank. Catches: Hadamard product replaced by a sum, wrong rank."""
    g = torch.Generator().manual_seed(7)
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"  # [64, 96]
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((64, 3), (3, 96), (64, 3), (3, 96)))
    path = tmp_path / "loha.safetensors"
    _one_weight_lora(path, "lora_unet_" + key[:-7].replace(".", "_"),
                     {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}, alpha=1.5)
    before, after = _patched(manager, tiny_checkpoints["base"], path, key, strength=0.7)
    want = before + 0.7 * (1.5 / 3) * ((w1a @ w1b) * (w2a @ w2b))
    torch.testing.assert_close(after, want, rtol=1e-6, atol=1e-6)


def test_lokr_hand_derivation(tiny_checkpoints, manager, tmp_path):
    """ΔW = w1 ⊗ (w2a·w2b) · alpha/rank(w2). Catches: Kronecker factors swapped, scale on full factors."""
    g = torch.Generator().manual_seed(8)
    key = "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"  # [64, 64]
    w1 = torch.randn(4, 8, generator=g)
    w2a, w2b = torch.randn(16, 2, generator=g), torch.randn(2, 8, generator=g)
    path = tmp_path / "lokr.safetensors"
    _one_weight_lora(path, "lora_unet_" + key[:-7].replace(".", "_"),
                     {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, alpha=4.0)
    before, after = _patched(manager, tiny_checkpoints["base"], path, key)
    want = before + (4.0 / 2) * torch.kron(w1, w2a @ w2b)
    torch.testing.assert_close(after, want, rtol=1e-6, atol=1e-6)


def test_locon_tucker_mid_and_diff(tiny_checkpoints, manager, tmp_path):
    """LoCon with a Tucker mid conv: ΔW[o,i,h,w] = Σ up[o,r]·mid[r,s,h,w]·down[s,i]; a `diff` key adds as is.
    Catches: mid ignored, mid transposed, diff scaled by alpha."""
    g = torch.Generator().manual_seed(9)
    key = "input_blocks.1.0.in_layers.2.weight"  # [32, 32, 3, 3]
    up, mid, down = torch.randn(32, 2, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 32, 1, 1, generator=g)
    diff_key = "out.2.weight"  # [4, 32, 3, 3]
    diff = torch.randn(4, 32, 3, 3, generator=g)
    path = tmp_path / "locon.safetensors"
    name = "lora_unet_" + key[:-7].replace(".", "_")
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_mid.weight": mid, f"{name}.lora_down.weight": down,
               f"{name}.alpha": torch.tensor(1.0), "diffusion_model.out.2.diff": diff}, str(path))
    m = manager
    ckpt = tiny_checkpoints["base"]
    cfg, _ = m.inspect(ckpt)
    b1, b2 = (m.get(ckpt, "unet").state_dict()[k].clone() for k in (key, diff_key))
    sd = m.get(ckpt, "unet", ((m.lora(path, cfg), 2.0),)).state_dict()
    delta = torch.einsum("or,rshw,si->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * (1.0 / 2)
    torch.testing.assert_close(sd[key], b1 + 2.0 * delta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sd[diff_key], b2 + 2.0 * diff, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- stacking, strength, removal


@pytest.fixture()
def two_loras(tiny_checkpoints, base_sd, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_kohya(a, base_sd["unet"], base_sd["clip_l"], base_sd["clip_g"], seed=11, alpha=4.0)
    write_kohya(b, base_sd["unet"], base_sd["clip_l"], base_sd["clip_g"], seed=12, alpha=1.0)
    return a, b


def test_two_stacked_equal_the_sum_of_deltas(tiny_checkpoints, manager, two_loras):
    """Catches: the second LoRA replacing the first, or being applied to an already-cast weight twice."""
    ckpt = tiny_checkpoints["base"]
    m = manager
    cfg, _ = m.inspect(ckpt)
    la, lb = (m.lora(p, cfg) for p in two_loras)
    base = {k: v.clone() for k, v in m.get(ckpt, "unet").state_dict().items()}
    da = {k: v - base[k] for k, v in m.get(ckpt, "unet", ((la, 0.8),)).state_dict().items()}
    db = {k: v - base[k] for k, v in m.get(ckpt, "unet", ((lb, -1.3),)).state_dict().items()}
    both = m.get(ckpt, "unet", ((la, 0.8), (lb, -1.3))).state_dict()
    changed = [k for k in base if da[k].abs().max() > 0]
    assert len(changed) == len(UNET_TARGETS)
    for k in base:
        torch.testing.assert_close(both[k], base[k] + da[k] + db[k], rtol=1e-5, atol=1e-6)


def test_strength_zero_is_no_lora_and_removal_restores_exactly(tiny_checkpoints, manager, two_loras):
    """Catches: patching with 0·ΔW rounding the weight, unpatch by subtraction (not bit-exact), patches
    left behind when the LoRA is removed, or a re-read of the whole network for a strength change."""
    ckpt = tiny_checkpoints["base"]
    fresh = checkpoint.load_checkpoint(ckpt)
    m = manager
    loads = m.loads
    cfg, _ = m.inspect(ckpt)
    la, lb = (m.lora(p, cfg) for p in two_loras)
    for part, fresh_module in (("unet", fresh.unet), ("clip_l", fresh.clip_l), ("clip_g", fresh.clip_g)):
        ref = fresh_module.state_dict()
        zero = m.get(ckpt, part, ((la, 0.0), (lb, 0.0))).state_dict()
        assert all(torch.equal(zero[k], ref[k]) for k in ref)
        patched = m.get(ckpt, part, ((la, 1.0), (lb, 0.5))).state_dict()
        assert sum(not torch.equal(patched[k], ref[k]) for k in ref) == len(UNET_TARGETS if part == "unet" else TE_TARGETS)
        m.get(ckpt, part, ((la, 0.25),))  # strength changed: re-patched in place
        restored = m.get(ckpt, part).state_dict()
        assert all(torch.equal(restored[k], ref[k]) for k in ref), part
    assert m.loads == loads  # no network re-read: strength changes and removal re-read only patched tensors


def test_fp16_storage_patch_computed_in_fp32(tiny_checkpoints, two_loras):
    """W16 + ΔW must be computed as fp32(W16) + ΔW, then rounded once. Catches: adding in fp16."""
    from sdxl_nodes.sdxl_core.memory import RuntimeOptions

    ckpt = tiny_checkpoints["base"]
    m = ModelManager(RuntimeOptions(unet_dtype=torch.float16))
    cfg, _ = m.inspect(ckpt)
    la = m.lora(two_loras[0], cfg)
    key = UNET_TARGETS[0] + ".weight"
    w16 = m.get(ckpt, "unet").state_dict()[key].clone()
    got = m.get(ckpt, "unet", ((la, 1.0),)).state_dict()[key]
    name = "lora_unet_" + UNET_TARGETS[0].replace(".", "_")
    sd = load_file(str(two_loras[0]))
    delta = (4.0 / RANK) * (sd[name + ".lora_up.weight"] @ sd[name + ".lora_down.weight"])
    assert got.dtype == torch.float16
    assert torch.equal(got, (w16.float() + delta).half())


# ---------------------------------------------------------------------------------------------- refusals


def test_unmatched_keys_one_warning_with_count(tiny_checkpoints, base_sd, tmp_path, caplog):
    path = tmp_path / "extra.safetensors"
    sd = write_kohya(path, base_sd["unet"], base_sd["clip_l"], base_sd["clip_g"])
    sd["lora_unet_not_a_block.lora_up.weight"] = torch.zeros(2, 2)
    sd["lora_unet_not_a_block.lora_down.weight"] = torch.zeros(2, 2)
    sd["something_else"] = torch.zeros(1)
    save_file(sd, str(path))
    with caplog.at_level(logging.WARNING):
        lp = load_lora(path, TINY_BASE)
    msgs = [r.getMessage() for r in caplog.records if "match no SDXL" in r.getMessage()]
    assert len(msgs) == 1 and "3 LoRA keys" in msgs[0] and "something_else" in msgs[0]
    assert sum(len(d) for d in lp.patches.values()) == len(UNET_TARGETS) + 2 * len(TE_TARGETS)


@pytest.mark.parametrize("ctx,family", [(768, "Stable Diffusion 1.x"), (1280, "SDXL refiner")])
def test_other_family_refused(tmp_path, ctx, family):
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, ctx),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4)},
              str(path))
    with pytest.raises(LoraError, match=f"trained for {family}, but it is applied to the SDXL base"):
        load_lora(path, TINY_BASE)


def test_base_lora_on_refiner_refused(tmp_path):
    from sdxl_nodes.sdxl_core.config import TINY_REFINER

    path = tmp_path / "base.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)},
              str(path))
    with pytest.raises(LoraError, match="trained for SDXL base, but it is applied to the SDXL refiner.*with the base"):
        load_lora(path, TINY_REFINER)


def test_mis_shaped_patch_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 65),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4)}, str(path))
    with pytest.raises(LoraError, match=r"1 LoRA patches do not fit.*proj_in"):
        load_lora(path, TINY_BASE)


def test_dora_hand_derivation(tiny_checkpoints, manager, tmp_path):
    """DoRA as ComfyUI v0.8 computes it (weight_decompose, magnitude on the output axis):
    W' = W + strength·(m ⊙ (W + s·BA) / (‖W‖_row + eps) − W). Catches: dora_scale ignored, the norm
    taken on the wrong axis, strength applied to ΔW only."""
    g = torch.Generator().manual_seed(10)
    key = "input_blocks.4.1.proj_in.weight"  # [64, 64]
    up, down = torch.randn(64, 2, generator=g) * 0.1, torch.randn(2, 64, generator=g) * 0.1
    m = 0.5 + torch.rand(64, 1, generator=g)
    path = tmp_path / "dora.safetensors"
    name = "lora_unet_" + key[:-7].replace(".", "_")
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0),
               f"{name}.dora_scale": m}, str(path))
    before, after = _patched(manager, tiny_checkpoints["base"], path, key, strength=0.6)
    calc = before + 0.5 * (up @ down)
    calc = calc * (m / (before.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))
    torch.testing.assert_close(after, before + 0.6 * (calc - before), rtol=1e-5, atol=1e-6)


def test_row_blocks_equal_whole_weight(tiny_checkpoints, manager, two_loras, monkeypatch):
    """Large weights are patched a block of rows at a time (memory); the result must not depend on it.
    Catches: a block using the wrong rows of lora_up, the last partial block skipped."""
    from sdxl_nodes.sdxl_core import lora

    ckpt = tiny_checkpoints["base"]
    cfg, _ = manager.inspect(ckpt)
    stack = tuple((manager.lora(p, cfg), s) for p, s in zip(two_loras, (0.7, 1.3)))
    base = {k: v.clone() for k, v in manager.get(ckpt, "unet").state_dict().items()}
    whole = {k: v.clone() for k, v in manager.get(ckpt, "unet", stack).state_dict().items()}
    manager.get(ckpt, "unet")
    monkeypatch.setattr(lora, "ROW_BLOCK_ABOVE", 300)  # blocks of 3–9 rows on the tiny weights
    blocks = {k: v.clone() for k, v in manager.get(ckpt, "unet", stack).state_dict().items()}
    manager.get(ckpt, "unet")
    assert sum(not torch.equal(whole[k], base[k]) for k in base) == len(UNET_TARGETS)
    for k in whole:
        torch.testing.assert_close(blocks[k], whole[k], rtol=1e-6, atol=1e-7)
