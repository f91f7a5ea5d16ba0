"""Files the editor reads and writes: ``/api/view``, ``/api/upload/image``, ``/internal/files``.

Every name that comes from a request is confined with :func:`paths.inside` (symlinks resolved).
Pillow is imported lazily: only uploads and converted views need it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import mimetypes
import os
import uuid
from pathlib import Path

from aiohttp import web

from ...paths import inside
from .common import BadRequest, json_error

FILE_TYPES = ("output", "input", "temp")
# Served as downloads, never rendered, when someone asks /api/view for them.
UNSAFE_VIEW_TYPES = ("text/html", "text/javascript", "application/javascript", "text/css",
                     "image/svg+xml", "application/xhtml+xml")


def unsafe_name(name: str) -> bool:
    """Names ComfyUI refuses for files: empty, absolute, with ``..``, or (ours) with a NUL/backslash."""
    return (not name or name.startswith(("/", "\\")) or ".." in name or "\x00" in name
            or "\\" in name or (len(name) > 1 and name[1] == ":"))


def split_annotation(name: str) -> tuple[str, str | None]:
    """``"x.png [input]"`` → ``("x.png", "input")``; other names are returned unchanged."""
    for kind in FILE_TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


class Files:
    """The input, output and temp folders as the editor sees them."""

    def __init__(self, dirs: dict[str, Path], max_upload_bytes: int):
        self.dirs = dirs
        self.max_upload_bytes = int(max_upload_bytes)

    def root(self, kind: str | None) -> Path:
        kind = kind or "output"
        if kind not in self.dirs:
            raise BadRequest(f"type must be one of {', '.join(FILE_TYPES)}, got {kind!r}")
        return self.dirs[kind]

    async def view(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        filename, kind = split_annotation(q.get("filename", ""))
        if unsafe_name(filename):
            raise BadRequest(f"invalid filename {q.get('filename', '')!r}")
        root = self.root(kind or q.get("type") or "output")
        subfolder = q.get("subfolder", "")
        if "\x00" in subfolder or os.path.isabs(subfolder):
            raise BadRequest(f"invalid subfolder {subfolder!r}", status=403)
        folder = inside(root, subfolder, allow_root=True)
        path = inside(root, subfolder, filename)
        if folder is None or path is None:
            raise BadRequest("the file is outside the allowed folder", status=403)
        if not path.is_file():
            return json_error(404, f"file not found: {Path(subfolder, filename).as_posix()}")

        preview, channel = q.get("preview"), q.get("channel", "rgba")
        if preview or channel in ("rgb", "a"):
            data, content_type = await asyncio.to_thread(convert_image, path, preview, channel)
            if data is not None:
                return web.Response(body=data, content_type=content_type,
                                    headers={"Content-Disposition": f'filename="{path.name}"'})
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type in UNSAFE_VIEW_TYPES:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": content_type,
                                               "Content-Disposition": f'filename="{path.name}"',
                                               "Cache-Control": "no-cache"})

    async def upload_image(self, request: web.Request) -> web.Response:
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError) as e:
            raise BadRequest(f"expected a multipart/form-data body: {e}") from None
        fields: dict[str, str] = {}
        image: bytes | None = None
        image_name = ""
        while True:
            part = await reader.next()
            if part is None:
                break
            if getattr(part, "name", None) == "image" and getattr(part, "filename", None) is not None:
                image_name = part.filename or ""
                chunks, size = [], 0
                while chunk := await part.read_chunk(1 << 16):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise BadRequest(f"the file is larger than the limit of {self.max_upload_bytes} bytes",
                                         status=413)
                    chunks.append(chunk)
                image = b"".join(chunks)
            elif getattr(part, "name", None):
                fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")
        if image is None:
            raise BadRequest("no file in the 'image' field")
        kind = fields.get("type") or "input"
        root = self.root(kind)
        subfolder = fields.get("subfolder", "")
        name = os.path.basename(image_name.replace("\\", "/"))
        if unsafe_name(name) or "/" in name:
            raise BadRequest(f"invalid file name {image_name!r}")
        if "\x00" in subfolder or os.path.isabs(subfolder) or ".." in Path(subfolder).parts:
            raise BadRequest(f"invalid subfolder {subfolder!r}", status=403)
        folder = inside(root, subfolder, allow_root=True)
        if folder is None or inside(root, subfolder, name) is None:
            raise BadRequest("the upload would leave the allowed folder", status=403)
        if not await asyncio.to_thread(is_image, image):
            raise BadRequest(f"{name} is not an image file (PNG, JPEG, WebP, GIF, BMP or TIFF)")
        overwrite = fields.get("overwrite", "").strip().lower() in ("true", "1")
        name = await asyncio.to_thread(store_upload, folder, name, image, overwrite)
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    async def internal_files(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind not in self.dirs:
            return json_error(400, f"unknown folder {kind!r}")
        root = self.dirs[kind]
        entries = [e for e in os.scandir(root) if e.is_file()] if root.is_dir() else []
        entries.sort(key=lambda e: -e.stat().st_mtime)
        return web.json_response([f"{e.name} [{kind}]" for e in entries])


# -- image helpers -------------------------------------------------------------------------------


def is_image(data: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            return im.format in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def store_upload(folder: Path, name: str, data: bytes, overwrite: bool) -> str:
    """Write ``data`` as ``folder/name``; on a clash use ``name (1).ext`` … unless the content is equal."""
    folder.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        stem, ext = os.path.splitext(name)
        digest = hashlib.sha256(data).digest()
        i = 1
        while (folder / name).exists():
            existing = folder / name
            if existing.is_file() and hashlib.sha256(existing.read_bytes()).digest() == digest:
                return name  # the same picture is already there
            name = f"{stem} ({i}){ext}"
            i += 1
    target = folder / name
    tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return name


def convert_image(path: Path, preview: str | None, channel: str) -> tuple[bytes | None, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if channel == "a":
                alpha = im.getchannel("A") if "A" in im.getbands() else Image.new("L", im.size, 255)
                im = Image.merge("RGBA", (Image.new("L", im.size, 0),) * 3 + (alpha,))
            elif channel == "rgb":
                im = im.convert("RGB")
            buf = io.BytesIO()
            if preview:
                fmt, _, quality = preview.partition(";")
                fmt = fmt.strip().lower()
                fmt = fmt if fmt in ("webp", "jpeg", "png") else "webp"
                quality_value = int(quality) if quality.strip().isdigit() else 90
                if fmt == "jpeg":
                    im = im.convert("RGB")
                im.save(buf, format=fmt.upper(), quality=quality_value)
                return buf.getvalue(), f"image/{fmt}"
            im.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
    except (UnidentifiedImageError, OSError, ValueError):
        return None, ""
