"""The user folder: settings (``comfy.settings.json``) and user data (saved workflows, subgraphs).

Single-user, like ComfyUI without ``--multi-user``: everything lives under ``<user_dir>/default``.
Every path from a request is confined with :func:`paths.inside` (symlinks resolved).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from aiohttp import web

from ...paths import inside
from .common import BadRequest, json_error, query_bool, read_body, read_json
from .files import check_name, is_partial

log = logging.getLogger(__name__)


class Settings:
    """``comfy.settings.json`` of one user, written atomically on every change.

    A file that cannot be read as a JSON object is never taken for empty settings (the next write
    would destroy the user's settings): it is renamed to ``comfy.settings.json.corrupt-<time>``,
    reported in the log, and the editor starts from the defaults.
    """

    def __init__(self, path: Path, defaults: Mapping[str, Any]):
        self.path = path
        self.defaults = dict(defaults)

    def stored(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self._keep_aside(f"it cannot be read as JSON ({e})")
            return {}
        if not isinstance(data, dict):
            self._keep_aside(f"it holds a JSON {type(data).__name__}, not an object of settings")
            return {}
        return data

    def _keep_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-"
                                    f"{uuid.uuid4().hex[:6]}")
        try:
            os.replace(self.path, aside)
        except OSError as e:
            raise BadRequest(f"the settings file {self.path} is unusable ({why}) and could not be moved "
                             f"aside ({e}); fix or remove it", status=500) from None
        log.error("the settings file %s is unusable: %s. It was kept as %s; the editor starts from the "
                  "default settings.", self.path, why, aside)

    def all(self) -> dict:
        return {**self.defaults, **self.stored()}

    def update(self, values: Mapping[str, Any]) -> None:
        data = self.stored()
        data.update(values)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=4), encoding="utf-8")
        os.replace(tmp, self.path)


class UserData:
    """Handlers of ``/api/users``, ``/api/settings`` and ``/api/userdata``."""

    def __init__(self, user_dir: Path, setting_defaults: Mapping[str, Any]):
        self.root = Path(user_dir) / "default"
        self.settings = Settings(self.root / "comfy.settings.json", setting_defaults)

    # -- users, settings ----------------------------------------------------------------------

    async def get_users(self, request: web.Request) -> web.Response:
        return web.json_response({"storage": "server", "migrated": True})

    async def get_settings(self, request: web.Request) -> web.Response:
        return web.json_response(self.settings.all())

    async def get_setting(self, request: web.Request) -> web.Response:
        return web.json_response(self.settings.all().get(request.match_info["id"]))

    async def post_settings(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object of settings")
        self.settings.update(body)
        return web.Response(status=200)

    async def post_setting(self, request: web.Request) -> web.Response:
        self.settings.update({request.match_info["id"]: await read_json(request)})
        return web.Response(status=200)

    # -- user data ----------------------------------------------------------------------------

    def path(self, relative: str) -> Path:
        if "\x00" in relative or os.path.isabs(relative):
            raise BadRequest("invalid path", status=403)
        for part in Path(relative).parts:
            check_name(part, "name")
        if len(relative) > 1024:
            raise BadRequest("the path is longer than 1024 characters")
        self.root.mkdir(parents=True, exist_ok=True)
        path = inside(self.root, relative)
        if path is None:
            raise BadRequest("the path is outside the user folder", status=403)
        if is_partial(path.name):
            raise BadRequest(f"{path.name!r} is a name reserved for half-written files")
        return path

    def file_info(self, path: Path) -> dict:
        st = path.stat()
        root = Path(os.path.realpath(self.root))
        return {"path": path.relative_to(root).as_posix(), "size": st.st_size,
                "modified": int(st.st_mtime * 1000), "created": int(st.st_ctime * 1000)}

    async def list(self, request: web.Request) -> web.Response:
        directory = request.query.get("dir", "")
        if not directory:
            raise BadRequest("the dir query parameter is required")
        base = self.path(directory)
        if not base.is_dir():
            return json_error(404, f"no such folder: {directory}")
        recurse = query_bool(request, "recurse", False)
        full_info = query_bool(request, "full_info", False)
        split = query_bool(request, "split", False)
        files = sorted(p for p in (base.rglob("*") if recurse else base.glob("*")) if p.is_file())
        out: list[Any] = []
        for p in files:
            if inside(base, str(p.relative_to(base))) is None:
                continue  # a symlink out of the user folder
            rel = p.relative_to(base).as_posix()
            if full_info:
                out.append({**self.file_info(p), "path": rel})
            elif split:
                out.append([rel, *rel.split("/")])
            else:
                out.append(rel)
        return web.json_response(out)

    async def get(self, request: web.Request) -> web.StreamResponse:
        path = self.path(request.match_info["file"])
        if not path.is_file():
            return json_error(404, "file not found")
        return web.FileResponse(path, headers={"Cache-Control": "no-store"})

    def _saved_response(self, request: web.Request, path: Path) -> web.Response:
        info = self.file_info(path)
        return web.json_response(info if query_bool(request, "full_info", False) else info["path"])

    async def post(self, request: web.Request) -> web.Response:
        path = self.path(request.match_info["file"])
        overwrite = query_bool(request, "overwrite", True)
        if path.exists() and not overwrite:
            return json_error(409, "File already exists")
        if path.is_dir():
            return json_error(400, "the path is a folder")
        body = await read_body(request)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(body)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):  # the folder of tmp may not exist (a file is in the way)
                tmp.unlink()
            raise _write_error(request.match_info["file"], e) from None
        return self._saved_response(request, path)

    async def delete(self, request: web.Request) -> web.Response:
        path = self.path(request.match_info["file"])
        if not path.is_file():
            return json_error(404, "file not found")
        path.unlink()
        return web.Response(status=204)

    async def move(self, request: web.Request) -> web.Response:
        source = self.path(request.match_info["file"])
        dest = self.path(request.match_info["dest"])
        if not source.is_file():
            return json_error(404, "file not found")
        if dest.exists() and not query_bool(request, "overwrite", True):
            return json_error(409, "File already exists")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)
        except OSError as e:
            raise _write_error(request.match_info["dest"], e) from None
        return self._saved_response(request, dest)


def _write_error(name: str, e: OSError) -> BadRequest:
    """A write the file system refused (a folder in the way, a file where a folder should be, …)."""
    return BadRequest(f"cannot write {name[:300]!r} in the user folder: {e.strerror or e}")
