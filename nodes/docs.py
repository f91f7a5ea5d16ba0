"""NODES.md, generated from the node declarations (`python -m sdxl_nodes.nodes.docs > NODES.md`)."""

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
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
