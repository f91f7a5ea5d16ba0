"""Workflow formats: API prompts, UI workflows, and PNG files that embed either.

* **API prompt** — ``{node_id: {"class_type", "inputs", "_meta"?}}``; an input is a literal or a
  link ``[source_id, output_index]``. Also accepted wrapped as the ``POST /api/prompt`` body
  ``{"prompt": {...}, "extra_data": {...}}``.
* **UI workflow** — what the editor saves (``nodes``, ``links``, ``widgets_values``, ``groups``,
  ``version`` 0.4; links may also be schema-1 dicts). :func:`ui_to_api` converts it to an API
  prompt the way the frontend's ``graphToPrompt`` does (``../shared/frontend/API.md`` §7.2; bypass
  resolution follows litegraph's ``ExecutableNodeDTO.resolveOutput``).
* **PNG** — ``tEXt``/``iTXt`` (and the frontend's custom ``comf``) chunks ``prompt`` and
  ``workflow`` as written by ``SaveImage`` (API.md §7.3); the UI workflow wins when both exist,
  as in the editor.

Everything here is plain JSON manipulation; node definitions come in as an ``/object_info`` dict
(see :mod:`.nodeinfo`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..sdxl_core.errors import UserError

__all__ = [
    "CONTROL_AFTER_GENERATE",
    "LoadedWorkflow",
    "VIRTUAL_NODE_TYPES",
    "WorkflowError",
    "detect_format",
    "load_workflow",
    "load_workflow_data",
    "normalize_api_prompt",
    "parse_json",
    "read_png_text",
    "ui_to_api",
    "widget_layout",
]

log = logging.getLogger(__name__)

# Frontend-only node types: never sent to the server.
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
CONTROL_AFTER_GENERATE = "control_after_generate"
UPLOAD_WIDGET = "upload"

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

# Input types that get a widget in the frontend (API.md §3.1); everything else is a socket only.
_WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO",
    "MARKDOWN", "COLOR", "IMAGEUPLOAD", "TEXTAREA", "CURVE", "BOUNDING_BOX", "CHART", "GALLERIA",
    "PAINTER",
})
_UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
_SEED_NAMES = ("seed", "noise_seed")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class WorkflowError(UserError, ValueError):
    """A workflow file or object could not be read or converted; the message says where and why."""


@dataclass
class LoadedWorkflow:
    """A workflow ready to validate and run.

    ``prompt`` is the API prompt; ``workflow`` is the UI workflow when the source had one (pass it
    on as ``extra_data={"extra_pnginfo": {"workflow": workflow}}`` so saved images embed it);
    ``kind`` is ``"api"`` or ``"ui"`` (what the source held); ``extra_data`` is the ``extra_data``
    of a wrapped ``POST /api/prompt`` body, else empty.
    """

    prompt: dict[str, dict]
    workflow: dict | None
    kind: str
    source: str
    extra_data: dict = field(default_factory=dict)

    def default_extra_data(self) -> dict:
        """``extra_data`` to execute with: the recorded one, with ``extra_pnginfo.workflow`` set."""
        extra = dict(self.extra_data)
        if self.workflow is not None:
            pnginfo = dict(extra.get("extra_pnginfo") or {})
            pnginfo.setdefault("workflow", self.workflow)
            extra["extra_pnginfo"] = pnginfo
        return extra


# --------------------------------------------------------------------------------------------
# Reading


def parse_json(text: str | bytes, *, source: str = "<string>") -> Any:
    """``json.loads`` with an error that names the source, line and column."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise WorkflowError(f"{source}: not UTF-8 text ({e}); expected a JSON or PNG workflow file") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{source}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def read_png_text(data: bytes, *, source: str = "<bytes>") -> dict[str, str]:
    """All ``tEXt``, ``iTXt`` (compressed or not) and ``comf`` chunks of a PNG as ``{keyword: text}``.

    Text is decoded as UTF-8 like the frontend does (Latin-1 as a fallback for odd ``tEXt``).
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise WorkflowError(f"{source}: not a PNG file (bad signature)")
    out: dict[str, str] = {}
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length  # length, type, data, crc
        if len(body) < length:
            raise WorkflowError(f"{source}: truncated PNG chunk {ctype!r}")
        try:
            if ctype in (b"tEXt", b"comf"):
                key, _, text = body.partition(b"\0")
                out[key.decode("latin-1")] = _decode_text(text)
            elif ctype == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, _method = rest[0], rest[1]
                _lang, _, rest = rest[2:].partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                if compressed:
                    text = zlib.decompress(text)
                out[key.decode("latin-1")] = text.decode("utf-8")
            elif ctype == b"IEND":
                break
        except (IndexError, UnicodeDecodeError, zlib.error) as e:
            raise WorkflowError(f"{source}: malformed PNG text chunk {ctype.decode('latin-1')}: {e}") from e
    return out


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def detect_format(data: Any) -> str:
    """``"ui"`` (editor workflow), ``"api_wrapped"`` (``{"prompt": ...}`` body) or ``"api"``.

    Raises :class:`WorkflowError` for anything else.
    """
    if isinstance(data, dict):
        if isinstance(data.get("nodes"), list) and ("links" in data or "version" in data):
            return "ui"
        if isinstance(data.get("prompt"), dict):
            return "api_wrapped"
        if data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
            return "api"
        keys = ", ".join(list(map(str, data))[:8]) or "none"
        raise WorkflowError(
            "not a workflow: expected an API prompt {id: {class_type, inputs}} or an editor workflow "
            f"with 'nodes' and 'links' (top-level keys: {keys})"
        )
    raise WorkflowError(f"not a workflow: expected a JSON object, got {type(data).__name__}")


def normalize_api_prompt(prompt: Mapping[str, Any]) -> dict[str, dict]:
    """Copy of an API prompt with string node ids and link sources (JSON from scripts may use ints)."""
    out = {}
    for node_id, node in prompt.items():
        node = dict(node) if isinstance(node, dict) else node
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            node["inputs"] = {
                k: [str(v[0]), v[1]] if _is_link(v) else v for k, v in node["inputs"].items()
            }
        out[str(node_id)] = node
    return out


def load_workflow_data(data: Any, object_info: Mapping[str, dict] | None, *, source: str = "<workflow>") -> LoadedWorkflow:
    """A parsed JSON object (API prompt, wrapped body or UI workflow) → :class:`LoadedWorkflow`.

    ``object_info`` (node definitions, :func:`.nodeinfo.object_info`) is needed only for UI
    workflows.
    """
    try:
        kind = detect_format(data)
    except WorkflowError as e:
        raise WorkflowError(f"{source}: {e}") from None
    if kind == "api":
        return LoadedWorkflow(normalize_api_prompt(data), None, "api", source)
    if kind == "api_wrapped":
        extra = data.get("extra_data") if isinstance(data.get("extra_data"), dict) else {}
        workflow = (extra.get("extra_pnginfo") or {}).get("workflow")
        return LoadedWorkflow(normalize_api_prompt(data["prompt"]), workflow, "api", source, dict(extra))
    if object_info is None:
        raise WorkflowError(f"{source}: is an editor (UI) workflow; converting it needs the node definitions")
    return LoadedWorkflow(ui_to_api(data, object_info, source=source), data, "ui", source)


def load_workflow(path: str | os.PathLike, object_info: Mapping[str, dict] | None) -> LoadedWorkflow:
    """Load a ``.json`` workflow (either format) or a ``.png`` with an embedded one."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise WorkflowError(f"{source}: cannot read: {e.strerror or e}") from e
    if raw.startswith(_PNG_SIGNATURE):
        chunks = read_png_text(raw, source=source)
        if "workflow" in chunks:
            data = parse_json(chunks["workflow"], source=f"{source} (PNG 'workflow' chunk)")
            loaded = load_workflow_data(data, object_info, source=source)
        elif "prompt" in chunks:
            data = parse_json(chunks["prompt"], source=f"{source} (PNG 'prompt' chunk)")
            loaded = load_workflow_data(data, object_info, source=source)
        else:
            raise WorkflowError(
                f"{source}: the PNG has no embedded workflow (no 'workflow' or 'prompt' text chunk); "
                "it was saved without metadata or by another program"
            )
        return loaded
    return load_workflow_data(parse_json(raw, source=source), object_info, source=source)


