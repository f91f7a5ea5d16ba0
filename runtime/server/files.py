"""Files the editor reads and writes: ``/api/view``, ``/api/upload/image``, ``/internal/files``.

Every name that comes from a request is confined with :func:`paths.inside` (symlinks resolved).
Pillow is imported lazily: only uploads and converted views need it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import mimetypes
import os
import re
import uuid
import warnings
from pathlib import Path

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ...paths import inside
from ..limits import DEFAULT_LIMITS, Limits
from .common import BadRequest, json_error, too_large

log = logging.getLogger(__name__)

FILE_TYPES = ("output", "input", "temp")
# Served as downloads, never rendered, when someone asks /api/view for them.
UNSAFE_VIEW_TYPES = ("text/html", "text/javascript", "application/javascript", "text/css",
                     "image/svg+xml", "application/xhtml+xml")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
# A file name (one path component) in bytes: the common file-system limit is 255, and our own
# temporary names add 35 bytes (".<name>.<32 hex>.tmp").
MAX_NAME_BYTES = 200
MAX_FIELD_BYTES = 4096  # a form field other than the image (type, subfolder, overwrite)
# Half-written files: nodes/images.py saves through ".partial-*" temporary files, uploads and user
# data through ".<name>.<uuid hex>.tmp". A kill -9 can leave them; they are removed at start and
# never served.
PARTIAL_NAME = re.compile(r"^(\.partial-.*|\..+\.[0-9a-f]{32}\.tmp)$", re.DOTALL)


def is_partial(name: str) -> bool:
    return bool(PARTIAL_NAME.match(name))


def remove_stale_partials(root: Path) -> int:
    """Delete the half-written files under ``root`` (not following links); returns how many."""
    removed = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if is_partial(name):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError as e:
                    log.warning("could not remove the stale partial file %s: %s", os.path.join(folder, name), e)
    if removed:
        log.info("removed %d half-written file(s) left in %s by an interrupted save", removed, root)
    return removed


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for names the OS refuses (too long, …) instead of raising."""
    try:
        return path.is_file()
    except OSError:
        return False


