"""Batch benchmark: N images as N separate `sdxl-nodes run` processes vs one `--sweep` vs one sweep with
`--batch B` (B jobs per UNet batch) vs one sweep on Ray.

Each variant runs the shipped workflows/sdxl_base.json at --size² with --steps steps and seeds 1..N, as
the user would (the `sdxl-nodes` command in a subprocess), and is timed from start to exit, model
loading included. Prints images/min and the ratio to the separate-processes reference, measured in the
same run. The `--batch` row also says whether its PNGs have the sweep's pixels (they should, bit for bit on
the CPU). With --full, full-size random checkpoints (about 7 GB of fp16 on disk; run under
`flock /tmp/sdxl-heavy.lock`); otherwise tiny ones.

    python benchmarks/bench_batch.py --dir /tmp/sdxl-bench-batch --jobs 8 --size 64 --steps 2
    flock /tmp/sdxl-heavy.lock python benchmarks/bench_batch.py --full --size 256 --steps 2 --jobs 8
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "sdxl_base.json"


def write_models(root: Path, full: bool) -> Path:
    models = root / ("models-full" if full else "models-tiny")
    ckpts = models / "checkpoints"
    if not (ckpts / "sd_xl_base_1.0.safetensors").exists():
        ckpts.mkdir(parents=True, exist_ok=True)
        if full:
            import torch

            from sdxl_nodes.sdxl_core.checkpoint import write_random_checkpoint
            from sdxl_nodes.sdxl_core.config import BASE

            write_random_checkpoint(ckpts / "sd_xl_base_1.0.safetensors", BASE, seed=0, dtype=torch.float16)
        else:
            from sdxl_nodes.sdxl_core.checkpoint import write_tiny_checkpoints

            write_tiny_checkpoints(ckpts, seed=0)
    return models


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-bench-batch"))
    ap.add_argument("--full", action="store_true", help="full-size random base checkpoint (heavy)")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="jobs per batch in the --batch variant (default 4)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray variant")
    args = ap.parse_args()

    if not (args.dir / ("models-full" if args.full else "models-tiny") / "checkpoints" / "sd_xl_base_1.0.safetensors").exists():
        # in a child process, so that this one does not keep gigabytes of freed tensors resident
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import bench_batch; "
                        "bench_batch.write_models(bench_batch.Path(sys.argv[2]), sys.argv[3] == '1')",
                        str(Path(__file__).parent), str(args.dir), "1" if args.full else "0"], check=True)
    models = write_models(args.dir, args.full)
    exe = [sys.executable, "-m", "sdxl_nodes.runtime.cli", "run", str(WORKFLOW)]
    common = ["--set", f"6.width={args.size}", "--set", f"6.height={args.size}", "--set", f"7.steps={args.steps}",
              "--models-dir", str(models), "--input-dir", str(args.dir / "input")]
    if args.full:
        common += ["--dtype", "bf16", "--vae-dtype", "bf16"]

    def out(name: str) -> list[str]:
        folder = args.dir / f"out-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        return ["--output-dir", str(folder), "--temp-dir", str(args.dir / "temp")]

    results: list[tuple[str, float]] = []
    seconds = sum(run(exe + common + ["--set", f"7.seed={i}"] + out("separate")) for i in range(1, args.jobs + 1))
    results.append((f"{args.jobs} separate `run` processes", seconds))
    sweep = ["--sweep", f"7.seed=1..{args.jobs}", "--quiet"]
    results.append(("one --sweep process", run(exe + common + sweep + out("sweep"))))
    results.append((f"one --sweep process, --batch {args.batch}",
                    run(exe + common + sweep + ["--batch", str(args.batch)] + out("batch"))))
    same = same_pixels(args.dir / "out-sweep", args.dir / "out-batch")
    if not args.no_ray:
        results.append(("one --sweep on Ray, local, 2 workers",
                        run(exe + common + sweep + ["--ray", "local", "--ray-workers", "2"] + out("ray"))))

    kind = "full-size random" if args.full else "tiny random"
    print(f"\n{args.jobs} images, {args.size}², {args.steps} steps, {kind} base checkpoint, CPU\n")
    print("| variant | seconds | images/min | speed vs separate | speed vs one sweep |\n|---|---:|---:|---:|---:|")
    ref, sweep_s = results[0][1], results[1][1]
    for name, s in results:
        print(f"| {name} | {s:.1f} | {args.jobs / s * 60:.1f} | {ref / s:.2f}× | {sweep_s / s:.2f}× |")
    print(f"\n--batch {args.batch} PNG pixels equal to the unbatched sweep's: {same}")


def same_pixels(a: Path, b: Path) -> str:
    """"yes (N images)" or how they differ: the --batch run's images against the sweep's, file by file."""
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in a.glob("*.png"))
    if names != sorted(p.name for p in b.glob("*.png")):
        return "no: different file names"
    worst, differing = 0, 0
    for name in names:
        with Image.open(a / name) as x, Image.open(b / name) as y:
            d = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        worst, differing = max(worst, int(d.max())), differing + int(d.any())
    return f"yes ({len(names)} images)" if not differing else \
        f"no: {differing} of {len(names)} images differ, by up to {worst} levels"


if __name__ == "__main__":
    main()
