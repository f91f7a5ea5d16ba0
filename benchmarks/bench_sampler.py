"""Sampler overhead per step: everything in `sdxl_core.sampling.sample` except the UNet.

A no-op eps UNet (returns zeros) at a 128x128 latent (1024x1024 image), batch 1, CFG on (so the
"UNet" sees batch 2), 25-step normal schedule. Prints ms per step and per denoiser evaluation.
Run: python benchmarks/bench_sampler.py [--steps 25] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from sdxl_nodes.sdxl_core.sampling import sample
from sdxl_nodes.sdxl_core.types import Conditioning

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "uni_pc", "lms")


class NoOpUNet:
    def __init__(self):
        self.calls = 0

    def __call__(self, x_in, timesteps, context, y):
        self.calls += 1
        return torch.zeros_like(x_in)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128, help="latent side (128 = 1024 px)")
    args = parser.parse_args()

    device = torch.device(args.device)
    pos = Conditioning(torch.randn(1, 77, 2048, device=device), torch.randn(1, 2816, device=device))
    neg = Conditioning(torch.randn(1, 77, 2048, device=device), torch.randn(1, 2816, device=device))
    latent = torch.zeros(1, 4, args.size, args.size, device=device)

    print(f"latent 1x4x{args.size}x{args.size}, cfg 8 (batch 2), {args.steps} steps, normal, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'sampler':<18}{'ms/step':>10}{'ms/eval':>10}{'evals':>8}")
    for name in SAMPLERS:
        unet = NoOpUNet()
        kwargs = dict(seed=1, steps=args.steps, cfg=8.0, sampler_name=name, scheduler="normal", dtype=torch.float32)
        sample(unet, pos, neg, latent, **kwargs)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            unet.calls = 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample(unet, pos, neg, latent, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        print(f"{name:<18}{1000 * best / args.steps:>10.3f}{1000 * best / unet.calls:>10.3f}{unet.calls:>8}")


if __name__ == "__main__":
    main()
