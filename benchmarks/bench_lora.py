"""LoRA benchmark: patch / unpatch / strength-change time and the memory a LoRA adds, full-size SDXL base.

Writes (once, into --dir) a full-size random base checkpoint (bf16, official layout, our writer) and a
rank-128 kohya LoRA on every UNet attention / feed-forward / proj linear and every text-encoder
attention / MLP linear (the usual "full" SDXL LoRA), then, with the UNet and both text encoders
resident in bf16 on the CPU:

* patch: apply the LoRA (strength 1) through the model manager, as a sampler's `model.load()` does;
* strength change: strength_model 1.0 → 0.5, i.e. what a re-run costs when only that widget changed
  (the patched tensors are put back from their undo records — no copy, no checkpoint read — and
  patched again);
* unpatch: the LoRA node removed (restored bit for bit, from the undo records);
* reference, measured in the same run: loading the UNet from the file (what a re-read would cost).

Peak RSS is sampled every 2 ms in a thread (VmRSS); "added" is the peak during a step minus the RSS
before it, compared with the LoRA file size (goal: ≤ file + 5 %).

    flock /tmp/sdxl-heavy.lock python benchmarks/bench_lora.py --dir /tmp/sdxl-bench-lora
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

GiB = 1024**3


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRSS:
    """Highest VmRSS seen while the `with` block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.added = self.peak - self.start


