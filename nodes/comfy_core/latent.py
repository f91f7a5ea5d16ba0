"""ComfyUI's latent nodes: empty latent, resize, batch, noise mask, save/load."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ...paths import inside
from ...sdxl_core.resize import CROP_METHODS, LATENT_METHODS, resize
from ..environment import NodeInputError, current
from ..sampling import CONTINUE_KEY, check_continue_info
from ..schema import MAX_RESOLUTION, Combo, Float, Int, NodeSchema, Output, Socket, String, node

log = logging.getLogger(__name__)

LATENT_OUT = (Output("LATENT", "LATENT", "The latent."),)
LATENT_EXT = ".latent"


def _samples(name="samples"):
    return Socket(name, "LATENT", "The latent.")


@node(NodeSchema(
    id="EmptyLatentImage",
    display_name="Empty Latent Image",
    category="latent",
    description="An all-zero latent batch to start text-to-image from (SDXL works best near 1024×1024).",
    inputs=(
        Int("width", "Image width in pixels.", default=512, min=16, max=MAX_RESOLUTION, step=8),
        Int("height", "Image height in pixels.", default=512, min=16, max=MAX_RESOLUTION, step=8),
        Int("batch_size", "How many images at once.", default=1, min=1, max=4096, step=None),
    ),
    outputs=LATENT_OUT,
))
class EmptyLatentImage:
    def run(self, width, height, batch_size):
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


def _method(choices):
    return Combo("upscale_method", "How new pixels are computed.", list(choices))


def _crop():
    return Combo("crop", "center: cut to the new aspect ratio first; disabled: stretch.", list(CROP_METHODS))


@node(NodeSchema(
    id="LatentUpscale",
    display_name="Upscale Latent",
    category="latent",
    description="Resizes a latent to width×height pixels (÷ 8 in the latent; each side at least 64). A side of "
                "0 keeps the aspect ratio; both 0 leave the latent unchanged.",
    inputs=(
        _samples(), _method(LATENT_METHODS),
        Int("width", "Target width in pixels (0 = from height and the aspect ratio).", default=512, min=0,
            max=MAX_RESOLUTION, step=8),
        Int("height", "Target height in pixels (0 = from width and the aspect ratio).", default=512, min=0,
            max=MAX_RESOLUTION, step=8),
        _crop(),
    ),
    outputs=LATENT_OUT,
))
class LatentUpscale:
    def run(self, samples, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (samples,)
        z = samples["samples"]
        if width == 0:
            height = max(64, height)
            width = max(64, round(z.shape[-1] * height / z.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(z.shape[-2] * width / z.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        out = dict(samples)
        out["samples"] = resize(z, width // 8, height // 8, upscale_method, crop)
        return (out,)


@node(NodeSchema(
    id="LatentUpscaleBy",
    display_name="Upscale Latent By",
    category="latent",
    description="Resizes a latent by a factor (each side rounded), e.g. 1.5 for a hires-fix pass.",
    inputs=(_samples(), _method(LATENT_METHODS),
            Float("scale_by", "The factor.", default=1.5, min=0.01, max=8.0, step=0.01)),
    outputs=LATENT_OUT,
))
class LatentUpscaleBy:
    def run(self, samples, upscale_method, scale_by):
        z = samples["samples"]
        out = dict(samples)
        out["samples"] = resize(z, round(z.shape[-1] * scale_by), round(z.shape[-2] * scale_by), upscale_method)
        return (out,)


@node(NodeSchema(
    id="RepeatLatentBatch",
    display_name="Repeat Latent Batch",
    category="latent/batch",
    description="Repeats the batch 'amount' times (batch_index continues so every copy gets its own noise).",
    inputs=(_samples(), Int("amount", "How many copies.", default=1, min=1, max=64, step=None)),
    outputs=LATENT_OUT,
))
class RepeatLatentBatch:
    def run(self, samples, amount):
        out = dict(samples)
        z = samples["samples"]
        out["samples"] = z.repeat((amount,) + (1,) * (z.ndim - 1))
        mask = samples.get("noise_mask")
        if mask is not None and mask.shape[0] > 1:
            out["noise_mask"] = mask.repeat((amount,) + (1,) * (mask.ndim - 1))
        if "batch_index" in samples:
            idx = list(samples["batch_index"])
            offset = max(idx) - min(idx) + 1
            out["batch_index"] = idx + [i + k * offset for k in range(1, amount) for i in idx]
        return (out,)


@node(NodeSchema(
    id="LatentFromBatch",
    display_name="Latent From Batch",
    category="latent/batch",
    description="Picks 'length' latents from 'batch_index' on; they keep their place's noise (batch_index).",
    inputs=(
        _samples(),
        Int("batch_index", "First latent to take (0-based; clamped to the batch).", default=0, min=0, max=63,
            step=None),
        Int("length", "How many to take (clamped to what is left).", default=1, min=1, max=64, step=None),
    ),
    outputs=LATENT_OUT,
))
class LatentFromBatch:
    def run(self, samples, batch_index, length):
        z = samples["samples"]
        start = min(z.shape[0] - 1, batch_index)
        length = min(z.shape[0] - start, length)
        out = dict(samples)
        out["samples"] = z[start:start + length].clone()
        mask = samples.get("noise_mask")
        if mask is not None:
            if mask.shape[0] == 1:
                out["noise_mask"] = mask.clone()
            else:
                if mask.shape[0] < z.shape[0]:
                    mask = mask.repeat(math.ceil(z.shape[0] / mask.shape[0]), 1, 1, 1)[: z.shape[0]]
                out["noise_mask"] = mask[start:start + length].clone()
        if "batch_index" in samples:
            out["batch_index"] = list(samples["batch_index"])[start:start + length]
        else:
            out["batch_index"] = list(range(start, start + length))
        return (out,)


@node(NodeSchema(
    id="SetLatentNoiseMask",
    display_name="Set Latent Noise Mask",
    category="latent/inpaint",
    description="Only the masked area (mask 1) is re-generated by the samplers; the rest keeps the latent.",
    inputs=(_samples(), Socket("mask", "MASK", "1 = repaint, 0 = keep.")),
    outputs=LATENT_OUT,
))
class SetLatentNoiseMask:
    def run(self, samples, mask):
        out = dict(samples)
        out["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (out,)


# -- SaveLatent / LoadLatent: ComfyUI's .latent files (safetensors), plus our hand-over record -------------


def _next_latent_counter(folder: Path, stem: str) -> int:
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})_\.latent$")
    numbers = [int(m.group(1)) for p in folder.glob(f"{stem}_*_.latent") if (m := pattern.match(p.name))]
    return max(numbers, default=0) + 1


@node(NodeSchema(
    id="SaveLatent",
    display_name="SaveLatent",
    category="_for_testing",
    description="Saves a latent as <prefix>_00001_.latent in the output folder (ComfyUI's format, with the "
                "workflow; a stopped-early latent also records where to continue, for SDXL Noise & Refine).",
    inputs=(_samples(), String("filename_prefix", "File name prefix; may include subfolders.",
                               default="latents/ComfyUI")),
    output_node=True,
    hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
))
class SaveLatent:
    DIFFERS_FROM_COMFYUI = ("Also writes the hand-over record of a stopped-early latent into the file's metadata (ComfyUI "
                            "ignores it).")

    def run(self, samples, filename_prefix="latents/ComfyUI", prompt=None, extra_pnginfo=None):
        root = Path(current().output_dir)
        root.mkdir(parents=True, exist_ok=True)
        target = inside(root, filename_prefix)
        if target is None:
            raise NodeInputError(f"filename_prefix '{filename_prefix}' points outside the output folder {root}")
        folder, stem = target.parent, target.name
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{stem}_{_next_latent_counter(folder, stem):05}_{LATENT_EXT}"
        metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
        for key, value in (extra_pnginfo or {}).items():
            metadata[key] = json.dumps(value)
        if samples.get(CONTINUE_KEY):
            metadata[CONTINUE_KEY] = json.dumps(samples[CONTINUE_KEY])
        tensors = {"latent_tensor": samples["samples"].contiguous(), "latent_format_version_0": torch.tensor([])}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=LATENT_EXT)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, 0o644)
            os.replace(tmp, folder / name)  # never a half-written file under its real name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        sub = folder.relative_to(root.resolve()).as_posix() if folder != root.resolve() else ""
        return {"ui": {"latents": [{"filename": name, "subfolder": "" if sub == "." else sub, "type": "output"}]},
                "result": ()}


def _latent_files() -> list[str]:
    root = Path(current().input_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(LATENT_EXT))


def _latent_path(name: str) -> Path:
    root = Path(current().input_dir)
    path = inside(root, name)
    if path is None or not path.is_file():
        raise NodeInputError(f"latent file '{name}' not found in the input folder {root}; copy a .latent file "
                             "saved by SaveLatent there")
    return path


@node(NodeSchema(
    id="LoadLatent",
    display_name="LoadLatent",
    category="_for_testing",
    description="Loads a .latent file from the input folder (ComfyUI's format; old files are rescaled as in "
                "ComfyUI). A hand-over record saved with it lets SDXL Noise & Refine continue the schedule.",
    inputs=(Combo("latent", "A .latent file in the input folder.", _latent_files),),
    outputs=LATENT_OUT,
))
class LoadLatent:
    DIFFERS_FROM_COMFYUI = "Also reads the hand-over record back, if the file has one."

    @classmethod
    def IS_CHANGED(cls, latent):  # noqa: N802 - ComfyUI's name
        return hashlib.sha256(_latent_path(latent).read_bytes()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, latent):  # noqa: N802
        try:
            _latent_path(latent)
        except NodeInputError as e:
            return str(e)
        return True

    def run(self, latent):
        path = _latent_path(latent)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                if "latent_tensor" not in keys:
                    raise NodeInputError(f"{path} has no 'latent_tensor'; it is not a latent saved by SaveLatent")
                samples = f.get_tensor("latent_tensor").float()
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise NodeInputError(f"cannot read latent file {path}: {e}") from e
        if samples.ndim != 4:
            raise NodeInputError(f"{path}: latent_tensor has shape {list(samples.shape)}, expected [B, 4, h, w]")
        if "latent_format_version_0" not in keys:
            samples = samples * (1.0 / 0.18215)  # files from before ComfyUI's format version 0
        out = {"samples": samples}
        if CONTINUE_KEY in metadata:
            try:
                record = json.loads(metadata[CONTINUE_KEY])
            except json.JSONDecodeError as e:
                raise NodeInputError(f"{path}: the hand-over record is not JSON ({e})") from e
            out[CONTINUE_KEY] = check_continue_info(record, f"LoadLatent {path.name}")
        return (out,)


NODES = (EmptyLatentImage, LatentUpscale, LatentUpscaleBy, RepeatLatentBatch, LatentFromBatch, SetLatentNoiseMask,
         SaveLatent, LoadLatent)
