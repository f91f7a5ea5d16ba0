"""Full-size workflow benchmark: the shipped base + refiner workflow on full-size random checkpoints, CPU.

Writes (once) full-size random base and refiner checkpoints in the official layout, runs
workflows/sdxl_base_refiner.json at --size² with --steps steps through the real executor and nodes,
and prints wall time, peak RSS and the time spent inside vs outside the UNet.

    python benchmarks/bench_workflow.py --dir /tmp/sdxl-bench --size 512 --steps 8 --dtype bf16
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-bench"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    args = ap.parse_args()

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