def check_name(name: str, what: str = "file name") -> None:
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BadRequest(f"the {what} is {len(name.encode('utf-8', 'surrogatepass'))} bytes long; "
                         f"the limit is {MAX_NAME_BYTES} bytes")


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

    def __init__(self, dirs: dict[str, Path], max_upload_bytes: int, limits: Limits = DEFAULT_LIMITS):
        self.dirs = dirs
        self.max_upload_bytes = int(max_upload_bytes)
        self.limits = limits

    def root(self, kind: str | None) -> Path:
        kind = kind or "output"
        if kind not in self.dirs:
            raise BadRequest(f"type must be one of {', '.join(FILE_TYPES)}, got {kind!r}")
        return self.dirs[kind]

    async def view(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        filename, kind = split_annotation(q.get("filename", ""))
        if unsafe_name(filename):
            raise BadRequest(f"invalid filename {q.get('filename', '')[:300]!r}")
        root = self.root(kind or q.get("type") or "output")
        subfolder = q.get("subfolder", "")
        if "\x00" in subfolder or os.path.isabs(subfolder):
            raise BadRequest(f"invalid subfolder {subfolder!r}", status=403)
        folder = inside(root, subfolder, allow_root=True)
        path = inside(root, subfolder, filename)
        if folder is None or path is None:
            raise BadRequest("the file is outside the allowed folder", status=403)
        if is_partial(path.name) or not is_file(path):
            return json_error(404, f"file not found: {Path(subfolder, filename).as_posix()[:300]}")

        preview, channel = q.get("preview"), q.get("channel", "rgba")
        if preview or channel in ("rgb", "a"):
            data, content_type = await asyncio.to_thread(convert_image, path, preview, channel,
                                                         self.limits.image_pixels)
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
        limit = self.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
        try:
            fields, image, image_name = await self._read_form(request, limit)
        except (ValueError, AssertionError, KeyError, LookupError, UnicodeError, HttpProcessingError) as e:
            # aiohttp's multipart reader raises these for a body that is not what its headers say
            raise BadRequest(f"malformed multipart/form-data body: {type(e).__name__}: {e}"[:300]) from None
        if image is None:
            raise BadRequest("no file in the 'image' field")
        kind = fields.get("type") or "input"
        root = self.root(kind)
        subfolder = fields.get("subfolder", "")
        name = os.path.basename(image_name.replace("\\", "/"))
        if unsafe_name(name) or "/" in name:
            raise BadRequest(f"invalid file name {image_name[:300]!r}")
        check_name(name)
        if "\x00" in subfolder or os.path.isabs(subfolder) or ".." in Path(subfolder).parts:
            raise BadRequest(f"invalid subfolder {subfolder[:300]!r}", status=403)
        for part in Path(subfolder).parts:
            check_name(part, "subfolder name")
        if is_partial(name):
            raise BadRequest(f"{name!r} is a name reserved for half-written files; rename the file")
        folder = inside(root, subfolder, allow_root=True)
        if folder is None or inside(root, subfolder, name) is None:
            raise BadRequest("the upload would leave the allowed folder", status=403)
        await asyncio.to_thread(check_image, image, name, self.limits.image_pixels)
        overwrite = fields.get("overwrite", "").strip().lower() in ("true", "1")
        name = await asyncio.to_thread(store_upload, folder, name, image, overwrite)
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    @staticmethod
    async def _read_form(request: web.Request, limit: int) -> tuple[dict[str, str], bytes | None, str]:
        """The form's text fields, the image bytes and its file name; at most ``limit`` bytes in all."""
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError) as e:
            raise BadRequest(f"expected a multipart/form-data body: {e}") from None
        fields: dict[str, str] = {}
        image: bytes | None = None
        image_name = ""
        total = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not supported")
            is_image_part = part.name == "image" and part.filename is not None
            cap = limit if is_image_part else min(limit, MAX_FIELD_BYTES)
            chunks, size = [], 0
            while chunk := await part.read_chunk(1 << 16):
                size += len(chunk)
                total += len(chunk)
                if total > limit:
                    raise too_large(limit)
                if size > cap:
                    raise BadRequest(f"the form field {part.name!r} is larger than {cap} bytes")
                chunks.append(chunk)
            data = b"".join(chunks)
            if is_image_part:
                image, image_name = data, part.filename or ""
            elif part.name:
                fields[part.name] = data.decode("utf-8", "replace")
        return fields, image, image_name

    async def internal_files(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind not in self.dirs:
            return json_error(400, f"unknown folder {kind!r}")
        root = self.dirs[kind]
        entries = [e for e in os.scandir(root) if e.is_file() and not is_partial(e.name)] if root.is_dir() else []
        entries.sort(key=lambda e: -e.stat().st_mtime)
        return web.json_response([f"{e.name} [{kind}]" for e in entries])


# -- image helpers -------------------------------------------------------------------------------


def _open_bounded(source, what: str, max_pixels: int):
    """``Image.open`` that refuses, from the header alone, an image over ``max_pixels``."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
        except Image.DecompressionBombError as e:
            raise BadRequest(f"{what} is too large to decode ({e}); the image_pixels limit is {max_pixels} "
                             f"pixels (serve --limit image_pixels=N)") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise BadRequest(f"{what} is {width}×{height} = {width * height} pixels, over the image_pixels limit of "
                         f"{max_pixels} (serve --limit image_pixels=N)")
    return im


def check_image(data: bytes, name: str, max_pixels: int = DEFAULT_LIMITS.image_pixels) -> None:
    """Refuse (400) data that is not an image of a known format, or one over ``max_pixels``.

    Only the header and the chunk checksums are read: nothing is decompressed.
    """
    from PIL import UnidentifiedImageError

    not_image = BadRequest(f"{name} is not an image file (PNG, JPEG, WebP, GIF, BMP or TIFF)")
    try:
        im = _open_bounded(io.BytesIO(data), name, max_pixels)
        with im:
            fmt = im.format
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise not_image from None
    if fmt not in IMAGE_FORMATS:
        raise not_image


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


def convert_image(path: Path, preview: str | None, channel: str,
                  max_pixels: int = DEFAULT_LIMITS.image_pixels) -> tuple[bytes | None, str]:
    """The image re-encoded for ``preview``/``channel``; (None, "") when it is not an image.

    An image over ``max_pixels`` is refused from its header, before anything is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_bounded(path, path.name, max_pixels) as im:
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
                quality_value = min(int(quality), 100) if quality.strip().isdigit() and len(quality) < 4 else 90
                if fmt == "jpeg":
                    im = im.convert("RGB")
                im.save(buf, format=fmt.upper(), quality=quality_value)
                return buf.getvalue(), f"image/{fmt}"
            im.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
    except (UnidentifiedImageError, OSError, ValueError):
        return None, ""
