"""`sdxl-nodes`: run, validate and convert shared workflow files, serve the editor, or run a demo.

    sdxl-nodes run workflow.json [--set 12.seed=42] [--models-dir DIR] [--output-dir DIR]
    sdxl-nodes validate workflow.json
    sdxl-nodes convert workflow.json [-o prompt.json]       # UI workflow → API prompt
    sdxl-nodes serve [--host 127.0.0.1] [--port 8188]
    sdxl-nodes demo                                         # tiny random checkpoints, whole pipeline

This module is the only place that parses arguments; it loads the node pack (and so torch) only for
the commands that need it. Workflows run on the main thread; Ctrl-C asks the executor to stop at the
next sampler step (a second Ctrl-C stops at once), nothing half-written is left and the exit code is 130.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..sdxl_core.errors import UserError
from .limits import parse_limits
from .validate import unsupported_message, validate_prompt
from .workflow import LoadedWorkflow, load_workflow

PYTHON_MODULE = "custom_nodes.sdxl-nodes"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = PACKAGE_ROOT / "workflows"

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
EXAMPLE_IMAGE = Path(__file__).resolve().parent / "data" / "example.png"


class CLIError(UserError):
    """A bad command line: printed as one message, exit code 2."""


def prefer_passive_openmp() -> None:
    """Make OpenMP's idle threads sleep instead of spinning; call before torch is imported.

    PyTorch's CPU build runs its kernels on a GNU OpenMP team as wide as the machine. By default
    libgomp lets a thread that finished its share of an operator busy-wait (up to 300,000 spins)
    for the others; it throttles that to 100 spins only when it manages more threads than there
    are CPUs. A UNet step is thousands of small operators, so when the team fills every core and
    anything else wants a core (another process, our event loop, the progress bar), the spinning
    thread burns the time slice the straggler needs: measured 10x slower (issue 9; profile: the
    sampler's thread in libgomp's barrier). `demo` was fast only by accident: it wrote its
    checkpoints on the main thread first, which left a second OpenMP team and so throttled spinning.
    libgomp reads its settings once, when torch loads it, so this must run before ``import torch``;
    a value the user set wins. Inside ComfyUI, ComfyUI owns the process and this is not called.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ------------------------------------------------------------------------------------------------
# Loading the pack


def node_pack(standalone: bool = True):
    """(class mapping, display names) the CLI runs with (imports torch).

    Standalone (every command here) that is our SDXL nodes plus the core-compatible set, ComfyUI's own
    node ids on sdxl_core, so shared workflows run as they are. ``standalone=False`` gives our pack
    alone, which is all that is ever registered inside ComfyUI (the root ``__init__.py``).
    """
    from ..nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    if not standalone:
        return NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from ..nodes.comfy_core import CORE_NODE_CLASS_MAPPINGS, CORE_NODE_DISPLAY_NAME_MAPPINGS

    return ({**NODE_CLASS_MAPPINGS, **CORE_NODE_CLASS_MAPPINGS},
            {**NODE_DISPLAY_NAME_MAPPINGS, **CORE_NODE_DISPLAY_NAME_MAPPINGS})


def object_info_for(classes, names) -> dict:
    from .nodeinfo import object_info

    return object_info(classes, PYTHON_MODULE, display_names=names)


def build_environment(args):
    """The folders and model manager the nodes use, from the command line."""
    from ..nodes.environment import configure
    from ..sdxl_core.memory import DTYPES, RuntimeOptions

    options = RuntimeOptions(
        device=getattr(args, "device", "auto") or "auto",  # "auto": resolved by RuntimeOptions (GPU if any)
        compile=getattr(args, "compile", None),
        prefetch_unet=getattr(args, "prefetch_unet", None),
        unet_dtype=DTYPES[args.dtype] if getattr(args, "dtype", None) else None,
        text_dtype=DTYPES[args.dtype] if getattr(args, "dtype", None) else None,
        vae_dtype=DTYPES[args.vae_dtype] if getattr(args, "vae_dtype", None) else None,
    )
    try:
        limits = parse_limits(getattr(args, "limit", None))
    except ValueError as e:
        raise CLIError(str(e)) from None
    return configure(models_dir=args.models_dir, input_dir=getattr(args, "input_dir", "input"),
                     output_dir=getattr(args, "output_dir", "output"), temp_dir=getattr(args, "temp_dir", None),
                     options=options, limits=limits)


# ------------------------------------------------------------------------------------------------
# --set NODE_ID.INPUT=VALUE


