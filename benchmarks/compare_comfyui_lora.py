"""Pixels with LoRAs: `sdxl-nodes run` vs ComfyUI's own LoraLoader, full-size random SDXL base, CPU.

One API prompt in core node ids (CheckpointLoaderSimple → LoraLoader [→ LoraLoader] → two CLIPTextEncode,
EmptyLatentImage, KSampler euler/normal cfg 7, VAEDecode, SaveImage), run as is by both tools in fresh
processes (ComfyUI: its server, `main.py --cpu` and its defaults, over HTTP; ours: `sdxl-nodes run` with
our default CPU settings), through bench_workflow's runners. Per variant it prints the difference of the two
PNGs, and each tool's difference from its own picture without a LoRA (so that a match is not trivial).

Variants: `none` (no LoRA), `lora` (rank-128 kohya LoRA, strength_model 1, strength_clip 1), `half`
(strength_model 0.5, strength_clip 1), `stack` (that LoRA, then a rank-16 one of another seed, both 1/1).
The LoRAs are written once with bench_lora's `write_lora` (UNet attention / feed-forward / proj linears and
both text encoders' attention / MLP linears); the base checkpoint with our random writer (fp16, official
layout) unless --dir already has one. Images stay in --dir/<variant>-<tool>/; a later call reuses the
`none` images there for the "vs no LoRA" columns. Load full-size weights one process at a time:

    flock /tmp/sdxl-heavy.lock python benchmarks/compare_comfyui_lora.py --dir /tmp/comfylora \\
        --comfyui /tmp/comfyui-run --comfyui-python /tmp/comfyui-venv/bin/python --comfyui-arg=--fp16-unet \\
        --variant none --variant lora

ComfyUI's CPU default keeps the UNet in fp32 and, while a LoRA is applied, also the unpatched fp32 tensors
(its backup): with the rank-128 LoRA on the full-size base that is more than a 24 GiB machine holds, hence
`--fp16-unet` there (same pixels as its default without LoRAs; with one, patched weights stored in fp16, as
ours by default on CPU for fp16 files and as ComfyUI on a GPU). `--weights` instead compares the patched
tensors themselves, bit for bit, for a few UNet and text-encoder weights in fp32 and fp16 storage: ComfyUI's
`comfy.lora.load_lora` + `calculate_weight` + `stochastic_rounding` (in ComfyUI's python) vs our
`lora.patch_module`; it reads only those tensors (no lock needed).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import write_lora  # noqa: E402
from bench_workflow import _base_prompt, _pixels, _run_comfyui, _run_ours  # noqa: E402

LORAS = {"kohya_rank128.safetensors": (128, 0), "kohya_rank16_seed1.safetensors": (16, 1)}
VARIANTS = {  # name → LoraLoaders in chain order: (file, strength_model, strength_clip)
    "none": (),
    "lora": (("kohya_rank128.safetensors", 1.0, 1.0),),
    "half": (("kohya_rank128.safetensors", 0.5, 1.0),),
    "stack": (("kohya_rank128.safetensors", 1.0, 1.0), ("kohya_rank16_seed1.safetensors", 1.0, 1.0)),
}


def lora_prompt(size: int, steps: int, loras: tuple) -> dict:
    """ComfyUI's default base graph at cfg 7 with the LoraLoaders chained between checkpoint and consumers."""
    prompt = copy.deepcopy(_base_prompt(size, steps))
    prompt["3"]["inputs"]["cfg"] = 7.0
    model, clip = ["4", 0], ["4", 1]
    for i, (name, s_model, s_clip) in enumerate(loras):
        nid = str(20 + i)
        prompt[nid] = {"class_type": "LoraLoader", "inputs": {
            "lora_name": name, "strength_model": s_model, "strength_clip": s_clip, "model": model, "clip": clip}}
        model, clip = [nid, 0], [nid, 1]
    prompt["3"]["inputs"]["model"] = model
    prompt["6"]["inputs"]["clip"] = clip
    prompt["7"]["inputs"]["clip"] = clip
    return prompt


def _diff(a, b) -> str:
    d = abs(a - b)
    return f"{int(d.max())} | {(d > 1).mean() * 100:.3f} % | {(d > 0).mean() * 100:.3f} %"


# ------------------------------------------------------------------------------------------------
# --weights: the patched tensors themselves, ComfyUI's maths vs ours

