"""The lean CPU default: networks stored as the file stores them (fp16), computed in fp32 layer by layer.

The reference is the plain fp32 path (the same fp16 file read with dtype=fp32: every tensor upcast
once at load, ordinary torch layers): fp16 → fp32 is exact, so the manual-cast path must give the
same bits, compared with `torch.equal`, for the UNet's eps, both text encoders' hidden states and
pooled output, the VAE both ways, and a whole sampling run through the model manager.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from sdxl_nodes.sdxl_core import checkpoint, ops
from sdxl_nodes.sdxl_core.config import TINY_BASE
from sdxl_nodes.sdxl_core.errors import CheckpointError
from sdxl_nodes.sdxl_core.memory import ModelManager, RuntimeOptions
from sdxl_nodes.sdxl_core.sampling import sample


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory) -> Path:
    """A tiny base checkpoint stored in fp16, as the SDXL releases are."""
    return checkpoint.write_random_checkpoint(tmp_path_factory.mktemp("fp16") / "base_fp16.safetensors", TINY_BASE,
                                              seed=77, dtype=torch.float16)


def _pair(path, part):
    """(lean: stored as in the file, fp32 compute; reference: stored and computed in fp32)."""
    lean = checkpoint.load_part(path, part, dtype=None)
    ref = checkpoint.load_part(path, part, dtype=torch.float32)
    return lean, ref


def _float_dtypes(module):
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


def test_compute_dtype_rule():
    """The storage → compute table, per device (the CUDA rows are what the GPU path relies on)."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    assert [ops.compute_dtype("cpu", d) for d in (None, f16, bf16, f32)] == [f32, f32, bf16, f32]
    assert [ops.compute_dtype("cuda", d) for d in (None, f16, bf16, f32)] == [f32, f16, bf16, f32]
    assert RuntimeOptions().compute_dtype_for("unet") == f32
    assert RuntimeOptions(unet_dtype=bf16).compute_dtype_for("unet") == bf16
    assert RuntimeOptions(text_dtype=f16).compute_dtype_for("clip_g") == f32


def test_unet_eps_bit_identical(fp16_base):
    """Catches: computing in fp16 (weights not upcast, or inputs cast to the weights' dtype by the UNet), a
    bias left in fp16, GroupNorm/LayerNorm weights not cast, the loader upcasting anyway (no memory saved)."""
    lean, ref = _pair(fp16_base, "unet")
    assert _float_dtypes(lean) == {torch.float16} and _float_dtypes(ref) == {torch.float32}
    assert lean.dtype == torch.float32 and ref.dtype == torch.float32
    u = TINY_BASE.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 321.0])
    ctx = torch.randn(2, 77, u.context_dim, generator=g)
    y = torch.randn(2, u.adm_in_channels, generator=g)
    with torch.inference_mode():
        a, b = lean(x, t, ctx, y), ref(x, t, ctx, y)
    assert a.dtype == torch.float32 and b.abs().max() > 0
    assert torch.equal(a, b)


def test_text_encoders_bit_identical(fp16_base):
    """Catches: the token/position embeddings looked up in fp16 (the whole encoder then runs in fp16), the
    attention or final LayerNorm in fp16, the projection's weight not cast."""
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72, [49406] + [49407] * 76])
    for part in ("clip_l", "clip_g"):
        lean, ref = _pair(fp16_base, part)
        assert _float_dtypes(lean) == {torch.float16}
        with torch.inference_mode():
            a = lean(input_ids=ids, output_hidden_states=True)
            b = ref(input_ids=ids, output_hidden_states=True)
        assert len(a.hidden_states) == len(b.hidden_states)
        for i, (ha, hb) in enumerate(zip(a.hidden_states, b.hidden_states)):
            assert ha.dtype == torch.float32 and torch.equal(ha, hb), (part, i)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state), part
        if part == "clip_g":
            assert torch.equal(a.text_embeds, b.text_embeds)  # the pooled vector


def test_vae_bit_identical(fp16_base):
    """Catches: the VAE casting its input to its fp16 weights, a GroupNorm or 1×1 attention conv in fp16."""
    lean, ref = _pair(fp16_base, "vae")
    assert _float_dtypes(lean) == {torch.float16}
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    px = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(lean.decode(z), ref.decode(z))
        assert torch.equal(lean.encode(px), ref.encode(px))


