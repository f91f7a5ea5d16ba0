"""Node definitions in the shape of ComfyUI's ``GET /api/object_info``, read from V1 node classes.

The runtime sees nodes only through ComfyUI's classic ("V1") contract: ``INPUT_TYPES()``,
``RETURN_TYPES``, ``RETURN_NAMES``, ``OUTPUT_TOOLTIPS``, ``FUNCTION``, ``CATEGORY``, ``DESCRIPTION``,
``OUTPUT_NODE`` and optional ``IS_CHANGED`` / ``VALIDATE_INPUTS``. This module turns such a class
into the JSON node definition the frontend reads (``../shared/frontend/API.md`` §3; field list
follows ComfyUI ``server.py`` ``node_info``), and holds the small input-spec helpers shared by the
converter, the validator and the executor.

No torch here, and no import of ``sdxl_nodes.nodes``: callers pass the class mapping in.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

__all__ = [
    "INPUT_CATEGORIES",
    "input_spec",
    "iter_input_specs",
    "node_info",
    "object_info",
    "to_json_value",
]

INPUT_CATEGORIES = ("required", "optional", "hidden")


def to_json_value(value: Any) -> Any:
    """Tuples become lists (recursively) so a definition serializes exactly like ComfyUI's."""
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json_value(v) for k, v in value.items()}
    return value


def _split_spec(spec: Any) -> tuple[Any, dict]:
    """``(TYPE,)`` / ``(TYPE, options)`` / ``"TYPE"`` → ``(TYPE, options)``; TYPE may be a combo list."""
    if isinstance(spec, (list, tuple)):
        if len(spec) == 0:
            return None, {}
        input_type = spec[0]
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(input_type, tuple):
            input_type = list(input_type)
        return input_type, options
    return spec, {}


def iter_input_specs(input_types: Mapping[str, Any]) -> Iterator[tuple[str, str, Any, dict]]:
    """Yield ``(category, name, TYPE, options)`` for every declared input, required first."""
    for category in INPUT_CATEGORIES:
        for name, spec in (input_types.get(category) or {}).items():
            input_type, options = _split_spec(spec)
            yield category, name, input_type, options


def input_spec(input_types: Mapping[str, Any], name: str) -> tuple[Any, str | None, dict]:
    """``(TYPE, category, options)`` of input ``name``; ``(None, None, {})`` when undeclared."""
    for category in INPUT_CATEGORIES:
        section = input_types.get(category) or {}
        if name in section:
            input_type, options = _split_spec(section[name])
            return input_type, category, options
    return None, None, {}


def node_info(
    class_type: str,
    cls: type,
    python_module: str,
    *,
    display_name: str | None = None,
) -> dict:
    """The ``/object_info`` entry for one node class.

    ``display_name`` overrides the class's own (``DISPLAY_NAME`` attribute, else the class type),
    as ComfyUI does with ``NODE_DISPLAY_NAME_MAPPINGS``. Numeric inputs keep exactly the ``min`` and
    ``max`` the node declares; the frontend clamps to 0…2048 when they are missing, so node classes
    should always declare both.
    """
    input_types = cls.INPUT_TYPES()
    outputs = list(to_json_value(getattr(cls, "RETURN_TYPES", ())))
    n = len(outputs)
    output_names = getattr(cls, "RETURN_NAMES", None)
    output_is_list = getattr(cls, "OUTPUT_IS_LIST", None)
    output_tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    return {
        "input": to_json_value({k: v for k, v in input_types.items() if k in INPUT_CATEGORIES}),
        "input_order": {
            category: list(input_types[category].keys())
            for category in INPUT_CATEGORIES
            if input_types.get(category)
        },
        "output": outputs,
        "output_is_list": list(output_is_list) if output_is_list is not None else [False] * n,
        "output_name": list(output_names) if output_names is not None else list(outputs),
        "output_tooltips": list(output_tooltips) if output_tooltips is not None else [None] * n,
        "name": class_type,
        "display_name": display_name or getattr(cls, "DISPLAY_NAME", None) or class_type,
        "description": getattr(cls, "DESCRIPTION", "") or "",
        "python_module": python_module,
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
        "deprecated": bool(getattr(cls, "DEPRECATED", False)),
        "experimental": bool(getattr(cls, "EXPERIMENTAL", False)),
    }


def object_info(
    node_classes: Mapping[str, type],
    python_module_for: str | Callable[[str, type], str],
    *,
    display_names: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """``{class_type: node_info(...)}`` for a whole class mapping.

    ``python_module_for`` is either one module string for every class (e.g.
    ``"custom_nodes.sdxl_nodes"``, which gives the pack badge in the editor) or a function
    ``(class_type, cls) -> str``. A class attribute ``PYTHON_MODULE`` (a string) overrides both.
    """
    display_names = display_names or {}
    out = {}
    for class_type, cls in node_classes.items():
        # a class may name its own module: the core-compatible nodes report ComfyUI's ("nodes",
        # "comfy_extras.…"), so the editor shows them as core nodes, not as our pack's
        module = getattr(cls, "PYTHON_MODULE", None)
        if not isinstance(module, str):
            module = python_module_for if isinstance(python_module_for, str) else python_module_for(class_type, cls)
        out[class_type] = node_info(class_type, cls, module, display_name=display_names.get(class_type))
    return out
