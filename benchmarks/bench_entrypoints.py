"""The same graph three ways: an in-process Executor call, `sdxl-nodes run`, and `sdxl-nodes serve` + HTTP.

Issue 9 found `run` and `serve` ~10x slower than an in-process call on a loaded 2-core machine: the
OpenMP spin-wait described in `runtime.cli.prefer_passive_openmp`. This benchmark shows such a
regression as a ratio against the in-process call measured in the same run. The benchmark process
itself applies the CLI's OpenMP setting (it is the reference); the subprocesses get the caller's
environment *without* it, so they only run fast if the CLI sets it itself.

    python benchmarks/bench_entrypoints.py --dir /tmp/sdxl-entry --size 256 --steps 25
    python benchmarks/bench_entrypoints.py --full --size 512 --steps 4     # full-size random weights (>3 GiB)

`--cli PYTHON_PATH_ROOT` runs the two subprocesses against another checkout (e.g. the code before a
fix, extracted so that ROOT/sdxl_nodes is the package), for before/after tables.

Measured 2026-11-30 on the shared 2-core machine (load average ~11), tiny weights, 256², 25 steps,
seconds (in-process reference 6.8 / 4.5 s in the same runs):

| entry point | before (b3fb932) | after |
|---|---|---|
| `sdxl-nodes run`, execution | 408.4 | 9.0 |
| `sdxl-nodes serve`, first prompt (cold) | 286.9 | 6.5 |
| `sdxl-nodes serve`, second prompt (warm) | 109.3 | 3.1 |
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from sdxl_nodes.runtime.cli import prefer_passive_openmp

REPO = Path(__file__).resolve().parents[1]
SIZE_WIDGETS = ("width", "height", "target_width", "target_height")


def make_prompt(args, info) -> tuple[dict, dict]:
    from sdxl_nodes.runtime.workflow import load_workflow

    wf = load_workflow(REPO / "workflows" / "sdxl_base_refiner.json", info)
    for node in wf.prompt.values():
        for k in SIZE_WIDGETS:
            if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                node["inputs"][k] = args.size
        if node["class_type"] in ("SDXLBaseSampler", "SDXLNoiseAndRefine"):
            node["inputs"]["steps"] = args.steps
    return wf.prompt, wf.default_extra_data()


def child_env(cli_root: Path | None) -> dict:
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" in os.environ and os.environ.get("_BENCH_SET_OMP") == "1":
        env.pop("OMP_WAIT_POLICY")  # ours, not the user's: the subprocess must set it itself
    env.pop("_BENCH_SET_OMP", None)
    if cli_root is not None:
        env["PYTHONPATH"] = str(cli_root)
    return env


def cli_argv(cli_root: Path | None) -> list[str]:
    return [sys.executable, "-m", "sdxl_nodes.runtime.cli"]


def in_process(prompt, extra, classes) -> float:
    from sdxl_nodes.runtime.executor import Executor

    t = time.perf_counter()
    result = Executor(classes).execute(prompt, str(uuid.uuid4()), extra_data=extra)
    assert result.success, result.error
    return time.perf_counter() - t


def via_run(args, prompt_file: Path, folders: list[str], env) -> tuple[float, float]:
    t = time.perf_counter()
    proc = subprocess.run([*cli_argv(args.cli), "run", str(prompt_file), *folders], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"sdxl-nodes run failed:\n{proc.stderr[-3000:]}")
    done = re.search(r"done in ([0-9.]+) s", proc.stdout)
    return wall, float(done.group(1)) if done else float("nan")


def via_serve(args, prompt, extra, folders: list[str], env) -> tuple[float, float]:
    proc = subprocess.Popen([*cli_argv(args.cli), "serve", "--port", "0", "--user-dir", str(args.dir / "user"),
                             *folders], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"(http://127\.0\.0\.1:\d+)/?", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise SystemExit("serve did not print its URL")

        def queue(seed_offset: int) -> float:
            p = json.loads(json.dumps(prompt))
            for node in p.values():
                if "seed" in node["inputs"]:
                    node["inputs"]["seed"] += seed_offset
            body = json.dumps({"prompt": p, "client_id": "bench", "extra_data": extra}).encode()
            t = time.perf_counter()
            req = urllib.request.Request(f"{url}/api/prompt", body, {"Content-Type": "application/json"})
            prompt_id = json.load(urllib.request.urlopen(req))["prompt_id"]
            while True:
                hist = json.load(urllib.request.urlopen(f"{url}/api/history/{prompt_id}"))
                if prompt_id in hist:
                    status = hist[prompt_id]["status"]["status_str"]
                    if status != "success":
                        raise SystemExit(f"serve run failed: {hist[prompt_id]['status']}")
                    return time.perf_counter() - t
                time.sleep(0.05)

        return queue(0), queue(1)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-entry"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--full", action="store_true", help="full-size random checkpoints (run under the heavy lock)")
    ap.add_argument("--cli", type=Path, default=None, help="PYTHONPATH root of another checkout for the subprocesses")
    args = ap.parse_args()

    if "OMP_WAIT_POLICY" not in os.environ:
        prefer_passive_openmp()
        os.environ["_BENCH_SET_OMP"] = "1"
    import torch

    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, environment
    from sdxl_nodes.runtime.nodeinfo import object_info
    from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint, write_tiny_checkpoints
    from sdxl_nodes.sdxl_core.config import BASE, REFINER

    models = args.dir / "models" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    if args.full:
        for name, cfg in (("sd_xl_base_1.0.safetensors", BASE), ("sd_xl_refiner_1.0.safetensors", REFINER)):
            if not (models / name).exists():
                write_random_checkpoint(models / name, cfg, seed=0, dtype=torch.float16)
    elif not (models / "sd_xl_base_1.0.safetensors").exists():
        write_tiny_checkpoints(models, seed=0)
    folders = ["--models-dir", str(args.dir / "models"), "--input-dir", str(args.dir / "input"),
               "--output-dir", str(args.dir / "output"), "--temp-dir", str(args.dir / "temp")]
    environment.configure(models_dir=args.dir / "models", input_dir=args.dir / "input",
                          output_dir=args.dir / "output", temp_dir=args.dir / "temp")
    info = object_info(NODE_CLASS_MAPPINGS, "custom_nodes.sdxl-nodes", display_names=NODE_DISPLAY_NAME_MAPPINGS)
    prompt, extra = make_prompt(args, info)
    prompt_file = args.dir / "prompt.json"
    prompt_file.write_text(json.dumps(prompt))
    env = child_env(args.cli)

    ref = in_process(prompt, extra, NODE_CLASS_MAPPINGS)
    environment.free_models()  # full size: the subprocesses need the memory this process's models hold
    run_wall, run_exec = via_run(args, prompt_file, folders, env)
    serve_cold, serve_warm = via_serve(args, prompt, extra, folders, env)
    ref2 = in_process(prompt, extra, NODE_CLASS_MAPPINGS)  # again, after: the load may have changed

    ref_best = min(ref, ref2)
    print(f"{'full-size' if args.full else 'tiny'} base + refiner, {args.size}², {args.steps} steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}"
          + (f", subprocesses from {args.cli}" if args.cli else ""))
    print("| entry point | seconds | ratio to in-process |\n|---|---|---|")
    print(f"| in-process Executor call (cold, then again after the others) | {ref:.1f} / {ref2:.1f} | 1.0 |")
    print(f"| `sdxl-nodes run`: execution (its 'done in') | {run_exec:.1f} | {run_exec / ref_best:.1f} |")
    print(f"| `sdxl-nodes run`: whole process (+ Python, torch import) | {run_wall:.1f} | {run_wall / ref_best:.1f} |")
    print(f"| `sdxl-nodes serve`: first prompt, POST to history (cold) | {serve_cold:.1f} | {serve_cold / ref_best:.1f} |")
    print(f"| `sdxl-nodes serve`: second prompt, new seed (warm) | {serve_warm:.1f} | {serve_warm / ref_best:.1f} |")


if __name__ == "__main__":
    main()
