"""Small helpers shared by the server modules: JSON bodies, query parameters, error responses."""

from __future__ import annotations

import asyncio
import json
import time
from importlib import metadata
from typing import Any

from aiohttp import web

from ..limits import DEFAULT_LIMITS, Limits


def now_ms() -> int:
    return int(time.time() * 1000)


def version(dist: str) -> str:
    """A distribution's version without importing it ("" when absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class BadRequest(Exception):
    """Raised inside a handler; the middleware turns it into a JSON error response."""

    def __init__(self, message: str, status: int = 400, body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else {"error": message}


MISSING = object()


def parse_json(raw: bytes | str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """``raw`` parsed as strict JSON within ``limits`` (``json_depth``, ``int_digits``).

    Raises :class:`BadRequest` naming the limit or the syntax error. ``NaN``/``Infinity`` and floats
    that overflow to infinity are refused: a browser cannot parse them back.
    """

    def parse_int(text: str) -> int:
        if len(text.lstrip("-")) > limits.int_digits:
            raise BadRequest(f"an integer in the JSON body has {len(text.lstrip('-'))} digits, over the "
                             f"int_digits limit of {limits.int_digits} (serve --limit int_digits=N)")
        return int(text)

    def parse_float(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise BadRequest(f"the number {text[:40]} in the JSON body is out of range")
        return value

    def parse_constant(name: str) -> Any:
        raise BadRequest(f"{name} is not valid JSON (use null or a finite number)")

    try:
        value = json.loads(raw, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except RecursionError:
        raise BadRequest(f"the JSON body is nested too deeply: over the json_depth limit of "
                         f"{limits.json_depth} (serve --limit json_depth=N)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"malformed JSON body: {e}") from None
    depth = json_depth(value)
    if depth > limits.json_depth:
        raise BadRequest(f"the JSON body is nested {depth} levels deep, over the json_depth limit of "
                         f"{limits.json_depth} (serve --limit json_depth=N)")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


async def read_json(request: web.Request, *, empty: Any = MISSING, limits: Limits | None = None) -> Any:
    """The request body parsed as JSON; an empty body gives ``empty`` (or a 400 if not given)."""
    if limits is None:
        limits = request.app.get(LIMITS_KEY, DEFAULT_LIMITS)
    raw = await read_body(request, limits)
    if not raw.strip():
        if empty is not MISSING:
            return empty
        raise BadRequest("the request body is empty; expected JSON")
    if len(raw) > 1 << 20:  # a big workflow: parse off the event loop so other requests keep flowing
        return await asyncio.to_thread(parse_json, raw, limits)
    return parse_json(raw, limits)


async def read_body(request: web.Request, limits: Limits | None = None) -> bytes:
    """The whole request body, refused with 413 naming ``request_bytes`` when it is too large."""
    if limits is None:
        limits = request.app.get(LIMITS_KEY, DEFAULT_LIMITS)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limits.request_bytes) from None


def too_large(limit: int) -> BadRequest:
    return BadRequest(f"the request body is larger than the request_bytes limit of {limit} bytes "
                      f"(serve --limit request_bytes=N)", status=413)


LIMITS_KEY = web.AppKey("sdxl_nodes_limits", Limits)


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("false", "0", "no", "")


def query_int(request: web.Request, name: str, default: int | None, *, minimum: int = 0) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    if len(value) > 18:
        raise BadRequest(f"{name} must be an integer below 10^18, got {value[:40]!r}")
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise BadRequest(f"{name} must be >= {minimum}, got {number}")
    return number
