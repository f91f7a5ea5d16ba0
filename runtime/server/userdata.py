"""The user folder: settings (``comfy.settings.json``) and user data (saved workflows, subgraphs).

Single-user, like ComfyUI without ``--multi-user``: everything lives under ``<user_dir>/default``.
Every path from a request is confined with :func:`paths.inside` (symlinks resolved).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

from aiohttp import web

from ...paths import inside
from .common import BadRequest, json_error, query_bool, read_json

log = logging.getLogger(__name__)


class Settings:
    """``comfy.settings.json`` of one user, written atomically on every change."""

    def __init__(self, path: Path, defaults: Mapping[str, Any]):
        self.path = path
        self.defaults = dict(defaults)

    def stored(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable settings file %s: %s", self.path, e)
            return {}
        return data if isinstance(data, dict) else {}

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
        self.root.mkdir(parents=True, exist_ok=True)
        path = inside(self.root, relative)
        if path is None:
            raise BadRequest("the path is outside the user folder", status=403)
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
        body = await request.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)
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
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, dest)
        return self._saved_response(request, dest)
