"""`sdxl-nodes`: run, validate and convert shared workflow files, serve the editor, or run a demo.

    sdxl-nodes run workflow.json [--set 12.seed=42] [--models-dir DIR] [--output-dir DIR]
    sdxl-nodes validate workflow.json
    sdxl-nodes convert workflow.json [-o prompt.json]       # UI workflow → API prompt
    sdxl-nodes serve [--host 127.0.0.1] [--port 8188]
    sdxl-nodes demo                                         # tiny random checkpoints, whole pipeline

This module is the only place that parses arguments; it loads the node pack (and so torch) only for
the commands that need it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .validate import validate_prompt
from .workflow import LoadedWorkflow, WorkflowError, load_workflow

PYTHON_MODULE = "custom_nodes.sdxl-nodes"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = PACKAGE_ROOT / "workflows"

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
# exception types that mean "the input was wrong" (their message says what to do; no traceback)
USER_ERROR_TYPES = ("NodeInputError", "CheckpointError", "ConditioningError", "SamplingError", "SDXLError")


class CLIError(Exception):
    """A user error: printed as one message, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Loading the pack


def node_pack():
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) of our pack (imports torch)."""
    from ..nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def object_info_for(classes, names) -> dict:
    from .nodeinfo import object_info

    return object_info(classes, PYTHON_MODULE, display_names=names)


def configure_environment(args) -> None:
    from ..nodes.environment import configure
    from ..sdxl_core.memory import DTYPES, RuntimeOptions

    options = RuntimeOptions(
        device=args.device,
        unet_dtype=DTYPES[args.dtype] if args.dtype else None,
        text_dtype=DTYPES[args.dtype] if args.dtype else None,
        vae_dtype=DTYPES[args.vae_dtype] if args.vae_dtype else None,
    )
    configure(models_dir=args.models_dir, input_dir=args.input_dir, output_dir=args.output_dir,
              temp_dir=args.temp_dir, options=options)


# ------------------------------------------------------------------------------------------------
# --set NODE_ID.INPUT=VALUE


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not node_id or not name:
            raise CLIError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 12.seed=42")
        if node_id not in prompt:
            raise CLIError(f"--set {item!r}: no node with id {node_id!r}; ids in this workflow: "
                           f"{', '.join(sorted(prompt, key=lambda k: (len(k), k)))}")
        inputs = prompt[node_id].setdefault("inputs", {})
        if isinstance(inputs.get(name), list):
            raise CLIError(f"--set {item!r}: input {name!r} of node {node_id} is connected to another node; "
                           "only widget values can be set")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # plain text: prompts, file names, sampler names
        inputs[name] = value


# ------------------------------------------------------------------------------------------------
# Reporting


def format_errors(error: dict, node_errors: dict, prompt: dict) -> str:
    lines = [f"error: {error.get('message', error)}" + (f": {error['details']}" if error.get("details") else "")]
    for node_id, entry in node_errors.items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title") or entry.get("class_type", "")
        seen_custom = set()
        for err in entry.get("errors", []):
            if err.get("type") == "custom_validation_failed":  # ComfyUI repeats it under every input
                text = str(err.get("details", "")).split(" - ", 1)[-1]
                if text in seen_custom:
                    continue
                seen_custom.add(text)
            where = err.get("extra_info", {}).get("input_name")
            lines.append(f"  node {node_id} ({title})" + (f", input '{where}'" if where else "")
                         + f": {err.get('message')}" + (f": {err['details']}" if err.get("details") else ""))
    return "\n".join(lines)


class ConsoleProgress:
    """Turns executor events into a tqdm bar per sampler and a line per saved file."""

    def __init__(self, prompt: dict, out=None):
        self.prompt, self.out = prompt, out or sys.stdout
        self.bar = None
        self.bar_node = None
        self.saved: list[str] = []
        self.output_dir: Path | None = None

    def title(self, node_id) -> str:
        node = self.prompt.get(str(node_id), {})
        return node.get("_meta", {}).get("title") or node.get("class_type", str(node_id))

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = self.bar_node = None

    def __call__(self, event: str, data: dict) -> None:
        if event == "progress":
            from tqdm import tqdm

            node = data.get("node")
            if self.bar is None or self.bar_node != node:
                self.close_bar()
                self.bar = tqdm(total=data["max"], desc=f"{self.title(node)} [{node}]", unit="step", file=sys.stderr,
                                leave=True, dynamic_ncols=True)
                self.bar_node = node
            self.bar.n = data["value"]
            self.bar.refresh()
        elif event == "executing":
            if data.get("node") != self.bar_node:
                self.close_bar()
        elif event == "executed":
            for img in (data.get("output") or {}).get("images", []):
                if img.get("type") == "output":
                    rel = Path(img.get("subfolder") or "") / img["filename"]
                    self.saved.append(str(rel))
                    base = self.output_dir / rel if self.output_dir else rel
                    print(f"saved {base}", file=self.out, flush=True)
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            self.close_bar()


def execute(loaded: LoadedWorkflow, args, *, out=None) -> int:
    """Validate and run a loaded workflow with our node pack; returns the exit code."""
    out = out or sys.stdout
    from .executor import Executor

    classes, _names = node_pack()
    prompt = loaded.prompt
    ok, error, node_errors, outputs = validate_prompt(prompt, classes)
    if not ok:
        print(format_errors(error, node_errors, prompt), file=sys.stderr)
        return EXIT_INVALID
    progress = ConsoleProgress(prompt, out)
    progress.output_dir = Path(args.output_dir)
    executor = Executor(classes, on_event=progress)
    result_box: dict = {}

    def work():
        result_box["result"] = executor.execute(prompt, str(uuid.uuid4()), extra_data=loaded.default_extra_data(),
                                                outputs=outputs)

    t0 = time.perf_counter()
    worker = threading.Thread(target=work, name="sdxl-nodes-run", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        print("interrupting (the current sampler stops after this step)…", file=sys.stderr)
        executor.interrupt()
        worker.join()
    result = result_box["result"]
    seconds = time.perf_counter() - t0
    if result.status == "success":
        print(f"done in {seconds:.1f} s: {len(progress.saved)} image(s) saved", file=out)
        return EXIT_OK
    if result.status == "interrupted":
        print("interrupted; nothing more was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    err = result.error or {}
    if not err.get("exception_type", "").endswith(USER_ERROR_TYPES):  # a bug, not bad input: show where
        print("".join(err.get("traceback") or []), file=sys.stderr, end="")
    print(f"error in node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_message')}",
          file=sys.stderr)
    return EXIT_FAILED


def load(args) -> LoadedWorkflow:
    classes, names = node_pack()
    info = object_info_for(classes, names)
    loaded = load_workflow(args.file, info)
    apply_overrides(loaded.prompt, args.set or [])
    if loaded.workflow is not None:
        apply_overrides_to_ui(loaded.workflow, args.set or [], info)
    return loaded


def apply_overrides_to_ui(workflow: dict, overrides: list[str], info: dict) -> None:
    """Write --set values into the UI workflow too, so the PNG it is embedded in reproduces the image."""
    from .workflow import widget_layout

    nodes = {str(n.get("id")): n for n in workflow.get("nodes", [])}
    for item in overrides:
        target, _, raw = item.partition("=")
        node_id, _, name = target.partition(".")
        node = nodes.get(node_id)
        if node is None or node.get("type") not in info:
            continue
        names = [n for n, _companion in widget_layout(info[node["type"]])]
        values = node.get("widgets_values")
        if name in names and isinstance(values, list) and names.index(name) < len(values):
            try:
                values[names.index(name)] = json.loads(raw)
            except json.JSONDecodeError:
                values[names.index(name)] = raw


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_run(args) -> int:
    configure_environment(args)
    if args.sweep or args.jobs or args.ray or args.resume or args.zip:  # many jobs: runtime/batch.py
        from .batch import run_batch

        return run_batch(args, load(args))
    return execute(load(args), args)


def cmd_validate(args) -> int:
    configure_environment(args)
    loaded = load(args)
    classes, _ = node_pack()
    ok, error, node_errors, outputs = validate_prompt(loaded.prompt, classes)
    if not ok:
        print(format_errors(error, node_errors, loaded.prompt), file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.file}: valid ({len(loaded.prompt)} nodes, {len(outputs)} output node(s))")
    return EXIT_OK


def cmd_convert(args) -> int:
    configure_environment(args)
    loaded = load(args)
    text = json.dumps(loaded.prompt, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return EXIT_OK


def cmd_demo(args) -> int:
    from ..sdxl_core.checkpoint import write_tiny_checkpoints

    root = Path(args.dir)
    models = root / "models" / "checkpoints"
    t0 = time.perf_counter()
    write_tiny_checkpoints(models, seed=0)
    print(f"wrote tiny random base + refiner checkpoints to {models} ({time.perf_counter() - t0:.1f} s)")
    args.models_dir, args.output_dir = str(root / "models"), str(root / "output")
    args.input_dir, args.temp_dir = str(root / "input"), str(root / "temp")
    args.file = str(WORKFLOWS_DIR / "sdxl_base_refiner.json")
    configure_environment(args)
    loaded = load(args)
    # small and quick: the tiny networks draw noise-like pictures at any size
    for node in loaded.prompt.values():
        if node["class_type"] == "SDXLEmptyLatent":
            node["inputs"].update(width=args.size, height=args.size)
        if node["class_type"] in ("SDXLSizeCropConditioning", "SDXLRefinerConditioning"):
            for k in ("width", "height", "target_width", "target_height"):
                if k in node["inputs"]:
                    node["inputs"][k] = args.size
    print(f"running {args.file} at {args.size}×{args.size} (random weights: expect noise, not art)")
    return execute(loaded, args)


def cmd_serve(args) -> int:
    from ..nodes.environment import free_models, system_info
    from . import server

    configure_environment(args)
    classes, names = node_pack()
    return server.serve_from_cli(args, classes, names, system_info=system_info, on_free=free_models)


# ------------------------------------------------------------------------------------------------


def add_batch_arguments(sp) -> None:
    """`run` flags for many jobs (runtime/batch.py, runtime/batch_ray.py)."""
    g = sp.add_argument_group("batches (see README: Batches)")
    g.add_argument("--sweep", action="append", metavar="NODE_ID.INPUT=VALUES",
                   help="run once per value (repeatable; several sweeps give the cross product). VALUES: a..b "
                        "(integers), @file (one value per line), a JSON list, or one value")
    g.add_argument("--zip", action="store_true", help="pair the --sweep values line by line instead of crossing them")
    g.add_argument("--jobs", metavar="FILE.jsonl",
                   help='one job per line: a JSON object of overrides, e.g. {"7.seed": 3, "2.text_g": "a cat"}')
    g.add_argument("--resume", action="store_true",
                   help="skip jobs that <output-dir>/manifest.jsonl records as done (and whose files exist)")
    g.add_argument("--quiet", action="store_true", help="only the overall progress bar, no per-sampler bars")
    g.add_argument("--ray", metavar="ADDRESS",
                   help="run the jobs on a Ray cluster: 'auto' (the cluster of `ray start`), ray://host:10001, "
                        "or 'local' (start one on this machine); needs pip install 'sdxl-nodes[ray]'")
    g.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray workers, each holding the models once (default: one per GPU, or one per node "
                        "without GPUs)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdxl-nodes", description="SDXL base + refiner as workflow nodes.")
    sub = p.add_subparsers(dest="command", required=True)

    def folders(sp, default_models="models"):
        sp.add_argument("--models-dir", default=default_models,
                        help="folder with the checkpoints, or a ComfyUI models/ folder (default: ./models)")
        sp.add_argument("--input-dir", default="input", help="folder of input images (default: ./input)")
        sp.add_argument("--output-dir", default="output", help="where images are saved (default: ./output)")
        sp.add_argument("--temp-dir", default=None, help="previews (default: <output-dir>/../temp)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
        sp.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="UNet and text encoder precision (default: fp32 on CPU, fp16 on CUDA)")
        sp.add_argument("--vae-dtype", choices=["fp32", "bf16"], default=None,
                        help="VAE precision (default: fp32 on CPU, bf16 on CUDA; never fp16, which gives NaNs)")

    for name, helptext, fn in (("run", "execute a workflow file (UI or API format, or a PNG)", cmd_run),
                               ("validate", "check a workflow without running it", cmd_validate),
                               ("convert", "print a workflow as an API prompt", cmd_convert)):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("file", help="workflow .json or a .png saved with its workflow")
        sp.add_argument("--set", action="append", metavar="NODE_ID.INPUT=VALUE",
                        help="change a widget value before running (repeatable), e.g. --set 12.seed=42")
        folders(sp)
        if name == "convert":
            sp.add_argument("-o", "--output", help="write the API prompt here instead of stdout")
        if name == "run":
            add_batch_arguments(sp)
        sp.set_defaults(func=fn)

    sp = sub.add_parser("serve", help="serve the ComfyUI editor on our own API")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sp.add_argument("--port", type=int, default=8188, help="port (default: 8188; 0 picks a free one)")
    sp.add_argument("--user-dir", default="user", help="settings and saved workflows (default: ./user)")
    folders(sp)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("demo", help="write tiny random checkpoints and run the shipped base + refiner workflow")
    sp.add_argument("--dir", default="sdxl-nodes-demo", help="folder for the demo's models and outputs")
    sp.add_argument("--size", type=int, default=256, help="image size for the demo (default: 256)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    sp.add_argument("--vae-dtype", choices=["fp32", "bf16"], default=None)
    sp.set_defaults(func=cmd_demo, set=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CLIError, WorkflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # noqa: BLE001 - a clear one-line error, never a bare traceback, for user errors
        from ..sdxl_core.errors import SDXLError

        if isinstance(e, SDXLError) or type(e).__name__ == "NodeInputError":
            print(f"error: {e}", file=sys.stderr)
            return EXIT_INVALID
        raise


if __name__ == "__main__":
    sys.exit(main())
