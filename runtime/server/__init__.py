"""The editor server: the official ComfyUI frontend on our own API (see ``app.py``).

``app.py`` assembles the aiohttp app; ``queue.py`` (queue, worker, history, cancel), ``ws.py``
(websockets, events, preview frames), ``files.py`` (view, upload) and ``userdata.py`` (settings,
user data) are its parts. The names below are the package's public entry points.
"""

from .app import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_WORKFLOW_NAME,
    FEATURE_FLAG,
    BackgroundServer,
    PromptServer,
    create_app,
    load_shipped_workflows,
    run_server,
    serve_from_cli,
    server_of,
)
from .ws import preview_frame

__all__ = [
    "BackgroundServer",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_WORKFLOW_NAME",
    "FEATURE_FLAG",
    "PromptServer",
    "create_app",
    "load_shipped_workflows",
    "preview_frame",
    "run_server",
    "serve_from_cli",
    "server_of",
]
