"""Who may talk to the server: Host allowlist, Origin check and the optional access token.

* **Host allowlist** (against DNS rebinding): a page on ``evil.example`` whose name an attacker
  points at 127.0.0.1 sends ``Host: evil.example``. Only loopback names (``localhost``,
  ``*.localhost``), IP literals (a page can only be *at* an IP literal if it really is this server),
  the bound host name and the names given with ``--allow-host`` are served.
* **Origin**: a request that carries an ``Origin`` must come from this very server: same scheme,
  host and port as the request itself. ``Origin: null`` is refused.
* **Token**: with ``--token`` (and always when the server listens beyond loopback) every request
  must prove it knows the token, by ``Authorization: Bearer <token>``, a ``?token=`` query
  parameter, or the cookie that opening ``/?token=<token>`` sets once (what the printed URL does,
  so the editor and its websocket carry it from then on).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from .common import json_error

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost",)
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def is_loopback(host: str) -> bool:
    """True for the addresses and names that only this machine can reach."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _split_host(value: str, scheme: str) -> tuple[str, int | None] | None:
    """``"Host:port"`` → ``(host lowercased, port)``; None when it does not parse."""
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if not host:
        return None
    return host, port if port is not None else DEFAULT_PORTS.get(scheme)


@dataclass
class Access:
    """The rules of one app; see the module docstring."""

    token: str | None = None
    allow_hosts: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.allow_hosts = {h.strip().strip("[]").lower() for h in self.allow_hosts if h.strip()}

    def host_allowed(self, host: str) -> bool:
        return is_loopback(host) or _is_ip(host) or host in self.allow_hosts

    def cookie_name(self, request: web.Request) -> str:
        return f"sdxl_nodes_token_{request.url.port or 80}"

    def token_ok(self, request: web.Request) -> bool:
        if not self.token:
            return True
        supplied = []
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            supplied.append(auth[7:].strip())
        supplied.append(request.cookies.get(self.cookie_name(request), ""))
        supplied.append(request.query.get("token", ""))
        return any(s and hmac.compare_digest(s.encode(), self.token.encode()) for s in supplied)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        scheme = request.scheme
        host = _split_host(request.headers.get("Host", ""), scheme)
        if host is None or not self.host_allowed(host[0]):
            log.warning("refused %s %s for Host %r (not an allowed host name; see --allow-host)",
                        request.method, request.path, request.headers.get("Host", ""))
            return json_error(403, f"host name {request.headers.get('Host', '')!r} is not allowed: open the "
                                   f"server by its address or localhost, or start it with --allow-host NAME")
        origin = request.headers.get("Origin")
        if origin is not None:
            source = urlsplit(origin)
            origin_host = _split_host(source.netloc, source.scheme) if origin != "null" else None
            if origin_host is None or source.scheme != scheme or origin_host != host:
                log.warning("refused %s %s from origin %s (host %s)", request.method, request.path, origin,
                            request.headers.get("Host"))
                return json_error(403, "cross-origin request refused")
        elif request.headers.get("Sec-Fetch-Site") == "cross-site":
            return json_error(403, "cross-site request refused")
        if not self.token_ok(request):
            return json_error(401, "this server requires its access token: open the URL that `sdxl-nodes serve` "
                                   "printed (it ends in ?token=...), or send 'Authorization: Bearer <token>'")
        if self.token and request.method == "GET" and request.path == "/" and "token" in request.query:
            # The printed URL: remember the token in a cookie and drop it from the address bar.
            response = web.Response(status=302, headers={"Location": "/", "Cache-Control": "no-store"})
            response.set_cookie(self.cookie_name(request), self.token, httponly=True, samesite="Strict",
                                path="/")
            return response
        return await handler(request)
