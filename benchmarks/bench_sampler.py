"""Sampler overhead per step for every sampler, and the Brownian tree against a full-size UNet step.

1. Every sampler in ComfyUI's list through `sdxl_core.sampling.sample` with a no-op eps UNet (returns
   zeros) at a 128x128 latent (1024x1024 image), batch 1, CFG on (the "UNet" sees batch 2), a 25-step
   normal schedule: ms per step and per denoiser evaluation, i.e. everything except the UNet.
2. The SDE samplers' noise alone: one Brownian-tree query (torchsde, CPU tree, as ComfyUI) vs one
   plain seeded randn, per query at 128x128, over a 25-step schedule's queries.
3. With --unet: one full-size SDXL base UNet evaluation (random bf16 weights, CFG batch 2) at
   --unet-size (default 32x32 latent, a lower bound on a real 128x128 step), measured in the same run,
   and the Brownian tree's cost per step as a percentage of it (target < 1 %). Needs ~6 GB RAM: run it
   under `flock /tmp/sdxl-heavy.lock`.

Run: python benchmarks/bench_sampler.py [--steps 25] [--repeats 3] [--device cpu] [--threads N]
     flock /tmp/sdxl-heavy.lock python benchmarks/bench_sampler.py --skip-overhead --unet [--unet-size 32]

On a CPU shared by other processes, use --threads 1: torchsde's tree does ~50 small tensor ops per
query, and oversubscribed intra-op threads make each of them ~10x slower.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdxl_nodes.sdxl_core.samplers import brownian_noise_sampler, default_noise_sampler
from sdxl_nodes.sdxl_core.sampling import SAMPLERS, CFGDenoiser, sample
from sdxl_nodes.sdxl_core.schedules import get_sigmas
from sdxl_nodes.sdxl_core.types import Conditioning


class NoOpUNet:
    def __init__(self):
        self.calls = 0

    def __call__(self, x_in, timesteps, context, y):
        self.calls += 1
        return torch.zeros_like(x_in)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats, device):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def conds(device, batch=1):
    g = torch.Generator().manual_seed(0)
    pos = Conditioning(torch.randn(batch, 77, 2048, generator=g), torch.randn(batch, 2816, generator=g))
    neg = Conditioning(torch.randn(batch, 77, 2048, generator=g), torch.randn(batch, 2816, generator=g))
    return (Conditioning(pos.crossattn.to(device), pos.vector.to(device)),
            Conditioning(neg.crossattn.to(device), neg.vector.to(device)))


def sampler_overhead(args, device):
    pos, neg = conds(device)
    latent = torch.zeros(1, 4, args.size, args.size, device=device)
    print(f"\n1. sampler overhead: latent 1x4x{args.size}x{args.size}, cfg 8 (batch 2), {args.steps} steps, normal, "
          f"no-op UNet")
    print(f"{'sampler':<32}{'ms/step':>10}{'ms/eval':>10}{'evals':>8}")
    for name in SAMPLERS:
        unet = NoOpUNet()
        kwargs = dict(seed=1, steps=args.steps, cfg=8.0, sampler_name=name, scheduler="normal", dtype=torch.float32)
        seconds = best_of(lambda: sample(unet, pos, neg, latent, **kwargs), args.repeats, device)  # noqa: B023
        evals = unet.calls // (args.repeats + 1)
        print(f"{name:<32}{1000 * seconds / args.steps:>10.3f}{1000 * seconds / max(evals, 1):>10.3f}{evals:>8}")


def noise_cost(args, device):
    """ms per query of the CPU Brownian tree and of plain randn, over one schedule's queries."""
    x = torch.zeros(1, 4, args.size, args.size, device=device)
    sigmas = get_sigmas("karras", args.steps).to(device)
    pairs = list(zip(sigmas[:-2], sigmas[1:-1]))  # the last step to 0 draws nothing

    def tree():
        ns = brownian_noise_sampler(x, sigmas, 1, cpu=True)
        for a, b in pairs:
            ns(a, b)

    def randn():
        ns = default_noise_sampler(x, 1)
        for a, b in pairs:
            ns(a, b)

    results = {name: 1000 * best_of(fn, args.repeats, device) / len(pairs) for name, fn in (("tree", tree), ("randn", randn))}
    print(f"\n2. noise per query at 1x4x{args.size}x{args.size} ({len(pairs)} queries of a {args.steps}-step karras schedule)")
    print(f"{'noise sampler':<32}{'ms/query':>10}{'ratio':>10}")
    for name, ms in results.items():
        print(f"{name:<32}{ms:>10.3f}{ms / results['randn']:>10.2f}")
    return results["tree"]


def full_unet_step(args, device):
    from sdxl_nodes.sdxl_core.config import BASE
    from sdxl_nodes.sdxl_core.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(BASE.unet)
    unet = unet.to(dtype=torch.bfloat16).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02, generator=g)
    pos, neg = conds(device)
    denoiser = CFGDenoiser(unet, pos, neg, 8.0, dtype=torch.bfloat16)
    x = torch.randn(1, 4, args.unet_size, args.unet_size, device=device)
    sigma = torch.tensor([5.0], device=device)
    with torch.inference_mode():
        return best_of(lambda: denoiser(x, sigma), max(1, args.repeats - 1), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128, help="latent side (128 = 1024 px)")
    parser.add_argument("--unet", action="store_true", help="also time a full-size UNet evaluation (heavy)")
    parser.add_argument("--unet-size", type=int, default=32, help="latent side of the full-size UNet evaluation")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-overhead", action="store_true", help="skip part 1 (e.g. for the heavy --unet run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    if not args.skip_overhead:
        sampler_overhead(args, device)
    tree_ms = noise_cost(args, device)
    if args.unet:
        unet_ms = 1000 * full_unet_step(args, device)
        per_step = 2 * tree_ms  # dpmpp_sde: two tree queries per step (the others one)
        print(f"\n3. full-size SDXL base UNet, CFG batch 2, bf16, latent {args.unet_size}x{args.unet_size}: "
              f"{unet_ms:.1f} ms per evaluation")
        print(f"Brownian tree per step (2 queries at {args.size}x{args.size}): {per_step:.3f} ms = "
              f"{100 * per_step / unet_ms:.3f} % of that UNet evaluation (target < 1 %)")
        if args.unet_size < args.size:
            print(f"(the UNet ran at {args.unet_size}x{args.unet_size}, the tree at {args.size}x{args.size}: a "
                  f"{args.size}x{args.size} UNet evaluation costs at least {(args.size // args.unet_size) ** 2}x more)")


if __name__ == "__main__":
    main()