# --------------------------------------------------------------------------------------------
# Widgets of a node definition


def widget_layout(node_def: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """``[(widget_name, is_companion), ...]`` in ``widgets_values`` order (API.md §3.2).

    Widget inputs in ``input_order`` order (required, optional, then anything not listed), each
    followed by its companions: ``control_after_generate`` (seed-like INTs, or any INT/FLOAT/COMBO
    whose options ask for it) and ``upload`` (combos with ``image_upload`` & co.). Companions are
    stored in the workflow but never sent in the prompt.
    """
    inputs = node_def.get("input") or {}
    order = node_def.get("input_order") or {}
    names: list[tuple[str, str]] = []
    for category in ("required", "optional"):
        section = inputs.get(category) or {}
        listed = [n for n in (order.get(category) or []) if n in section]
        names += [(category, n) for n in listed] + [(category, n) for n in section if n not in listed]
    layout = []
    for category, name in names:
        spec = inputs[category][name]
        input_type = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
        options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
        is_combo = isinstance(input_type, (list, tuple)) or input_type == "COMBO"
        widget_type = options.get("widgetType")
        if options.get("forceInput") or options.get("defaultInput"):
            continue
        if not (is_combo or input_type in _WIDGET_TYPES or widget_type in _WIDGET_TYPES):
            continue
        layout.append((name, False))
        control = options.get(CONTROL_AFTER_GENERATE)
        if input_type in ("INT", "FLOAT") or is_combo:
            if control is not False and (control or (input_type == "INT" and name in _SEED_NAMES)):
                layout.append((CONTROL_AFTER_GENERATE, True))
        if is_combo and any(options.get(k) for k in _UPLOAD_OPTIONS):
            layout.append((UPLOAD_WIDGET, True))
    return layout


def _widget_default(node_def: Mapping[str, Any], name: str) -> Any:
    inputs = node_def.get("input") or {}
    for category in ("required", "optional"):
        spec = (inputs.get(category) or {}).get(name)
        if spec is None:
            continue
        input_type = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
        options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
        if "default" in options:
            return options["default"]
        if isinstance(input_type, (list, tuple)):
            return input_type[0] if input_type else None
        if input_type == "COMBO":
            choices = options.get("options") or []
            return choices[0] if choices else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(input_type)
    return None


# --------------------------------------------------------------------------------------------
# UI workflow → API prompt


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 2
        and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
        and isinstance(value[1], int) and not isinstance(value[1], bool)
    )


