"""Regenerate NODES.md from the node declarations (ours and the ComfyUI core-compatible set).

    python tools/nodes_md.py          # writes NODES.md at the repository root
"""

from __future__ import annotations

from pathlib import Path

from sdxl_nodes.nodes.docs import render

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "NODES.md"
    path.write_text(render())
    print(f"wrote {path}")
