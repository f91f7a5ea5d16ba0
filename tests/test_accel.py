"""torch.compile plumbing: `--compile`, SDXL Compile UNet and TorchCompileModel reach the sampler's UNet.

torch.compile itself is replaced by a recorder (a real compile of even the tiny UNet takes minutes on two
CPU cores; benchmarks/bench_gpu.py measures the real one on a GPU). The recorder returns a wrapper that
calls the module, so the pixels must equal the uncompiled run and each (network, backend) must be
compiled exactly once however many times it samples.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_nodes.nodes.environment import build, use
from sdxl_nodes.runtime import cli
from sdxl_nodes.runtime.executor import Executor
from sdxl_nodes.runtime.validate import validate_prompt
from sdxl_nodes.sdxl_core import accel
from sdxl_nodes.sdxl_core.memory import RuntimeOptions


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, module, **kwargs):
        self.calls.append((module, kwargs))
        wrapper = torch.nn.Module()
        wrapper.inner = module  # parameters() reaches the module's (the sampler reads their dtype/device)
        wrapper.forward = lambda *a, **k: module(*a, **k)
        wrapper.compiled_with = kwargs
        return wrapper


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch, "compile", rec)
    monkeypatch.setattr(accel, "_COMPILED", accel.weakref.WeakKeyDictionary())
    return rec


def graph(seed: int, compile_node: str | None, backend: str = "inductor") -> dict:
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"c{seed}", "images": ["6", 0]}},
    }
    if compile_node:
        p["9"] = {"class_type": compile_node, "inputs": {"model": ["1", 0], "backend": backend}}
        p["5"]["inputs"]["model"] = ["9", 0]
    return p


def run_latent(models_dir, tmp_path, prompt, options=None):
    classes, _ = cli.node_pack(standalone=True)
    env = build(models_dir=models_dir, output_dir=tmp_path / "out", options=options or RuntimeOptions())
    with use(env):
        ex = Executor(classes)
        res = ex.execute(prompt, str(uuid.uuid4()))
        assert res.success, res.error
        ex.last_result, ex.env_output = res, env.output_dir
        return ex, env


def sampled(ex) -> np.ndarray:
    """The saved image's pixels."""
    (entry,) = ex.last_result.outputs["7"]["images"]
    with Image.open(ex.env_output / entry["subfolder"] / entry["filename"]) as im:
        return np.asarray(im).copy()


@pytest.mark.parametrize("node_id,backend", [("SDXLTorchCompile", "max-autotune"), ("TorchCompileModel", "cudagraphs")])
def test_compile_node_compiles_the_unet_once_and_changes_no_pixel(models_dir, tmp_path, recorder, node_id, backend):
    prompt = graph(1, None)
    plain_ex, _ = run_latent(models_dir, tmp_path, prompt)
    want = sampled(plain_ex)
    assert recorder.calls == []  # no compile without the node or the option

    p = graph(1, node_id, backend)
    if node_id == "SDXLTorchCompile":  # our node takes our sockets: the same graph in our ids
        p["9"]["inputs"]["model"] = ["1", 0]
    ex, env = run_latent(models_dir, tmp_path, p)
    assert np.array_equal(sampled(ex), want)
    assert len(recorder.calls) == 1
    module, kwargs = recorder.calls[0]
    assert module is env.manager.get(env.checkpoint_path("sd_xl_base_1.0.safetensors"), "unet")
    expected = {"mode": "max-autotune", "dynamic": False} if backend == "max-autotune" else \
        {"backend": backend, "dynamic": False}
    assert kwargs == expected

    # a new seed samples again with the same compiled UNet: no second compile
    p2 = graph(2, node_id, backend)
    with use(env):
        assert ex.execute(p2, str(uuid.uuid4())).success
    assert len(recorder.calls) == 1


def test_compile_option_from_the_command_line(models_dir, tmp_path, recorder):
    args = cli.build_parser().parse_args(["run", "x.json", "--models-dir", str(models_dir), "--compile"])
    env = cli.build_environment(args)
    assert env.manager.options.compile == "inductor"
    ex, _ = run_latent(models_dir, tmp_path, graph(3, None), options=env.manager.options)
    assert len(recorder.calls) == 1 and recorder.calls[0][1] == {"backend": "inductor", "dynamic": False}
    args = cli.build_parser().parse_args(["run", "x.json", "--models-dir", str(models_dir)])
    assert cli.build_environment(args).manager.options.compile is None


def test_unknown_backend_is_refused_before_anything_runs(models_dir, tmp_path):
    classes, _ = cli.node_pack(standalone=True)
    env = build(models_dir=models_dir, output_dir=tmp_path / "out")
    with use(env):
        errors = validate_prompt(graph(1, "TorchCompileModel", "tensorrt"), classes)
    text = str(errors)
    assert "backend" in text and "tensorrt" in text and "inductor" in text


