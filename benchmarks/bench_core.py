"""Core benchmark: load time and peak RSS, UNet step and VAE decode against diffusers on the same weights.

Writes full-size random base and refiner checkpoints (bf16, official key layout) once into --dir, then
runs each measurement in a fresh subprocess so peak RSS belongs to that measurement alone. Prints a table.

    python benchmarks/bench_core.py --dir /tmp/sdxl-bench          # everything (~10 min on 2 cores)
    python benchmarks/bench_core.py --dir /tmp/sdxl-bench --only unet
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DTYPE = torch.bfloat16


def peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it does not inherit the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2  # KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def file_gb(*paths) -> float:
    return sum(os.path.getsize(p) for p in paths) / 1024**3


def ensure_checkpoints(folder: Path) -> dict[str, Path]:
    from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint
    from sdxl_nodes.sdxl_core.config import BASE, REFINER

    out = {}
    for kind, cfg in (("base", BASE), ("refiner", REFINER)):
        path = folder / f"random_{kind}_bf16.safetensors"
        if not path.exists():
            t = time.perf_counter()
            write_random_checkpoint(path, cfg, seed=0, dtype=DTYPE)
            print(f"wrote {path} ({file_gb(path):.2f} GiB) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        out[kind] = path
    return out


# ---- measurements, each run in its own process -------------------------------------------------


def m_load(paths: list[str]) -> dict:
    from sdxl_nodes.sdxl_core.checkpoint import load_checkpoint

    base_rss = peak_rss_gb()
    t = time.perf_counter()
    models = [load_checkpoint(p, unet_dtype=DTYPE, text_dtype=DTYPE, vae_dtype=DTYPE) for p in paths]
    seconds = time.perf_counter() - t
    # Touch every weight once, as the first forward would: memory-mapped tensors only become resident
    # (and count in RSS) when read, so an untouched load would under-report the footprint.
    t = time.perf_counter()
    with torch.inference_mode():
        for m in models:
            for n in ("unet", "vae", "clip_l", "clip_g"):
                if m.__dict__[n] is not None:
                    for p in m.__dict__[n].parameters():
                        p.reshape(-1)[::1024].float().sum()  # one element per 2 KiB: every page
    touch = time.perf_counter() - t
    weights = sum(sum(t.numel() * t.element_size() for t in m.__dict__[n].state_dict().values())
                  for m in models for n in ("unet", "vae", "clip_l", "clip_g") if m.__dict__[n] is not None)
    return {"seconds": seconds, "touch_seconds": touch, "peak_rss_gb": peak_rss_gb(), "start_rss_gb": base_rss,
            "weights_gb": weights / 1024**3}


def _diffusers_unet(sd, cfg):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    u = cfg.unet
    yaml = {"model": {"params": {"network_config": {"params": {
        "adm_in_channels": u.adm_in_channels, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": u.model_channels, "attention_resolutions": [4, 2], "num_res_blocks": 2,
        "channel_mult": list(u.channel_mult), "num_head_channels": 64, "use_linear_in_transformer": True,
        "transformer_depth": [1, 2, 10], "context_dim": u.context_dim}},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = sfu.create_unet_diffusers_config_from_ldm(yaml, sd)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, config), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _time(fn, warmup=1, reps=5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def m_unet(path: str, which: str) -> dict:
    from safetensors.torch import load_file

    from sdxl_nodes.sdxl_core.checkpoint import load_part
    from sdxl_nodes.sdxl_core.config import BASE

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g).to(DTYPE)
    t = torch.tensor([999.0, 999.0])
    ctx = torch.randn(2, 77, 2048, generator=g).to(DTYPE)
    pooled = torch.randn(2, 1280, generator=g).to(DTYPE)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    with torch.inference_mode():
        if which == "ours":
            unet = load_part(path, "unet", dtype=DTYPE)
            from sdxl_nodes.sdxl_core.unet import timestep_embedding

            y = torch.cat([pooled.float(), timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], 1).to(DTYPE)
            sec = _time(lambda: unet(x, t, ctx, y))
        else:
            sd = {k: v for k, v in load_file(path).items() if k.startswith("model.diffusion_model.")}
            unet = _diffusers_unet(sd, BASE).to(DTYPE)
            del sd
            sec = _time(lambda: unet(x, t, encoder_hidden_states=ctx,
                                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(DTYPE)}))
    return {"seconds": sec, "peak_rss_gb": peak_rss_gb()}


def m_vae(path: str, which: str) -> dict:
    from safetensors.torch import load_file

    from sdxl_nodes.sdxl_core.checkpoint import load_part

    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if which == "ours":
            vae = load_part(path, "vae", dtype=DTYPE)
            sec = _time(lambda: vae.decode(z))
        else:
            from diffusers import AutoencoderKL
            from diffusers.loaders import single_file_utils as sfu

            sd = {k: v for k, v in load_file(path).items() if k.startswith("first_stage_model.")}
            yaml = {"model": {"params": {"scale_factor": 0.13025, "first_stage_config": {"params": {"ddconfig": {
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 4, "in_channels": 3,
                "out_ch": 3}}}}}}
            config = sfu.create_vae_diffusers_config_from_ldm(yaml, sd)
            vae = AutoencoderKL(**config)
            vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, config), strict=True)
            vae = vae.to(DTYPE).eval()
            zz = z.to(DTYPE)
            sec = _time(lambda: vae.decode(zz).sample)
    return {"seconds": sec, "peak_rss_gb": peak_rss_gb()}


MEASURES = {"load": m_load, "unet": m_unet, "vae": m_vae}


def run_child(name: str, *args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, *map(str, args)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-bench"))
    ap.add_argument("--only", choices=["load", "unet", "vae"], action="append")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        name, *rest = args.child
        if name == "load":
            print(json.dumps(m_load(rest)))
        else:
            print(json.dumps(MEASURES[name](*rest)))
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    paths = ensure_checkpoints(args.dir)
    only = set(args.only or MEASURES)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {DTYPE}")
    if "load" in only:
        for label, ps in (("load base", [paths["base"]]), ("load base + refiner", [paths["base"], paths["refiner"]])):
            r = run_child("load", *ps)
            over = (r["peak_rss_gb"] - r["weights_gb"]) / r["weights_gb"] * 100
            rows.append(f"| {label} | {r['seconds']:.1f} s (+{r['touch_seconds']:.1f} s first read) | peak RSS {r['peak_rss_gb']:.2f} GiB | weights "
                        f"{r['weights_gb']:.2f} GiB | +{over:.1f} % over weights |")
    for name, label in (("unet", "UNet forward, 32×32 latent, batch 2"), ("vae", "VAE decode 256×256")):
        if name not in only:
            continue
        ours = run_child(name, paths["base"], "ours")
        ref = run_child(name, paths["base"], "diffusers")
        rows.append(f"| {label} | ours {ours['seconds']:.3f} s | diffusers {ref['seconds']:.3f} s | "
                    f"ratio {ours['seconds'] / ref['seconds']:.2f}× | peak RSS {ours['peak_rss_gb']:.2f} vs "
                    f"{ref['peak_rss_gb']:.2f} GiB |")
    print("| measurement | | | | |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
