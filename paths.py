"""Path confinement: the one function that decides whether a name stays inside a folder.

Every file the program reads or writes on behalf of a workflow or an HTTP request (checkpoints,
input images, outputs, previews, uploads, user data) goes through :func:`inside`. It is torch-free
and sits below both ``nodes/`` and ``runtime/`` so that each layer uses the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path


def inside(root: str | os.PathLike, *parts: str, resolve_links: bool = True,
           allow_root: bool = False) -> Path | None:
    """``root/parts…`` if it stays strictly inside ``root``; else None.

    ``resolve_links=True`` (the default) follows symlinks on both sides, so a link inside the folder
    that points out of it is refused. ``resolve_links=False`` only removes ``..`` lexically: for the
    models folder, where a link to a file elsewhere is the user's own choice. The folder itself is
    refused unless ``allow_root`` (a name that resolves to the folder is never a file in it).
    """
    norm = os.path.realpath if resolve_links else os.path.abspath
    base = Path(norm(root))
    try:
        target = Path(norm(os.path.join(base, *parts)))
    except (ValueError, OSError):  # NUL bytes, names too long for the OS
        return None
    if target == base:
        return target if allow_root else None
    return target if base in target.parents else None
