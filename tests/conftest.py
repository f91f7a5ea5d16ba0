"""Shared fixtures: tiny random SDXL checkpoints in the official key layout, written once per session."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{'base': Path, 'refiner': Path} of tiny fp32 checkpoints named like the official files."""
    from sdxl_nodes.sdxl_core.checkpoint import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("models"), seed=1234)


@pytest.fixture(scope="session")
def tiny_base(tiny_checkpoints):
    from sdxl_nodes.sdxl_core.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoints["base"])


@pytest.fixture(scope="session")
def tiny_refiner(tiny_checkpoints):
    from sdxl_nodes.sdxl_core.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoints["refiner"])


@pytest.fixture(scope="session", autouse=True)
def _sigint_not_ignored():
    """Ctrl-C tests need SIGINT delivered. A suite started in the background by a non-interactive shell
    (`cmd &`, nohup) inherits SIGINT ignored, which our CLI rightly respects and every child process inherits;
    give the test process Python's usual handler, so the children start with the default disposition."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(autouse=True)
def _no_environment_leaks():
    """Each test starts with no current node environment; one a test sets (configure/use) ends with it.

    (Looked up in sys.modules so that torch-free test files do not import the nodes, and torch, here.)
    """
    import sys

    before = sys.modules.get("sdxl_nodes.nodes.environment")
    token = before._ACTIVE.set(None) if before is not None else None
    yield
    if before is not None:
        before._ACTIVE.reset(token)
    elif (after := sys.modules.get("sdxl_nodes.nodes.environment")) is not None:
        after._ACTIVE.set(None)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_checkpoints):
    """A ComfyUI-style models/ folder whose checkpoints/ holds the tiny base and refiner (hard links)."""
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    for path in tiny_checkpoints.values():
        try:
            os.link(path, root / "checkpoints" / path.name)
        except OSError:
            shutil.copyfile(path, root / "checkpoints" / path.name)
    return root
