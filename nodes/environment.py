"""Where the nodes find files and models: the folders, the device policy and the model manager.

An :class:`Environment` is an object, not module state. Whoever runs nodes builds one and makes
it the current one for the code it runs, in a context variable:

* standalone, the CLI builds it from its options (`configure(...)` = build + make current) for
  `run`, `validate` and `serve`; the executor runs every prompt in the context it was created in
  (``runtime.executor``), so the environment reaches the nodes on the server's worker thread too;
* a test or a Python caller writes ``with use(Environment.from_folders(...)):`` (or `configure`);
* inside ComfyUI nobody sets one and `current()` answers with an adapter over ComfyUI's
  `folder_paths` (checkpoint list, input/output/temp folders), built once per process and keyed by
  ComfyUI's flags: its device, VRAM state and precision flags become our RuntimeOptions, and the
  model manager takes part in ComfyUI's memory management (`comfy_memory.py`).

Nodes ask `current()` when they run (and `INPUT_TYPES` when it lists files).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import inside
from ..runtime.limits import DEFAULT_LIMITS, Limits  # a torch-free leaf module, like paths.py
from ..sdxl_core.errors import UserError
from ..sdxl_core.memory import ModelManager, RuntimeOptions
from . import comfy_memory

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class NodeInputError(UserError, ValueError):
    """A widget value the node cannot use (a missing file, a refiner wired into the base sampler…)."""


@dataclass
class Environment:
    checkpoint_dirs: list[Path]
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    manager: ModelManager
    inside_comfyui: bool = False
    limits: Limits = DEFAULT_LIMITS  # image_pixels, filename_prefix_chars… (runtime/limits.py)
    # kind ("loras", "vae", "embeddings") → folders searched before models/<kind>/ beside the checkpoints
    extra_model_dirs: dict = field(default_factory=dict)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_names(self) -> list[str]:
        if self.inside_comfyui:
            import folder_paths  # ComfyUI's module

            return [n for n in folder_paths.get_filename_list("checkpoints") if n.endswith(CHECKPOINT_EXTENSIONS)]
        names = set()
        for d in self.checkpoint_dirs:
            if d.is_dir():
                names.update(
                    p.relative_to(d).as_posix() for p in d.rglob("*") if p.suffix in CHECKPOINT_EXTENSIONS and p.is_file()
                )
                # diffusers-format folders, listed by folder name (their weights are not listed as files)
                folders = {p.parent for p in d.rglob("model_index.json")}
                names.update(f.relative_to(d).as_posix() for f in folders)
                names = {n for n in names if not any((d / n).is_relative_to(f) and d / n != f for f in folders)}
        return sorted(names)

    def checkpoint_path(self, name: str) -> Path:
        if self.inside_comfyui:
            import folder_paths

            path = folder_paths.get_full_path("checkpoints", name)
            if path:
                return Path(path)
        for d in self.checkpoint_dirs:
            p = inside(d, name, resolve_links=False)  # a linked model file is the user's own choice
            if p is not None and (p.is_file() or (p / "model_index.json").is_file()):
                return p
        raise NodeInputError(f"checkpoint '{name}' not found. {self.explain_checkpoint(name)}")

    def explain_checkpoint(self, name: str) -> str:
        """Why ``name`` is not a usable checkpoint here: where we looked and what to do."""
        found = [p for d in self.checkpoint_dirs if (p := inside(d, name, resolve_links=False)) and p.is_file()]
        if name.lower().endswith(PICKLE_EXTENSIONS) and found:
            return (f"{found[0]} is a pickle file: pickles can run code when loaded, so they are refused. "
                    "Use the .safetensors release of the model (sd_xl_base_1.0.safetensors / "
                    "sd_xl_refiner_1.0.safetensors) or convert the file in a trusted environment.")
        if not self.checkpoint_dirs:
            return "No models folder is configured: pass --models-dir."
        where = []
        for d in self.checkpoint_dirs:
            state = "" if d.is_dir() else " (does not exist)"
            where.append(f"{d.resolve() if d.is_dir() else d}{state}")
        first = self.checkpoint_dirs[0]
        remedy = ("or add its folder to ComfyUI's extra_model_paths.yaml" if self.inside_comfyui else
                  "or pass --models-dir with the folder that holds it (or a ComfyUI models/ folder)")
        return f"Searched {', '.join(where)}: the file must be {first / name} (a .safetensors file), {remedy}."

    # -- other model folders (loras, vae, embeddings) -------------------------------------------------
    def model_dirs(self, kind: str) -> list[Path]:
        """The folders of one kind of model file: `models/<kind>/` beside each checkpoints folder
        (a ComfyUI-style models/ tree), or ComfyUI's own folder_paths inside ComfyUI."""
        if self.inside_comfyui:
            import folder_paths

            return [Path(p) for p in folder_paths.get_folder_paths(kind)]
        dirs = list(self.extra_model_dirs.get(kind, ()))
        for d in self.checkpoint_dirs:
            root = d.parent if d.name == "checkpoints" else d
            if root / kind not in dirs:
                dirs.append(root / kind)
        return dirs

    def model_names(self, kind: str, extensions=CHECKPOINT_EXTENSIONS) -> list[str]:
        """Files of `kind` (relative names, '/' separated), sorted; folders that do not exist are skipped."""
        if self.inside_comfyui:
            import folder_paths

            return [n for n in folder_paths.get_filename_list(kind) if n.endswith(tuple(extensions))]
        names = set()
        for d in self.model_dirs(kind):
            if d.is_dir():
                names.update(p.relative_to(d).as_posix() for p in d.rglob("*") if p.suffix in extensions and p.is_file())
        return sorted(names)

    def model_path(self, kind: str, name: str) -> Path:
        """The file `name` in the `kind` folders; NodeInputError naming every folder searched."""
        if self.inside_comfyui:
            import folder_paths

            path = folder_paths.get_full_path(kind, name)
            if path:
                return Path(path)
        for d in self.model_dirs(kind):
            p = inside(d, name, resolve_links=False)  # models folder: links are the user's choice
            if p is not None and p.is_file():
                return p
        where = ", ".join(str(d) for d in self.model_dirs(kind)) or "(no models folder configured)"
        raise NodeInputError(f"{kind} file '{name}' not found in {where}. Put the file there (a models/{kind}/ "
                             "folder beside models/checkpoints/) and refresh.")

    # -- images ------------------------------------------------------------------------------------
    def input_images(self) -> list[str]:
        root = self.input_dir
        if not root.is_dir():
            return []
        names = (p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        return sorted(n for n in names if inside(root, n) is not None)  # not links that leave the folder

    def input_image_path(self, name: str) -> Path:
        """The file `name` in the input folder; symlinks are resolved, so one pointing out of it is refused."""
        p = inside(self.input_dir, name) if isinstance(name, str) else None
        if p is None or not p.is_file():
            raise NodeInputError(f"image '{name}' not found in the input folder {self.input_dir.absolute()}")
        return p


_ACTIVE: contextvars.ContextVar[Environment | None] = contextvars.ContextVar("sdxl_nodes_environment", default=None)


def build(
    *,
    models_dir: str | Path | None = None,
    input_dir: str | Path = "input",
    output_dir: str | Path = "output",
    temp_dir: str | Path | None = None,
    options: RuntimeOptions | None = None,
    limits: Limits | None = None,
) -> Environment:
    """An environment over these folders (a ComfyUI ``models/`` folder or the checkpoints themselves)."""
    dirs: list[Path] = []
    if models_dir is not None:
        m = Path(models_dir)
        dirs = [m / "checkpoints"] if (m / "checkpoints").is_dir() else [m]  # a ComfyUI models/ folder, or the files
    out = Path(output_dir)
    return Environment(
        checkpoint_dirs=dirs,
        input_dir=Path(input_dir),
        output_dir=out,
        temp_dir=Path(temp_dir) if temp_dir else out.parent / "temp",
        manager=ModelManager(options or RuntimeOptions()),
        limits=limits or DEFAULT_LIMITS,
    )


@contextlib.contextmanager
def use(env: Environment) -> Iterator[Environment]:
    """Make ``env`` the current environment for the code run inside the ``with`` block."""
    token = _ACTIVE.set(env)
    try:
        yield env
    finally:
        _ACTIVE.reset(token)


def configure(**folders) -> Environment:
    """`build(**folders)` and make it current in the caller's context (the CLI's command, a test)."""
    env = build(**folders)
    _ACTIVE.set(env)
    return env


_COMFY_LOCK = threading.Lock()
_COMFY_ENV: tuple[object, Environment] | None = None  # (ComfyUI's flags, the environment built for them)


def _from_comfyui() -> Environment:
    """The environment inside ComfyUI: built once per process for ComfyUI's flags (device, VRAM state,
    precision flags); should they change, the old one unloads its networks and a new one is built."""
    global _COMFY_ENV
    mm, args = _comfy_modules()
    flags = comfy_memory.read_flags(mm, args) if mm is not None else None
    with _COMFY_LOCK:
        if _COMFY_ENV is not None and _COMFY_ENV[0] == flags:
            return _COMFY_ENV[1]
        if _COMFY_ENV is not None:
            old = _COMFY_ENV[1].manager
            log.info("sdxl-nodes: ComfyUI's flags changed (%s → %s): unloading the networks loaded for the old ones",
                     _COMFY_ENV[0], flags)
            old.unload_all()
            if isinstance(old, comfy_memory.ComfyUIModelManager):
                old.deregister()
        env = _build_comfyui(mm, flags)
        _COMFY_ENV = (flags, env)
        return env


def _comfy_modules():
    """ComfyUI's comfy.model_management and comfy.cli_args.args; (None, None) for a stripped ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        log.warning("sdxl-nodes: ComfyUI's comfy.model_management cannot be imported; using the CPU on our own")
        return None, None
    try:
        from comfy.cli_args import args
    except ImportError:
        log.warning("sdxl-nodes: ComfyUI's comfy.cli_args cannot be imported; its precision flags are not read")
        args = None
    return mm, args


def _build_comfyui(mm, flags) -> Environment:
    import folder_paths

    if mm is None:
        manager = ModelManager(RuntimeOptions(device="cpu"))
    else:
        memory = comfy_memory.read_memory(mm, flags.device) if flags.vram_state == "LOW_VRAM" else None
        kwargs, notes = comfy_memory.runtime_kwargs(flags, memory)
        options, unsupported = comfy_memory.runtime_options(kwargs)
        for note in notes:
            log.warning("sdxl-nodes: %s", note)
        for name, value in unsupported.items():
            log.warning("sdxl-nodes: ComfyUI's %s asks for %s=%r, which this version's model manager does not "
                        "support (RuntimeOptions has no such field): it is not honoured",
                        flags.vram_state, name, value)
        manager = comfy_memory.ComfyUIModelManager(options, mm, requested=kwargs)
        log.info("sdxl-nodes inside ComfyUI: %s", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    return Environment(
        checkpoint_dirs=[Path(p) for p in folder_paths.get_folder_paths("checkpoints")],
        input_dir=Path(folder_paths.get_input_directory()),
        output_dir=Path(folder_paths.get_output_directory()),
        temp_dir=Path(folder_paths.get_temp_directory()),
        manager=manager,
        inside_comfyui=True,
    )


def current() -> Environment:
    """The environment of the running code: the one set by `use`/`configure`; inside ComfyUI its folders.

    With neither (a bare ``import`` of the nodes, e.g. to list their schemas) it is the default
    folders under the working directory, built afresh each time.
    """
    env = _ACTIVE.get()
    if env is not None:
        return env
    if "folder_paths" in sys.modules:
        return _from_comfyui()
    return build(models_dir="models")


def system_info(env: Environment | None = None) -> dict:
    """What /api/system_stats reports about the compute device (the editor's About panel)."""
    import psutil
    import torch

    env = env or current()
    device = torch.device(env.manager.options.device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = f"{device} {torch.cuda.get_device_name(device)}"
    else:
        vm = psutil.virtual_memory()
        free, total, name = vm.available, vm.total, "cpu"
    return {
        "system": {"pytorch_version": torch.__version__},
        "devices": [{"name": name, "type": device.type, "index": device.index or 0, "vram_total": total,
                     "vram_free": free, "torch_vram_total": total, "torch_vram_free": free}],
    }


def free_models(_body: dict | None = None, *, env: Environment | None = None) -> None:
    """/api/free: unload every resident network (they load again on next use)."""
    (env or current()).manager.unload_all()