def _is_valid_connection(a: Any, b: Any) -> bool:
    """litegraph's ``isValidConnection``: ``*``/empty match anything; comma lists are unions."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    sa, sb = str(a).lower(), str(b).lower()
    if "," not in sa and "," not in sb:
        return sa == sb
    return bool(set(sa.split(",")) & set(sb.split(",")))


class _Graph:
    """Index of a UI workflow's nodes and links (list or schema-1 dict links)."""

    def __init__(self, workflow: Mapping[str, Any], source: str):
        self.source = source
        self.nodes: dict[str, dict] = {}
        for node in workflow.get("nodes") or []:
            if not isinstance(node, dict) or "id" not in node:
                raise WorkflowError(f"{source}: a node entry has no 'id': {str(node)[:80]}")
            self.nodes[str(node["id"])] = node
        self.links: dict[str, tuple[str, int, str, int, Any]] = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):
                try:
                    row = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                           link["target_slot"], link.get("type"))
                except KeyError as e:
                    raise WorkflowError(f"{source}: link {link} has no {e.args[0]!r}") from None
            elif isinstance(link, (list, tuple)) and len(link) >= 5:
                row = tuple(link[:6]) if len(link) >= 6 else (*link[:5], None)
            else:
                raise WorkflowError(f"{source}: malformed link entry {link!r}")
            lid, oid, oslot, tid, tslot, ltype = row
            self.links[str(lid)] = (str(oid), int(oslot), str(tid), int(tslot), ltype)

    def resolve_input(self, node: dict, slot: int, want_type: Any, visited: set) -> tuple[str, int] | None:
        """The real ``(source_id, output_index)`` feeding input ``slot``, or None."""
        key = (str(node["id"]), "I", slot)
        if key in visited:
            raise WorkflowError(f"{self.source}: circular link through bypassed/reroute node {node['id']}")
        visited.add(key)
        inputs = node.get("inputs") or []
        if slot >= len(inputs):
            return None
        inp = inputs[slot]
        link_id = inp.get("link")
        if link_id is None:
            return None
        link = self.links.get(str(link_id))
        if link is None:
            log.warning("%s: node %s input %r refers to missing link %s; treated as unconnected",
                        self.source, node["id"], inp.get("name"), link_id)
            return None
        origin = self.nodes.get(link[0])
        if origin is None:
            log.warning("%s: link %s comes from missing node %s; treated as unconnected",
                        self.source, link_id, link[0])
            return None
        return self.resolve_output(origin, link[1], want_type if want_type is not None else inp.get("type"), visited)

    def resolve_output(self, node: dict, slot: int, want_type: Any, visited: set) -> tuple[str, int] | None:
        key = (str(node["id"]), "O", slot)
        if key in visited:
            raise WorkflowError(f"{self.source}: circular link through bypassed/reroute node {node['id']}")
        visited.add(key)
        if node.get("mode") == MODE_BYPASS:
            index = self._bypass_slot_index(node, slot, want_type)
            if index < 0:
                log.info("%s: bypassed node %s has no input of type %s; input left unconnected",
                         self.source, node["id"], want_type)
                return None
            return self.resolve_input(node, index, None, visited)
        if node.get("type") == "Reroute":
            if node.get("inputs"):
                return self.resolve_input(node, 0, want_type, visited)
            return None
        if node.get("type") in VIRTUAL_NODE_TYPES:
            return None  # PrimitiveNode: its value was written into the target widget already
        return str(node["id"]), slot

    @staticmethod
    def _bypass_slot_index(node: dict, slot: int, want_type: Any) -> int:
        """litegraph ``_getBypassSlotIndex``: same slot if compatible, else exact type, else first compatible."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        output_type = outputs[slot].get("type") if slot < len(outputs) else None
        if want_type in ("*", "", None):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        if slot < len(inputs):
            t = inputs[slot].get("type")
            if _is_valid_connection(t, output_type) and _is_valid_connection(t, want_type):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            t = inp.get("type")
            if _is_valid_connection(t, output_type) and _is_valid_connection(t, want_type):
                return i
        return -1


def _sort_key(node_id: str) -> tuple:
    # JavaScript objects list integer-like keys first, ascending; the frontend's prompt follows that.
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, dict], *, source: str = "<workflow>") -> dict[str, dict]:
    """Convert an editor workflow to an API prompt exactly as the frontend's ``graphToPrompt``.

    ``object_info`` maps class types to their ``/object_info`` definitions (for the widget order).
    Raises :class:`WorkflowError` listing every node type that has no definition.
    """
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowError(f"{source}: not an editor workflow (no 'nodes' list)")
    graph = _Graph(workflow, source)
    subgraph_ids = {
        str(sg.get("id")) for sg in ((workflow.get("definitions") or {}).get("subgraphs") or [])
        if isinstance(sg, dict)
    }

    # 1. Which nodes reach the server; unknown types are reported all at once.
    active: list[dict] = []
    unknown: dict[str, list[str]] = {}
    for node_id, node in graph.nodes.items():
        ntype = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if ntype in VIRTUAL_NODE_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        if ntype in subgraph_ids or str(ntype).startswith(("workflow>", "workflow/")):
            raise WorkflowError(
                f"{source}: node {node_id} is a subgraph or group node ({ntype}); these are not supported "
                "yet: convert it back to plain nodes in the editor (right click → Unpack Subgraph)"
            )
        if ntype not in object_info:
            unknown.setdefault(str(ntype), []).append(node_id)
            continue
        active.append(node)
    if unknown:
        listing = "; ".join(f"{t} (node {', '.join(ids)})" for t, ids in sorted(unknown.items()))
        raise WorkflowError(
            f"{source}: unknown node type(s): {listing}. They come from another node pack (ComfyUI "
            "core or a custom node) that is not available here; replace or delete those nodes"
        )

    # 2. Legacy PrimitiveNode: its value is written into every widget it drives.
    overrides: dict[str, dict[str, Any]] = {}
    for node in graph.nodes.values():
        if node.get("type") != "PrimitiveNode" or not node.get("widgets_values"):
            continue
        value = node["widgets_values"][0]
        for output in node.get("outputs") or []:
            for link_id in output.get("links") or []:
                link = graph.links.get(str(link_id))
                target = graph.nodes.get(link[2]) if link else None
                if target is None:
                    continue
                tinputs = target.get("inputs") or []
                if link[3] < len(tinputs):
                    inp = tinputs[link[3]]
                    name = (inp.get("widget") or {}).get("name") or inp.get("name")
                    overrides.setdefault(link[2], {})[name] = value

    # 3. Widgets, then links (a linked widget's literal is replaced by the link).
    output: dict[str, dict] = {}
    for node in sorted(active, key=lambda n: _sort_key(str(n["id"]))):
        node_id = str(node["id"])
        node_def = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        layout = widget_layout(node_def)
        if isinstance(values, dict):  # some exporters store widgets by name
            named = values
        else:
            values = list(values or [])
            named = {}
            for index, (name, companion) in enumerate(layout):
                if index < len(values):
                    if not companion:
                        named[name] = values[index]
            if len(values) < len(layout) and isinstance(node.get("widgets_values_named"), dict):
                named = {**named, **node["widgets_values_named"]}
        for name, companion in layout:
            if companion:
                continue
            value = named[name] if name in named else _widget_default(node_def, name)
            value = overrides.get(node_id, {}).get(name, value)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot, inp in enumerate(node.get("inputs") or []):
            resolved = graph.resolve_input(node, slot, None, set())
            if resolved is not None:
                inputs[inp.get("name")] = [resolved[0], resolved[1]]
        meta = {"title": node.get("title") or node_def.get("display_name") or node["type"]}
        for key in ("cnr_id", "aux_id", "ver"):
            if key in (node.get("properties") or {}):
                meta[key] = node["properties"][key]
        output[node_id] = {"inputs": inputs, "class_type": node["type"], "_meta": meta}

    # 4. Links to nodes that did not make it (muted, unknown) are removed.
    for entry in output.values():
        for name in [n for n, v in entry["inputs"].items() if _is_link(v) and str(v[0]) not in output]:
            del entry["inputs"][name]
    return output