def test_manager_default_samples_bit_identical(fp16_base):
    """The whole default path: manager options → loader → sampler. Catches: the sampler's denoiser casting
    its inputs to the weights' fp16 (it must take the UNet's compute dtype)."""
    lean_m, ref_m = ModelManager(RuntimeOptions()), ModelManager(RuntimeOptions(unet_dtype=torch.float32))
    lean, ref = lean_m.get(fp16_base, "unet"), ref_m.get(fp16_base, "unet")
    assert _float_dtypes(lean) == {torch.float16} and _float_dtypes(ref) == {torch.float32}
    g = torch.Generator().manual_seed(2)
    u = TINY_BASE.unet
    cond = [[torch.randn(1, 77, u.context_dim, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    uncond = [[torch.randn(1, 77, u.context_dim, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    latent = torch.zeros(1, 4, 8, 8)
    kw = dict(seed=5, steps=3, cfg=7.0, sampler_name="euler", scheduler="normal")
    a = sample(lean, cond, uncond, latent, **kw)
    b = sample(ref, cond, uncond, latent, **kw)
    assert torch.equal(a, b)


def test_fp32_file_never_rounded_down(tiny_checkpoints):
    """An fp32 file stays fp32 by default (the tiny fixtures are fp32); asking for fp16 rounds it and still
    computes in fp32. Catches: a default of fp16 storage that silently rounds a user's fp32 weights."""
    path = tiny_checkpoints["base"]
    m = ModelManager()
    assert _float_dtypes(m.get(path, "unet")) == {torch.float32}
    assert _float_dtypes(m.get(path, "clip_g")) == {torch.float32}
    half = checkpoint.load_part(path, "unet", dtype=torch.float16)
    assert _float_dtypes(half) == {torch.float16} and half.dtype == torch.float32


def test_bf16_stays_bf16_compute(fp16_base):
    """`--dtype bf16` on the CPU stores and computes in bf16 (no manual cast: speed, not exactness)."""
    unet = ModelManager(RuntimeOptions(unet_dtype=torch.bfloat16)).get(fp16_base, "unet")
    assert _float_dtypes(unet) == {torch.bfloat16} and unet.dtype == torch.bfloat16
    assert not any(isinstance(m, ops.CastLinear) for m in unet.modules())


def test_lora_on_fp16_storage(fp16_base, tmp_path):
    """A LoRA on the lean default: patched in fp32, rounded once to fp16, computed in fp32; removing it
    restores the file's bits. Catches: patching in fp16, or the patch upcasting the stored weight."""
    from safetensors.torch import save_file

    m = ModelManager()
    cfg, _ = m.inspect(fp16_base)
    unet = m.get(fp16_base, "unet")
    key = "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    w16 = unet.state_dict()[key].clone()
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, w16.shape[1], generator=g), torch.randn(w16.shape[0], 4, generator=g)
    name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
    path = tmp_path / "one.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)},
              str(path))
    patched = m.get(fp16_base, "unet", ((m.lora(path, cfg), 1.0),)).state_dict()[key]
    assert patched.dtype == torch.float16
    assert torch.equal(patched, (w16.float() + up @ down).half())
    assert torch.equal(m.get(fp16_base, "unet").state_dict()[key], w16)


def test_manual_cast_refuses_unknown_weight_holders():
    """A layer type without a casting version would quietly compute in fp16: refused by name."""

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))

    net = torch.nn.Sequential(torch.nn.Linear(3, 3).half(), Scale())
    with pytest.raises(TypeError, match=r"1 \(Scale\) holds weights"):
        ops.manual_cast(net, torch.float32)


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_loaded_network_holds_no_file_pages(fp16_base):
    """Stored in the file's dtype, a network must still not live in the file's memory map (pages counted in
    RSS on top of the page cache, pinned while the network lives). Catches: tensors taken from safe_open."""
    gc.collect()
    assert not _mapped(fp16_base)
    unet = checkpoint.load_part(fp16_base, "unet", dtype=None)
    assert _float_dtypes(unet) == {torch.float16}
    assert not _mapped(fp16_base)
    # the reader itself: bit-equal to safetensors' own reading
    from safetensors.torch import load_file

    ref = load_file(str(fp16_base))
    with checkpoint.TensorFile(fp16_base) as f:
        assert set(f.keys()) == set(ref)
        for k in list(ref)[:50]:
            t = f.get_tensor(k)
            assert t.dtype == ref[k].dtype and torch.equal(t, ref[k]), k


def test_truncated_file_is_a_clear_error(fp16_base, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = fp16_base.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with checkpoint.TensorFile(cut) as f:
        last = max(f.keys(), key=lambda k: f._span(k)[1])
        with pytest.raises(CheckpointError, match="do not fit its shape .* or the file"):
            f.get_tensor(last)
    os.remove(cut)


def test_text_encoders_freed_before_the_unet_loads_when_memory_is_short(models_dir, tmp_path, monkeypatch):
    """A base run (ComfyUI's default graph, core ids) on a machine whose RAM holds the UNet and the VAE but
    not the UNet beside both text encoders. Memory is simulated without a cgroup: available = a budget minus
    the bytes of the networks still alive (weakrefs, so a module evicted but still referenced counts).
    Catches: the UNet loaded first and the encoders freed after, an evicted encoder kept alive by a
    reference, or the UNet evicted needlessly for the VAE."""
    import uuid
    import weakref

    from sdxl_nodes.nodes.environment import configure
    from sdxl_nodes.runtime.cli import node_pack
    from sdxl_nodes.runtime.executor import Executor
    from sdxl_nodes.sdxl_core import memory

    alive: dict[str, weakref.ref] = {}
    size = {p: sum(t.numel() * 4 for t in m.parameters()) for p, m in checkpoint.build_modules(TINY_BASE).items()}
    budget = size["unet"] + size["vae"] + 1024  # fp32 tiny file: stored as 4 bytes a weight
    events = []

    def live_bytes():
        gc.collect()
        return sum(size[p] for p, r in alive.items() if r() is not None)

    real_load = checkpoint.load_part

    def load_part(path, part, **kw):
        events.append((part, sorted(p for p, r in alive.items() if r() is not None)))
        module = real_load(path, part, **kw)
        alive[part] = weakref.ref(module)
        return module

    monkeypatch.setattr(checkpoint, "load_part", load_part)
    monkeypatch.setattr(memory, "available_bytes", lambda device: budget - live_bytes())
    configure(models_dir=models_dir, input_dir=tmp_path, output_dir=tmp_path / "out",
              options=RuntimeOptions(reserve_bytes=0))
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a bottle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 2, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t", "images": ["8", 0]}},
    }
    result = Executor(node_pack(standalone=True)[0]).execute(prompt, str(uuid.uuid4()))
    assert result.success, result.error
    assert events == [("clip_l", []), ("clip_g", ["clip_l"]), ("unet", []), ("vae", ["unet"])]


def test_part_nbytes_counts_the_stored_dtype(fp16_base, tiny_checkpoints):
    """What the manager must budget for: 2 bytes a weight for an fp16 file kept as stored, 4 when upcast."""
    n = sum(p.numel() for p in checkpoint.build_modules(TINY_BASE)["unet"].parameters())
    assert checkpoint.part_nbytes(fp16_base, "unet", None) == 2 * n
    assert checkpoint.part_nbytes(fp16_base, "unet", torch.float32) == 4 * n
    assert checkpoint.part_nbytes(tiny_checkpoints["base"], "unet", None) == 4 * n  # an fp32 file stays fp32
    assert checkpoint.part_nbytes(tiny_checkpoints["base"], "unet", torch.bfloat16) == 2 * n


def test_page_cache_dropped_only_when_asked_or_short(fp16_base, monkeypatch):
    """DONTNEED covers exactly the network's bytes, and is sent when asked or when memory is short, never
    otherwise (a kept cache makes the next read twice as fast). Catches: dropping the whole file, or always."""
    import psutil

    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)))
    with checkpoint.TensorFile(fp16_base) as f:
        cfg, shapes = checkpoint.inspect_checkpoint(fp16_base)
        keys = checkpoint.split_keys(shapes, cfg)[0]["vae"]
        spans = [f._span(k) for k in keys]
    want = (min(b for b, _ in spans), max(e for _, e in spans) - min(b for b, _ in spans), os.POSIX_FADV_DONTNEED)
    checkpoint.load_part(fp16_base, "vae", dtype=None, drop_cache=False)
    assert calls == []
    checkpoint.load_part(fp16_base, "vae", dtype=None, drop_cache=True)
    assert calls == [want]
    calls.clear()
    plenty = psutil.virtual_memory()._replace(available=1 << 40)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: plenty)
    checkpoint.load_part(fp16_base, "vae", dtype=None)
    assert calls == []
    short = plenty._replace(available=1000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: short)
    checkpoint.load_part(fp16_base, "vae", dtype=None)
    assert calls == [want]
