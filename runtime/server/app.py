"""The HTTP/WebSocket server that lets the official ComfyUI web editor run on our own nodes.

The contract is ``../shared/frontend/API.md`` (``comfyui-frontend-package`` 1.58.1): the editor's
static files at ``/``, the JSON API under ``/api`` (every route also without the prefix, as ComfyUI
registers them), the websocket at ``/ws``, ``/internal/...`` and ``/extensions/<pack>/...``.
Behaviour follows ComfyUI's ``server.py``, ``app/user_manager.py``, ``app/frontend_management.py``
and ``comfy_execution/jobs.py`` where the editor depends on it; the code is our own.

This module assembles the app: :class:`PromptServer` owns the parts (``queue.py``: queue, worker,
history; ``ws.py``: websockets; ``files.py``: view and upload; ``userdata.py``: settings and user
data), handles ``/api/prompt`` and the small endpoints, and :func:`create_app` adds the middlewares
and routes. Node classes and the hooks that need torch (``system_info``, ``on_free``) are passed in:
the server never imports torch or ``sdxl_nodes.nodes``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import platform
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from aiohttp import web

from ...paths import inside
from ..limits import DEFAULT_LIMITS, Limits
from ..nodeinfo import object_info
from ..validate import validate_prompt
from .access import Access
from .common import LIMITS_KEY, BadRequest, json_error, now_ms, query_int, read_json, version
from .files import Files, remove_stale_partials
from .queue import JOB_STATUSES, PromptQueue, QueueItem
from .userdata import UserData
from .ws import Clients

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
WEB_DIR = PACKAGE_ROOT / "web"
WORKFLOWS_DIR = PACKAGE_ROOT / "workflows"
DEFAULT_WORKFLOW_NAME = "sdxl_base_refiner"

DEFAULT_MAX_UPLOAD_BYTES = DEFAULT_LIMITS.request_bytes  # one upload request, all its fields together
FEATURE_FLAG = "sdxl_nodes_standalone"
"""Key in ``/api/features`` and the websocket ``feature_flags`` that tells ``web/sdxl_nodes.js`` it
runs on this server (inside ComfyUI the key is absent and the extension does nothing)."""
DEFAULT_WORKFLOW_ROUTE = "/sdxl_nodes/default_workflow"
APP_KEY = web.AppKey("sdxl_nodes_server", object)
ACCESS_KEY = web.AppKey("sdxl_nodes_access", Access)


def prompt_shape_problem(prompt: Any) -> str | None:
    """What is wrong with the outer shape of an API prompt (None when nothing), before validation.

    The validator checks the graph; this refuses the shapes that are not a graph at all:
    ``{"<id>": {"class_type": str, "inputs": {...}, "_meta": {...}}}``.
    """
    if not isinstance(prompt, dict):
        return f"the prompt must be an object of node id → node, got {type(prompt).__name__}"
    for node_id, node in prompt.items():
        where = f"node {node_id[:40]!r}"
        if not isinstance(node, dict):
            return f"{where} must be an object with class_type and inputs, got {type(node).__name__}"
        class_type = node.get("class_type")
        if not isinstance(class_type, str):
            return f"{where}: class_type must be a node type name (a string), got {type(class_type).__name__}"
        if "inputs" in node and not isinstance(node["inputs"], dict):
            return f"{where}: inputs must be an object of input name → value, got {type(node['inputs']).__name__}"
        meta = node.get("_meta")
        if meta is not None and not isinstance(meta, dict):
            return f"{where}: _meta must be an object like {{\"title\": \"...\"}}, got {type(meta).__name__}"
    return None


class PromptServer:
    """One app's parts (queue, websockets, files, user data) and the handlers that join them."""

    def __init__(
        self,
        node_classes: Mapping[str, type],
        *,
        display_names: Mapping[str, str] | None,
        python_module: str,
        input_dir: Path,
        output_dir: Path,
        temp_dir: Path,
        user_dir: Path,
        default_workflow: dict | None,
        templates: Mapping[str, dict] | None,
        system_info: Callable[[], dict] | None,
        on_free: Callable[[dict], None] | None,
        max_upload_bytes: int,
        model_folders: Mapping[str, list[str]] | None,
        web_dir: Path | None,
        limits: Limits = DEFAULT_LIMITS,
    ):
        self.node_classes = node_classes
        self.display_names = dict(display_names or {})
        self.python_module = python_module
        self.pack_name = python_module.rsplit(".", 1)[-1]
        self.dirs = {"input": Path(input_dir), "output": Path(output_dir), "temp": Path(temp_dir)}
        self.default_workflow = default_workflow
        self.templates = dict(templates or {})
        self.system_info = system_info
        self.on_free = on_free
        self.max_upload_bytes = int(max_upload_bytes)
        self.model_folders = dict(model_folders or {})
        self.web_dir = web_dir
        self.limits = limits
        self.static_dir = self._frontend_static_dir()

        self.files = Files(self.dirs, self.max_upload_bytes, limits)
        # A fresh editor only opens the default graph (ours, via web/sdxl_nodes.js) when the
        # tutorial is marked done; otherwise it opens a blank graph and the Templates dialog.
        defaults = {"Comfy.TutorialCompleted": True} if default_workflow is not None else {}
        self.userdata = UserData(Path(user_dir), defaults)
        self.queue = PromptQueue(node_classes, on_event=self._on_event)
        self.clients = Clients(self.queue.status_data, self.features, resume=self._resume)

    # -- lifecycle ----------------------------------------------------------------------------

    @staticmethod
    def _frontend_static_dir() -> Path | None:
        try:
            import comfyui_frontend_package
        except ImportError:
            log.warning("comfyui-frontend-package is not installed: the API works, the editor does not")
            return None
        return Path(comfyui_frontend_package.__file__).resolve().parent / "static"

    def user_root(self) -> Path:
        return self.userdata.root

    async def on_startup(self, app: web.Application) -> None:
        # The editor lists workflows/ and subgraphs/ at boot; empty folders answer [] instead of 404.
        for d in (*self.dirs.values(), self.user_root() / "workflows", self.user_root() / "subgraphs"):
            d.mkdir(parents=True, exist_ok=True)
        for kind in ("output", "temp", "input"):  # what a killed save or upload left behind
            await asyncio.to_thread(remove_stale_partials, self.dirs[kind])
        self.queue.start()

    async def on_shutdown(self, app: web.Application) -> None:
        await self.clients.close_all()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.queue.stop()

    # -- events -------------------------------------------------------------------------------

    def features(self) -> dict:
        return {
            "supports_preview_metadata": True,
            "max_upload_size": self.max_upload_bytes,
            "node_replacements": True,
            "assets": False,
            FEATURE_FLAG: True,
        }

    def _on_event(self, name: str, data: dict, sid: str | None) -> None:
        self.clients.send(name, data, sid)

    def _resume(self, sid: str) -> None:
        """A client that reconnects while its prompt runs learns which node runs."""
        running = self.queue.running
        if running is not None and running.client_id == sid and self.queue.last_node is not None:
            self.clients.send("executing", {"node": self.queue.last_node, "display_node": self.queue.last_node,
                                            "prompt_id": running.prompt_id}, sid)

    # -- prompt -------------------------------------------------------------------------------

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": self.queue.status_data()["status"]["exec_info"]})

    async def post_prompt(self, request: web.Request) -> web.Response:
        def fail(kind: str, message: str, details: str = "") -> web.Response:
            error = {"type": kind, "message": message, "details": details, "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)

        try:
            body = await read_json(request)
        except BadRequest as e:
            return fail("invalid_prompt", "Invalid JSON in the request body", str(e))
        if not isinstance(body, dict):
            return fail("invalid_prompt", "The request body must be a JSON object", type(body).__name__)
        if "prompt" not in body:
            return fail("no_prompt", "No prompt provided", "No prompt provided")
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            return fail("invalid_prompt", "extra_data must be an object", type(extra_data).__name__)
        pnginfo = extra_data.get("extra_pnginfo")
        if pnginfo is not None and not isinstance(pnginfo, dict):
            return fail("invalid_prompt", "extra_data.extra_pnginfo must be an object (name → JSON to embed in "
                        "saved PNGs)", type(pnginfo).__name__)
        client_id = body.get("client_id")
        if client_id is not None and not isinstance(client_id, str):
            return fail("invalid_prompt", "client_id must be a string", type(client_id).__name__)
        targets = body.get("partial_execution_targets")
        if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
            return fail("invalid_prompt", "partial_execution_targets must be a list of node ids", repr(targets))
        prompt_id = body.get("prompt_id")
        if prompt_id is not None:
            try:
                if not isinstance(prompt_id, str) or str(uuid.UUID(prompt_id)) != prompt_id:
                    raise ValueError
            except ValueError:
                return fail("invalid_prompt_id", "prompt_id must be a UUID in canonical lowercase form",
                            repr(prompt_id))
            if self.queue.known_prompt(prompt_id):
                return fail("invalid_prompt_id", "A prompt with this prompt_id already exists", prompt_id)
        else:
            prompt_id = str(uuid.uuid4())
        number: float
        if "number" in body:
            try:
                if isinstance(body["number"], bool):
                    raise TypeError
                number = float(body["number"])
            except (TypeError, ValueError, OverflowError):
                return fail("invalid_prompt", "number must be a number", repr(body["number"])[:100])
            if not math.isfinite(number):
                return fail("invalid_prompt", "number must be a finite number", repr(body["number"])[:100])
        else:
            number = self.queue.counter
        problem = prompt_shape_problem(body["prompt"])
        if problem is not None:
            return fail("invalid_prompt", f"Invalid prompt: {problem}", problem)
        self.queue.next_number()
        if body.get("front"):
            number = -number
        if isinstance(number, float) and number.is_integer():
            number = int(number)

        prompt = body["prompt"]
        try:
            ok, error, node_errors, outputs = await asyncio.to_thread(
                validate_prompt, prompt, self.node_classes, targets, limits=self.limits)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            # A validator bug on an input shape it did not foresee: the sender gets a 400 with the
            # reason, the log gets the traceback to fix it.
            log.exception("validating prompt %s failed", prompt_id)
            return fail("invalid_prompt", "The prompt could not be validated", f"{type(e).__name__}: {e}"[:500])
        if not ok:
            log.info("prompt rejected: %s", (error or {}).get("message"))
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        extra = {**extra_data, "create_time": now_ms(), "client_id": client_id or None}
        item = QueueItem(number, prompt_id, prompt, extra, list(outputs), client_id or None, extra["create_time"])
        self.queue.enqueue(item)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await read_json(request, empty={})
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.queue.interrupt(prompt_id if isinstance(prompt_id, str) and prompt_id else None)
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        body = await read_json(request, empty={})
        if not isinstance(body, dict):
            raise BadRequest("expected an object like {\"unload_models\": true}")

        def free() -> None:  # on the worker thread: never while a prompt runs
            if body.get("unload_models") or body.get("free_memory"):
                self.queue.executor.clear_cache()  # cached outputs hold model references
            if self.on_free is not None:
                self.on_free(dict(body))

        future = self.queue.run_on_worker(free)
        future.add_done_callback(_log_failure)
        return web.Response(status=200)

    # -- queue / history / jobs ---------------------------------------------------------------

    async def get_queue(self, request: web.Request) -> web.Response:
        running = [self.queue.running.as_tuple()] if self.queue.running is not None else []
        return web.json_response({"queue_running": running,
                                  "queue_pending": [it.as_tuple() for it in self.queue.pending]})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest('expected {"clear": true} or {"delete": [prompt ids]}')
        if body.get("clear"):
            self.queue.dequeue({it.prompt_id for it in self.queue.pending})
        if "delete" in body:
            ids = body["delete"]
            if not isinstance(ids, list):
                raise BadRequest("delete must be a list of prompt ids")
            self.queue.dequeue({str(i) for i in ids})
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = query_int(request, "max_items", None)
        offset = query_int(request, "offset", None)
        return web.json_response(self.queue.history_page(max_items, offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.queue.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest('expected {"clear": true} or {"delete": [prompt ids]}')
        ids = body.get("delete")
        if ids is not None and not isinstance(ids, list):
            raise BadRequest("delete must be a list of prompt ids")
        self.queue.delete_history(ids, clear=bool(body.get("clear")))
        return web.Response(status=200)

    async def get_jobs(self, request: web.Request) -> web.Response:
        statuses = set(JOB_STATUSES)
        status_param = request.query.get("status")
        wanted = statuses if not status_param else {s.strip() for s in status_param.split(",") if s.strip()}
        if wanted - statuses:
            raise BadRequest(f"unknown status {sorted(wanted - statuses)}; use {sorted(statuses)}")
        sort_by = request.query.get("sort_by", "created_at")
        sort_order = request.query.get("sort_order", "desc")
        if sort_by not in ("created_at", "execution_duration"):
            raise BadRequest("sort_by must be created_at or execution_duration")
        if sort_order not in ("asc", "desc"):
            raise BadRequest("sort_order must be asc or desc")
        limit = query_int(request, "limit", None, minimum=1)
        offset = query_int(request, "offset", 0) or 0
        jobs = self.queue.jobs(wanted, sort_by=sort_by, descending=sort_order == "desc",
                               workflow_id=request.query.get("workflow_id"))
        total = len(jobs)
        page = jobs[offset:offset + limit if limit is not None else None]
        return web.json_response({"jobs": page, "pagination": {
            "offset": offset, "limit": limit, "total": total, "has_more": offset + len(page) < total}})

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.queue.find_job(request.match_info["job_id"], detail=True)
        if job is None:
            return json_error(404, "Job not found")
        return web.json_response(job)

    async def post_job_cancel(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["job_id"]
        if self.queue.find_job(prompt_id, detail=False) is None:
            return json_error(404, "Job not found")
        return web.json_response({"cancelled": self.queue.cancel(prompt_id)})

    async def post_jobs_cancel(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadRequest('expected {"job_ids": ["<prompt id>", ...]}')
        return web.json_response({"cancelled": [i for i in ids if self.queue.cancel(i)]})

    # -- node definitions ---------------------------------------------------------------------

    def _object_info(self) -> dict:
        return object_info(self.node_classes, self.python_module, display_names=self.display_names)

    async def get_object_info(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._object_info))

    async def get_object_info_node(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        if name not in self.node_classes:
            return web.json_response({})
        sub = {name: self.node_classes[name]}
        info = await asyncio.to_thread(object_info, sub, self.python_module, display_names=self.display_names)
        return web.json_response(info)

    async def get_folder_paths(self, request: web.Request) -> web.Response:
        out = {kind: [[str(path.resolve())], []] for kind, path in self.dirs.items()}
        for name, folders in self.model_folders.items():
            out[name] = [[str(Path(f).resolve()) for f in folders], [".safetensors", ".sft"]]
        return web.json_response(out)

    # -- small endpoints ----------------------------------------------------------------------

    async def get_features(self, request: web.Request) -> web.Response:
        return web.json_response(self.features())

    async def get_system_stats(self, request: web.Request) -> web.Response:
        stats = await asyncio.to_thread(self._system_stats)
        return web.json_response(stats)

    def _system_stats(self) -> dict:
        try:
            import psutil

            vm = psutil.virtual_memory()
            ram_total, ram_free = vm.total, vm.available
        except ImportError:
            ram_total = ram_free = 0
        frontend = version("comfyui-frontend-package")
        stats: dict[str, Any] = {
            "system": {
                "os": sys.platform,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": version("sdxl-nodes") or "0.0.0",
                "required_frontend_version": frontend,
                "python_version": sys.version,
                "pytorch_version": version("torch"),
                "embedded_python": False,
                "deploy_environment": "sdxl-nodes",
                "argv": list(sys.argv),
                "comfy_package_versions": [
                    {"name": "comfyui-frontend-package", "installed": frontend, "required": frontend}],
                "machine": platform.machine(),
            },
            "devices": [],
        }
        if self.system_info is not None:
            try:
                extra = self.system_info() or {}
            except Exception:  # noqa: BLE001 - /system_stats answers without device info rather than a 500; logged
                log.exception("system_info() failed")
                extra = {}
            stats["system"].update(extra.get("system") or {})
            if "devices" in extra:
                stats["devices"] = list(extra["devices"])
        return stats

    async def get_extensions(self, request: web.Request) -> web.Response:
        if self.web_dir is None or not self.web_dir.is_dir():
            return web.json_response([])
        files = sorted(p.relative_to(self.web_dir).as_posix() for p in self.web_dir.rglob("*.js"))
        return web.json_response([f"/extensions/{self.pack_name}/{f}" for f in files])

    async def get_extension_file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["pack"] != self.pack_name or self.web_dir is None:
            raise web.HTTPNotFound()
        path = inside(self.web_dir, request.match_info["path"])
        if path is None or not path.is_file():
            raise web.HTTPNotFound()
        return _static_file(path)

    async def get_default_workflow(self, request: web.Request) -> web.Response:
        if self.default_workflow is None:
            return json_error(404, "this server has no default workflow")
        return web.json_response(self.default_workflow, headers={"Cache-Control": "no-store"})

    async def get_workflow_templates(self, request: web.Request) -> web.Response:
        # Our templates are listed once, with titles and descriptions, by /templates/index.json below
        # (this list would only repeat them as bare names).
        return web.json_response({})

    async def get_template_index(self, request: web.Request) -> web.Response:
        """The Templates dialog's catalogue: our workflows with the title and description each carries in
        ``extra.sdxl_nodes`` (written by tools/make_workflows.py); cards and files come from
        /api/workflow_templates/<pack>/<name>.jpg|json."""
        cards = []
        for name in sorted(self.templates):
            about = (self.templates[name].get("extra") or {}).get("sdxl_nodes") or {}
            cards.append({"name": name, "title": about.get("title", name), "description": about.get("description", ""),
                          "mediaType": "image", "mediaSubtype": "jpg"})
        return web.json_response([{"moduleName": self.pack_name, "title": "SDXL", "type": "image",
                                   "templates": cards}] if cards else [])

    async def get_workflow_template(self, request: web.Request) -> web.Response:
        if request.match_info["pack"] != self.pack_name:
            raise web.HTTPNotFound()
        stem, _, ext = request.match_info["file"].rpartition(".")
        if stem not in self.templates:
            raise web.HTTPNotFound()
        if ext == "json":
            return web.json_response(self.templates[stem])
        thumbnail = WORKFLOWS_DIR / f"{stem}.jpg"  # shipped beside the workflow (tools/make_thumbnails.py)
        if ext == "jpg" and thumbnail.is_file():
            return web.FileResponse(thumbnail, headers={"Cache-Control": "public, max-age=3600"})
        if ext in ("jpg", "jpeg", "webp", "png"):  # no thumbnail shipped: a plain card with the name
            return web.Response(body=_thumbnail_svg(stem), content_type="image/svg+xml",
                                headers={"Cache-Control": "public, max-age=3600"})
        raise web.HTTPNotFound()

    # -- static frontend ----------------------------------------------------------------------

    async def get_index(self, request: web.Request) -> web.StreamResponse:
        if self.static_dir is None:
            return web.Response(text="comfyui-frontend-package is not installed", status=503)
        return web.FileResponse(self.static_dir / "index.html", headers={
            "Cache-Control": "no-store, must-revalidate", "Pragma": "no-cache", "Expires": "0",
            "Content-Type": "text/html; charset=utf-8"})

    async def get_static(self, request: web.Request) -> web.StreamResponse:
        if self.static_dir is None:
            raise web.HTTPNotFound()
        path = inside(self.static_dir, request.match_info["path"])
        if path is None or not path.is_file():
            raise web.HTTPNotFound()
        return _static_file(path)



def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("POST /free failed: %s", future.exception())


def _static_file(path: Path) -> web.FileResponse:
    suffix = path.suffix.lower()
    headers = {}
    if suffix in (".js", ".mjs"):
        headers["Content-Type"] = "application/javascript; charset=utf-8"
    if suffix in (".js", ".mjs", ".css") or (path.name.startswith("index") and suffix == ".json"):
        headers["Cache-Control"] = "no-store"
    return web.FileResponse(path, headers=headers)


def _thumbnail_svg(title: str) -> bytes:
    label = title.replace("_", " ").replace("&", "&amp;").replace("<", "&lt;")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="512" height="384" viewBox="0 0 512 384">'
            f'<rect width="512" height="384" fill="#2b2f36"/><text x="256" y="200" font-family="sans-serif" '
            f'font-size="30" fill="#e8e8e8" text-anchor="middle">{label}</text></svg>').encode()



# -------------------------------------------------------------------------------------------------
# app assembly


@web.middleware
async def _errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except BadRequest as e:
        return web.json_response(e.body, status=e.status)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, f"internal server error: {type(e).__name__}: {e}")


def create_app(
    node_classes: Mapping[str, type],
    *,
    display_names: Mapping[str, str] | None = None,
    python_module: str = "custom_nodes.sdxl-nodes",
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    temp_dir: str | os.PathLike,
    user_dir: str | os.PathLike,
    default_workflow: dict | None = None,
    templates: Mapping[str, dict] | None = None,
    system_info: Callable[[], dict] | None = None,
    on_free: Callable[[dict], None] | None = None,
    max_upload_bytes: int | None = None,
    model_folders: Mapping[str, list[str]] | None = None,
    web_dir: str | os.PathLike | None = WEB_DIR,
    limits: Limits = DEFAULT_LIMITS,
    token: str | None = None,
    allow_hosts: Iterable[str] = (),
) -> web.Application:
    """The aiohttp application serving the editor and the API for ``node_classes``.

    ``python_module`` is what ``/object_info`` reports (``custom_nodes.<pack>`` gives the pack
    badge); its last part is also the pack name under ``/extensions/<pack>/`` (``web_dir``'s
    ``.js`` files) and ``/api/workflow_templates``. ``default_workflow`` (a UI workflow) is what a
    fresh editor opens; ``templates`` (name → UI workflow) appear in the Templates dialog.
    ``system_info()`` may return ``{"system": {...}, "devices": [...]}`` merged into
    ``/api/system_stats``; ``on_free(body)`` runs on the worker thread after ``POST /api/free``.
    ``model_folders`` (name → folders) are listed by ``/internal/folder_paths``.
    ``limits`` bound what a request may ask (see ``runtime/limits.py``); ``max_upload_bytes`` (one
    upload request, all fields together) defaults to ``limits.request_bytes``. ``token`` and
    ``allow_hosts`` are the access rules of ``access.py``.
    """
    if max_upload_bytes is None:
        max_upload_bytes = limits.request_bytes
    server = PromptServer(
        node_classes, display_names=display_names, python_module=python_module,
        input_dir=Path(input_dir), output_dir=Path(output_dir), temp_dir=Path(temp_dir),
        user_dir=Path(user_dir), default_workflow=default_workflow, templates=templates,
        system_info=system_info, on_free=on_free, max_upload_bytes=max_upload_bytes,
        model_folders=model_folders, web_dir=Path(web_dir) if web_dir is not None else None, limits=limits,
    )
    # Bodies other than uploads (which stream and count their own bytes) are workflows and settings.
    access = Access(token=token, allow_hosts=set(allow_hosts))
    app = web.Application(middlewares=[access.middleware, _errors_middleware],
                          client_max_size=limits.request_bytes)
    app[APP_KEY] = server
    app[LIMITS_KEY] = limits
    app[ACCESS_KEY] = access
    app.on_startup.append(server.on_startup)
    app.on_shutdown.append(server.on_shutdown)
    app.on_cleanup.append(server.on_cleanup)

    s, u = server, server.userdata
    api_routes = [
        ("GET", "/prompt", s.get_prompt),
        ("POST", "/prompt", s.post_prompt),
        ("POST", "/interrupt", s.post_interrupt),
        ("POST", "/free", s.post_free),
        ("GET", "/queue", s.get_queue),
        ("POST", "/queue", s.post_queue),
        ("GET", "/history", s.get_history),
        ("GET", "/history/{prompt_id}", s.get_history_item),
        ("POST", "/history", s.post_history),
        ("GET", "/jobs", s.get_jobs),
        ("POST", "/jobs/cancel", s.post_jobs_cancel),
        ("GET", "/jobs/{job_id}", s.get_job),
        ("POST", "/jobs/{job_id}/cancel", s.post_job_cancel),
        ("GET", "/object_info", s.get_object_info),
        ("GET", "/object_info/{node_class}", s.get_object_info_node),
        ("GET", "/view", s.files.view),
        ("POST", "/upload/image", s.files.upload_image),
        ("GET", "/users", u.get_users),
        ("GET", "/settings", u.get_settings),
        ("POST", "/settings", u.post_settings),
        ("GET", "/settings/{id}", u.get_setting),
        ("POST", "/settings/{id}", u.post_setting),
        ("GET", "/userdata", u.list),
        ("GET", "/userdata/{file}", u.get),
        ("POST", "/userdata/{file}", u.post),
        ("DELETE", "/userdata/{file}", u.delete),
        ("POST", "/userdata/{file}/move/{dest}", u.move),
        ("GET", "/extensions", s.get_extensions),
        ("GET", "/features", s.get_features),
        ("GET", "/system_stats", s.get_system_stats),
        ("GET", "/workflow_templates", s.get_workflow_templates),
        ("GET", "/workflow_templates/{pack}/{file}", s.get_workflow_template),
        ("GET", DEFAULT_WORKFLOW_ROUTE, s.get_default_workflow),
        ("GET", "/i18n", _constant({})),
        ("GET", "/global_subgraphs", _constant({})),
        ("GET", "/node_replacements", _constant({})),
        ("GET", "/experiment/models", _constant([])),
        ("GET", "/experiment/models/{folder}", _constant([])),
        ("GET", "/embeddings", _constant([])),
    ]
    for method, path, handler in api_routes:  # ComfyUI serves each route with and without /api
        app.router.add_route(method, "/api" + path, handler)
        app.router.add_route(method, path, handler)
    app.router.add_get("/ws", s.clients.handle)
    app.router.add_get("/internal/files/{kind}", s.files.internal_files)
    app.router.add_get("/internal/folder_paths", s.get_folder_paths)
    app.router.add_get("/extensions/{pack}/{path:.+}", s.get_extension_file)
    app.router.add_get("/templates/index.json", s.get_template_index)
    app.router.add_get("/templates/index_logo.json", _constant({}))
    app.router.add_get("/", s.get_index)
    app.router.add_get("/{path:.+}", s.get_static)  # last: the frontend package's files
    return app


def _constant(value: Any):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(value)

    return handler


def server_of(app: web.Application) -> PromptServer:
    """The :class:`PromptServer` behind an app made by :func:`create_app`."""
    return app[APP_KEY]  # type: ignore[return-value]
