"""The editor server: the official ComfyUI frontend on our own API (see ``app.py``).

``app.py`` assembles the aiohttp app; ``queue.py`` (queue, worker, history, cancel), ``ws.py``
(websockets, events, preview frames), ``files.py`` (view, upload) and ``userdata.py`` (settings,
user data) are its parts; ``access.py`` decides who may talk to it and ``serve.py`` runs it. The names below are the package's public entry points.
"""

from .app import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_WORKFLOW_NAME,
    FEATURE_FLAG,
    PromptServer,
    create_app,
    prompt_shape_problem,
    server_of,
)
from .serve import (
    BackgroundServer,
    ServeError,
    load_shipped_workflows,
    parse_limits,
    run_server,
    serve_from_cli,
)
from .ws import preview_frame

__all__ = [
    "BackgroundServer",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_WORKFLOW_NAME",
    "FEATURE_FLAG",
    "PromptServer",
    "ServeError",
    "create_app",
    "load_shipped_workflows",
    "parse_limits",
    "preview_frame",
    "prompt_shape_problem",
    "run_server",
    "serve_from_cli",
    "server_of",
]
