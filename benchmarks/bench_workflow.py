"""Full-size workflow benchmark: the shipped base + refiner workflow on full-size random checkpoints, CPU.

Writes (once) full-size random base and refiner checkpoints in the official layout, runs
workflows/sdxl_base_refiner.json at --size² with --steps steps through the real executor and nodes,
and prints wall time, peak RSS and the time spent inside vs outside the UNet.

    python benchmarks/bench_workflow.py --dir /tmp/sdxl-bench --size 512 --steps 8 --dtype bf16
    python benchmarks/bench_workflow.py --stock --tiny --dir /tmp/sdxl-bench-tiny --size 256 --steps 25
        # ComfyUI's official SDXL example graph (core node ids) vs the same graph in our nodes, fresh
        # processes each; add no --tiny for full-size random weights (run under flock /tmp/sdxl-heavy.lock)
    flock /tmp/sdxl-heavy.lock python benchmarks/bench_workflow.py --dir /tmp/sdxl-bench --size 256 --steps 2 \
        --comfyui /tmp/comfyui-run --comfyui-python /tmp/comfyui-venv/bin/python
        # ComfyUI's default base graph, whole process each, alternating: `sdxl-nodes run` with our default CPU
        # settings vs ComfyUI's server (`main.py --cpu`, its defaults) given the same API prompt over HTTP
    flock /tmp/sdxl-heavy.lock python benchmarks/bench_workflow.py --dir /tmp/sdxl-bench --size 256 --steps 2 \
        --dtype-pixels   # ours: default vs --dtype fp32 vs --dtype bf16, pixels against fp32
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


# ------------------------------------------------------------------------------------------------
# --stock: ComfyUI's official SDXL example graph (core node ids) vs the same graph in our SDXL nodes


def _stock_prompts(size: int, steps: int) -> dict[str, dict]:
    """{'official': the official example's API prompt (core ids), 'ours': the same graph in SDXL nodes}."""
    split = round(steps * 0.8)
    pos, neg = "evening sunset scenery blue sky nature, glass bottle with a galaxy in it", "text, watermark"
    base, refiner = "sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"
    sampler = {"cfg": 8, "sampler_name": "euler", "scheduler": "normal", "steps": steps}
    official = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}},
        "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": refiner}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": pos, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": neg, "clip": ["4", 1]}},
        "15": {"class_type": "CLIPTextEncode", "inputs": {"text": pos, "clip": ["12", 1]}},
        "16": {"class_type": "CLIPTextEncode", "inputs": {"text": neg, "clip": ["12", 1]}},
        "10": {"class_type": "KSamplerAdvanced", "inputs": {
            **sampler, "add_noise": "enable", "noise_seed": 721897303308196, "start_at_step": 0,
            "end_at_step": split, "return_with_leftover_noise": "enable", "model": ["4", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {
            **sampler, "add_noise": "disable", "noise_seed": 0, "start_at_step": split, "end_at_step": 10000,
            "return_with_leftover_noise": "disable", "model": ["12", 0], "positive": ["15", 0],
            "negative": ["16", 0], "latent_image": ["10", 0]}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 2]}},
        "19": {"class_type": "SaveImage", "inputs": {"filename_prefix": "stock", "images": ["17", 0]}},
    }
    sizes = {"width": size, "height": size}
    ours = {
        "4": {"class_type": "SDXLCheckpointLoader", "inputs": {"ckpt_name": base}},
        "12": {"class_type": "SDXLCheckpointLoader", "inputs": {"ckpt_name": refiner}},
        "5": {"class_type": "SDXLEmptyLatent", "inputs": {**sizes, "batch_size": 1}},
        "6": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["4", 1], "text_g": pos, "text_l": pos}},
        "7": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["4", 1], "text_g": neg, "text_l": neg}},
        "8": {"class_type": "SDXLSizeCropConditioning", "inputs": {"text": ["6", 0], **sizes, "crop_w": 0,
              "crop_h": 0, "target_width": size, "target_height": size}},
        "9": {"class_type": "SDXLSizeCropConditioning", "inputs": {"text": ["7", 0], **sizes, "crop_w": 0,
              "crop_h": 0, "target_width": size, "target_height": size}},
        "15": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["12", 1], "text_g": pos, "text_l": ""}},
        "16": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["12", 1], "text_g": neg, "text_l": ""}},
        "13": {"class_type": "SDXLRefinerConditioning", "inputs": {"text": ["15", 0], "ascore": 6.0, **sizes}},
        "14": {"class_type": "SDXLRefinerConditioning", "inputs": {"text": ["16", 0], "ascore": 2.5, **sizes}},
        "10": {"class_type": "SDXLBaseSampler", "inputs": {
            **sampler, "seed": 721897303308196, "denoise_end": split / steps, "model": ["4", 0],
            "positive": ["8", 0], "negative": ["9", 0], "latent": ["5", 0]}},
        "11": {"class_type": "SDXLNoiseAndRefine", "inputs": {
            "seed": 0, "cfg": 8, "sampler_name": "euler", "mode": "continue", "steps": steps, "scheduler": "normal",
            "strength": 0.3, "continue_from_step": 0, "model": ["12", 0], "positive": ["13", 0],
            "negative": ["14", 0], "latent": ["10", 0]}},
        "17": {"class_type": "SDXLVAEDecode", "inputs": {"vae": ["12", 2], "samples": ["11", 0]}},
        "19": {"class_type": "SDXLSaveImage", "inputs": {"filename_prefix": "stock", "images": ["17", 0]}},
    }
    return {"official": official, "ours": ours}