def apply_overrides(prompt: dict, overrides: list[str], info: dict | None = None) -> None:
    """Apply ``--set`` items to an API prompt; ``info`` (object_info) lets unknown input names fail."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not node_id or not name:
            raise CLIError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 12.seed=42")
        if node_id not in prompt:
            raise CLIError(f"--set {item!r}: no node with id {node_id!r}; ids in this workflow: "
                           f"{', '.join(sorted(prompt, key=lambda k: (len(k), k)))}")
        inputs = prompt[node_id].setdefault("inputs", {})
        node_def = (info or {}).get(prompt[node_id].get("class_type"))
        if node_def is not None:
            known = [n for section in ("required", "optional") for n in (node_def.get("input") or {}).get(section) or {}]
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise CLIError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                               f"{name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                               + f" Its inputs: {', '.join(known)}")
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
        self.node_started: dict[str, float] = {}
        self.current_node: str | None = None
        self.last_progress: tuple[float, float] | None = None
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
            self.last_progress = (data["value"], data["max"])
            if self.bar is None or self.bar_node != node:
                self.close_bar()
                self.bar = tqdm(total=data["max"], desc=f"{self.title(node)} [{node}]", unit="step", file=sys.stderr,
                                leave=True, dynamic_ncols=True)
                # The first event arrives after the first step: time the bar from the node's start,
                # not from now, or the first update divides one step by ~0 s.
                self.bar.start_t = self.node_started.get(node, self.bar.start_t)
                self.bar_node = node
            self.bar.n = data["value"]
            self.bar.refresh()
        elif event == "executing":
            node = data.get("node")
            self.current_node, self.last_progress = node, None
            if node is not None:
                self.node_started[node] = time.time()  # tqdm's clock
            if node != self.bar_node:
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


class StopOnCtrlC:
    """While a workflow runs on the main thread: Ctrl-C asks the executor to stop at the next step.

    The handler only sets the executor's flag (the sampler checks it at every step and the executor
    between nodes, so nothing is half-written); a second Ctrl-C ends the process at once with 130.
    Outside the main thread (an embedding application) nothing is installed.
    """

    def __init__(self, executor):
        self.executor = executor
        self.requested = False
        self.previous = None

    def handle(self, _signum, _frame) -> None:
        if self.requested:
            os.write(2, b"\ninterrupted again: stopping now\n")
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        self.executor.interrupt()

    def __enter__(self):
        # not on other threads, and not where SIGINT is ignored (a background job of a script)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def execute(loaded: LoadedWorkflow, args, *, out=None, env=None) -> int:
    """Validate and run a loaded workflow with our node pack; returns the exit code."""
    out = out or sys.stdout
    from .executor import Executor

    classes, _names = node_pack()
    prompt = loaded.prompt
    unsupported = unsupported_message(str(getattr(args, "file", "workflow")), prompt, classes)
    if unsupported:
        print(f"error: {unsupported}", file=sys.stderr)
        return EXIT_INVALID
    limits = env.limits if env is not None else None
    ok, error, node_errors, outputs = validate_prompt(prompt, classes, limits=limits)
    if not ok:
        print(format_errors(error, node_errors, prompt), file=sys.stderr)
        return EXIT_INVALID
    progress = ConsoleProgress(prompt, out)
    progress.output_dir = Path(args.output_dir)
    executor = Executor(classes, on_event=progress)
    t0 = time.perf_counter()
    with StopOnCtrlC(executor):
        result = executor.execute(prompt, str(uuid.uuid4()), extra_data=loaded.default_extra_data(), outputs=outputs)
    seconds = time.perf_counter() - t0
    if result.status == "success":
        print(f"done in {seconds:.1f} s: {len(progress.saved)} image(s) saved", file=out)
        return EXIT_OK
    if result.status == "interrupted":
        err = result.error or {}
        node = err.get("node_id")
        step = f" at step {progress.last_progress[0]:g}/{progress.last_progress[1]:g}" if (
            progress.last_progress and progress.current_node == node) else ""
        saved = f"{len(progress.saved)} image(s) saved before" if progress.saved else "nothing was saved"
        print(f"interrupted in node {node} ({progress.title(node)}){step} after {seconds:.1f} s; {saved}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    err = result.error or {}
    if not isinstance(result.exception, UserError):  # a bug, not bad input: show where
        print("".join(err.get("traceback") or []), file=sys.stderr, end="")
    print(f"error in node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_message')}",
          file=sys.stderr)
    return EXIT_FAILED


def load(args) -> LoadedWorkflow:
    classes, names = node_pack()
    info = object_info_for(classes, names)
    loaded = load_workflow(args.file, info)
    apply_overrides(loaded.prompt, args.set or [], info)
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
    env = build_environment(args)
    if args.sweep or args.jobs or args.ray or args.resume or args.zip or args.batch != 1:  # many jobs: runtime/batch.py
        from .batch import run_batch

        return run_batch(args, load(args))  # the environment is current (configure)
    return execute(load(args), args, env=env)


def cmd_validate(args) -> int:
    env = build_environment(args)
    loaded = load(args)
    classes, _ = node_pack()
    unsupported = unsupported_message(args.file, loaded.prompt, classes)
    if unsupported:
        print(f"error: {unsupported}", file=sys.stderr)
        return EXIT_INVALID
    ok, error, node_errors, outputs = validate_prompt(loaded.prompt, classes, limits=env.limits)
    if not ok:
        print(format_errors(error, node_errors, loaded.prompt), file=sys.stderr)
        return EXIT_INVALID
    core = sum(1 for n in loaded.prompt.values() if getattr(classes[n["class_type"]], "PYTHON_MODULE", None))
    which = f", all supported: {core} ComfyUI core-compatible, {len(loaded.prompt) - core} sdxl-nodes" if core else ""
    print(f"{args.file}: valid ({len(loaded.prompt)} nodes, {len(outputs)} output node(s){which})")
    return EXIT_OK


def cmd_convert(args) -> int:
    loaded = load(args)
    text = json.dumps(loaded.prompt, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return EXIT_OK


# widgets the demo sets to its --size, per node type (the shipped workflow is drawn for 1024²)
DEMO_SIZE_WIDGETS = {
    "SDXLEmptyLatent": ("width", "height"),
    "SDXLSizeCropConditioning": ("width", "height", "target_width", "target_height"),
    "SDXLRefinerConditioning": ("width", "height"),
}


def cmd_demo(args) -> int:
    from ..sdxl_core.checkpoint import write_tiny_checkpoints

    root = Path(args.dir)
    models = root / "models" / "checkpoints"
    t0 = time.perf_counter()
    write_tiny_checkpoints(models, seed=0)
    print(f"wrote tiny random base + refiner checkpoints to {models} ({time.perf_counter() - t0:.1f} s)")
    args.models_dir, args.output_dir = str(root / "models"), str(root / "output")
    args.input_dir, args.temp_dir = str(root / "input"), str(root / "temp")
    example = Path(args.input_dir) / EXAMPLE_IMAGE.name
    if not example.exists():  # what the img2img and refine-image workflows load
        example.parent.mkdir(parents=True, exist_ok=True)
        example.write_bytes(EXAMPLE_IMAGE.read_bytes())
    args.file = str(WORKFLOWS_DIR / "sdxl_base_refiner.json")
    env = build_environment(args)
    # Small and quick (the tiny networks draw noise-like pictures at any size). The sizes go in as
    # --set items, so the UI workflow embedded in the PNG gets them too and re-runs to the same pixels.
    classes, names = node_pack()
    prompt = load_workflow(args.file, object_info_for(classes, names)).prompt
    args.set = [f"{nid}.{k}={args.size}" for nid, node in prompt.items()
                for k in DEMO_SIZE_WIDGETS.get(node["class_type"], ()) if k in node["inputs"]]
    loaded = load(args)
    print(f"running {args.file} at {args.size}×{args.size} (random weights: expect noise, not art)")
    code = execute(loaded, args, env=env)
    if code == EXIT_OK:
        folders = f"--models-dir {root / 'models'} --input-dir {root / 'input'} --output-dir {root / 'output'}"
        print(f"next: open the editor with `sdxl-nodes serve {folders}`, or run another shipped workflow, "
              f"e.g. `sdxl-nodes run {WORKFLOWS_DIR / 'sdxl_img2img.json'} {folders}`")
    return code


def cmd_serve(args) -> int:
    from ..nodes.environment import free_models, system_info
    from . import server

    try:
        import comfyui_frontend_package  # noqa: F401 - the editor bundle lives in the [editor] extra
    except ImportError:
        raise CLIError("the editor bundle (comfyui-frontend-package) is not installed: "
                       "pip install 'sdxl-nodes[editor]'") from None
    env = build_environment(args)
    classes, names = node_pack()
    # the hooks run on the server's threads: give them the environment explicitly
    return server.serve_from_cli(args, classes, names, system_info=lambda: system_info(env),
                                 on_free=lambda body=None: free_models(body, env=env))


# ------------------------------------------------------------------------------------------------


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdxl-nodes")
    except PackageNotFoundError:
        return "unknown (not installed)"


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
    g.add_argument("--batch", type=int, default=1, metavar="N",
                   help="run up to N consecutive jobs that differ only in seeds and prompt texts as one batch "
                        "(one UNet call for all; each job's pixels as unbatched). Default 1: one job at a time")
    g.add_argument("--quiet", action="store_true", help="only the overall progress bar, no per-sampler bars")
    g.add_argument("--ray", metavar="ADDRESS",
                   help="run the jobs on a Ray cluster: 'auto' (the cluster of `ray start`), ray://host:10001, "
                        "or 'local' (start one on this machine); needs pip install 'sdxl-nodes[ray]'")
    g.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray workers, each holding the models once (default: one per GPU, or one per node "
                        "without GPUs)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdxl-nodes", description="SDXL base + refiner as workflow nodes.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def models_and_input(sp):
        sp.add_argument("--models-dir", default="models",
                        help="folder with the checkpoints, or a ComfyUI models/ folder (default: ./models)")
        sp.add_argument("--input-dir", default="input", help="folder of input images (default: ./input)")

    def output_and_device(sp):
        sp.add_argument("--output-dir", default="output", help="where images are saved (default: ./output)")
        sp.add_argument("--temp-dir", default=None, help="previews (default: <output-dir>/../temp)")
        device(sp)

    def device(sp):
        sp.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N (default: auto = cuda when a GPU is there, else cpu)")
        sp.add_argument("--compile", nargs="?", const="inductor", default=None,
                        choices=["inductor", "cudagraphs", "max-autotune"],
                        help="torch.compile the UNet (default backend: inductor). The first step of each image "
                             "size compiles (a minute or more); later runs of that size in the same process are "
                             "faster. Best with `serve` or batches")
        sp.add_argument("--prefetch-unet", action=argparse.BooleanOptionalAction, default=None,
                        help="start reading each checkpoint's UNet in the background as soon as its loader runs "
                             "(default: on the CPU when RAM has room for the whole checkpoint and 2 GiB more, "
                             "off on CUDA, where it helps only on slow disks)")
        sp.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="UNet and text encoder precision (default on CPU: kept as the file stores it, "
                        "computed in fp32, the pixels of fp32 at half the memory; on CUDA: fp16)")
        sp.add_argument("--vae-dtype", choices=["fp32", "bf16"], default=None,
                        help="VAE precision (default on CPU: as stored, computed in fp32; bf16 on CUDA; never "
                        "fp16, which gives NaNs)")

    def limit(sp):
        sp.add_argument("--limit", action="append", metavar="NAME=VALUE", help="change one limit of runtime/limits.py, "
                        "e.g. --limit image_pixels=100000000 (repeatable)")

    def unused(sp, *groups):
        """Accept (so one set of folder options works with every command) but do not list options the
        command ignores."""
        hidden = argparse.ArgumentParser(add_help=False)
        for group in groups:
            group(hidden)
        for action in hidden._actions:
            sp.add_argument(*action.option_strings, default=action.default, choices=action.choices,
                            help=argparse.SUPPRESS)

    for name, helptext, fn in (("run", "execute a workflow file (UI or API format, or a PNG)", cmd_run),
                               ("validate", "check a workflow without running it", cmd_validate),
                               ("convert", "print a workflow as an API prompt", cmd_convert)):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("file", help="workflow .json or a .png saved with its workflow")
        sp.add_argument("--set", action="append", metavar="NODE_ID.INPUT=VALUE",
                        help="change a widget value first (repeatable), e.g. --set 12.seed=42")
        if name in ("run", "validate"):
            limit(sp)
        if name == "run":
            models_and_input(sp)
            output_and_device(sp)
            add_batch_arguments(sp)
        elif name == "validate":  # checkpoint and image names are checked against these folders
            models_and_input(sp)
            unused(sp, output_and_device)
        else:
            sp.add_argument("-o", "--output", help="write the API prompt here instead of stdout")
            unused(sp, models_and_input, output_and_device)
        sp.set_defaults(func=fn)

    sp = sub.add_parser("serve", help="serve the ComfyUI editor on our own API")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sp.add_argument("--port", type=int, default=8188, help="port (default: 8188; 0 picks a free one)")
    sp.add_argument("--user-dir", default="user", help="settings and saved workflows (default: ./user)")
    sp.add_argument("--token", default=None, help="require this access token (one is generated whenever --host "
                    "is not a loopback address); the printed URL carries it")
    sp.add_argument("--allow-host", action="append", metavar="NAME", help="also answer requests for this host "
                    "name (besides localhost and IP addresses; repeatable)")
    limit(sp)
    models_and_input(sp)
    output_and_device(sp)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("demo", help="write tiny random checkpoints and run the shipped base + refiner workflow")
    sp.add_argument("--dir", default="sdxl-nodes-demo",
                    help="folder for the demo's models/, input/, output/ and temp/ (default: ./sdxl-nodes-demo)")
    sp.add_argument("--size", type=int, default=256, help="image size for the demo (default: 256)")
    device(sp)
    sp.set_defaults(func=cmd_demo, set=None)
    return p


def main(argv: list[str] | None = None) -> int:
    prefer_passive_openmp()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as e:  # the message says what to change: no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:  # Ctrl-C before or after a run (during one, StopOnCtrlC handles it)
        print("interrupted; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
