"""Where the nodes find files and models: the folders, the device policy and the model manager.

Standalone (`sdxl-nodes run|serve`) the CLI calls `configure(...)` once. Inside ComfyUI nothing
calls it, and the first use builds an environment from ComfyUI's `folder_paths` (checkpoint list,
input/output/temp folders) and ComfyUI's torch device.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..sdxl_core.memory import ModelManager, RuntimeOptions

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".safetensors", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class NodeInputError(ValueError):
    """A widget value the node cannot use (a missing file, a refiner wired into the base sampler…)."""


@dataclass
class Environment:
    checkpoint_dirs: list[Path]
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    manager: ModelManager
    inside_comfyui: bool = False
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
            p = _inside(d, name)
            if p is not None and (p.is_file() or (p / "model_index.json").is_file()):
                return p
        where = ", ".join(str(d) for d in self.checkpoint_dirs) or "(no models folder configured)"
        raise NodeInputError(
            f"checkpoint '{name}' not found in {where}. Put the file there or pass --models-dir "
            "(a folder with the .safetensors files, or a ComfyUI models/ folder)."
        )

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
            p = _inside(d, name)
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
        return sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )

    def input_image_path(self, name: str) -> Path:
        root = _lexical(self.input_dir)
        p = _inside(root, name)
        if p is None or not p.is_file():
            raise NodeInputError(f"image '{name}' not found in the input folder {root}")
        return p


def _lexical(path: Path) -> Path:
    """Absolute, with '..' removed, symlinks NOT followed (a linked model file is the user's choice)."""
    return Path(os.path.abspath(path))


def _inside(folder: Path, name: str) -> Path | None:
    """folder/name if that stays inside folder after normalising '..'; None if it escapes."""
    root = _lexical(folder)
    p = _lexical(root / name)
    return p if root in p.parents else None


_lock = threading.Lock()
_current: Environment | None = None


def configure(
    *,
    models_dir: str | Path | None = None,
    input_dir: str | Path = "input",
    output_dir: str | Path = "output",
    temp_dir: str | Path | None = None,
    options: RuntimeOptions | None = None,
) -> Environment:
    """Set the process's environment (the CLI's job). Returns it."""
    global _current
    dirs: list[Path] = []
    if models_dir is not None:
        m = Path(models_dir)
        dirs = [m / "checkpoints"] if (m / "checkpoints").is_dir() else [m]  # a ComfyUI models/ folder, or the files
    out = Path(output_dir)
    env = Environment(
        checkpoint_dirs=dirs,
        input_dir=Path(input_dir),
        output_dir=out,
        temp_dir=Path(temp_dir) if temp_dir else out.parent / "temp",
        manager=ModelManager(options or RuntimeOptions()),
    )
    with _lock:
        _current = env
    return env


def _from_comfyui() -> Environment:
    import folder_paths

    device = "cpu"
    try:
        import comfy.model_management as mm

        device = str(mm.get_torch_device())
    except Exception:  # noqa: BLE001 - an old or stripped ComfyUI: stay on the CPU
        log.warning("sdxl-nodes: could not ask ComfyUI for its device; using the CPU")
    return Environment(
        checkpoint_dirs=[Path(p) for p in folder_paths.get_folder_paths("checkpoints")],
        input_dir=Path(folder_paths.get_input_directory()),
        output_dir=Path(folder_paths.get_output_directory()),
        temp_dir=Path(folder_paths.get_temp_directory()),
        manager=ModelManager(RuntimeOptions(device=device)),
        inside_comfyui=True,
    )


def current() -> Environment:
    """The configured environment; inside ComfyUI one built from `folder_paths`; else the defaults."""
    global _current
    with _lock:
        if _current is None:
            if "folder_paths" in sys.modules:
                _current = _from_comfyui()
            else:
                _current = Environment(
                    checkpoint_dirs=[Path("models/checkpoints")],
                    input_dir=Path("input"),
                    output_dir=Path("output"),
                    temp_dir=Path("temp"),
                    manager=ModelManager(RuntimeOptions()),
                )
        return _current


def system_info() -> dict:
    """What /api/system_stats reports about the compute device (the editor's About panel)."""
    import psutil
    import torch

    env = current()
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


def free_models(_body: dict | None = None) -> None:
    """/api/free: unload every resident network (they load again on next use)."""
    current().manager.unload_all()
