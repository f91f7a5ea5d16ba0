"""Running an app: ``sdxl-nodes serve``, the foreground loop, and a background server for tests."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import json
import logging
import os
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

from aiohttp import web

from ..limits import parse_limits
from .access import is_loopback
from .app import DEFAULT_WORKFLOW_NAME, WORKFLOWS_DIR, create_app

log = logging.getLogger(__name__)

ALL_INTERFACES = ("", "0.0.0.0", "::")
CHECKPOINT_SUFFIXES = (".safetensors", ".sft")


class ServeError(Exception):
    """The server could not start; the message is one line for the user."""


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _url(host: str, port: int, token: str | None = None) -> str:
    if host in ALL_INTERFACES:
        host = "127.0.0.1"
    return f"http://{_host_for_url(host)}:{port}/" + (f"?token={token}" if token else "")


async def _start(app: web.Application, host: str, port: int, access_log: bool) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=logging.getLogger("sdxl_nodes.access") if access_log else None,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} is already in use on {host or 'all interfaces'}: stop the other "
                             f"server, or pick another port with --port N (--port 0 picks a free one)") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound


def run_server(
    app: web.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 8188,
    on_ready: Callable[[str, int], None] | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``app`` until interrupted (Ctrl-C / SIGTERM). ``port=0`` picks a free port;
    ``on_ready(url, port)`` is called once the socket listens. Raises :class:`ServeError` when the
    address cannot be used."""

    async def main() -> None:
        runner, bound = await _start(app, host, port, access_log)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
        url = _url(host, bound)
        log.debug("serving on %s", url)
        if on_ready is not None:
            on_ready(url, bound)
        try:
            await stop.wait()
        finally:
            log.debug("shutting down")
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
                self._runner, bound = loop.run_until_complete(_start(self.app, self.host, self.port, False))
                self.url = _url(self.host, bound)
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


# -------------------------------------------------------------------------------------------------
# sdxl-nodes serve


def models_report(models_dir: str | os.PathLike | None) -> tuple[str, bool]:
    """One line about the models folder and whether it is usable (a warning when it is not)."""
    if not models_dir:
        return "models folder: none given (--models-dir): no checkpoint can be loaded", False
    folder = Path(models_dir).expanduser().resolve()
    if not folder.is_dir():
        return (f"models folder {folder} does not exist: create it and put the SDXL .safetensors "
                f"checkpoints there, or pass --models-dir PATH"), False
    found = 0
    for _, _, files in os.walk(folder, followlinks=True):
        found += sum(1 for f in files if f.lower().endswith(CHECKPOINT_SUFFIXES))
        if found > 10_000:
            break
    if found == 0:
        return (f"models folder {folder}: no .safetensors checkpoints found (put sd_xl_base_1.0.safetensors "
                f"and sd_xl_refiner_1.0.safetensors there)"), False
    return f"models folder {folder}: {found} checkpoint{'s' * (found != 1)} found", True


def _lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses, read from the interfaces (no network traffic)."""
    try:
        import psutil
    except ImportError:
        return []
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not is_loopback(a.address):
                out.append(a.address)
    return out


def serve_from_cli(
    args: Any,
    node_classes: Mapping[str, type],
    display_names: Mapping[str, str] | None = None,
    *,
    system_info: Callable[[], dict] | None = None,
    on_free: Callable[[dict], None] | None = None,
    out: TextIO | None = None,
) -> int:
    """``sdxl-nodes serve``: ``args`` has ``host``, ``port``, ``user_dir``, ``input_dir``,
    ``output_dir``, ``temp_dir`` (None: ``<output_dir>/../temp``) and ``models_dir``, and optionally
    ``token``, ``allow_host`` (list) and ``limit`` (list of NAME=VALUE). Returns the exit code."""
    out = out or sys.stdout
    err = sys.stderr
    # The CLI logs warnings only; the server's own lines (prompts queued/finished, node failures)
    # are what a user watching the terminal needs.
    logging.getLogger(__package__).setLevel(logging.INFO)
    try:
        limits = parse_limits(getattr(args, "limit", None))
    except ValueError as e:
        print(f"error: {e}", file=err)
        return 2
    host = args.host
    token = getattr(args, "token", None) or None
    exposed = not is_loopback(host)
    if exposed and not token:
        token = secrets.token_urlsafe(24)
    allow_hosts = list(getattr(args, "allow_host", None) or [])
    if host not in ALL_INTERFACES and not is_loopback(host):
        allow_hosts.append(host)  # the name the user bound is a name the user will open
    if host in ALL_INTERFACES:
        allow_hosts.append(socket.gethostname())  # from /etc/hostname: no lookup
    lan = _lan_addresses() if host in ALL_INTERFACES else []

    output_dir = Path(args.output_dir)
    temp_dir = Path(args.temp_dir) if getattr(args, "temp_dir", None) else output_dir.parent / "temp"
    workflows = load_shipped_workflows()
    models_dir = getattr(args, "models_dir", None)
    models_line, models_ok = models_report(models_dir)
    if not models_ok:
        log.warning("%s", models_line)
    app = create_app(
        node_classes, display_names=display_names,
        input_dir=args.input_dir, output_dir=output_dir, temp_dir=temp_dir, user_dir=args.user_dir,
        default_workflow=workflows.get(DEFAULT_WORKFLOW_NAME), templates=workflows,
        system_info=system_info, on_free=on_free,
        model_folders={"checkpoints": [str(models_dir)]} if models_dir else None,
        limits=limits, token=token, allow_hosts=allow_hosts,
    )

    def ready(url: str, port: int) -> None:
        lines = []
        if exposed:
            where = "all network interfaces" if host in ALL_INTERFACES else f"{host}"
            lines.append(f"WARNING: the editor listens on {where} (port {port}), not only on this machine. "
                         "Anyone who can reach it and has the token can run workflows and read and write "
                         "the input, output, temp and user folders. Use --host 127.0.0.1 unless you need this.")
        lines.append(f"sdxl-nodes editor: {_url(host, port, token)}")
        if host in ALL_INTERFACES:
            others = lan or ["<this machine's address>"]
            lines += [f"  from another machine: {_url(a, port, token)}" for a in others]
        if token:
            lines.append("  API clients send the header 'Authorization: Bearer <token>' with the token above")
        lines.append(f"  {models_line}")
        lines.append("  Ctrl-C stops the server")
        print("\n".join(lines), file=out, flush=True)

    try:
        run_server(app, host=host, port=args.port, on_ready=ready)
    except ServeError as e:
        print(f"error: {e}", file=err, flush=True)
        return 1
    print("sdxl-nodes editor stopped", file=out, flush=True)
    return 0
