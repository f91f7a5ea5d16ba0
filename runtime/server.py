"""The HTTP/WebSocket server that lets the official ComfyUI web editor run on our own nodes.

The contract is ``../shared/frontend/API.md`` (``comfyui-frontend-package`` 1.58.1): the editor's
static files at ``/``, the JSON API under ``/api`` (every route also without the prefix, as ComfyUI
registers them), the websocket at ``/ws``, ``/internal/...`` and ``/extensions/<pack>/...``.
Behaviour follows ComfyUI's ``server.py``, ``app/user_manager.py``, ``app/frontend_management.py``
and ``comfy_execution/jobs.py`` where the editor depends on it; the code is our own.

One asyncio task is the queue worker. It hands each prompt to one dedicated worker thread that runs
:class:`.executor.Executor` (so the event loop stays responsive); executor events come back to the
loop with ``call_soon_threadsafe`` and go to the websocket of the prompt's ``client_id`` (to every
socket when the prompt has none). Binary preview frames use the type-4 layout of API.md §5.3.

Node classes and the hooks that need torch (``system_info``, ``on_free``) are passed in: this
module never imports torch or ``sdxl_nodes.nodes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import io
import json
import logging
import mimetypes
import os
import platform
import struct
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from .executor import ExecutionResult, Executor
from .nodeinfo import object_info
from .validate import validate_prompt

__all__ = [
    "BackgroundServer",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "FEATURE_FLAG",
    "PromptServer",
    "create_app",
    "preview_frame",
    "run_server",
    "serve_from_cli",
]

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
WEB_DIR = PACKAGE_ROOT / "web"
WORKFLOWS_DIR = PACKAGE_ROOT / "workflows"
DEFAULT_WORKFLOW_NAME = "sdxl_base_refiner"

DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
FEATURE_FLAG = "sdxl_nodes_standalone"
"""Key in ``/api/features`` and the websocket ``feature_flags`` that tells ``web/sdxl_nodes.js`` it
runs on this server (inside ComfyUI the key is absent and the extension does nothing)."""
DEFAULT_WORKFLOW_ROUTE = "/sdxl_nodes/default_workflow"
MAX_HISTORY = 1000
FILE_TYPES = ("output", "input", "temp")
# Keys the frontend may put into extra_data that must not be echoed by history/jobs.
SENSITIVE_EXTRA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
PREVIEWABLE_MEDIA = frozenset({"images", "video", "audio", "3d", "text"})
# Served as downloads, never rendered, when someone asks /api/view for them.
UNSAFE_VIEW_TYPES = ("text/html", "text/javascript", "application/javascript", "text/css",
                     "image/svg+xml", "application/xhtml+xml")
APP_KEY = web.AppKey("sdxl_nodes_server", object)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _version(dist: str) -> str:
    """A distribution's version without importing it ("" when absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class _BadRequest(Exception):
    """Raised inside a handler; the middleware turns it into a JSON error response."""

    def __init__(self, message: str, status: int = 400, body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else {"error": message}


_MISSING = object()


async def _read_json(request: web.Request, *, empty: Any = _MISSING) -> Any:
    """The request body parsed as JSON; an empty body gives ``empty`` (or a 400 if not given)."""
    raw = await request.read()
    if not raw.strip():
        if empty is not _MISSING:
            return empty
        raise _BadRequest("the request body is empty; expected JSON")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _BadRequest(f"malformed JSON body: {e}") from None


def _query_bool(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("false", "0", "no", "")


def _query_int(request: web.Request, name: str, default: int | None, *, minimum: int = 0) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise _BadRequest(f"{name} must be >= {minimum}, got {number}")
    return number


def _inside(root: Path, *parts: str) -> Path | None:
    """``root/parts…`` with symlinks resolved, or None when that leaves ``root``."""
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(os.path.join(base, *parts)))
    if target != base and base not in target.parents:
        return None
    return target


def _unsafe_name(name: str) -> bool:
    """Names ComfyUI refuses for files: empty, absolute, with ``..``, or (ours) with a NUL/backslash."""
    return (not name or name.startswith(("/", "\\")) or ".." in name or "\x00" in name
            or "\\" in name or (len(name) > 1 and name[1] == ":"))


def preview_frame(meta: Mapping[str, Any], image: bytes) -> bytes:
    """A binary type-4 websocket frame: ``>I 4``, ``>I len(json)``, the JSON metadata, the image.

    ``meta`` keys in ComfyUI's order (``node_id, prompt_id, display_node_id, parent_node_id,
    real_node_id, image_type``), serialized with Python's default separators like ComfyUI.
    """
    header = json.dumps(dict(meta)).encode("utf-8")
    return struct.pack(">II", 4, len(header)) + header + bytes(image)


def _legacy_preview_frame(image_type: str, image: bytes) -> bytes:
    """Binary type 1 (for clients that did not announce ``supports_preview_metadata``)."""
    return struct.pack(">II", 1, 2 if image_type == "image/png" else 1) + bytes(image)


# -------------------------------------------------------------------------------------------------
# state


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict  # as posted, plus create_time and client_id
    outputs: list[str]
    client_id: str | None
    create_time: int
    start_time: int | None = None

    def public_extra(self) -> dict:
        return {k: v for k, v in self.extra_data.items() if k not in SENSITIVE_EXTRA_KEYS}

    def as_tuple(self) -> list:
        """ComfyUI's queue item ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
        return [self.number, self.prompt_id, self.prompt, self.public_extra(), list(self.outputs)]

    @property
    def workflow_id(self) -> str | None:
        workflow = (self.extra_data.get("extra_pnginfo") or {}).get("workflow")
        return workflow.get("id") if isinstance(workflow, dict) else None


class _Client:
    """One websocket: an outgoing queue drained by its own task, so sends keep their order."""

    def __init__(self, sid: str, ws: web.WebSocketResponse):
        self.sid = sid
        self.ws = ws
        self.features: dict = {}
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._drain())

    @property
    def wants_metadata_previews(self) -> bool:
        return bool(self.features.get("supports_preview_metadata"))

    def put(self, message: str | bytes) -> None:
        self.outbox.put_nowait(message)

    async def _drain(self) -> None:
        while True:
            message = await self.outbox.get()
            if message is None:
                return
            try:
                if isinstance(message, bytes):
                    await self.ws.send_bytes(message)
                else:
                    await self.ws.send_str(message)
            except (ConnectionError, RuntimeError) as e:  # closed under us
                log.debug("websocket %s: send failed (%s)", self.sid, e)
                return

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 5)


class _Settings:
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


# -------------------------------------------------------------------------------------------------
# jobs (the /api/jobs shapes of ComfyUI's comfy_execution/jobs.py, written for our history entries)


def _is_previewable(media_type: str, item: dict) -> bool:
    if media_type in PREVIEWABLE_MEDIA:
        return True
    fmt = str(item.get("format", ""))
    return fmt.startswith(("video/", "audio/"))


def _outputs_summary(outputs: Mapping[str, Any]) -> tuple[int, int, dict | None]:
    """``(outputs_count, previewable_outputs_count, preview_output)``; saved files preferred."""
    count = previewable = 0
    preview = fallback = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue  # text strings are metadata, not files
                count += 1
                if not _is_previewable(media_type, item):
                    continue
                previewable += 1
                entry = {**item, "nodeId": node_id}
                entry.setdefault("mediaType", media_type)
                if preview is None and item.get("type") == "output":
                    preview = entry
                elif fallback is None:
                    fallback = entry
    return count, previewable, preview or fallback


def _history_job(prompt_id: str, entry: dict, *, detail: bool = False) -> dict:
    number, _, prompt, extra_data, _ = entry["prompt"]
    status = entry.get("status") or {}
    start = end = error = None
    interrupted = False
    for name, data in status.get("messages", []):
        if not isinstance(data, dict):
            continue
        if name == "execution_start":
            start = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if name == "execution_error":
                error = data
            interrupted = interrupted or name == "execution_interrupted"
    if status.get("status_str") == "error":
        state = "cancelled" if interrupted else "failed"
    else:
        state = "completed"
    outputs = entry.get("outputs") or {}
    count, previewable, preview = _outputs_summary(outputs)
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow")
    job = _prune({
        "id": prompt_id,
        "status": state,
        "priority": number,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": start,
        "execution_end_time": end,
        "execution_error": error,
        "outputs_count": count,
        "previewable_outputs_count": previewable,
        "preview_output": preview,
        "workflow_id": workflow.get("id") if isinstance(workflow, dict) else None,
    })
    if detail:
        job["outputs"] = outputs
        job["execution_status"] = status
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _queue_job(item: QueueItem, state: str, *, detail: bool = False) -> dict:
    job = _prune({
        "id": item.prompt_id,
        "status": state,
        "priority": item.number,
        "create_time": item.create_time,
        "execution_start_time": item.start_time if state == "in_progress" else None,
        "outputs_count": 0,
        "previewable_outputs_count": 0,
        "workflow_id": item.workflow_id,
    })
    if detail:
        job["outputs"] = {}
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.public_extra()}
    return job


# -------------------------------------------------------------------------------------------------
# the server


class PromptServer:
    """State and handlers of one app: queue, history, websockets, files, settings, user data."""

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
    ):
        self.node_classes = node_classes
        self.display_names = dict(display_names or {})
        self.python_module = python_module
        self.pack_name = python_module.rsplit(".", 1)[-1]
        self.dirs = {"input": Path(input_dir), "output": Path(output_dir), "temp": Path(temp_dir)}
        self.user_dir = Path(user_dir)
        self.default_workflow = default_workflow
        self.templates = dict(templates or {})
        self.system_info = system_info
        self.on_free = on_free
        self.max_upload_bytes = int(max_upload_bytes)
        self.model_folders = dict(model_folders or {})
        self.web_dir = web_dir
        # A fresh editor only opens the default graph (ours, via web/sdxl_nodes.js) when the
        # tutorial is marked done; otherwise it opens a blank graph and the Templates dialog.
        defaults = {"Comfy.TutorialCompleted": True} if default_workflow is not None else {}
        self.settings = _Settings(self.user_root() / "comfy.settings.json", defaults)
        self.static_dir = self._frontend_static_dir()

        self.executor = Executor(node_classes, on_event=self._on_executor_event)
        self.pool: ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: list[QueueItem] = []
        self.running: QueueItem | None = None
        self.last_node: str | None = None
        self.interrupt_requested: str | None = None  # prompt id; see _on_executor_event
        self.history: dict[str, dict] = {}
        self.clients: dict[str, _Client] = {}
        self.counter = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @staticmethod
    def _frontend_static_dir() -> Path | None:
        try:
            import comfyui_frontend_package
        except ImportError:
            log.warning("comfyui-frontend-package is not installed: the API works, the editor does not")
            return None
        return Path(comfyui_frontend_package.__file__).resolve().parent / "static"

    async def on_startup(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        # The editor lists workflows/ and subgraphs/ at boot; empty folders answer [] instead of 404.
        for d in (*self.dirs.values(), self.user_root() / "workflows", self.user_root() / "subgraphs"):
            d.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-nodes-exec")
        self._wakeup = asyncio.Event()
        self._worker = self.loop.create_task(self._worker_loop(), name="sdxl-nodes-queue")

    async def on_shutdown(self, app: web.Application) -> None:
        for client in list(self.clients.values()):
            await client.close()
        self.clients.clear()

    async def on_cleanup(self, app: web.Application) -> None:
        self.queue.clear()
        self.executor.interrupt()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    # -- websocket messages -------------------------------------------------------------------

    def features(self) -> dict:
        return {
            "supports_preview_metadata": True,
            "max_upload_size": self.max_upload_bytes,
            "node_replacements": True,
            "assets": False,
            FEATURE_FLAG: True,
        }

    def status_data(self) -> dict:
        remaining = len(self.queue) + (1 if self.running is not None else 0)
        return {"status": {"exec_info": {"queue_remaining": remaining}}}

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        """Queue a JSON message for ``sid`` (every socket when ``sid`` is None or empty)."""
        text = json.dumps({"type": event, "data": data})
        if sid:
            client = self.clients.get(sid)
            if client is not None:
                client.put(text)
        else:
            for client in self.clients.values():
                client.put(text)

    def broadcast_status(self) -> None:
        self.send("status", self.status_data())

    def _on_executor_event(self, name: str, data: dict) -> None:
        """Called on the worker thread; hands the event to the loop in emission order."""
        if name == "execution_start" and self.interrupt_requested == data.get("prompt_id"):
            # Executor.execute clears its interrupt flag when it starts: an interrupt that came
            # between dequeueing and that moment is applied again here, on the worker thread.
            self.executor.interrupt()
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._route_event, name, data)

    def _route_event(self, name: str, data: dict) -> None:
        item = self.running
        sid = item.client_id if item is not None and item.prompt_id == data.get("prompt_id") else None
        if name == "preview":
            meta = {k: data.get(k) for k in ("node_id", "prompt_id", "display_node_id", "parent_node_id",
                                             "real_node_id", "image_type")}
            image = data.get("image") or b""
            targets = [self.clients.get(sid)] if sid else list(self.clients.values())
            for client in targets:
                if client is None:
                    continue
                if client.wants_metadata_previews:
                    client.put(preview_frame(meta, image))
                else:
                    client.put(_legacy_preview_frame(str(meta["image_type"]), image))
            return
        if name == "executing":
            self.last_node = data.get("node")
        self.send(name, data, sid)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        previous = self.clients.pop(sid, None)
        if previous is not None:
            await previous.close()
        client = _Client(sid, ws)
        self.clients[sid] = client
        client.put(json.dumps({"type": "status", "data": {**self.status_data(), "sid": sid}}))
        running = self.running
        if running is not None and running.client_id == sid and self.last_node is not None:
            self.send("executing", {"node": self.last_node, "display_node": self.last_node,
                                    "prompt_id": running.prompt_id}, sid)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        payload = json.loads(msg.data)
                    except ValueError:
                        log.warning("websocket %s: ignoring a non-JSON message", sid)
                        continue
                    if isinstance(payload, dict) and payload.get("type") == "feature_flags":
                        data = payload.get("data")
                        client.features = data if isinstance(data, dict) else {}
                        self.send("feature_flags", self.features(), sid)
                elif msg.type == WSMsgType.ERROR:
                    log.debug("websocket %s closed with %s", sid, ws.exception())
        finally:
            if self.clients.get(sid) is client:
                del self.clients[sid]
            await client.close()
        return ws

    # -- queue worker -------------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        if self._wakeup is None or self.loop is None:
            raise RuntimeError("internal: the queue worker started before the app")
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self.queue.pop(0)
            self.running, self.last_node, self.interrupt_requested = item, None, None
            item.start_time = _now_ms()
            self.broadcast_status()
            try:
                result = await self.loop.run_in_executor(self.pool, self._execute, item)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the executor never raises; this guards the server anyway
                log.exception("prompt %s crashed the executor", item.prompt_id)
                payload = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                           "exception_message": str(e), "exception_type": type(e).__name__,
                           "traceback": [], "current_inputs": {}, "current_outputs": [], "timestamp": _now_ms()}
                self.send("execution_error", payload, item.client_id)
                result = ExecutionResult(item.prompt_id, "error", error=payload,
                                         messages=[("execution_error", payload)])
            self._record(item, result)
            self.running, self.last_node = None, None
            self.broadcast_status()
            self.send("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)

    def _execute(self, item: QueueItem) -> ExecutionResult:
        log.info("running prompt %s (%d nodes)", item.prompt_id, len(item.prompt))
        t0 = time.perf_counter()
        result = self.executor.execute(item.prompt, item.prompt_id, extra_data=item.extra_data,
                                       outputs=item.outputs)
        log.info("prompt %s: %s in %.2f s", item.prompt_id, result.status, time.perf_counter() - t0)
        return result

    def _record(self, item: QueueItem, result: ExecutionResult) -> None:
        self.history[item.prompt_id] = {
            "prompt": item.as_tuple(),
            "outputs": result.outputs,
            "status": {
                "status_str": "success" if result.success else "error",
                "completed": result.success,
                "messages": [[name, data] for name, data in result.messages],
            },
            "meta": result.meta,
        }
        while len(self.history) > MAX_HISTORY:
            del self.history[next(iter(self.history))]

    def enqueue(self, item: QueueItem) -> None:
        self.queue.append(item)
        self.queue.sort(key=lambda it: it.number)  # stable: equal numbers keep their order
        if self._wakeup is not None:
            self._wakeup.set()
        self.broadcast_status()

    def dequeue(self, prompt_ids: set[str]) -> list[str]:
        removed = [it.prompt_id for it in self.queue if it.prompt_id in prompt_ids]
        if removed:
            self.queue = [it for it in self.queue if it.prompt_id not in prompt_ids]
            self.broadcast_status()
        return removed

    def interrupt(self, prompt_id: str | None = None) -> bool:
        running = self.running
        if running is None or (prompt_id and running.prompt_id != prompt_id):
            return False
        log.info("interrupting prompt %s", running.prompt_id)
        self.interrupt_requested = running.prompt_id
        self.executor.interrupt()
        return True

    def known_prompt(self, prompt_id: str) -> bool:
        return (prompt_id in self.history or any(it.prompt_id == prompt_id for it in self.queue)
                or (self.running is not None and self.running.prompt_id == prompt_id))

    # -- prompt -------------------------------------------------------------------------------

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": self.status_data()["status"]["exec_info"]})

    async def post_prompt(self, request: web.Request) -> web.Response:
        def fail(kind: str, message: str, details: str = "") -> web.Response:
            error = {"type": kind, "message": message, "details": details, "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)

        try:
            body = await _read_json(request)
        except _BadRequest as e:
            return fail("invalid_prompt", "Invalid JSON in the request body", str(e))
        if not isinstance(body, dict):
            return fail("invalid_prompt", "The request body must be a JSON object", type(body).__name__)
        if "prompt" not in body:
            return fail("no_prompt", "No prompt provided", "No prompt provided")
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            return fail("invalid_prompt", "extra_data must be an object", type(extra_data).__name__)
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
            if self.known_prompt(prompt_id):
                return fail("invalid_prompt_id", "A prompt with this prompt_id already exists", prompt_id)
        else:
            prompt_id = str(uuid.uuid4())
        if "number" in body:
            try:
                number: float = float(body["number"])
            except (TypeError, ValueError):
                return fail("invalid_prompt", "number must be a number", repr(body["number"]))
        else:
            number = self.counter
        if body.get("front"):
            number = -number
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        self.counter += 1

        prompt = body["prompt"]
        ok, error, node_errors, outputs = await asyncio.to_thread(
            validate_prompt, prompt, self.node_classes, targets)
        if not ok:
            log.info("prompt rejected: %s", (error or {}).get("message"))
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        extra = {**extra_data, "create_time": _now_ms(), "client_id": client_id or None}
        item = QueueItem(number, prompt_id, prompt, extra, list(outputs), client_id or None, extra["create_time"])
        self.enqueue(item)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await _read_json(request, empty={})
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.interrupt(prompt_id if isinstance(prompt_id, str) and prompt_id else None)
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        body = await _read_json(request, empty={})
        if not isinstance(body, dict):
            raise _BadRequest("expected an object like {\"unload_models\": true}")

        def free() -> None:  # on the worker thread: never while a prompt runs
            if body.get("unload_models") or body.get("free_memory"):
                self.executor.clear_cache()  # cached outputs hold model references
            if self.on_free is not None:
                self.on_free(dict(body))

        if self.loop is None:
            raise RuntimeError("internal: /api/free before the app started")
        future = self.loop.run_in_executor(self.pool, free)
        future.add_done_callback(_log_failure)
        return web.Response(status=200)

    # -- queue / history / jobs ---------------------------------------------------------------

    async def get_queue(self, request: web.Request) -> web.Response:
        running = [self.running.as_tuple()] if self.running is not None else []
        return web.json_response({"queue_running": running, "queue_pending": [it.as_tuple() for it in self.queue]})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise _BadRequest('expected {"clear": true} or {"delete": [prompt ids]}')
        if body.get("clear"):
            self.dequeue({it.prompt_id for it in self.queue})
        if "delete" in body:
            ids = body["delete"]
            if not isinstance(ids, list):
                raise _BadRequest("delete must be a list of prompt ids")
            self.dequeue({str(i) for i in ids})
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = _query_int(request, "max_items", None)
        offset = _query_int(request, "offset", None)
        items = list(self.history.items())
        if offset is None:
            offset = max(0, len(items) - max_items) if max_items is not None else 0
        end = offset + max_items if max_items is not None else None
        return web.json_response(dict(items[offset:end]))

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise _BadRequest('expected {"clear": true} or {"delete": [prompt ids]}')
        if body.get("clear"):
            self.history.clear()
        if "delete" in body:
            ids = body["delete"]
            if not isinstance(ids, list):
                raise _BadRequest("delete must be a list of prompt ids")
            for prompt_id in ids:
                self.history.pop(str(prompt_id), None)
        return web.Response(status=200)

    async def get_jobs(self, request: web.Request) -> web.Response:
        statuses = {"pending", "in_progress", "completed", "failed", "cancelled"}
        status_param = request.query.get("status")
        wanted = statuses if not status_param else {s.strip() for s in status_param.split(",") if s.strip()}
        if wanted - statuses:
            raise _BadRequest(f"unknown status {sorted(wanted - statuses)}; use {sorted(statuses)}")
        sort_by = request.query.get("sort_by", "created_at")
        sort_order = request.query.get("sort_order", "desc")
        if sort_by not in ("created_at", "execution_duration"):
            raise _BadRequest("sort_by must be created_at or execution_duration")
        if sort_order not in ("asc", "desc"):
            raise _BadRequest("sort_order must be asc or desc")
        limit = _query_int(request, "limit", None, minimum=1)
        offset = _query_int(request, "offset", 0) or 0
        workflow_id = request.query.get("workflow_id")

        jobs: list[dict] = []
        if "in_progress" in wanted and self.running is not None:
            jobs.append(_queue_job(self.running, "in_progress"))
        if "pending" in wanted:
            jobs.extend(_queue_job(it, "pending") for it in self.queue)
        if wanted & {"completed", "failed", "cancelled"}:
            for prompt_id, entry in self.history.items():
                job = _history_job(prompt_id, entry)
                if job["status"] in wanted:
                    jobs.append(job)
        if workflow_id:
            jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]

        def key(job: dict) -> float:
            if sort_by == "execution_duration":
                start, end = job.get("execution_start_time"), job.get("execution_end_time")
                return end - start if start and end else 0
            return job.get("create_time") or 0

        jobs.sort(key=key, reverse=sort_order == "desc")
        total = len(jobs)
        page = jobs[offset:offset + limit if limit is not None else None]
        return web.json_response({"jobs": page, "pagination": {
            "offset": offset, "limit": limit, "total": total, "has_more": offset + len(page) < total}})

    def find_job(self, prompt_id: str, *, detail: bool) -> dict | None:
        if prompt_id in self.history:
            return _history_job(prompt_id, self.history[prompt_id], detail=detail)
        if self.running is not None and self.running.prompt_id == prompt_id:
            return _queue_job(self.running, "in_progress", detail=detail)
        for it in self.queue:
            if it.prompt_id == prompt_id:
                return _queue_job(it, "pending", detail=detail)
        return None

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.find_job(request.match_info["job_id"], detail=True)
        if job is None:
            return _json_error(404, "Job not found")
        return web.json_response(job)

    def cancel(self, prompt_id: str) -> bool:
        if self.dequeue({prompt_id}):
            return True
        return self.interrupt(prompt_id)

    async def post_job_cancel(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["job_id"]
        if self.find_job(prompt_id, detail=False) is None:
            return _json_error(404, "Job not found")
        return web.json_response({"cancelled": self.cancel(prompt_id)})

    async def post_jobs_cancel(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _BadRequest('expected {"job_ids": ["<prompt id>", ...]}')
        return web.json_response({"cancelled": [i for i in ids if self.cancel(i)]})

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

    # -- files --------------------------------------------------------------------------------

    def _file_root(self, kind: str | None) -> Path:
        kind = kind or "output"
        if kind not in self.dirs:
            raise _BadRequest(f"type must be one of {', '.join(FILE_TYPES)}, got {kind!r}")
        return self.dirs[kind]

    @staticmethod
    def _split_annotation(name: str) -> tuple[str, str | None]:
        """``"x.png [input]"`` → ``("x.png", "input")``; other names are returned unchanged."""
        for kind in FILE_TYPES:
            suffix = f" [{kind}]"
            if name.endswith(suffix):
                return name[: -len(suffix)], kind
        return name, None

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        filename, kind = self._split_annotation(q.get("filename", ""))
        if _unsafe_name(filename):
            raise _BadRequest(f"invalid filename {q.get('filename', '')!r}")
        root = self._file_root(kind or q.get("type") or "output")
        subfolder = q.get("subfolder", "")
        if "\x00" in subfolder or os.path.isabs(subfolder):
            raise _BadRequest(f"invalid subfolder {subfolder!r}", status=403)
        folder = _inside(root, subfolder)
        path = _inside(root, subfolder, filename)
        if folder is None or path is None:
            raise _BadRequest("the file is outside the allowed folder", status=403)
        if not path.is_file():
            return _json_error(404, f"file not found: {Path(subfolder, filename).as_posix()}")

        preview, channel = q.get("preview"), q.get("channel", "rgba")
        if preview or channel in ("rgb", "a"):
            data, content_type = await asyncio.to_thread(_convert_image, path, preview, channel)
            if data is not None:
                return web.Response(body=data, content_type=content_type,
                                    headers={"Content-Disposition": f'filename="{path.name}"'})
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type in UNSAFE_VIEW_TYPES:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": content_type,
                                               "Content-Disposition": f'filename="{path.name}"',
                                               "Cache-Control": "no-cache"})

    async def post_upload_image(self, request: web.Request) -> web.Response:
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError) as e:
            raise _BadRequest(f"expected a multipart/form-data body: {e}") from None
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
                        raise _BadRequest(f"the file is larger than the limit of {self.max_upload_bytes} bytes",
                                          status=413)
                    chunks.append(chunk)
                image = b"".join(chunks)
            elif getattr(part, "name", None):
                fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")
        if image is None:
            raise _BadRequest("no file in the 'image' field")
        kind = fields.get("type") or "input"
        root = self._file_root(kind)
        subfolder = fields.get("subfolder", "")
        name = os.path.basename(image_name.replace("\\", "/"))
        if _unsafe_name(name) or "/" in name:
            raise _BadRequest(f"invalid file name {image_name!r}")
        if "\x00" in subfolder or os.path.isabs(subfolder) or ".." in Path(subfolder).parts:
            raise _BadRequest(f"invalid subfolder {subfolder!r}", status=403)
        folder = _inside(root, subfolder)
        if folder is None or _inside(root, subfolder, name) is None:
            raise _BadRequest("the upload would leave the allowed folder", status=403)
        if not await asyncio.to_thread(_is_image, image):
            raise _BadRequest(f"{name} is not an image file (PNG, JPEG, WebP, GIF, BMP or TIFF)")
        overwrite = fields.get("overwrite", "").strip().lower() in ("true", "1")
        name = await asyncio.to_thread(_store_upload, folder, name, image, overwrite)
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    async def get_internal_files(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind not in self.dirs:
            return _json_error(400, f"unknown folder {kind!r}")
        root = self.dirs[kind]
        entries = [e for e in os.scandir(root) if e.is_file()] if root.is_dir() else []
        entries.sort(key=lambda e: -e.stat().st_mtime)
        return web.json_response([f"{e.name} [{kind}]" for e in entries])

    async def get_folder_paths(self, request: web.Request) -> web.Response:
        out = {kind: [[str(path.resolve())], []] for kind, path in self.dirs.items()}
        for name, folders in self.model_folders.items():
            out[name] = [[str(Path(f).resolve()) for f in folders], [".safetensors", ".sft"]]
        return web.json_response(out)

    # -- users, settings, user data -----------------------------------------------------------

    def user_root(self) -> Path:
        return self.user_dir / "default"  # single-user server, like ComfyUI without --multi-user

    async def get_users(self, request: web.Request) -> web.Response:
        return web.json_response({"storage": "server", "migrated": True})

    async def get_settings(self, request: web.Request) -> web.Response:
        return web.json_response(self.settings.all())

    async def get_setting(self, request: web.Request) -> web.Response:
        return web.json_response(self.settings.all().get(request.match_info["id"]))

    async def post_settings(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise _BadRequest("expected a JSON object of settings")
        self.settings.update(body)
        return web.Response(status=200)

    async def post_setting(self, request: web.Request) -> web.Response:
        self.settings.update({request.match_info["id"]: await _read_json(request)})
        return web.Response(status=200)

    def _user_path(self, relative: str) -> Path:
        if "\x00" in relative or os.path.isabs(relative):
            raise _BadRequest("invalid path", status=403)
        root = self.user_root()
        root.mkdir(parents=True, exist_ok=True)
        path = _inside(root, relative)
        if path is None or path == Path(os.path.realpath(root)):
            raise _BadRequest("the path is outside the user folder", status=403)
        return path

    def _file_info(self, path: Path) -> dict:
        st = path.stat()
        root = Path(os.path.realpath(self.user_root()))
        return {"path": path.relative_to(root).as_posix(), "size": st.st_size,
                "modified": int(st.st_mtime * 1000), "created": int(st.st_ctime * 1000)}

    async def list_userdata(self, request: web.Request) -> web.Response:
        directory = request.query.get("dir", "")
        if not directory:
            raise _BadRequest("the dir query parameter is required")
        base = self._user_path(directory)
        if not base.is_dir():
            return _json_error(404, f"no such folder: {directory}")
        recurse = _query_bool(request, "recurse", False)
        full_info = _query_bool(request, "full_info", False)
        split = _query_bool(request, "split", False)
        files = sorted(p for p in (base.rglob("*") if recurse else base.glob("*")) if p.is_file())
        out: list[Any] = []
        for p in files:
            if _inside(base, str(p.relative_to(base))) is None:
                continue  # a symlink out of the user folder
            rel = p.relative_to(base).as_posix()
            if full_info:
                out.append({**self._file_info(p), "path": rel})
            elif split:
                out.append([rel, *rel.split("/")])
            else:
                out.append(rel)
        return web.json_response(out)

    async def get_userdata(self, request: web.Request) -> web.StreamResponse:
        path = self._user_path(request.match_info["file"])
        if not path.is_file():
            return _json_error(404, "file not found")
        return web.FileResponse(path, headers={"Cache-Control": "no-store"})

    def _saved_response(self, request: web.Request, path: Path) -> web.Response:
        info = self._file_info(path)
        return web.json_response(info if _query_bool(request, "full_info", False) else info["path"])

    async def post_userdata(self, request: web.Request) -> web.Response:
        path = self._user_path(request.match_info["file"])
        overwrite = _query_bool(request, "overwrite", True)
        if path.exists() and not overwrite:
            return _json_error(409, "File already exists")
        if path.is_dir():
            return _json_error(400, "the path is a folder")
        body = await request.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)
        return self._saved_response(request, path)

    async def delete_userdata(self, request: web.Request) -> web.Response:
        path = self._user_path(request.match_info["file"])
        if not path.is_file():
            return _json_error(404, "file not found")
        path.unlink()
        return web.Response(status=204)

    async def move_userdata(self, request: web.Request) -> web.Response:
        source = self._user_path(request.match_info["file"])
        dest = self._user_path(request.match_info["dest"])
        if not source.is_file():
            return _json_error(404, "file not found")
        if dest.exists() and not _query_bool(request, "overwrite", True):
            return _json_error(409, "File already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, dest)
        return self._saved_response(request, dest)

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
        frontend = _version("comfyui-frontend-package")
        stats: dict[str, Any] = {
            "system": {
                "os": sys.platform,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": _version("sdxl-nodes") or "0.0.0",
                "required_frontend_version": frontend,
                "python_version": sys.version,
                "pytorch_version": _version("torch"),
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
            except Exception:
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
        path = _inside(self.web_dir, request.match_info["path"])
        if path is None or not path.is_file():
            raise web.HTTPNotFound()
        return _static_file(path)

    async def get_default_workflow(self, request: web.Request) -> web.Response:
        if self.default_workflow is None:
            return _json_error(404, "this server has no default workflow")
        return web.json_response(self.default_workflow, headers={"Cache-Control": "no-store"})

    async def get_workflow_templates(self, request: web.Request) -> web.Response:
        return web.json_response({self.pack_name: sorted(self.templates)} if self.templates else {})

    async def get_workflow_template(self, request: web.Request) -> web.Response:
        if request.match_info["pack"] != self.pack_name:
            raise web.HTTPNotFound()
        stem, _, ext = request.match_info["file"].rpartition(".")
        if stem not in self.templates:
            raise web.HTTPNotFound()
        if ext == "json":
            return web.json_response(self.templates[stem])
        if ext in ("jpg", "jpeg", "webp", "png"):  # the dialog's thumbnail: a plain card with the name
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
        path = _inside(self.static_dir, request.match_info["path"])
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


# -- image helpers (Pillow is imported lazily: only uploads and converted views need it) -------


def _is_image(data: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            return im.format in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def _store_upload(folder: Path, name: str, data: bytes, overwrite: bool) -> str:
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


def _convert_image(path: Path, preview: str | None, channel: str) -> tuple[bytes | None, str]:
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


# -------------------------------------------------------------------------------------------------
# app assembly


@web.middleware
async def _errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except _BadRequest as e:
        return web.json_response(e.body, status=e.status)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return _json_error(500, f"internal server error: {type(e).__name__}: {e}")


@web.middleware
async def _same_origin_middleware(request: web.Request, handler):
    """Refuse cross-site requests (a web page elsewhere must not drive a local server)."""
    origin = request.headers.get("Origin")
    if origin is not None:
        netloc = urlsplit(origin).netloc.lower() if origin != "null" else "null"
        if netloc != (request.host or "").lower():
            log.warning("refused %s %s from origin %s (host %s)", request.method, request.path, origin, request.host)
            return _json_error(403, "cross-origin request refused")
    elif request.headers.get("Sec-Fetch-Site") == "cross-site":
        return _json_error(403, "cross-site request refused")
    return await handler(request)


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
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    model_folders: Mapping[str, list[str]] | None = None,
    web_dir: str | os.PathLike | None = WEB_DIR,
) -> web.Application:
    """The aiohttp application serving the editor and the API for ``node_classes``.

    ``python_module`` is what ``/object_info`` reports (``custom_nodes.<pack>`` gives the pack
    badge); its last part is also the pack name under ``/extensions/<pack>/`` (``web_dir``'s
    ``.js`` files) and ``/api/workflow_templates``. ``default_workflow`` (a UI workflow) is what a
    fresh editor opens; ``templates`` (name → UI workflow) appear in the Templates dialog.
    ``system_info()`` may return ``{"system": {...}, "devices": [...]}`` merged into
    ``/api/system_stats``; ``on_free(body)`` runs on the worker thread after ``POST /api/free``.
    ``model_folders`` (name → folders) are listed by ``/internal/folder_paths``.
    """
    server = PromptServer(
        node_classes, display_names=display_names, python_module=python_module,
        input_dir=Path(input_dir), output_dir=Path(output_dir), temp_dir=Path(temp_dir),
        user_dir=Path(user_dir), default_workflow=default_workflow, templates=templates,
        system_info=system_info, on_free=on_free, max_upload_bytes=max_upload_bytes,
        model_folders=model_folders, web_dir=Path(web_dir) if web_dir is not None else None,
    )
    # Bodies other than uploads (which stream) are workflows and settings: a generous cap.
    app = web.Application(middlewares=[_same_origin_middleware, _errors_middleware],
                          client_max_size=max(64 * 1024 * 1024, max_upload_bytes))
    app[APP_KEY] = server
    app.on_startup.append(server.on_startup)
    app.on_shutdown.append(server.on_shutdown)
    app.on_cleanup.append(server.on_cleanup)

    s = server
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
        ("GET", "/view", s.get_view),
        ("POST", "/upload/image", s.post_upload_image),
        ("GET", "/users", s.get_users),
        ("GET", "/settings", s.get_settings),
        ("POST", "/settings", s.post_settings),
        ("GET", "/settings/{id}", s.get_setting),
        ("POST", "/settings/{id}", s.post_setting),
        ("GET", "/userdata", s.list_userdata),
        ("GET", "/userdata/{file}", s.get_userdata),
        ("POST", "/userdata/{file}", s.post_userdata),
        ("DELETE", "/userdata/{file}", s.delete_userdata),
        ("POST", "/userdata/{file}/move/{dest}", s.move_userdata),
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
    app.router.add_get("/ws", s.websocket)
    app.router.add_get("/internal/files/{kind}", s.get_internal_files)
    app.router.add_get("/internal/folder_paths", s.get_folder_paths)
    app.router.add_get("/extensions/{pack}/{path:.+}", s.get_extension_file)
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


# -------------------------------------------------------------------------------------------------
# running


def _url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


async def _start(app: web.Application, host: str, port: int, access_log: bool) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=logging.getLogger("sdxl_nodes.access") if access_log else None,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, _url(host, bound)


def run_server(
    app: web.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 8188,
    on_ready: Callable[[str], None] | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``app`` until interrupted (Ctrl-C / SIGTERM). ``port=0`` picks a free port;
    ``on_ready(url)`` is called once the socket listens."""

    async def main() -> None:
        runner, url = await _start(app, host, port, access_log)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
        log.info("serving on %s", url)
        if on_ready is not None:
            on_ready(url)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


class BackgroundServer:
    """Runs an app on its own event loop in a daemon thread (tests, benchmarks)::

        with BackgroundServer(create_app(...)) as url:
            ...
    """

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> str:
        ready = threading.Event()
        failure: list[BaseException] = []

        def target() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._runner, self.url = loop.run_until_complete(_start(self.app, self.host, self.port, False))
            except BaseException as e:  # noqa: BLE001 - handed to the starting thread
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        # the server thread runs in the starter's context: what it set there (the nodes' environment) holds
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(target,),
                                        name="sdxl-nodes-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if failure:
            raise failure[0]
        if self.url is None:
            raise RuntimeError("internal: the server started without a URL")
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def load_shipped_workflows(folder: Path = WORKFLOWS_DIR) -> dict[str, dict]:
    """``{stem: workflow}`` of the ``*.json`` files in ``folder`` (unreadable ones are skipped)."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("skipping workflow %s: %s", path, e)
    return out


def serve_from_cli(
    args: Any,
    node_classes: Mapping[str, type],
    display_names: Mapping[str, str] | None = None,
    *,
    system_info: Callable[[], dict] | None = None,
    on_free: Callable[[dict], None] | None = None,
) -> int:
    """``sdxl-nodes serve``: ``args`` has ``host``, ``port``, ``user_dir``, ``input_dir``,
    ``output_dir``, ``temp_dir`` (None: ``<output_dir>/../temp``) and ``models_dir``."""
    output_dir = Path(args.output_dir)
    temp_dir = Path(args.temp_dir) if getattr(args, "temp_dir", None) else output_dir.parent / "temp"
    workflows = load_shipped_workflows()
    models_dir = getattr(args, "models_dir", None)
    app = create_app(
        node_classes, display_names=display_names,
        input_dir=args.input_dir, output_dir=output_dir, temp_dir=temp_dir, user_dir=args.user_dir,
        default_workflow=workflows.get(DEFAULT_WORKFLOW_NAME), templates=workflows,
        system_info=system_info, on_free=on_free,
        model_folders={"checkpoints": [str(models_dir)]} if models_dir else None,
    )

    def ready(url: str) -> None:
        print(f"sdxl-nodes editor: {url}", flush=True)

    run_server(app, host=args.host, port=args.port, on_ready=ready)
    return 0
