"""NODES.md, generated from the node declarations (`python -m sdxl_nodes.nodes.docs > NODES.md`, or tools/nodes_md.py)."""

from __future__ import annotations

from . import NODES
from .schema import Input


def _type(i: Input) -> str:
    if i.choices is not None:
        if callable(i.choices):
            return "COMBO (files)"
        shown = ", ".join(f"`{c}`" for c in list(i.choices)[:6])
        return f"COMBO: {shown}" + (", …" if len(list(i.choices)) > 6 else "")
    return i.type


def _range(i: Input) -> str:
    parts = []
    if i.default is not None and i.default != "":
        parts.append(f"default `{i.default!r}`" if isinstance(i.default, str) else f"default `{i.default}`")
    if i.min is not None:
        parts.append(f"{i.min} … {i.max}" + (f" step {i.step}" if i.step not in (None, 1) else ""))
    if i.multiline:
        parts.append("multiline")
    return ", ".join(parts)


def render() -> str:
    out = [
        "# Nodes",
        "",
        "Generated from the node declarations by `python -m sdxl_nodes.nodes.docs > NODES.md`; a test keeps it "
        "in sync. Node ids are permanent; inputs may be added, never renamed.",
        "",
        "| id | name | category | outputs |",
        "|---|---|---|---|",
    ]
    for cls in NODES:
        s = cls.SCHEMA
        outs = ", ".join(f"`{o.name}` {o.type}" for o in s.outputs) or "(saves / shows images)"
        out.append(f"| `{s.id}` | {s.display_name} | {s.category} | {outs} |")
    for cls in NODES:
        s = cls.SCHEMA
        out += ["", f"## {s.display_name} (`{s.id}`)", "", s.description, "", "| input | type | values | what it does |",
                "|---|---|---|---|"]
        for i in s.inputs:
            opt = " (optional)" if i.optional else ""
            out.append(f"| `{i.name}`{opt} | {_type(i)} | {_range(i)} | {i.tooltip} |")
        if s.outputs:
            out += ["", "| output | type | what it is |", "|---|---|---|"]
            out += [f"| `{o.name}` | {o.type} | {o.tooltip} |" for o in s.outputs]
    out += _core_section()
    return "\n".join(out) + "\n"


def _core_section() -> list[str]:
    """The ComfyUI core-compatible set: ids, ComfyUI's categories, inputs in widget order, differences."""
    from .comfy_core import NODES as CORE

    out = [
        "",
        "# ComfyUI core-compatible nodes",
        "",
        "Registered only by `sdxl-nodes run | validate | convert | serve` (never inside ComfyUI, where ComfyUI's own "
        "nodes stand), so workflows built from ComfyUI's core SDXL nodes run as they are. Ids, input names and order, "
        "defaults, ranges, output types and categories are ComfyUI v0.8.0's (a test compares them with ComfyUI's "
        "recorded `/object_info`); MODEL / CLIP / VAE carry the same objects as SDXL_MODEL / SDXL_CLIP / SDXL_VAE and "
        "both sets sample through the same code, so the same graph gives the same pixels in either set.",
        "",
        "| id | ComfyUI name | category | inputs (widget order) | outputs | differs from ComfyUI |",
        "|---|---|---|---|---|---|",
    ]
    for cls in CORE:
        s = cls.SCHEMA
        inputs = ", ".join(f"`{i.name}`" for i in s.inputs)
        outs = ", ".join(o.type for o in s.outputs) or "(saves / shows)"
        note = getattr(cls, "DIFFERS_FROM_COMFYUI", "") or "none"
        out.append(f"| `{s.id}` | {s.display_name} | {s.category} | {inputs} | {outs} | {note} |")
    out += ["", "`VAELoader` comes with the LoRA / VAE loader module; ControlNet, IPAdapter and other packs' nodes "
            "are not available: a workflow using them stops before running with one message naming each such node."]
    return out
