"""Memory tiers on a GPU: what moving a network between the GPU and host RAM costs, and sequential offload.

With a full-size SDXL base UNet in fp16 (random weights built on the device, no file), on CUDA:

* down: GPU → host RAM as the model manager demotes a network (`pack_to_host`: a few large buffers,
  page-locked with cudaHostRegister), against `module.to("cpu")` (pageable memory) in the same run;
* up: host RAM → GPU as the manager promotes it (`move_to_device`: asynchronous copies from the pinned
  buffers, one sync), against `.to("cuda")` from the pageable copy;
* whether the round trip is bit for bit, and how many of the bytes were really pinned;
* one UNet forward at 1024² with batch 2 (CFG's batch): resident, and streamed block by block from
  pinned RAM with 1 GiB of blocks (sequential offload, what runs when a network does not fit the GPU);
  seconds and peak VRAM of each.

    python benchmarks/bench_memory_tiers.py           # CUDA, full size: well under a minute on an H100-class GPU
    python benchmarks/bench_memory_tiers.py --tiny    # any device (the tiny config): checks that it runs
"""

from __future__ import annotations

import argparse
import time

import torch

from sdxl_nodes.sdxl_core import memory
from sdxl_nodes.sdxl_core.config import BASE, TINY_BASE
from sdxl_nodes.sdxl_core.unet import UNetModel

GiB = 1024**3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def peak(device, fn):
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / GiB


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test config (runs anywhere)")
    ap.add_argument("--block-gib", type=float, default=None,
                    help="GPU room for blocks when streaming (default 1 GiB; --tiny: an eighth of the UNet)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the script on the CPU")
    cfg = TINY_BASE if args.tiny else BASE
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNetModel(cfg.unet).eval().requires_grad_(False).to(dtype)
    for p in unet.parameters():  # default init is fine for speed; small values keep fp16 finite
        p.normal_(0, 0.02)
    size = memory._nbytes(unet)
    block_gib = args.block_gib or (size / 8 / GiB if args.tiny else 1.0)
    original = {k: v.clone().cpu() for k, v in unet.state_dict().items()}
    pin = device.type == "cuda"
    rows = []

    # 1. down and up, the manager's way, three round trips (best of each)
    downs, ups, pinned = [], [], 0
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        store = memory.pack_to_host(unet, pin=pin)
        downs.append(time.perf_counter() - t)
        pinned = store.pinned_bytes
        t = time.perf_counter()
        memory.move_to_device(unet, device, store)
        ups.append(time.perf_counter() - t)
    same = all(torch.equal(v.cpu(), original[k]) for k, v in unet.state_dict().items())

    # 2. the reference: pageable copies with module.to()
    ref_down = timed(device, lambda: unet.to("cpu"), repeat=1)
    ref_up = timed(device, lambda: unet.to(device), repeat=1)
    unet.to(device)

    def gbs(s):
        return f"{size / s / 1e9:.1f}"

    rows += [("down: GPU → pinned RAM (manager)", min(downs), gbs(min(downs)), f"{ref_down / min(downs):.2f}× faster"),
             ("down: module.to('cpu') (reference)", ref_down, gbs(ref_down), "1.00×"),
             ("up: pinned RAM → GPU (manager)", min(ups), gbs(min(ups)), f"{ref_up / min(ups):.2f}× faster"),
             ("up: .to(device) from pageable (reference)", ref_up, gbs(ref_up), "1.00×")]

    # 3. one forward, resident vs streamed from pinned RAM
    side = 16 if args.tiny else 128
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    ts = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    y = torch.randn(2, cfg.unet.adm_in_channels, generator=g).to(device, dtype)

    def forward():
        with torch.no_grad():
            return unet(x, ts, ctx, y)

    want = forward().float().cpu()
    t_res = timed(device, forward)
    vram_res = peak(device, forward)

    m = memory.ModelManager(memory.RuntimeOptions(device=str(device), reserve_bytes=0,
                                                  vram_limit_bytes=int(block_gib * GiB)))
    m.offload = True
    entry = memory._Entry(("bench-unet", 0, 0, "unet"), "cpu", size, unet)
    m._entries[entry.key] = entry
    m._start_streaming(entry)  # packs into pinned RAM, installs the block hooks
    got = forward().float().cpu()
    t_str = timed(device, forward)
    vram_str = peak(device, forward)
    blocks = len(entry.streamed) // 2
    rows += [("UNet forward, resident", t_res, f"peak {vram_res:.2f} GiB", "1.00×"),
             (f"UNet forward, streamed ({blocks} blocks ≤ {block_gib:.3g} GiB)", t_str,
              f"peak {vram_str:.2f} GiB", f"{t_str / t_res:.2f}× slower")]

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"UNet {'tiny' if args.tiny else 'SDXL base'} in {str(dtype).replace('torch.', '')}: {size / GiB:.2f} GiB")
    print(f"round trip bit for bit: {'yes' if same else 'NO'}; pinned: {pinned / GiB:.2f} of {size / GiB:.2f} GiB; "
          f"streamed vs resident output max |Δ|: {(got - want).abs().max().item():.3g}")
    print(f"| {'step':<48} | {'seconds':>8} | {'GB/s or VRAM':>16} | {'vs reference':>14} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 18}|{'-' * 16}|")
    for name, s, rate, ratio in rows:
        print(f"| {name:<48} | {s:>8.3f} | {rate:>16} | {ratio:>14} |")


if __name__ == "__main__":
    main()