def test_channels_last_changes_layout_not_values(tiny_checkpoints):
    """channels_last (the CUDA default) only reorders memory: same weights, same eps to fp32 rounding. Catches a
    conversion that permutes values (e.g. a reshape instead of a memory-format change)."""
    from sdxl_nodes.sdxl_core.checkpoint import load_part

    unet = load_part(tiny_checkpoints["base"], "unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ctx_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k")).in_features
    adm = unet.label_emb[0][0].in_features
    x, ctx, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, ctx_dim, generator=g), torch.randn(2, adm, generator=g)
    t = torch.tensor([999.0, 500.0])
    with torch.inference_mode():
        want = unet(x, t, ctx, y)
        accel.to_channels_last(unet)
        got = unet(x, t, ctx, y)
    convs = [p for p in unet.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


GiB = 1024**3


@pytest.mark.parametrize("device,prefetch_unet,free,expected", [
    ("cuda", True, 64 * GiB, True), ("cuda", False, 64 * GiB, False), ("cuda", None, 64 * GiB, False),
    ("cpu", None, 64 * GiB, True), ("cpu", None, 2 * GiB, False), ("cpu", False, 64 * GiB, False),
    ("cpu", True, 64 * GiB, True),
])
def test_checkpoint_loader_prefetches_the_unet(models_dir, tmp_path, device, prefetch_unet, free, expected):
    """By default a checkpoint loader starts the UNet's read at once on the CPU, when RAM holds the whole
    checkpoint plus a 2 GiB margin (the read then overlaps the text encoders' work), and never on CUDA
    (slower there with the files in the page cache); an explicit setting wins on either device.

    Catches: the CPU default off, a prefetch with no room left for the rest (2 GiB free: under the
    margin), the CUDA default flipped, --prefetch-unet / --no-prefetch-unet ignored."""
    import dataclasses

    from sdxl_nodes.nodes.loaders import CheckpointLoader
    from sdxl_nodes.sdxl_core.memory import ModelManager

    env = build(models_dir=models_dir, output_dir=tmp_path / "out")
    real = env.manager
    calls = []

    class Recording:  # the manager as the loader sees it, on a device this machine may not have
        options = dataclasses.replace(real.options, device=device, prefetch_unet=prefetch_unet, reserve_bytes=0)
        prefetch_unet_wanted = ModelManager.prefetch_unet_wanted  # the real decision, on this stub

        def inspect(self, path):
            return real.inspect(path)

        def _reader(self, path, part):
            return real._reader(path, part)

        def _free_bytes(self, tier):
            assert tier == "cpu"
            return free

        def prefetch(self, path, part):
            calls.append((path, part))
            return True

    env.manager = Recording()
    with use(env):
        CheckpointLoader().run("sd_xl_base_1.0.safetensors")
    want = [(str(env.checkpoint_path("sd_xl_base_1.0.safetensors")), "unet")] if expected else []
    assert calls == want


def test_prefetch_unet_flag():
    """--prefetch-unet / --no-prefetch-unet / neither → True / False / None (the device's default)."""
    p = cli.build_parser()
    args = [["run", "w.json", *a] for a in (["--prefetch-unet"], ["--no-prefetch-unet"], [])]
    assert [p.parse_args(a).prefetch_unet for a in args] == [True, False, None]


def test_sdpa_guard_leaves_out_cudnn_attention_on_cuda_only():
    """On CUDA our networks' attention may not use cuDNN's SDPA kernel (wrong results measured on an H200);
    on the CPU nothing changes; the flags come back on exit."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with accel.sdpa_backends("cuda:0"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with accel.sdpa_backends("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_sampling_text_and_vae_run_inside_the_guard(tiny_base, monkeypatch):
    """Every entry point that runs attention (sampler, prompt encoding, VAE) enters the guard with its device."""
    import contextlib

    from sdxl_nodes.sdxl_core import conditioning, sampling, text, vae
    from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

    seen = []

    @contextlib.contextmanager
    def recorder(device):
        seen.append(str(torch.device(device)))
        yield

    for module in (sampling, text, vae):
        monkeypatch.setattr(module, "sdpa_backends", recorder)
    enc = text.TextEncoders(tiny_base.clip_l, tiny_base.clip_g, load_tokenizer())
    emb = text.encode_prompt(enc, "a cat")
    assert seen == ["cpu"]
    c = conditioning.base_conditioning(emb, width=64, height=64)
    lat = sampling.sample(tiny_base.unet, c, c, torch.zeros(1, 4, 8, 8), seed=0, steps=1, cfg=2.0,
                          sampler_name="euler", scheduler="normal")
    assert seen == ["cpu", "cpu"]
    tiny_base.vae.decode(lat)
    tiny_base.vae.encode(torch.zeros(1, 3, 64, 64))
    assert seen == ["cpu"] * 4