def _stock_child(args) -> None:
    """One variant in this (fresh) process: prints one JSON line with wall time, peak RSS and the image hash."""
    import hashlib
    import json

    from sdxl_nodes.nodes.environment import configure
    from sdxl_nodes.runtime.cli import node_pack
    from sdxl_nodes.runtime.executor import Executor
    from sdxl_nodes.sdxl_core.memory import DTYPES, RuntimeOptions

    dtype = DTYPES[args.dtype]
    out_dir = args.dir / f"output-{args.stock_child}"
    configure(models_dir=args.dir / "models", input_dir=args.dir / "input", output_dir=out_dir,
              options=RuntimeOptions(unet_dtype=dtype, text_dtype=dtype, vae_dtype=dtype))
    prompt = _stock_prompts(args.size, args.steps)[args.stock_child]
    classes, _names = node_pack(standalone=True)
    t0 = time.perf_counter()
    result = Executor(classes).execute(prompt, str(uuid.uuid4()))
    wall = time.perf_counter() - t0
    assert result.success, result.error
    newest = max(out_dir.glob("stock_*.png"), key=lambda p: p.stat().st_mtime)
    from PIL import Image
    with Image.open(newest) as im:
        digest = hashlib.sha256(im.tobytes()).hexdigest()[:16]
    print(json.dumps({"wall": wall, "rss": peak_rss_gb(), "pixels": digest}))


def stock(args) -> None:
    """Alternate fresh processes for the two variants; table of median wall time and peak RSS, with the ratio."""
    import json
    import statistics
    import subprocess
    import sys

    models = args.dir / "models" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint, write_tiny_checkpoints
    from sdxl_nodes.sdxl_core.config import BASE, REFINER

    if args.tiny:
        if not (models / "sd_xl_base_1.0.safetensors").exists():
            write_tiny_checkpoints(models, seed=0)
    else:
        for name, cfg in (("sd_xl_base_1.0.safetensors", BASE), ("sd_xl_refiner_1.0.safetensors", REFINER)):
            if not (models / name).exists():
                write_random_checkpoint(models / name, cfg, seed=0, dtype=torch.float16)
    runs: dict[str, list[dict]] = {"official": [], "ours": []}
    for i in range(args.repeats):
        for variant in (("ours", "official") if i % 2 else ("official", "ours")):
            cmd = [sys.executable, __file__, "--stock-child", variant, "--dir", str(args.dir), "--size",
                   str(args.size), "--steps", str(args.steps), "--dtype", args.dtype]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[variant].append(json.loads(line))
    weights = "tiny random" if args.tiny else "full-size random"
    print(f"{weights} weights, {args.size}², {args.steps} steps (base {round(args.steps * 0.8)} + refiner), "
          f"{args.dtype}, {torch.get_num_threads()} threads, {args.repeats} fresh processes each, alternating")
    print("| graph | wall (median) | wall (min–max) | peak RSS (median) | pixels |\n|---|---|---|---|---|")
    med = {}
    for variant, label in (("ours", "our SDXL nodes"), ("official", "official example (core ids)")):
        walls, rss = [r["wall"] for r in runs[variant]], [r["rss"] for r in runs[variant]]
        med[variant] = (statistics.median(walls), statistics.median(rss))
        print(f"| {label} | {med[variant][0]:.2f} s | {min(walls):.2f}–{max(walls):.2f} s | "
              f"{med[variant][1]:.2f} GiB | {runs[variant][0]['pixels']} |")
    same = {r["pixels"] for r in runs["ours"] + runs["official"]}
    print(f"| ratio official / ours | {med['official'][0] / med['ours'][0]:.3f}× | | "
          f"{med['official'][1] / med['ours'][1]:.3f}× | {'identical' if len(same) == 1 else 'DIFFERENT'} |")


