"""Websocket clients, JSON events and binary preview frames (API.md §5)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import uuid
from typing import Any, Callable, Mapping

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

PREVIEW_META_KEYS = ("node_id", "prompt_id", "display_node_id", "parent_node_id", "real_node_id", "image_type")


def preview_frame(meta: Mapping[str, Any], image: bytes) -> bytes:
    """A binary type-4 websocket frame: ``>I 4``, ``>I len(json)``, the JSON metadata, the image.

    ``meta`` keys in ComfyUI's order (``node_id, prompt_id, display_node_id, parent_node_id,
    real_node_id, image_type``), serialized with Python's default separators like ComfyUI.
    """
    header = json.dumps(dict(meta)).encode("utf-8")
    return struct.pack(">II", 4, len(header)) + header + bytes(image)


def legacy_preview_frame(image_type: str, image: bytes) -> bytes:
    """Binary type 1 (for clients that did not announce ``supports_preview_metadata``)."""
    return struct.pack(">II", 1, 2 if image_type == "image/png" else 1) + bytes(image)


class Client:
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


class Clients:
    """The connected websockets by ``clientId``, and the events sent to them.

    ``status()`` gives the current ``status`` payload; ``features()`` the ``feature_flags`` answer;
    ``resume(sid)`` is called when a client (re)connects, to tell it what runs for it now.
    """

    def __init__(self, status: Callable[[], dict], features: Callable[[], dict],
                 resume: Callable[[str], None] | None = None):
        self.status = status
        self.features = features
        self.resume = resume
        self.by_sid: dict[str, Client] = {}

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        """Queue a JSON message for ``sid`` (every socket when ``sid`` is None or empty)."""
        if event == "preview":
            self.send_preview(data, sid)
            return
        text = json.dumps({"type": event, "data": data})
        for client in self._targets(sid):
            client.put(text)

    def send_preview(self, data: Mapping[str, Any], sid: str | None) -> None:
        meta = {k: data.get(k) for k in PREVIEW_META_KEYS}
        image = data.get("image") or b""
        for client in self._targets(sid):
            if client.wants_metadata_previews:
                client.put(preview_frame(meta, image))
            else:
                client.put(legacy_preview_frame(str(meta["image_type"]), image))

    def _targets(self, sid: str | None) -> list[Client]:
        if sid:
            client = self.by_sid.get(sid)
            return [client] if client is not None else []
        return list(self.by_sid.values())

    async def close_all(self) -> None:
        for client in list(self.by_sid.values()):
            await client.close()
        self.by_sid.clear()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /ws``: one client's socket until it closes."""
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        previous = self.by_sid.pop(sid, None)
        if previous is not None:
            await previous.close()
        client = Client(sid, ws)
        self.by_sid[sid] = client
        client.put(json.dumps({"type": "status", "data": {**self.status(), "sid": sid}}))
        if self.resume is not None:
            self.resume(sid)
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
            if self.by_sid.get(sid) is client:
                del self.by_sid[sid]
            await client.close()
        return ws
