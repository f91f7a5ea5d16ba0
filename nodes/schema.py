"""One declaration per node, from which ComfyUI's classic (V1) attributes and NODES.md are generated.

A node class is written as

    @node(NodeSchema(id="SDXLEmptyLatent", display_name=..., category=..., description=...,
                     inputs=(Int("width", ...), ...), outputs=(Output("LATENT", "LATENT", ...),)))
    class EmptyLatent:
        def run(self, width, height, batch_size): ...

and `node` fills in INPUT_TYPES, RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS, FUNCTION, CATEGORY,
DESCRIPTION and OUTPUT_NODE, which is all ComfyUI, our executor and our /object_info read.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF  # ComfyUI's seed range: 0 … 2**64-1
MAX_RESOLUTION = 16384  # ComfyUI nodes.MAX_RESOLUTION


@dataclass(frozen=True)
class Input:
    name: str
    type: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    # combo choices: a fixed sequence, or a callable returning the current list (files on disk)
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    optional: bool = False
    extra: dict = field(default_factory=dict)  # other options passed through (image_upload, round, …)

    def spec(self) -> tuple:
        opts: dict[str, Any] = {"tooltip": self.tooltip}
        if self.default is not None:
            opts["default"] = self.default
        for k in ("min", "max", "step"):
            if getattr(self, k) is not None:
                opts[k] = getattr(self, k)
        if self.multiline:
            opts["multiline"] = True
        opts.update(self.extra)
        if self.choices is not None:
            choices = list(self.choices() if callable(self.choices) else self.choices)
            return (choices, opts)
        return (self.type, opts)


def Int(name, tooltip, *, default, min, max, step=1, **extra) -> Input:  # noqa: A002 - ComfyUI's option names
    """An INT widget; options are keyword-only so a declaration reads as names. step=None leaves `step` out."""
    return Input(name, "INT", tooltip, default=default, min=min, max=max, step=step, extra=extra)


def Float(name, tooltip, *, default, min, max, step=0.01, **extra) -> Input:  # noqa: A002
    """A FLOAT widget; options keyword-only. step=None leaves `step` out (ComfyUI then uses its own)."""
    return Input(name, "FLOAT", tooltip, default=default, min=min, max=max, step=step, extra=extra)


def String(name, tooltip, default="", multiline=False, **extra) -> Input:
    return Input(name, "STRING", tooltip, default=default, multiline=multiline, extra=extra)


def Combo(name, tooltip, choices, default=None, **extra) -> Input:
    return Input(name, "COMBO", tooltip, default=default, choices=choices, extra=extra)


def Socket(name, type_, tooltip, optional=False) -> Input:
    return Input(name, type_, tooltip, optional=optional)


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    tooltip: str


@dataclass(frozen=True)
class NodeSchema:
    id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...] = ()
    output_node: bool = False
    # hidden inputs the runtime injects: ComfyUI's PROMPT / EXTRA_PNGINFO / UNIQUE_ID, and our
    # SDXL_PROGRESS (a progress reporter; ComfyUI leaves unknown hidden types out, so it is optional)
    hidden: dict[str, str] = field(default_factory=dict)


class SchemaError(TypeError):
    """A node declaration that does not match its class (a programming error, raised at import)."""


def _check_run_covers_inputs(cls, schema: NodeSchema) -> None:
    """`run()` must accept every declared input (ComfyUI calls it with keywords) and need nothing undeclared."""
    run = getattr(cls, "run", None)
    if run is None:
        raise SchemaError(f"{schema.id}: class {cls.__name__} has no run() method")
    params = list(inspect.signature(run).parameters.values())[1:]  # drop self
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    declared = [i.name for i in schema.inputs] + list(schema.hidden)
    dupes = sorted({n for n in declared if declared.count(n) > 1})
    if dupes:
        raise SchemaError(f"{schema.id}: input name(s) declared twice: {', '.join(dupes)}")
    missing = [n for n in declared if n not in named and not takes_kwargs]
    if missing:
        raise SchemaError(f"{schema.id}: {cls.__name__}.run() does not take declared input(s) {', '.join(missing)}")
    not_required = {i.name for i in schema.inputs if i.optional} | set(schema.hidden)
    for name in not_required:
        p = named.get(name)
        if p is not None and p.default is p.empty:
            raise SchemaError(f"{schema.id}: optional/hidden input '{name}' needs a default in run()")
    undeclared = [n for n, p in named.items() if n not in declared and p.default is p.empty]
    if undeclared:
        raise SchemaError(f"{schema.id}: {cls.__name__}.run() needs undeclared input(s) {', '.join(undeclared)}")


def node(schema: NodeSchema):
    """Class decorator: generate the V1 attributes from `schema`; the class implements `run`.

    Raises SchemaError at import when `run()` does not cover the declared inputs (see above).
    """

    def wrap(cls):
        _check_run_covers_inputs(cls, schema)
        def input_types(_cls):
            required = {i.name: i.spec() for i in schema.inputs if not i.optional}
            optional = {i.name: i.spec() for i in schema.inputs if i.optional}
            out: dict[str, Any] = {"required": required}
            if optional:
                out["optional"] = optional
            if schema.hidden:
                out["hidden"] = dict(schema.hidden)
            return out

        cls.SCHEMA = schema
        cls.INPUT_TYPES = classmethod(input_types)
        cls.RETURN_TYPES = tuple(o.type for o in schema.outputs)
        cls.RETURN_NAMES = tuple(o.name for o in schema.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in schema.outputs)
        cls.FUNCTION = "run"
        cls.CATEGORY = schema.category
        cls.DESCRIPTION = schema.description
        cls.OUTPUT_NODE = schema.output_node
        return cls

    return wrap