def write_lora(path: Path, rank: int = 128, seed: int = 0) -> Path:
    """A kohya-format LoRA (fp16, alpha = rank/2) on the usual SDXL LoRA targets; random from `seed`."""
    from safetensors.torch import save_file

    from sdxl_nodes.sdxl_core.checkpoint import build_modules
    from sdxl_nodes.sdxl_core.config import BASE

    mods = build_modules(BASE)  # meta: names and shapes only
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, out_f, in_f):
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 1e-3).half()
        sd[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)

    targets = ("attn1.to_", "attn2.to_", "ff.net.", "proj_in", "proj_out")
    for k, v in mods["unet"].state_dict().items():
        if k.endswith(".weight") and v.ndim == 2 and any(t in k for t in targets):
            add("lora_unet_" + k[:-7].replace(".", "_"), *v.shape)
    for part, prefix in (("clip_l", "lora_te1_"), ("clip_g", "lora_te2_")):
        for k, v in mods[part].state_dict().items():
            if k.endswith(".weight") and v.ndim == 2 and ("self_attn" in k or ".mlp." in k):
                c = k if k.startswith("text_model.") else "text_model." + k
                add(prefix + c[:-7].replace(".", "_"), *v.shape)
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/sdxl-bench-lora", type=Path)
    ap.add_argument("--rank", default=128, type=int)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)

    from sdxl_nodes.sdxl_core import checkpoint
    from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint
    from sdxl_nodes.sdxl_core.config import BASE
    from sdxl_nodes.sdxl_core.memory import ModelManager, RuntimeOptions

    ckpt = args.dir / "random_base_bf16.safetensors"
    if not ckpt.exists():
        t = time.perf_counter()
        write_random_checkpoint(ckpt, BASE, seed=0, dtype=torch.bfloat16)
        print(f"wrote {ckpt} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    lora_path = args.dir / f"kohya_rank{args.rank}.safetensors"
    if not lora_path.exists():
        write_lora(lora_path, args.rank)
    lora_size = lora_path.stat().st_size

    bf16 = torch.bfloat16
    m = ModelManager(RuntimeOptions(unet_dtype=bf16, text_dtype=bf16, vae_dtype=bf16, reserve_bytes=0))
    with PeakRSS() as load:
        unet = m.get(ckpt, "unet")
    for part in ("clip_l", "clip_g"):
        m.get(ckpt, part)
    cfg, _ = m.inspect(ckpt)
    # weights load memory-mapped: read every one once so RSS counts them before the LoRA steps
    for part in ("unet", "clip_l", "clip_g"):
        for t in m.get(ckpt, part).state_dict().values():
            t.float().sum()
    keys = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",  # patched whole
            "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"]  # patched in row blocks
    before = {k: unet.state_dict()[k].clone() for k in keys}


    reread = []  # tensors read back from the checkpoint to undo a patch (undo records make this 0)
    read_tensors = checkpoint.read_module_tensors

    def counting(path, part, keys, **kw):
        keys = list(keys)
        reread.extend(keys)
        return read_tensors(path, part, keys, **kw)

    checkpoint.read_module_tensors = counting

    with PeakRSS() as read:
        lp = m.lora(lora_path, cfg)
    n_patched = sum(len(d) for d in lp.patches.values())
    rows = []
    with PeakRSS() as patch:
        for part in ("unet", "clip_l", "clip_g"):
            m.get(ckpt, part, ((lp, 1.0),))
    changed = [not torch.equal(unet.state_dict()[k], before[k]) for k in keys]
    print(f"after patch: weights changed {changed}, unet patched tensors "
          f"{len(unet._sdxl_patch_state.patched)}", file=sys.stderr)
    modules = {p: m.get(ckpt, p, ((lp, 1.0),)) for p in ("unet", "clip_l", "clip_g")}  # as patched: no change
    undo_bytes = sum(mod._sdxl_patch_state.undo_nbytes() for mod in modules.values())
    patched_bytes = sum(t.numel() * t.element_size() for mod in modules.values()
                        for k, t in mod.state_dict().items() if k in mod._sdxl_patch_state.patched)
    del modules
    with PeakRSS() as restrength:
        m.get(ckpt, "unet", ((lp, 0.5),))
    print(f"after strength change: unet patched tensors {len(unet._sdxl_patch_state.patched)}", file=sys.stderr)
    with PeakRSS() as unpatch:
        for part in ("unet", "clip_l", "clip_g"):
            m.get(ckpt, part)
    exact = all(torch.equal(unet.state_dict()[k], before[k]) for k in keys)
    states = {p: len(m.get(ckpt, p)._sdxl_patch_state.patched) for p in ("unet", "clip_l", "clip_g")}
    print(f"patched tensors left after unpatch: {states}", file=sys.stderr)
    assert m.loads == 3, m.loads

    total_added = max(read.peak, patch.peak, restrength.peak, unpatch.peak) - read.start
    rows = [
        ("load UNet from file (reference)", load.seconds, load.added),
        ("read + match LoRA file", read.seconds, read.added),
        (f"patch {n_patched} weights (UNet + both encoders)", patch.seconds, patch.added),
        ("strength_model 1.0 → 0.5 (UNet re-patch)", restrength.seconds, restrength.added),
        ("unpatch (LoRA removed)", unpatch.seconds, unpatch.added),
    ]
    print(f"\nfull-size SDXL base (bf16, CPU, {torch.get_num_threads()} threads), kohya LoRA rank {args.rank}: "
          f"{lora_size / GiB:.3f} GiB, {n_patched} patched weights\n")
    print("| step | seconds | vs UNet load | peak RSS added (GiB) |\n|---|---|---|---|")
    for name, sec, added in rows:
        print(f"| {name} | {sec:.2f} | {sec / load.seconds:.2f}× | {added / GiB:.3f} |")
    print(f"\npeak RSS added by the LoRA over the whole cycle: {total_added / GiB:.3f} GiB = "
          f"{total_added / lora_size:.2f}× the LoRA file (goal ≤ 1.05×); unpatched weights bit-identical: {exact}; "
          f"networks read from disk: {m.loads}; tensors re-read from the checkpoint to undo: {len(reread)}")
    print(f"undo records: {undo_bytes / 2**20:.1f} MiB for {patched_bytes / GiB:.2f} GiB of patched weights "
          f"({100 * undo_bytes / patched_bytes:.2f} %)")


if __name__ == "__main__":
    main()