WEIGHT_KEYS = {  # a few of each kind; ff.net.0.proj is large enough that ours patches it in row blocks
    "unet": ("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
             "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
             "output_blocks.2.1.transformer_blocks.9.attn2.to_k.weight", "output_blocks.2.1.proj_out.weight"),
    "clip_l": ("encoder.layers.5.self_attn.q_proj.weight", "encoder.layers.11.mlp.fc2.weight"),
    "clip_g": ("encoder.layers.20.mlp.fc1.weight", "encoder.layers.31.self_attn.out_proj.weight"),
}
STORAGE = ("float32", "float16")


def _kohya_name(part: str, key: str) -> str:
    """The name write_lora gives the LoRA module of this weight."""
    c = key if part == "unet" or key.startswith("text_model.") else "text_model." + key
    return {"unet": "lora_unet_", "clip_l": "lora_te1_", "clip_g": "lora_te2_"}[part] + c[: -len(".weight")].replace(".", "_")


def _comfyui_weights_child(args) -> None:
    """In ComfyUI's python: patch the saved originals as ModelPatcher.patch_weight_to_device does (every
    patch of a key in one calculate_weight call, fp32, then stochastic_rounding to the storage dtype)."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(args.comfyui))
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.float
    import comfy.lora
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    work = args.dir / "weights"
    meta = json.loads((work / "meta.json").read_text())
    orig = load_file(str(work / "orig.safetensors"))
    key_map = {m["lora"]: m["name"] for m in meta}
    patches = {n: comfy.lora.load_lora(comfy.utils.load_torch_file(str(args.dir / "models" / "loras" / n),
                                                                    safe_load=True), key_map, log_missing=False)
               for n in LORAS}
    out = {}
    for variant, loras in VARIANTS.items():
        if not loras:
            continue
        for store in STORAGE:
            dtype = getattr(torch, store)
            for name, w in orig.items():
                temp = w.to(dtype).to(torch.float32, copy=True)
                plist = [(s_model, patches[n][name], 1.0, None, None) for n, s_model, _ in loras]
                r = comfy.lora.calculate_weight(plist, temp, name, intermediate_dtype=torch.float32)
                out[f"{variant}|{store}|{name}"] = comfy.float.stochastic_rounding(r, dtype).contiguous()
    save_file(out, str(work / "comfyui.safetensors"))


def weights(args) -> None:
    import subprocess

    import torch
    from safetensors.torch import load_file, save_file

    from sdxl_nodes.sdxl_core import checkpoint, lora
    from sdxl_nodes.sdxl_core.config import BASE

    work = args.dir / "weights"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = args.dir / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors"
    orig, meta = {}, []
    modules = checkpoint.build_modules(BASE)  # on meta: the module keys (text encoders' as transformers names them)
    for part, keys in WEIGHT_KEYS.items():
        names = list(modules[part].state_dict())
        keys = [next(k for k in names if k.endswith(want)) for want in keys]
        for k, t in checkpoint.read_module_tensors(ckpt, part, keys, dtype=None).items():
            orig[f"{part}/{k}"] = t.contiguous()
            meta.append({"part": part, "key": k, "name": f"{part}/{k}", "lora": _kohya_name(part, k)})
    save_file(orig, str(work / "orig.safetensors"))
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    subprocess.run([str(args.comfyui_python), __file__, "--comfyui-weights-child", "--dir", str(args.dir),
                    "--comfyui", str(args.comfyui), "--comfyui-python", str(args.comfyui_python)],
                   check=True, cwd=args.comfyui)
    ref = load_file(str(work / "comfyui.safetensors"))

    wanted = {(m["part"], m["key"]) for m in meta}
    lps = {}
    for n in LORAS:  # only the weights above: the stand-in modules hold no others
        full = lora.load_lora(args.dir / "models" / "loras" / n, BASE)
        lps[n] = lora.LoraPatches(path=full.path, kind=full.kind, patches={
            p: {k: a for k, a in d.items() if (p, k) in wanted} for p, d in full.patches.items()})
    print(f"patched weights, ours (lora.patch_module) vs ComfyUI (load_lora + calculate_weight + "
          f"stochastic_rounding), {len(meta)} weights: UNet {len(WEIGHT_KEYS['unet'])}, CLIP-L 2, bigG 2")
    print("| variant | storage | bit-identical | max |Δ| ours vs ComfyUI | values the LoRAs changed |\n|---|---|---|---|---|")
    for variant, loras in VARIANTS.items():
        if not loras:
            continue
        stack = tuple((lps[n], s_model) for n, s_model, _ in loras)
        for store in STORAGE:
            dtype = getattr(torch, store)
            same, worst, changed, total = 0, 0.0, 0, 0
            for part in WEIGHT_KEYS:
                root = torch.nn.Module()
                for m in meta:
                    if m["part"] != part:
                        continue
                    mod = root
                    *path, leaf = m["key"].split(".")
                    for step in path:
                        if not hasattr(mod, step):
                            mod.add_module(step, torch.nn.Module())
                        mod = getattr(mod, step)
                    mod.register_parameter(leaf, torch.nn.Parameter(orig[m["name"]].to(dtype, copy=True),
                                                                    requires_grad=False))
                lora.patch_module(root, part, stack, lambda keys, part=part, dtype=dtype: {
                    k: orig[f"{part}/{k}"].to(dtype, copy=True) for k in keys})
                params = dict(root.named_parameters())
                for m in meta:
                    if m["part"] != part:
                        continue
                    ours, theirs = params[m["key"]].detach(), ref[f"{variant}|{store}|{m['name']}"]
                    same += torch.equal(ours, theirs)
                    worst = max(worst, (ours.float() - theirs.float()).abs().max().item())
                    changed += (theirs != orig[m["name"]].to(dtype)).sum().item()
                    total += theirs.numel()
            print(f"| {variant} | {store} | {same}/{len(meta)} | {worst:.3g} | {changed / total * 100:.1f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/comfylora"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable; default: all")
    ap.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    ap.add_argument("--comfyui-python", type=Path, required=True, help="the python of ComfyUI's environment")
    ap.add_argument("--comfyui-arg", action="append", default=[], help="extra ComfyUI flag (repeatable)")
    ap.add_argument("--ours-arg", action="append", default=[], help="extra `sdxl-nodes run` flag (repeatable)")
    ap.add_argument("--weights", action="store_true", help="compare patched tensors instead of pictures")
    ap.add_argument("--comfyui-weights-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.comfyui_weights_child:
        return _comfyui_weights_child(args)
    variants = args.variant or list(VARIANTS)

    models = args.dir / "models"
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    if not (models / "checkpoints" / "sd_xl_base_1.0.safetensors").exists():
        import torch

        from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint
        from sdxl_nodes.sdxl_core.config import BASE

        write_random_checkpoint(models / "checkpoints" / "sd_xl_base_1.0.safetensors", BASE, seed=0,
                                dtype=torch.float16)
    for name, (rank, seed) in LORAS.items():
        if not (models / "loras" / name).exists():
            write_lora(models / "loras" / name, rank, seed=seed)
    if args.weights:
        return weights(args)

    images: dict[tuple[str, str], object] = {}
    timing: dict[tuple[str, str], dict] = {}
    for variant in variants:
        prompt = lora_prompt(args.size, args.steps, VARIANTS[variant])
        for who in ("ours", "comfyui"):
            out = args.dir / f"{variant}-{who}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            (out / "prompt.json").write_text(json.dumps(prompt, indent=1))
            if who == "ours":
                r = _run_ours(args, out / "prompt.json", out, args.ours_arg)
            else:
                r = _run_comfyui(args, prompt, out, folders=("checkpoints", "loras"))
            timing[variant, who] = r
            images[variant, who] = _pixels(out)
            print(f"  {variant} {who}: wall {r['wall']:.1f} s, peak RSS {r['rss']:.2f} GiB", flush=True)
    for who in ("ours", "comfyui"):  # the no-LoRA pictures of an earlier call
        if ("none", who) not in images and (args.dir / f"none-{who}").is_dir():
            images["none", who] = _pixels(args.dir / f"none-{who}")

    print(f"\nfull-size random SDXL base, {args.size}², {args.steps} steps, euler/normal, cfg 7; "
          f"ours: sdxl-nodes run {' '.join(args.ours_arg) or '(defaults)'}; "
          f"ComfyUI: main.py --cpu {' '.join(args.comfyui_arg) or '(defaults)'}")
    print("| variant | ours vs ComfyUI: max |Δ| | > 1 level | ≠ | ours vs ours without LoRA: max |Δ| | > 1 | ≠ "
          "| ComfyUI vs ComfyUI without LoRA: max |Δ| | > 1 | ≠ | wall ours / ComfyUI |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        row = [variant, _diff(images[variant, "ours"], images[variant, "comfyui"])]
        for who in ("ours", "comfyui"):
            row.append(_diff(images[variant, who], images["none", who]) if ("none", who) in images else "– | – | –")
        row.append(f"{timing[variant, 'ours']['wall']:.1f} s / {timing[variant, 'comfyui']['wall']:.1f} s")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