# ------------------------------------------------------------------------------------------------
# --comfyui: the base graph, whole process, `sdxl-nodes run` vs ComfyUI's own server


def _base_prompt(size: int, steps: int) -> dict:
    """ComfyUI's default graph (its front page) on the SDXL base, in core node ids: both tools run it as is."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {
            "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 156680208700286, "steps": steps, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }


def _wait_rusage(proc) -> float:
    """Reap `proc` and return its peak RSS in GiB (ru_maxrss of that process: KiB on Linux)."""
    import os

    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024**2


def _run_ours(args, prompt_file: Path, out: Path, extra: list[str]) -> dict:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sdxl_nodes.runtime.cli", "run", str(prompt_file), "--models-dir",
           str(args.dir / "models"), "--output-dir", str(out), "--quiet", *extra]
    with open(out / "log.txt", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        rss = _wait_rusage(proc)
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"ours failed ({proc.returncode}): see {out / 'log.txt'}")
    return {"wall": wall, "rss": rss, "ready": float("nan")}


def _run_comfyui(args, prompt: dict, out: Path, folders: tuple[str, ...] = ("checkpoints",)) -> dict:
    """Start ComfyUI's server on a free port, queue `prompt`, poll /history until it is done; whole process
    time from the start of the interpreter to the finished prompt (its shutdown is not counted).
    `folders`: the model folders under `args.dir / 'models'` that ComfyUI is pointed at."""
    import json
    import signal
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (out / "user").mkdir(exist_ok=True)  # --user-directory must exist
    paths = out / "extra_model_paths.yaml"
    paths.write_text(f"bench:\n    base_path: {args.dir / 'models'}\n" + "".join(f"    {f}: {f}\n" for f in folders))
    cmd = [str(args.comfyui_python), str(args.comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
           str(port), "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--output-directory",
           str(out), "--temp-directory", str(out / "temp"), "--user-directory", str(out / "user"),
           "--extra-model-paths-config", str(paths), *args.comfyui_arg]
    url = f"http://127.0.0.1:{port}"
    with open(out / "log.txt", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=args.comfyui)
        try:
            while True:  # 1. wait for the server
                if proc.poll() is not None:
                    raise SystemExit(f"ComfyUI exited ({proc.returncode}) before serving: see {out / 'log.txt'}")
                try:
                    urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.05)
            ready = time.perf_counter() - t0
            body = json.dumps({"prompt": prompt, "client_id": "bench"}).encode()
            req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
            prompt_id = json.loads(urllib.request.urlopen(req, timeout=30).read())["prompt_id"]
            while True:  # 2. wait for the prompt
                hist = json.loads(urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=30).read())
                status = hist.get(prompt_id, {}).get("status", {})
                if status.get("completed") or status.get("status_str") == "error":
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"ComfyUI exited ({proc.returncode}) mid-prompt: see {out / 'log.txt'}")
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            if status.get("status_str") != "success":
                raise SystemExit(f"ComfyUI's prompt failed: {json.dumps(status)[:2000]}")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        rss = _wait_rusage(proc) if proc.returncode is None else float("nan")
    return {"wall": wall, "rss": rss, "ready": ready}


def _pixels(folder: Path):
    import numpy as np
    from PIL import Image

    newest = max(folder.glob("bench_*.png"), key=lambda p: p.stat().st_mtime)
    with Image.open(newest) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def comfyui(args) -> None:
    """Alternate fresh processes: ours (`sdxl-nodes run`, default CPU settings unless --ours-arg) and ComfyUI
    (its server with `--cpu` and its defaults); table of medians, the ratio and the pixel difference."""
    import json
    import shutil
    import statistics

    models = args.dir / "models" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "sd_xl_base_1.0.safetensors").exists():
        from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint
        from sdxl_nodes.sdxl_core.config import BASE

        write_random_checkpoint(models / "sd_xl_base_1.0.safetensors", BASE, seed=0, dtype=torch.float16)
    prompt = _base_prompt(args.size, args.steps)
    runs: dict[str, list[dict]] = {"ours": [], "comfyui": []}
    images = {}
    for i in range(args.repeats):
        for who in (("comfyui", "ours") if i % 2 else ("ours", "comfyui")):
            out = args.dir / f"bench-{who}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            if who == "ours":
                (out / "prompt.json").write_text(json.dumps(prompt))
                r = _run_ours(args, out / "prompt.json", out, args.ours_arg)
            else:
                r = _run_comfyui(args, prompt, out)
            images[who] = _pixels(out)
            runs[who].append(r)
            print(f"  run {i + 1} {who}: wall {r['wall']:.1f} s, peak RSS {r['rss']:.2f} GiB", flush=True)
    diff = abs(images["ours"] - images["comfyui"])
    print(f"full-size random base, ComfyUI's default graph, {args.size}², {args.steps} steps, euler/normal, cfg 8; "
          f"{torch.get_num_threads()} threads; whole process each, {args.repeats} alternating runs; "
          f"ours: sdxl-nodes run {' '.join(args.ours_arg) or '(defaults)'}; "
          f"ComfyUI: main.py --cpu {' '.join(args.comfyui_arg) or '(defaults)'}")
    print("| | wall (median) | wall (min–max) | ComfyUI server ready | peak RSS (median) |\n|---|---|---|---|---|")
    med = {}
    for who, label in (("ours", "ours"), ("comfyui", "ComfyUI")):
        walls, rss = [r["wall"] for r in runs[who]], [r["rss"] for r in runs[who]]
        med[who] = (statistics.median(walls), statistics.median(rss))
        ready = statistics.median(r["ready"] for r in runs[who])
        print(f"| {label} | {med[who][0]:.1f} s | {min(walls):.1f}–{max(walls):.1f} s | "
              f"{'' if ready != ready else f'{ready:.1f} s'} | {med[who][1]:.2f} GiB |")
    print(f"| ours / ComfyUI | **{med['ours'][0] / med['comfyui'][0]:.2f}×** | | | "
          f"**{med['ours'][1] / med['comfyui'][1]:.2f}×** |")
    print(f"pixels (last run of each): max |Δ| {int(diff.max())} levels of 255, "
          f"{(diff > 0).mean() * 100:.3f} % of values differ")


def dtype_pixels(args) -> None:
    """Ours on the base graph with the default CPU settings, --dtype fp32 and --dtype bf16 (fresh processes):
    wall, peak RSS and each image's difference from the fp32 one."""
    import json
    import shutil

    models = args.dir / "models" / "checkpoints"
    if not (models / "sd_xl_base_1.0.safetensors").exists():
        raise SystemExit(f"no {models / 'sd_xl_base_1.0.safetensors'}: run --comfyui once, or write it")
    prompt = _base_prompt(args.size, args.steps)
    rows = {}
    for label, extra in (("fp32", ["--dtype", "fp32", "--vae-dtype", "fp32"]), ("default", []),
                         ("bf16", ["--dtype", "bf16", "--vae-dtype", "bf16"])):
        out = args.dir / f"bench-dtype-{label}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "prompt.json").write_text(json.dumps(prompt))
        r = _run_ours(args, out / "prompt.json", out, extra)
        rows[label] = (r, _pixels(out), " ".join(extra) or "(default)")
    ref = rows["fp32"][1]
    print(f"full-size random base, ComfyUI's default graph, {args.size}², {args.steps} steps; whole process each")
    print("| sdxl-nodes run | wall | peak RSS | max abs diff vs fp32 (of 255) | values differing |\n|---|---|---|---|---|")
    for _label, (r, px, flags) in rows.items():
        d = abs(px - ref)
        print(f"| {flags} | {r['wall']:.1f} s | {r['rss']:.2f} GiB | {int(d.max())} | {(d > 0).mean() * 100:.3f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-bench"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--stock", action="store_true", help="official SDXL example (core ids) vs the same graph in ours")
    ap.add_argument("--tiny", action="store_true", help="--stock on tiny random checkpoints")
    ap.add_argument("--repeats", type=int, default=3, help="--stock: fresh processes per graph")
    ap.add_argument("--stock-child", choices=["official", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--comfyui", type=Path, help="a ComfyUI checkout: the base graph, ours vs its server")
    ap.add_argument("--comfyui-python", type=Path, help="--comfyui: the python of ComfyUI's environment")
    ap.add_argument("--comfyui-arg", action="append", default=[], help="--comfyui: extra ComfyUI flag (repeatable)")
    ap.add_argument("--ours-arg", action="append", default=[], help="--comfyui: extra `sdxl-nodes run` flag "
                    "(repeatable), e.g. --ours-arg=--dtype --ours-arg=bf16")
    ap.add_argument("--dtype-pixels", action="store_true", help="ours on the base graph: default, fp32 and bf16, "
                    "pixels vs fp32")
    args = ap.parse_args()
    if args.dtype_pixels:
        return dtype_pixels(args)
    if args.comfyui:
        if not args.comfyui_python:
            ap.error("--comfyui needs --comfyui-python (the interpreter of ComfyUI's venv)")
        return comfyui(args)
    if args.stock_child:
        return _stock_child(args)
    if args.stock:
        return stock(args)

    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from sdxl_nodes.nodes.environment import configure
    from sdxl_nodes.runtime.executor import Executor
    from sdxl_nodes.runtime.nodeinfo import object_info
    from sdxl_nodes.runtime.workflow import load_workflow
    from sdxl_nodes.sdxl_core import unet as unet_mod
    from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint
    from sdxl_nodes.sdxl_core.config import BASE, REFINER
    from sdxl_nodes.sdxl_core.memory import DTYPES, RuntimeOptions

    models = args.dir / "models" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    for name, cfg in (("sd_xl_base_1.0.safetensors", BASE), ("sd_xl_refiner_1.0.safetensors", REFINER)):
        if not (models / name).exists():
            write_random_checkpoint(models / name, cfg, seed=0, dtype=torch.float16)
    dtype = DTYPES[args.dtype]
    configure(models_dir=args.dir / "models", input_dir=args.dir / "input", output_dir=args.dir / "output",
              options=RuntimeOptions(unet_dtype=dtype, text_dtype=dtype, vae_dtype=dtype))

    info = object_info(NODE_CLASS_MAPPINGS, "custom_nodes.sdxl-nodes", display_names=NODE_DISPLAY_NAME_MAPPINGS)
    wf = load_workflow(Path(__file__).resolve().parents[1] / "workflows" / "sdxl_base_refiner.json", info)
    for node in wf.prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "SDXLEmptyLatent":
            inputs.update(width=args.size, height=args.size)
        if node["class_type"] == "SDXLBaseSampler":
            inputs.update(steps=args.steps)
        for k in ("width", "height", "target_width", "target_height"):
            if k in inputs and node["class_type"] != "SDXLEmptyLatent":
                inputs[k] = args.size

    unet_seconds = [0.0]
    calls = [0]
    original = unet_mod.UNetModel.forward

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            unet_seconds[0] += time.perf_counter() - t
            calls[0] += 1

    unet_mod.UNetModel.forward = timed
    node_times: dict[str, float] = {}
    started: dict[str, float] = {}

    def on_event(name, data):
        if name == "executing" and data.get("node"):
            started[data["node"]] = time.perf_counter()
        elif name == "progress_state":
            for nid, st in data["nodes"].items():
                if st["state"] == "finished" and nid in started and nid not in node_times:
                    node_times[nid] = time.perf_counter() - started[nid]

    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    result = Executor(NODE_CLASS_MAPPINGS, on_event=on_event).execute(
        wf.prompt, str(uuid.uuid4()), extra_data=wf.default_extra_data())
    wall = time.perf_counter() - t0
    assert result.success, result.error
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.size}², "
          f"{args.steps} steps (base {round(args.steps * 0.8)} + refiner {args.steps - round(args.steps * 0.8)}), cfg 8")
    print("| measurement | value |\n|---|---|")
    print(f"| wall time, whole workflow (load + encode + sample + decode + save) | {wall:.1f} s |")
    print(f"| time inside the UNet ({calls[0]} calls, batch 2) | {unet_seconds[0]:.1f} s |")
    print(f"| time outside the UNet | {wall - unet_seconds[0]:.1f} s ({(wall - unet_seconds[0]) / wall * 100:.1f} %) |")
    print(f"| peak RSS | {peak_rss_gb():.2f} GiB |")
    for nid, sec in sorted(node_times.items(), key=lambda kv: -kv[1])[:6]:
        print(f"| node {nid} {wf.prompt[nid]['class_type']} | {sec:.1f} s |")


if __name__ == "__main__":
    main()
