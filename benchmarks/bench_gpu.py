"""GPU benchmark: our CUDA path vs diffusers' StableDiffusionXLPipeline + refiner, same GPU, same run.

One call measures everything inside --budget seconds (sections that would not fit are reported as
skipped), writing results.json and a table to --out as it goes:

  1. full-size random base + refiner checkpoints in the official layout, written here by our writer;
  2. UNet it/s at 1024² batch 2 (one CFG step): ours eager (NCHW and channels_last), diffusers eager;
  3. which attention kernels SDPA runs in our UNet (profiler kernel names);
  4. the 30-step base + refiner (0.8 switch, euler, cfg 8) wall time incl. text encoding and VAE decode:
     ours (core API, and the whole node graph through our executor) vs diffusers, peak VRAM of each;
  5. max |Δ| in 0..255 levels of our fp16 CUDA image vs our fp32 path (TF32 off) on the same weights;
  6. the 8 GB-VRAM mode (our manager capped at 8 GiB: networks move to the CPU tier and back);
  7. torch.compile: first-run compile time, UNet it/s and pipeline wall, ours and diffusers'.

    python benchmarks/bench_gpu.py --dir /tmp/gpu --out /tmp/gpu/out --budget 540
    python benchmarks/bench_gpu.py --device cpu --tiny --size 64 --steps 4 --dir /tmp/gpu-smoke --skip compile
        # a CPU smoke run of every code path on tiny weights (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS: dict[str, dict] = {}
PROMPT = "evening sunset scenery blue sky nature, glass bottle with a galaxy in it"
NEGATIVE = "text, watermark"


# ------------------------------------------------------------------------------------------------
# bookkeeping


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def save(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def section(args, budget: Budget, name: str, estimate: float, fn, *a):
    if name.split(":")[0] in args.skip or any(s in name for s in args.skip):
        RESULTS[name] = {"skipped": "--skip"}
        return None
    if budget.left() < estimate:
        RESULTS[name] = {"skipped": f"{budget.left():.0f} s left < {estimate:.0f} s estimated"}
        log(f"skip {name}: {RESULTS[name]['skipped']}")
        save(args)
        return None
    log(f"== {name} (≈{estimate:.0f} s, {budget.left():.0f} s left)")
    t0 = time.perf_counter()
    try:
        out = fn(*a)
        RESULTS.setdefault(name, {})["section_s"] = round(time.perf_counter() - t0, 2)
        return out
    except Exception as e:  # noqa: BLE001 - a benchmark section failing must not stop the others
        RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        traceback.print_exc()
        return None
    finally:
        log(f"   {name}: {json.dumps(RESULTS.get(name), default=str)[:600]}")
        save(args)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_BASELINE = [0]


def reset_peak(device) -> None:
    """Start a peak measurement: the peak is then reported above what is allocated now (other sections' models)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _BASELINE[0] = torch.cuda.memory_allocated()


def peak_gib(device, own_weights: float = 0.0) -> float | None:
    """GiB: `own_weights` (the measured pipeline's resident weights) + the peak allocated above the baseline."""
    if torch.device(device).type == "cuda":
        return round(own_weights + (torch.cuda.max_memory_allocated() - _BASELINE[0]) / 1024**3, 2)
    return None


def weights_gib(*modules) -> float:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if p.device.type == "cuda" and p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                n += p.numel() * p.element_size()
    return n / 1024**3


def per_call(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


# ------------------------------------------------------------------------------------------------
# ours


def ours_pipeline(mgr, base, refiner, *, size, steps, seed, compile_backend=None, prompt=PROMPT):
    """Base → refiner → decoded uint8 image (H, W, 3) on the CPU, through sdxl_core's public functions."""
    from sdxl_nodes.sdxl_core import conditioning as cond
    from sdxl_nodes.sdxl_core.memory import ModelRef
    from sdxl_nodes.sdxl_core.sampling import sample
    from sdxl_nodes.sdxl_core.text import TextEncoders, encode_prompt
    from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

    cfg_b, _ = mgr.inspect(base)
    cfg_r, _ = mgr.inspect(refiner)
    tok = load_tokenizer()
    sizes = {"width": size, "height": size}

    def encode():  # the encoders are referenced only in here: the manager may move them once it returns
        enc = TextEncoders(clip_l=mgr.get(base, "clip_l"), clip_g=mgr.get(base, "clip_g"), tokenizer=tok)
        pos = cond.base_conditioning(encode_prompt(enc, prompt, prompt), **sizes, target_width=size,
                                     target_height=size)
        neg = cond.base_conditioning(encode_prompt(enc, NEGATIVE, NEGATIVE), **sizes, target_width=size,
                                     target_height=size)
        del enc
        renc = TextEncoders(clip_l=None, clip_g=mgr.get(refiner, "clip_g"), tokenizer=tok)
        rpos = cond.refiner_conditioning(encode_prompt(renc, prompt), **sizes, aesthetic_score=6.0)
        rneg = cond.refiner_conditioning(encode_prompt(renc, NEGATIVE), **sizes, aesthetic_score=2.5)
        return pos, neg, rpos, rneg

    with torch.inference_mode():
        pos, neg, rpos, rneg = encode()
        unet = ModelRef(mgr, str(base), "unet", cfg_b, compile=compile_backend).load_for_sampling()
        device = next(unet.parameters()).device
        split = round(steps * 0.8)
        common = {"steps": steps, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal"}
        latent = torch.zeros(1, 4, size // 8, size // 8, device=device)
        lat = sample(unet, pos, neg, latent, seed=seed, end_step=split, return_with_leftover_noise=True, **common)
        del unet  # as the node graph does: the base UNet is not in use while the refiner loads
        runet = ModelRef(mgr, str(refiner), "unet", cfg_r, compile=compile_backend).load_for_sampling()
        lat = sample(runet, rpos, rneg, lat, seed=0, start_step=split, add_noise=False, **common)
        del runet
        pixels = mgr.get(refiner, "vae").decode(lat)
        return ((pixels + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu()


def unet_inputs(cfg, device, dtype, size, batch=2):
    g = torch.Generator(device="cpu").manual_seed(0)
    u = cfg.unet
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    ctx = torch.randn(batch, 77, u.context_dim, generator=g)
    pooled = torch.randn(batch, u.adm_in_channels - 6 * 256 if not cfg.is_refiner else u.adm_in_channels - 5 * 256,
                         generator=g)
    n_sizes = 5 if cfg.is_refiner else 6
    time_ids = torch.tensor([[size, size, 0, 0, size, size][:n_sizes]] * batch, dtype=torch.float32)
    if cfg.is_refiner:
        time_ids[:, 4] = 6.0
    from sdxl_nodes.sdxl_core.unet import timestep_embedding

    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(batch, -1)], dim=1)
    t = torch.tensor([999.0] * batch)
    mv = {"device": device, "dtype": dtype}
    return {"x": x.to(**mv), "t": t.to(device), "ctx": ctx.to(**mv), "y": y.to(**mv), "pooled": pooled.to(**mv),
            "time_ids": time_ids.to(**mv)}


# ------------------------------------------------------------------------------------------------
# diffusers, built from the same files through diffusers' own single-file conversion


def sgm_yaml(cfg) -> dict:
    """The SGM inference yaml (as a dict) describing this config, the way Stability writes it."""
    u, v = cfg.unet, cfg.vae
    depth = list(u.transformer_depth)
    depth[0] = depth[1]
    return {"model": {"params": {
        "scale_factor": v.scale_factor,
        "network_config": {"params": {
            "adm_in_channels": u.adm_in_channels, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": u.model_channels, "attention_resolutions": [4, 2], "num_res_blocks": u.num_res_blocks,
            "channel_mult": list(u.channel_mult), "num_head_channels": u.num_head_channels,
            "use_linear_in_transformer": True,
            "transformer_depth": depth if not cfg.is_refiner else u.transformer_depth_middle,
            "context_dim": u.context_dim}},
        "first_stage_config": {"params": {"ddconfig": {
            "ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels,
            "in_channels": 3, "out_ch": 3}}},
    }}}


def diffusers_unet(cfg, sd, device, dtype):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_unet_diffusers_config_from_ldm(sgm_yaml(cfg), sd)
    config.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    config["projection_class_embeddings_input_dim"] = cfg.unet.adm_in_channels
    with init_empty_weights():
        model = UNet2DConditionModel(**config)
    model.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, config), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def diffusers_vae(cfg, sd, device, dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_vae_diffusers_config_from_ldm(sgm_yaml(cfg), sd)
    with init_empty_weights():
        model = AutoencoderKL(**config)
    model.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, config), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def clip_tokenizers(folder: Path):
    """transformers' CLIPTokenizer from vocab.json/merges.txt written from the BPE file we ship."""
    import gzip
    from importlib import resources

    from transformers import CLIPTokenizer

    from sdxl_nodes.sdxl_core.tokenizer import BPE_FILE, vocab_from_bpe

    data = resources.files("sdxl_nodes.sdxl_core").joinpath("data", BPE_FILE)
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
    vocab, merges = vocab_from_bpe(lines)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tok2 = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    tok.model_max_length = tok2.model_max_length = 77
    return tok, tok2


def transformers_text_encoder(ours, device, dtype):
    """transformers' CLIPTextModel(WithProjection) with a copy of our encoder's weights (the API diffusers calls)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = ours.config  # sdxl_core.config.TextEncoderConfig
    config = CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                            num_hidden_layers=c.layers, num_attention_heads=c.heads, max_position_embeddings=c.max_length,
                            hidden_act=c.activation, layer_norm_eps=1e-5, projection_dim=c.projection_dim or c.width,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=c.pad_token)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if c.projection_dim else CLIPTextModel)(config)
    sd = {k: v.detach().to(device, dtype, copy=True) for k, v in ours.state_dict().items()}
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5's plain CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):  # the non-persistent position_ids, still on meta
        owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        owner.register_buffer(leaf, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)
    return model.eval().requires_grad_(False)


def diffusers_pipelines(mgr, base, refiner, device, tmp: Path):
    """(base pipeline, refiner pipeline) on the same weights, fp16 (diffusers' usual GPU setup)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    cfg_b, _ = mgr.inspect(base)
    cfg_r, _ = mgr.inspect(refiner)
    sd_b = load_file(str(base))
    unet = diffusers_unet(cfg_b, sd_b, device, dtype)
    vae = diffusers_vae(cfg_b, sd_b, device, dtype)
    del sd_b
    sd_r = load_file(str(refiner))
    runet = diffusers_unet(cfg_r, sd_r, device, dtype)
    del sd_r
    # diffusers' text encoders: transformers' CLIP models holding copies of our encoders' weights
    te1 = transformers_text_encoder(mgr.get(base, "clip_l"), device, dtype)
    te2 = transformers_text_encoder(mgr.get(base, "clip_g"), device, dtype)
    rte2 = transformers_text_encoder(mgr.get(refiner, "clip_g"), device, dtype)
    tok, tok2 = clip_tokenizers(tmp / "tokenizer")
    sched = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler(**sched))
    rpipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=rte2, tokenizer=None,
                                             tokenizer_2=tok2, unet=runet, scheduler=EulerDiscreteScheduler(**sched),
                                             requires_aesthetics_score=True)
    for p in (pipe, rpipe):
        p.set_progress_bar_config(disable=True)
    return pipe, rpipe


def diffusers_run(pipe, rpipe, *, size, steps, seed, device, prompt=PROMPT):
    g = torch.Generator(device=device).manual_seed(seed)
    common = {"num_inference_steps": steps, "guidance_scale": 8.0}
    with torch.inference_mode():
        lat = pipe(prompt=prompt, negative_prompt=NEGATIVE, height=size, width=size, denoising_end=0.8,
                   output_type="latent", generator=g, **common).images
        img = rpipe(prompt=prompt, negative_prompt=NEGATIVE, image=lat, denoising_start=0.8, output_type="pt",
                    generator=g, **common).images
    return img[0].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu()


# ------------------------------------------------------------------------------------------------
# the sections


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-gpu"))
    ap.add_argument("--out", type=Path, default=None, help="results.json and table.md (default: --dir)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random checkpoints (a smoke run of the code paths)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--iters", type=int, default=20, help="UNet calls timed per it/s figure")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole benchmark")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip (name prefixes)")
    ap.add_argument("--compile-unet-only", action="store_true", help="compile: UNet it/s only, no pipeline")
    args = ap.parse_args(argv)
    args.out = args.out or args.dir
    budget = Budget(args.budget)
    dev = args.device
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.dir / "inductor-cache"))

    from sdxl_nodes.sdxl_core import checkpoint
    from sdxl_nodes.sdxl_core.config import BASE, REFINER, TINY_BASE, TINY_REFINER
    from sdxl_nodes.sdxl_core.memory import ModelManager, RuntimeOptions

    env = {"torch": torch.__version__, "device": dev, "python": sys.version.split()[0]}
    if torch.device(dev).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["sdpa_flash_enabled"] = torch.backends.cuda.flash_sdp_enabled()
        env["sdpa_mem_efficient_enabled"] = torch.backends.cuda.mem_efficient_sdp_enabled()
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError as e:
        env["diffusers"] = f"missing: {e}"
    RESULTS["env"] = env
    log(env)

    ckdir = args.dir / ("tiny" if args.tiny else "full")
    base, refiner = ckdir / "sd_xl_base_1.0.safetensors", ckdir / "sd_xl_refiner_1.0.safetensors"

    def write():
        r = RESULTS.setdefault("write", {})
        for path, cfg, seed in ((base, TINY_BASE if args.tiny else BASE, 0),
                                (refiner, TINY_REFINER if args.tiny else REFINER, 1)):
            if not path.exists():
                t0 = time.perf_counter()
                checkpoint.write_random_checkpoint(path, cfg, seed=seed, dtype=torch.float16,
                                                   device=dev if torch.device(dev).type == "cuda" else "cpu")
                r[path.name] = {"seconds": round(time.perf_counter() - t0, 1),
                                "GB": round(path.stat().st_size / 1e9, 2)}

    section(args, budget, "write", 120, write)
    if not base.exists():
        log("no checkpoints: stopping")
        return

    mgr = ModelManager(RuntimeOptions(device=dev))
    state: dict = {"mgr": mgr}

    def load():
        r = RESULTS.setdefault("load", {})
        reset_peak(dev)
        for path in (base, refiner):
            for part in ("clip_l", "clip_g", "unet", "vae"):
                if part == "clip_l" and path == refiner:
                    continue
                t0 = time.perf_counter()
                m = mgr.get(path, part)
                sync(dev)
                s = time.perf_counter() - t0
                nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
                r[f"{path.stem.split('_')[2]}.{part}"] = {"seconds": round(s, 2), "GB": round(nbytes / 1e9, 2),
                                                          "GB/s": round(nbytes / 1e9 / s, 2)}
        r["dtypes"] = {part: str(next(mgr.get(base, part).parameters()).dtype) for part in ("unet", "clip_g", "vae")}
        r["peak_vram_GiB"] = peak_gib(dev)

    section(args, budget, "load", 60, load)

    def uploader_check():
        """The pinned-buffer upload gives the same device tensors as a plain .to() (odd sizes, several dtypes,
        one larger than a staging buffer)."""
        from sdxl_nodes.sdxl_core.accel import PinnedUploader

        up = PinnedUploader(dev, buffer_bytes=1 << 20)
        g = torch.Generator().manual_seed(0)
        cases = [(torch.randn(3, 5, 7, generator=g).half(), torch.float32),
                 (torch.randn(1_000_003, generator=g), torch.float16),
                 (torch.randn(700, 900, generator=g).bfloat16(), torch.bfloat16),
                 (torch.arange(77)[None], None)]
        outs = [up.upload(t, d) for t, d in cases]
        up.finish()
        ok = all(torch.equal(o, t.to(device=dev, dtype=d or t.dtype)) for o, (t, d) in zip(outs, cases))
        RESULTS["uploader_check"] = {"bit_equal": ok}

    if torch.device(dev).type == "cuda":
        section(args, budget, "uploader_check", 5, uploader_check)

    size, steps = args.size, args.steps
    cfg_b, _ = mgr.inspect(base)
    cfg_r, _ = mgr.inspect(refiner)
    udtype = next(mgr.get(base, "unet").parameters()).dtype

    def ours_unet():
        from sdxl_nodes.sdxl_core.accel import to_channels_last

        r = RESULTS.setdefault("ours_unet", {})
        unet = mgr.get(base, "unet")
        i = unet_inputs(cfg_b, dev, udtype, size)
        with torch.inference_mode():
            for layout in ("nchw", "channels_last"):
                if layout == "channels_last":
                    to_channels_last(unet)
                else:
                    for p in unet.parameters():
                        if p.dim() == 4:
                            p.data = p.data.contiguous()
                reset_peak(dev)
                s = per_call(lambda: unet(i["x"], i["t"], i["ctx"], i["y"]), dev, 3, args.iters)
                r[layout] = {"it_per_s": round(1 / s, 2), "ms": round(s * 1000, 1), "peak_vram_GiB": peak_gib(dev)}
            runet = mgr.get(refiner, "unet")
            ri = unet_inputs(cfg_r, dev, udtype, size)
            to_channels_last(runet)
            s = per_call(lambda: runet(ri["x"], ri["t"], ri["ctx"], ri["y"]), dev, 3, args.iters)
            r["refiner_channels_last"] = {"it_per_s": round(1 / s, 2), "ms": round(s * 1000, 1)}
        # the default follows the faster layout (RuntimeOptions.channels_last); recorded for the note
        r["faster"] = max(("nchw", "channels_last"), key=lambda k: r[k]["it_per_s"])

    section(args, budget, "ours_unet", 30, ours_unet)

    def sdpa():
        from sdxl_nodes.sdxl_core.accel import attention_kernels

        unet = mgr.get(base, "unet")
        i = unet_inputs(cfg_b, dev, udtype, size)
        with torch.inference_mode():
            names = attention_kernels(lambda: unet(i["x"], i["t"], i["ctx"], i["y"]))
        RESULTS["sdpa"] = {"kernels": names,
                           "flash_or_efficient": any(k in n.lower() for n in names for k in ("flash", "fmha", "efficient"))}

    if torch.device(dev).type == "cuda":
        section(args, budget, "sdpa", 15, sdpa)

    def ours_pipe(name, compile_backend=None, runs=2):
        r = RESULTS.setdefault(name, {})
        t0 = time.perf_counter()
        state[name + "_img"] = ours_pipeline(mgr, base, refiner, size=size, steps=steps, seed=1,
                                             compile_backend=compile_backend)
        r["first_run_s"] = round(time.perf_counter() - t0, 2)
        walls = []
        reset_peak(dev)
        for k in range(runs):
            t0 = time.perf_counter()
            ours_pipeline(mgr, base, refiner, size=size, steps=steps, seed=2 + k, compile_backend=compile_backend,
                          prompt=f"{PROMPT} {k}")
            walls.append(time.perf_counter() - t0)
        r["wall_s"] = round(min(walls), 3)
        r["walls"] = [round(w, 3) for w in walls]
        own = weights_gib(*(mgr.get(p, part) for p in (base, refiner) for part in ("unet", "clip_g", "vae")),
                          mgr.get(base, "clip_l")) if torch.device(dev).type == "cuda" else 0.0
        r["peak_vram_GiB"] = peak_gib(dev, own)  # every network of both checkpoints resident + the peak above

    section(args, budget, "ours_pipeline", 30, ours_pipe, "ours_pipeline")

    def ours_graph(name="ours_graph", manager=None, runs=3):
        """The same run as a node graph through our executor (what `run`/`serve` do); with `manager` None the
        models are already loaded, else that (fresh) manager reads them: the cold run."""
        import uuid

        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_workflow import _stock_prompts

        from sdxl_nodes.nodes.environment import build, use
        from sdxl_nodes.runtime.cli import node_pack
        from sdxl_nodes.runtime.executor import Executor

        models = args.dir / "graph-models"
        (models / "checkpoints").mkdir(parents=True, exist_ok=True)
        for p in (base, refiner):
            link = models / "checkpoints" / p.name
            if not link.exists():
                link.symlink_to(p)
        env_ = build(models_dir=models, input_dir=args.dir / "input", output_dir=args.dir / "graph-out",
                     options=RuntimeOptions(device=dev))
        env_.manager = manager or mgr
        classes, _ = node_pack(standalone=True)
        walls = []
        with use(env_):
            ex = Executor(classes)  # prompts run in the context the executor was made in
            for k in range(runs):
                prompt = _stock_prompts(size, steps)["ours"]
                for nid in ("6", "15"):
                    prompt[nid]["inputs"]["text_g"] += f" {k}"
                prompt["10"]["inputs"]["seed"] = 10 + k
                t0 = time.perf_counter()
                res = ex.execute(prompt, str(uuid.uuid4()))
                walls.append(time.perf_counter() - t0)
                if not res.success:
                    raise RuntimeError(res.error)
        RESULTS[name] = {"first_run_s": round(walls[0], 2), "walls": [round(w, 3) for w in walls],
                         "note": "incl. previews and PNG save"}
        if len(walls) > 1:
            RESULTS[name]["wall_s"] = round(min(walls[1:]), 3)

    section(args, budget, "ours_graph", 25, ours_graph)

    def cold_graphs():
        """Whole graph from nothing loaded (files in the page cache), with and without the UNet prefetch that
        overlaps the refiner's read with the base's work."""
        for prefetch in (False, True):
            m = ModelManager(RuntimeOptions(device=dev, prefetch_unet=prefetch))
            sync(dev)
            ours_graph(f"ours_cold_graph_prefetch_{'on' if prefetch else 'off'}", m, runs=1)
            m.unload_all()
            del m
            torch.cuda.empty_cache() if torch.device(dev).type == "cuda" else None

    section(args, budget, "cold_graphs", 40, cold_graphs)

    def diffusers_eager():
        r = RESULTS.setdefault("diffusers", {})
        t0 = time.perf_counter()
        pipe, rpipe = diffusers_pipelines(mgr, base, refiner, dev, args.dir)
        r["build_s"] = round(time.perf_counter() - t0, 1)
        state["pipes"] = (pipe, rpipe)
        i = unet_inputs(cfg_b, dev, pipe.unet.dtype, size)
        with torch.inference_mode():
            def call():
                return pipe.unet(i["x"], i["t"], encoder_hidden_states=i["ctx"],
                                 added_cond_kwargs={"text_embeds": i["pooled"], "time_ids": i["time_ids"]}).sample
            reset_peak(dev)
            s = per_call(call, dev, 3, args.iters)
        r["unet"] = {"it_per_s": round(1 / s, 2), "ms": round(s * 1000, 1)}
        t0 = time.perf_counter()
        state["diffusers_img"] = diffusers_run(pipe, rpipe, size=size, steps=steps, seed=1, device=dev)
        r["first_run_s"] = round(time.perf_counter() - t0, 2)
        walls = []
        reset_peak(dev)
        for k in range(2):
            t0 = time.perf_counter()
            diffusers_run(pipe, rpipe, size=size, steps=steps, seed=2 + k, device=dev, prompt=f"{PROMPT} {k}")
            walls.append(time.perf_counter() - t0)
        r["wall_s"] = round(min(walls), 3)
        r["walls"] = [round(w, 3) for w in walls]
        own = weights_gib(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, rpipe.unet,
                          rpipe.text_encoder_2) if torch.device(dev).type == "cuda" else 0.0
        r["peak_vram_GiB"] = peak_gib(dev, own)

    section(args, budget, "diffusers", 90, diffusers_eager)

    def fp32_delta():
        """Our default (fp16 UNet/CLIP, bf16 VAE) vs our fp32 path on the same weights: one UNet call, one prompt
        encoding, and whole images after 4 and `steps` steps (random weights are not a trained, contracting
        denoiser: a long trajectory may amplify rounding, so the short run and the single calls show where)."""
        from sdxl_nodes.sdxl_core.text import TextEncoders, encode_prompt
        from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        m32 = ModelManager(RuntimeOptions(device=dev, unet_dtype=torch.float32, text_dtype=torch.float32,
                                          vae_dtype=torch.float32))
        r = RESULTS.setdefault("fp32_delta", {})

        def rel(a, b):
            return float((a.float() - b.float()).abs().max() / b.float().abs().max())

        with torch.inference_mode():
            i32 = unet_inputs(cfg_b, dev, torch.float32, size)
            e32 = m32.get(base, "unet")(i32["x"], i32["t"], i32["ctx"], i32["y"])
            e16 = mgr.get(base, "unet")(i32["x"].to(udtype), i32["t"], i32["ctx"].to(udtype), i32["y"].to(udtype))
            r["unet_eps_rel_err"] = rel(e16, e32)
            tok = load_tokenizer()
            t32 = encode_prompt(TextEncoders(m32.get(base, "clip_l"), m32.get(base, "clip_g"), tok), PROMPT)
            t16 = encode_prompt(TextEncoders(mgr.get(base, "clip_l"), mgr.get(base, "clip_g"), tok), PROMPT)
            r["text_crossattn_rel_err"] = rel(t16.crossattn, t32.crossattn)
            r["text_pooled_rel_err"] = rel(t16.pooled, t32.pooled)
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dev)
            p32 = m32.get(base, "vae").decode(z)
            p16 = mgr.get(base, "vae").decode(z)
            r["vae_decode_rel_err"] = rel(p16, p32)
        for n in (4, steps):
            img32 = ours_pipeline(m32, base, refiner, size=size, steps=n, seed=1)
            img16 = ours_pipeline(mgr, base, refiner, size=size, steps=n, seed=1)
            d = (img16.int() - img32.int()).abs()
            r[f"image_{n}_steps"] = {
                "max_levels": int(d.max()), "mean_levels": round(float(d.float().mean()), 3),
                "pct_values_over_1_level": round(100 * float((d > 1).float().mean()), 3),
                "pct_values_equal": round(100 * float((d == 0).float().mean()), 2),
                "fp32_image_mean_std": [round(float(img32.float().mean()), 1), round(float(img32.float().std()), 1)],
                "fp32_pct_saturated": round(100 * float(((img32 == 0) | (img32 == 255)).float().mean()), 2)}
            if n == steps:
                state["img32"] = img32
        m32.unload_all()
        del m32
        img32 = state.pop("img32")
        if "diffusers_img" in state:
            dd = (state["diffusers_img"].int() - img32.int()).abs()
            # information only: diffusers' Euler uses its own ("leading") timesteps, not ComfyUI's "normal"
            RESULTS["fp32_delta"]["diffusers_fp16_vs_our_fp32_other_schedule"] = {
                "max_levels": int(dd.max()), "mean_levels": round(float(dd.float().mean()), 3)}
        torch.backends.cudnn.allow_tf32 = True

    section(args, budget, "fp32_delta", 45, fp32_delta)

    def low_vram():
        """Our manager capped at 8 GiB of VRAM: base and refiner take turns, the other waits in CPU RAM."""
        fields = RuntimeOptions.__dataclass_fields__
        if "vram_limit_bytes" not in fields:
            RESULTS["vram_8gb"] = {"skipped": "this tree's manager has no VRAM cap"}
            return
        m8 = ModelManager(RuntimeOptions(device=dev, vram_limit_bytes=8 * 1024**3))
        walls = []
        torch.cuda.empty_cache()
        reset_peak(dev)  # the other sections' models stay resident: the peak is counted above them
        for k in range(2):
            t0 = time.perf_counter()
            ours_pipeline(m8, base, refiner, size=size, steps=steps, seed=2 + k, prompt=f"{PROMPT} {k}")
            walls.append(time.perf_counter() - t0)
        RESULTS["vram_8gb"] = {"first_run_s": round(walls[0], 2), "wall_s": round(walls[1], 3),
                               "peak_vram_GiB_incl_weights": peak_gib(dev), "disk_loads": m8.loads,
                               "resident": [tuple(map(str, r))[1:] for r in m8.resident()]}
        m8.unload_all()

    if torch.device(dev).type == "cuda":
        section(args, budget, "vram_8gb", 40, low_vram)

    def ours_compiled():
        from sdxl_nodes.sdxl_core.accel import compiled

        r = RESULTS.setdefault("ours_compiled", {})
        unet = ModelRef_for(mgr, base, cfg_b).load_for_sampling()
        cu = compiled(unet, "inductor")
        i = unet_inputs(cfg_b, dev, udtype, size)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cu(i["x"], i["t"], i["ctx"], i["y"])
            sync(dev)
            r["compile_s_base"] = round(time.perf_counter() - t0, 1)
            s = per_call(lambda: cu(i["x"], i["t"], i["ctx"], i["y"]), dev, 2, args.iters)
        r["unet"] = {"it_per_s": round(1 / s, 2), "ms": round(s * 1000, 1)}
        if args.compile_unet_only:
            return
        t0 = time.perf_counter()
        ours_pipe("ours_compiled_pipeline", compile_backend="inductor")
        r["pipeline_incl_refiner_compile_s"] = round(time.perf_counter() - t0, 1)

    section(args, budget, "ours_compiled", 110 if args.compile_unet_only else 200, ours_compiled)

    def diffusers_compiled():
        pipes = state.get("pipes")
        if pipes is None:
            raise RuntimeError("diffusers eager section did not build the pipelines")
        pipe, _ = pipes
        r = RESULTS.setdefault("diffusers_compiled", {})
        pipe.unet.to(memory_format=torch.channels_last)
        cu = torch.compile(pipe.unet, fullgraph=True)
        i = unet_inputs(cfg_b, dev, pipe.unet.dtype, size)
        with torch.inference_mode():
            def call():
                return cu(i["x"], i["t"], encoder_hidden_states=i["ctx"],
                          added_cond_kwargs={"text_embeds": i["pooled"], "time_ids": i["time_ids"]}).sample
            t0 = time.perf_counter()
            call()
            sync(dev)
            r["compile_s_base"] = round(time.perf_counter() - t0, 1)
            s = per_call(call, dev, 2, args.iters)
        r["unet"] = {"it_per_s": round(1 / s, 2), "ms": round(s * 1000, 1)}

    section(args, budget, "diffusers_compiled", 120, diffusers_compiled)

    table(args)


