"""VAE decode/encode and image load/save/preview nodes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from ..paths import inside
from ..sdxl_core.vae import decode_tiled, encode_tiled
from .environment import NodeInputError, current
from .progress import StepReporter
from .schema import Combo, NodeSchema, Output, Socket, String, node

log = logging.getLogger(__name__)

PROGRESS_HIDDEN = {"progress": "SDXL_PROGRESS"}  # our runtime's reporter: interrupt checks inside the VAE

# Decode in tiles once a latent is larger than this many latent pixels (about 1536×1536 images) on the
# CPU, or whenever a whole-image decode runs out of memory.
TILE_ABOVE_LATENT_PIXELS = 192 * 192


def _whole_or_tiled(whole, tiled, x, large: bool):
    """Run the VAE on the whole tensor, or in tiles when it is large or the whole run runs out of memory.

    Out of memory is recognised by type: torch.OutOfMemoryError (CUDA, and any backend that raises it).
    A CPU allocation failure is a plain RuntimeError and is not retried; on the CPU large images are
    tiled from the start (TILE_ABOVE_LATENT_PIXELS).
    """
    with torch.inference_mode():
        if large:
            return tiled()
        try:
            return whole(x)
        except torch.OutOfMemoryError:
            log.warning("VAE ran out of memory on the whole image; retrying in tiles")
            return tiled()


@node(NodeSchema(
    id="SDXLVAEDecode",
    display_name="SDXL VAE Decode",
    category="sdxl/latent",
    description="Turns a latent into an image with the SDXL VAE (in fp32/bf16, never fp16, so no black NaN "
                "images). Large latents, or any that run out of memory, are decoded in overlapping tiles.",
    inputs=(
        Socket("vae", "SDXL_VAE", "The VAE from SDXL Checkpoint Loader (base and refiner share the same VAE)."),
        Socket("samples", "LATENT", "The latent to decode."),
    ),
    outputs=(Output("IMAGE", "IMAGE", "The decoded image batch, [B, H, W, 3] in 0..1."),),
    hidden=PROGRESS_HIDDEN,
))
class VAEDecode:
    def run(self, vae, samples, progress=None):
        model = vae.load()
        z = samples["samples"].to(next(model.parameters()).device)
        large = z.shape[-1] * z.shape[-2] > TILE_ABOVE_LATENT_PIXELS
        steps = StepReporter(progress)
        with steps.cancellable() as stop:  # polled per tile and between the decoder's levels
            pixels = _whole_or_tiled(lambda t: model.decode(t, stop), lambda: decode_tiled(model, z, should_stop=stop),
                                     z, large)
        image = ((pixels.float().cpu() + 1) / 2).clamp(0, 1)  # ComfyUI: clamp((x+1)/2, 0, 1)
        return (image.permute(0, 2, 3, 1).contiguous(),)


@node(NodeSchema(
    id="SDXLVAEEncode",
    display_name="SDXL VAE Encode",
    category="sdxl/latent",
    description="Turns an image into a latent with the SDXL VAE (posterior mean, as ComfyUI). Sides that are "
                "not multiples of 8 are cropped to the nearest multiple, centred.",
    inputs=(
        Socket("vae", "SDXL_VAE", "The VAE from SDXL Checkpoint Loader."),
        Socket("pixels", "IMAGE", "The image batch to encode."),
    ),
    outputs=(Output("LATENT", "LATENT", "The latent of the image."),),
    hidden=PROGRESS_HIDDEN,
))
class VAEEncode:
    def run(self, vae, pixels, progress=None):
        b, h, w, _c = pixels.shape
        if h < 8 or w < 8:
            raise NodeInputError(f"image is {w}×{h}; the VAE needs at least 8×8 pixels")
        limit = current().limits.image_pixels
        if w * h * b > limit:
            raise NodeInputError(f"image batch is {b} × {w}×{h} = {w * h * b:,} pixels; the limit image_pixels is "
                                 f"{limit:,}. Scale the image down or encode fewer at once.")
        y0, x0 = (h % 8) // 2, (w % 8) // 2
        pixels = pixels[:, y0 : y0 + h // 8 * 8, x0 : x0 + w // 8 * 8, :3]
        model = vae.load()
        x = pixels.permute(0, 3, 1, 2).to(next(model.parameters()).device) * 2 - 1
        large = x.shape[-1] * x.shape[-2] > TILE_ABOVE_LATENT_PIXELS * 64
        steps = StepReporter(progress)
        with steps.cancellable() as stop:  # polled per tile and between the encoder's levels
            z = _whole_or_tiled(lambda t: model.encode(t, stop), lambda: encode_tiled(model, x, should_stop=stop),
                                x, large)
        return ({"samples": z.float().cpu()},)


def _input_images() -> list[str]:
    return current().input_images()


@node(NodeSchema(
    id="SDXLLoadImage",
    display_name="SDXL Load Image",
    category="sdxl/image",
    description="Loads an image from the input folder (upload one with the button). Alpha is dropped; EXIF "
                "rotation is applied.",
    inputs=(Combo("image", "An image file in the input folder.", _input_images, image_upload=True),),
    outputs=(Output("IMAGE", "IMAGE", "The image, [1, H, W, 3] in 0..1."),),
))
class LoadImage:
    @classmethod
    def IS_CHANGED(cls, image):  # noqa: N802 - ComfyUI's name: re-run when the file's bytes change
        path = current().input_image_path(image)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image):  # noqa: N802
        try:  # the name, and the size from the file's header (an oversized image is refused before any run)
            image_size(current().input_image_path(image), current().limits.image_pixels)
        except NodeInputError as e:
            return str(e)
        return True

    def run(self, image):
        path = current().input_image_path(image)
        return (load_image(path, current().limits.image_pixels),)


def _check_pixels(path: Path, im: Image.Image, max_pixels: int) -> tuple[int, int]:
    w, h = im.size
    if w * h > max_pixels:
        raise NodeInputError(f"image {path.name} is {w}×{h} = {w * h:,} pixels; the limit image_pixels is "
                             f"{max_pixels:,}. Scale it down before loading, or raise the limit.")
    return w, h


def image_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding; NodeInputError if unreadable or too large."""
    return _open_image(path, max_pixels, lambda im: _check_pixels(path, im, max_pixels))


