"""Packaging: the editor bundle is an extra, so installing the pack into ComfyUI keeps ComfyUI's frontend."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sdxl_nodes.runtime import cli, server

PYPROJECT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")


def _requirement_list(key: str) -> set[str]:
    """Package names in the TOML array ``key = [...]`` (tomllib needs Python 3.11; we support 3.10)."""
    body = re.search(rf"^{re.escape(key)} = \[(.*?)^\]", PYPROJECT, re.S | re.M)
    assert body, key
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in re.findall(r'^\s*"([^"]+)"', body[1], re.M)}


def test_frontend_bundle_is_only_in_the_editor_extra():
    assert "torch" in _requirement_list("dependencies")  # the parser reads the list at all
    assert "comfyui-frontend-package" not in _requirement_list("dependencies")
    assert _requirement_list("editor") == {"comfyui-frontend-package"}


def test_serve_without_the_editor_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "comfyui_frontend_package", None)  # import fails as if not installed

    def would_serve(*args, **kwargs):
        raise AssertionError("serve started without the editor bundle")

    monkeypatch.setattr(server, "serve_from_cli", would_serve)
    code = cli.main(["serve", "--port", "0", "--models-dir", str(tmp_path), "--user-dir", str(tmp_path / "u"),
                     "--input-dir", str(tmp_path / "i"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "pip install 'sdxl-nodes[editor]'" in err