def ModelRef_for(mgr, path, cfg):  # noqa: N802 - reads like the class it builds
    from sdxl_nodes.sdxl_core.memory import ModelRef

    return ModelRef(mgr, str(path), "unet", cfg)


def table(args) -> None:
    R = RESULTS

    def g(sec, *keys):
        v = R.get(sec, {})
        for k in keys:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        return v if not isinstance(v, dict) or v else "—"

    rows = [
        ("UNet it/s, 1024² batch 2 (base)", g("ours_unet", "nchw", "it_per_s"), g("ours_unet", "channels_last", "it_per_s"),
         g("ours_compiled", "unet", "it_per_s"), g("diffusers", "unet", "it_per_s"),
         g("diffusers_compiled", "unet", "it_per_s")),
        ("base+refiner 30 steps wall s (incl. text + decode)", g("ours_pipeline", "wall_s"), "",
         g("ours_compiled_pipeline", "wall_s"), g("diffusers", "wall_s"), ""),
        ("first run s (incl. compile)", g("ours_pipeline", "first_run_s"), "",
         g("ours_compiled_pipeline", "first_run_s"), g("diffusers", "first_run_s"), g("diffusers_compiled",
                                                                                        "compile_s_base")),
        ("peak VRAM GiB (pipeline)", g("ours_pipeline", "peak_vram_GiB"), "", g("ours_compiled_pipeline", "peak_vram_GiB"),
         g("diffusers", "peak_vram_GiB"), ""),
    ]
    lines = [f"# bench_gpu — {R.get('env', {}).get('gpu', args.device)}, torch {R.get('env', {}).get('torch')}, "
             f"diffusers {R.get('env', {}).get('diffusers')}", "",
             "| | ours eager | ours eager channels_last | ours compiled | diffusers eager | diffusers compiled |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    ours_w, dif_w = R.get("ours_pipeline", {}).get("wall_s"), R.get("diffusers", {}).get("wall_s")
    if isinstance(ours_w, float) and isinstance(dif_w, float):
        lines.append(f"\nours / diffusers wall (eager): {ours_w / dif_w:.2f}×")
    lines.append(f"\nour graph through the executor (previews + PNG save): {g('ours_graph', 'wall_s')} s; cold "
                 f"(weights read from the page cache): {g('ours_cold_graph_prefetch_off', 'first_run_s')} s, with the "
                 f"UNet prefetch {g('ours_cold_graph_prefetch_on', 'first_run_s')} s")
    lines.append(f"8 GiB VRAM cap: {json.dumps(R.get('vram_8gb'))}")
    lines.append(f"fp16 vs fp32 (ours): {json.dumps(R.get('fp32_delta'))}")
    lines.append(f"SDPA kernels: {json.dumps(R.get('sdpa'))}")
    lines.append(f"load: {json.dumps(R.get('load'))}")
    lines.append(f"write: {json.dumps(R.get('write'))}")
    text = "\n".join(lines)
    print(text, flush=True)
    (args.out / "table.md").write_text(text + "\n")
    save(args)


if __name__ == "__main__":
    main()