def load_image(path: Path, max_pixels: int) -> torch.Tensor:
    """[1, H, W, 3] float32 in 0..1 from an image file; its size is checked from the header before decoding."""

    def decode(im):
        _check_pixels(path, im, max_pixels)
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255.0

    return torch.from_numpy(_open_image(path, max_pixels, decode))[None]


def _open_image(path: Path, max_pixels: int, use):
    """`use(im)` on the opened image, with PIL's errors (and its own bomb check) as clear NodeInputErrors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as im:
                return use(im)
    except Image.DecompressionBombError as e:  # so large that PIL refuses it before we see the size
        raise NodeInputError(f"image {path.name} is too large ({e}); the limit image_pixels is {max_pixels:,}. "
                             "Scale it down before loading.") from None
    except NodeInputError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable or truncated files
        raise NodeInputError(f"cannot read image {path.name}: {e}") from None


def _png_info(prompt, extra_pnginfo) -> PngInfo:
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def resolve_prefix_vars(prefix: str, width: int, height: int, now: time.struct_time | None = None) -> str:
    """ComfyUI's server-side `filename_prefix` variables (folder_paths.get_save_image_path, v0.8):
    %width% %height% of the first image, and the local %year% %month% %day% %hour% %minute% %second%
    (two digits but the year). The editor resolves %date:…% and %Node.widget% before queueing."""
    if "%" not in prefix:
        return prefix
    now = now or time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
              "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
              "second": f"{now.tm_sec:02}"}
    for name, value in values.items():
        prefix = prefix.replace(f"%{name}%", str(value))
    return prefix


def _next_counter(folder: Path, stem: str) -> int:
    """1 + the highest N of the `<stem>_N_.png` files in `folder` (one directory scan, no pattern over `stem`)."""
    head, highest = stem + "_", 0
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(head) and name.endswith("_.png"):
                digits = name[len(head) : -len("_.png")]
                if len(digits) >= 5 and digits.isascii() and digits.isdigit():
                    highest = max(highest, int(digits))
    return highest + 1


def _save_target(prefix: str, root: Path, kind: str) -> tuple[Path, Path, str]:
    """(folder, resolved root, file stem) for a prefix, refused before anything is created or written.

    The prefix must name a file strictly inside the folder: "", ".", "sub/.." name the folder itself,
    "../x" or a subfolder linked elsewhere leave it (paths.inside resolves both).
    """
    target = inside(root, prefix)
    if target is None:
        raise NodeInputError(f"filename_prefix {prefix!r} does not name a file inside the {kind} folder {root}: "
                             "use a name such as 'SDXL' or 'portraits/SDXL', without '..' or a leading '/'")
    return target.parent, Path(os.path.realpath(root)), target.name


def _write_png(image, path: Path, info: PngInfo, compress_level: int) -> None:
    """Write one PNG atomically: a `.partial-*` file beside it, renamed once complete.

    The partial file is created with mode 0666 minus the umask (0644 usually, as ComfyUI's files);
    a crash leaves at most a `.partial-*` file, never a half image under a real name.
    """
    arr = np.clip(image.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8)  # truncates, like ComfyUI
    tmp = path.parent / f".partial-{secrets.token_hex(8)}.png"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format="PNG", pnginfo=info, compress_level=compress_level)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_prefix(prefix, root: Path, kind: str, width: int = 1, height: int = 1) -> tuple[Path, Path, str]:
    """The length limit and the folder rule for a prefix (see `_save_target`); also run at validation."""
    if not isinstance(prefix, str):
        raise NodeInputError(f"filename_prefix must be text, got {type(prefix).__name__}")
    limit = current().limits.filename_prefix_chars
    if len(prefix) > limit:  # before the variables (a 10 MB prefix cost 139 s in a regex and a glob)
        raise NodeInputError(f"filename_prefix is {len(prefix)} characters long; the limit filename_prefix_chars is "
                             f"{limit}. Use a shorter prefix.")
    return _save_target(resolve_prefix_vars(prefix, width, height), root, kind)


def save_images(images, prefix: str, root: Path, kind: str, prompt, extra_pnginfo, compress_level: int):
    """Write each image as <prefix>_00001_.png (ComfyUI's naming) with the graph embedded; atomic writes."""
    height, width = (int(images.shape[1]), int(images.shape[2])) if images.ndim == 4 else (0, 0)
    folder, real_root, stem = check_prefix(prefix, root, kind, width, height)
    folder.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(folder, stem)
    info = _png_info(prompt, extra_pnginfo)
    subfolder = folder.relative_to(real_root).as_posix()
    results = []
    for image in images:
        name = f"{stem}_{counter:05}_.png"
        _write_png(image, folder / name, info, compress_level)
        results.append({"filename": name, "subfolder": "" if subfolder == "." else subfolder, "type": kind})
        counter += 1
    return results


SAVE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@node(NodeSchema(
    id="SDXLSaveImage",
    display_name="SDXL Save Image",
    category="sdxl/image",
    description="Saves images as PNG files in the output folder, with the workflow embedded: drag a saved PNG "
                "into the editor to get its graph back.",
    inputs=(
        Socket("images", "IMAGE", "The images to save."),
        String("filename_prefix", "File name prefix; may include subfolders (e.g. 'sdxl/portrait'). Files are "
               "numbered <prefix>_00001_.png, …", default="SDXL"),
    ),
    output_node=True,
    hidden=SAVE_HIDDEN,
))
class SaveImage:
    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):  # noqa: N802 - refused before the run, on the node
        if filename_prefix is None:  # linked: checked when the node runs
            return True
        try:
            check_prefix(filename_prefix, current().output_dir, "output")
        except NodeInputError as e:
            return str(e)
        return True

    def run(self, images, filename_prefix="SDXL", prompt=None, extra_pnginfo=None):
        saved = save_images(images, filename_prefix, current().output_dir, "output", prompt, extra_pnginfo, 4)
        level = logging.DEBUG if current().inside_comfyui else logging.INFO  # ComfyUI's console stays quiet
        for item in saved:
            log.log(level, "saved %s", Path(item["subfolder"]) / item["filename"])
        return {"ui": {"images": saved}, "result": ()}


@node(NodeSchema(
    id="SDXLPreviewImage",
    display_name="SDXL Preview Image",
    category="sdxl/image",
    description="Shows images on the node without keeping them (written to the temp folder).",
    inputs=(Socket("images", "IMAGE", "The images to preview."),),
    output_node=True,
    hidden=SAVE_HIDDEN,
))
class PreviewImage:
    def run(self, images, prompt=None, extra_pnginfo=None):
        saved = save_images(images, "preview", current().temp_dir, "temp", prompt, extra_pnginfo, 1)
        return {"ui": {"images": saved}, "result": ()}
