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

import datetime
import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..sdxl_core.errors import UserError
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "CONTROL_AFTER_GENERATE",
    "LoadedWorkflow",
    "VIRTUAL_NODE_TYPES",
    "WorkflowError",
    "check_json_depth",
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


def is_link(value: Any) -> bool:
    """A prompt input ``[source_id, output_index]`` (a literal list would be ``{"__value__": [...]}``)."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


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


def parse_json(text: str | bytes, *, source: str = "<string>", limits: Limits | None = None) -> Any:
    """``json.loads`` with an error that names the source, line and column, within the ``json_depth`` and
    ``int_digits`` limits (a 5,000-digit integer or 100,000 nested arrays are refused, not a crash)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise WorkflowError(f"{source}: not UTF-8 text ({e}); expected a JSON or PNG workflow file") from e
    limits = limits or DEFAULT_LIMITS

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > limits.int_digits:
            raise _TooLarge(f"an integer has {len(digits.lstrip('-'))} digits; the limit int_digits is "
                            f"{limits.int_digits}")
        return int(digits)

    try:
        data = json.loads(text, parse_int=parse_int)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{source}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except _TooLarge as e:
        raise WorkflowError(f"{source}: {e}") from None
    except RecursionError:
        raise WorkflowError(f"{source}: JSON nested too deeply; the limit json_depth is {limits.json_depth}") from None
    check_json_depth(data, limits.json_depth, source=source)
    return data


class _TooLarge(ValueError):
    """A JSON value over a limit, found while parsing."""


def check_json_depth(data: Any, max_depth: int, *, source: str = "<json>") -> None:
    """Raise WorkflowError when arrays/objects nest deeper than ``max_depth`` (iterative: any depth is safe)."""
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise WorkflowError(f"{source}: JSON nested more than {max_depth} levels deep; the limit json_depth "
                                    f"is {max_depth}")
            children = value.values() if isinstance(value, dict) else value
            todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


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
                k: _string_source(v) for k, v in node["inputs"].items()
            }
        out[str(node_id)] = node
    return out


def _string_source(value: Any) -> Any:
    """``[5, 0]`` (an int node id, as scripts write it) → ``["5", 0]``; anything else unchanged."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], int) and not isinstance(value[0], bool):
        candidate = [str(value[0]), value[1]]
        if is_link(candidate):
            return candidate
    return value


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


# Node types whose filename_prefix the editor expands (frontend 1.58 saveImageExtraOutput.ts); the SDXL*
# save nodes are not among them, so the editor sends their prefixes as written (and so do we).
SAVE_NODE_TYPES = frozenset((
    "SaveImage", "SaveImageAdvanced", "SaveSVGNode", "SaveVideo", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio",
    "SaveAudioMP3", "SaveAudioOpus", "SaveAudioAdvanced", "SaveGLB", "Save3DAdvanced", "SaveGaussianSplat", "SavePointCloud",
    "SaveAnimatedPNG", "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent",
))
_FORBIDDEN_IN_NAMES = re.compile(r'[/?<>\\:*|"\x00-\x1F\x7F]')
_DATE_TOKENS = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")


def _format_date(pattern: str, now: datetime.datetime) -> str:
    """The editor's formatDate: yyyy, yy, MM/M, dd/d, hh/h (24 h), mm/m, ss/s; other text unchanged."""
    parts = {"d": now.day, "M": now.month, "h": now.hour, "m": now.minute, "s": now.second}

    def one(match: re.Match) -> str:
        token = match.group(0)
        if token == "yy":
            return str(now.year)[2:]
        if token == "yyyy":
            return str(now.year)
        if token[0] in parts:
            return str(parts[token[0]]).rjust(len(token), "0")
        return token

    return _DATE_TOKENS.sub(one, pattern)


def _js_string(value: Any) -> str:
    """``String(value)`` as JavaScript writes widget values (1.0 → "1", true → "true", null → "")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def _is_combo(node_def: Mapping[str, Any], name: str) -> bool:
    inputs = node_def.get("input") or {}
    for category in ("required", "optional"):
        spec = (inputs.get(category) or {}).get(name)
        if spec is not None:
            input_type = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            return isinstance(input_type, (list, tuple)) or input_type == "COMBO"
    return False


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


SUBGRAPH_INPUT_ID, SUBGRAPH_OUTPUT_ID = "-10", "-20"  # litegraph's ids of a subgraph's input/output nodes
_GROUP_NODE_PREFIXES = ("workflow>", "workflow/")  # legacy group nodes (extra.groupNodes)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


class _Graph:
    """One level of a UI workflow: the root graph, or one subgraph definition (``definitions.subgraphs``)."""

    def __init__(self, data: Mapping[str, Any], source: str, definition: bool = False):
        self.source = source
        self.id = str(data.get("id")) if definition else None
        self.name = data.get("name") if definition else None
        self.where = f" in subgraph {self.name!r} ({self.id})" if definition else ""
        self.nodes: dict[str, dict] = {}
        for node in data.get("nodes") or []:
            if not isinstance(node, dict) or "id" not in node:
                raise WorkflowError(f"{source}: a node entry{self.where} has no 'id': {str(node)[:80]}")
            _check_ui_node(node, source)
            self.nodes[str(node["id"])] = node
        self.links: dict[str, tuple[str, int, str, int, Any]] = {}
        links = data.get("links") or []
        if not isinstance(links, list):
            raise WorkflowError(f"{source}: 'links'{self.where} must be a list, got {type(links).__name__}")
        for link in links:
            if isinstance(link, dict):
                try:
                    row = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                           link["target_slot"], link.get("type"))
                except KeyError as e:
                    raise WorkflowError(f"{source}: link {str(link)[:80]}{self.where} has no {e.args[0]!r}") from None
            elif isinstance(link, (list, tuple)) and len(link) >= 5:
                row = tuple(link[:6]) if len(link) >= 6 else (*link[:5], None)
            else:
                raise WorkflowError(f"{source}: malformed link entry {str(link)[:80]}{self.where}")
            lid, oid, oslot, tid, tslot, ltype = row
            what = f"{source}: link {str(link)[:80]}{self.where}"
            self.links[_ui_id(lid, f"{what}: id")] = (
                _ui_id(oid, f"{what}: origin id"), _ui_slot(oslot, f"{what}: origin slot"),
                _ui_id(tid, f"{what}: target id"), _ui_slot(tslot, f"{what}: target slot"), ltype,
            )
        # A subgraph definition's own input and output slots (what its instances show).
        self.inputs = [s for s in (data.get("inputs") or []) if isinstance(s, dict)] if definition else []
        self.outputs = [s for s in (data.get("outputs") or []) if isinstance(s, dict)] if definition else []


class _Exec:
    """One node as the frontend compiles it (litegraph's ``ExecutableNodeDTO``).

    ``path`` holds the ids of the subgraph instances from the root down to the one containing the
    node; the execution id is ``path`` and the node's own id joined by ``:`` (``"12:5"``).
    """

    __slots__ = ("node", "path", "graph", "instance", "id", "inputs")

    def __init__(self, node: dict, path: tuple[str, ...], graph: _Graph, instance: _Exec | None, inputs: list):
        self.node, self.path, self.graph, self.instance = node, path, graph, instance
        self.id = ":".join((*path, str(node["id"])))
        self.inputs = inputs  # [(name, type, link_id)] in the frontend's live order


def _input_type(spec: Any) -> Any:
    input_type = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(input_type, (list, tuple)) else input_type


class _Converter:
    """``graphToPrompt`` of frontend 1.58 (``src/utils/executionUtil.ts``) over a UI workflow."""

    def __init__(self, workflow: Mapping[str, Any], object_info: Mapping[str, dict], source: str):
        self.source = source
        self.object_info = object_info
        self.root = _Graph(workflow, source)
        self.subgraphs: dict[str, _Graph] = {}
        for data in (workflow.get("definitions") or {}).get("subgraphs") or []:
            if isinstance(data, dict) and data.get("id") is not None:
                self.subgraphs[str(data["id"])] = _Graph(data, source, definition=True)
        self.execs: dict[str, _Exec] = {}
        self.overrides: dict[tuple[str | None, str], dict[str, Any]] = {}

    # ---- node shape ----------------------------------------------------------------------

    def subgraph_of(self, node: dict) -> _Graph | None:
        return self.subgraphs.get(str(node.get("type")))

    def is_virtual(self, node: dict) -> bool:
        return node.get("type") in VIRTUAL_NODE_TYPES or self.subgraph_of(node) is not None

    def live_inputs(self, node: dict) -> list[tuple[str, Any, Any]]:
        """The node's inputs as the loaded graph has them (seen in frontend 1.58): the definition's
        sockets, then its widget inputs (even when the saved file left them out), each in definition
        order with the definition's type, then any other saved input; links by input name."""
        saved = [i for i in (node.get("inputs") or []) if isinstance(i, dict)]
        links = {i.get("name"): i.get("link") for i in saved}
        declared: list[tuple[str, Any]] = []
        sub = self.subgraph_of(node)
        node_def = self.object_info.get(node.get("type")) if sub is None else None
        if sub is not None:
            declared = [(s.get("name"), s.get("type")) for s in sub.inputs]
        elif node_def is not None:
            inputs, order = node_def.get("input") or {}, node_def.get("input_order") or {}
            for category in ("required", "optional"):
                section = inputs.get(category) or {}
                listed = [n for n in (order.get(category) or []) if n in section]
                declared += [(n, _input_type(section[n])) for n in listed + [n for n in section if n not in listed]]
            widgets = {n for n, companion in widget_layout(node_def) if not companion}
            declared = [d for d in declared if d[0] not in widgets] + [d for d in declared if d[0] in widgets]
        names = {n for n, _ in declared}
        out = [(n, t, links.get(n)) for n, t in declared]
        out += [(i.get("name"), i.get("type"), i.get("link")) for i in saved if i.get("name") not in names]
        return out

    def output_type(self, node: dict, slot: int) -> Any:
        sub = self.subgraph_of(node)
        if sub is not None:
            return sub.outputs[slot].get("type") if slot < len(sub.outputs) else None
        node_def = self.object_info.get(node.get("type"))
        if node_def is not None and slot < len(node_def.get("output") or []):
            return _input_type([node_def["output"][slot]])
        outputs = node.get("outputs") or []
        return outputs[slot].get("type") if slot < len(outputs) and isinstance(outputs[slot], dict) else None

    def make_exec(self, node: dict, path: tuple[str, ...], graph: _Graph, instance: _Exec | None) -> _Exec:
        dto = _Exec(node, path, graph, instance, self.live_inputs(node))
        self.execs[dto.id] = dto
        return dto

    def expand(self, instance: _Exec, chain: tuple[str, ...]) -> None:
        """``SubgraphNode.getInnerNodes``: register the inner nodes of a subgraph instance (nested
        instances are expanded whatever their mode, as the frontend does)."""
        sub = self.subgraph_of(instance.node)
        if sub.id in chain:
            raise WorkflowError(f"{self.source}: subgraph {sub.name!r} ({sub.id}) contains itself "
                                f"(through node {instance.id}); a subgraph cannot be nested in itself")
        path = (*instance.path, str(instance.node["id"]))
        for inner in sub.nodes.values():
            dto = self.make_exec(inner, path, sub, instance)
            if self.subgraph_of(inner) is not None:
                self.expand(dto, (*chain, sub.id))

    # ---- link resolution (ExecutableNodeDTO.resolveInput / resolveOutput) --------------------

    def _visit(self, dto: _Exec, kind: str, slot: int, visited: set) -> None:
        key = (dto.instance.graph.id if dto.instance else None, dto.instance and dto.instance.id, str(dto.node["id"]), kind, slot)
        if key in visited:
            raise WorkflowError(f"{self.source}: circular link through node {dto.id} ({dto.node.get('type')}): "
                                "reroutes or bypassed nodes form a loop; remove one of its links")
        visited.add(key)

    def _broken(self, dto: _Exec, what: str) -> WorkflowError:
        return WorkflowError(f"{self.source}: node {dto.id} ({dto.node.get('type')}){dto.graph.where}: {what}; "
                             "the workflow file is damaged: reconnect or delete that input in the editor")

    def resolve_input(self, dto: _Exec, slot: int, visited: set, want: Any = None):
        """``None``, ``("link", exec_id, output_index)`` or ``("value", value)``."""
        self._visit(dto, "I", slot, visited)
        if slot >= len(dto.inputs):
            return None
        name, input_type, link_id = dto.inputs[slot]
        if link_id is None:
            return None
        link = dto.graph.links.get(str(link_id))
        if link is None:
            if dto.graph.id is not None:
                raise self._broken(dto, f"input {name!r} refers to link {link_id}, which does not exist")
            log.warning("%s: node %s input %r refers to missing link %s; treated as unconnected",
                        self.source, dto.id, name, link_id)
            return None
        origin_id, origin_slot = link[0], link[1]
        if dto.instance is not None and origin_id == SUBGRAPH_INPUT_ID:
            return self._resolve_subgraph_input(dto, name, origin_slot, visited)
        origin = dto.graph.nodes.get(origin_id)
        if origin is None:
            if dto.graph.id is not None:
                raise self._broken(dto, f"input {name!r} is linked (link {link_id}) from node {origin_id}, "
                                        "which does not exist")
            log.warning("%s: link %s comes from missing node %s; treated as unconnected",
                        self.source, link_id, origin_id)
            return None
        origin_dto = self.execs.get(":".join((*dto.path, origin_id)))
        if origin_dto is None:
            return None
        return self.resolve_output(origin_dto, origin_slot, want if want is not None else input_type, visited)

    def _resolve_subgraph_input(self, dto: _Exec, name: str, index: int, visited: set):
        """A link from the subgraph's input node: continue outside, at the instance's input."""
        instance, sub = dto.instance, dto.instance and self.subgraph_of(dto.instance.node)
        if index >= len(sub.inputs):
            raise self._broken(dto, f"input {name!r} is linked from subgraph input {index}, but the subgraph "
                                    f"has {len(sub.inputs)} input(s)")
        outer_slot = next((i for i, (n, _t, _l) in enumerate(instance.inputs) if n == sub.inputs[index].get("name")), None)
        if outer_slot is not None and instance.inputs[outer_slot][2] is not None:
            return self.resolve_input(instance, outer_slot, visited)
        promoted = self.promoted_value(instance, index)
        return None if promoted is None else ("value", promoted[0])

    def promoted_value(self, instance: _Exec, index: int) -> tuple[Any] | None:
        """The value of the widget promoted onto a subgraph instance for subgraph input ``index``
        (``SubgraphNode._resolveInputWidget`` / ``_applyPromotedWidgetValues``), or None if that
        input carries no widget. The instance's ``widgets_values`` hold one value per promoted input."""
        sub = self.subgraph_of(instance.node)
        promoted = [i for i in range(len(sub.inputs)) if self._promoted_widget(sub, i) is not None]
        if index not in promoted:
            return None
        values = instance.node.get("widgets_values")
        position = promoted.index(index)
        if isinstance(values, list) and position < len(values):
            return (values[position],)
        inner, widget = self._promoted_widget(sub, index)
        return (self.widget_values(inner, sub).get(widget),)

    def _promoted_widget(self, sub: _Graph, index: int) -> tuple[dict, str] | None:
        """The first inner node widget fed by subgraph input ``index``: ``(node, widget name)``."""
        for link_id in sub.inputs[index].get("linkIds") or []:
            link = sub.links.get(str(link_id))
            target = sub.nodes.get(link[2]) if link else None
            if target is None:
                continue
            for inp in target.get("inputs") or []:
                if isinstance(inp, dict) and str(inp.get("link")) == str(link_id) and isinstance(inp.get("widget"), dict):
                    wname = inp["widget"].get("name")
                    node_def = self.object_info.get(target.get("type"))
                    if node_def is not None and any(n == wname for n, _c in widget_layout(node_def)):
                        return target, wname
        return None

    def resolve_output(self, dto: _Exec, slot: int, want: Any, visited: set):
        self._visit(dto, "O", slot, visited)
        node = dto.node
        mode = node.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None  # muted nodes produce nothing
        if mode == MODE_BYPASS:
            index = self._bypass_slot_index(dto, slot, want)
            if index < 0:
                log.info("%s: bypassed node %s has no input of type %s; input left unconnected",
                         self.source, dto.id, want)
                return None
            return self.resolve_input(dto, index, visited)
        sub = self.subgraph_of(node)
        if sub is not None:
            if slot >= len(sub.outputs):
                raise self._broken(dto, f"output {slot} is used, but its subgraph has {len(sub.outputs)} output(s)")
            link_ids = sub.outputs[slot].get("linkIds") or []
            link = sub.links.get(str(link_ids[0])) if link_ids else None
            if link is None:
                if link_ids:
                    raise WorkflowError(f"{self.source}: subgraph {sub.name!r} ({sub.id}) output "
                                        f"{sub.outputs[slot].get('name')!r} refers to link {link_ids[0]}, which "
                                        "does not exist; the workflow file is damaged")
                return None  # nothing connected to that output inside
            inner = self.execs.get(":".join((*dto.path, str(node["id"]), link[0])))
            if inner is None:
                raise WorkflowError(f"{self.source}: subgraph {sub.name!r} ({sub.id}) output "
                                    f"{sub.outputs[slot].get('name')!r} comes from node {link[0]}, which does not "
                                    f"exist in the subgraph (instance node {dto.id})")
            return self.resolve_output(inner, link[1], want, visited)
        if node.get("type") in VIRTUAL_NODE_TYPES:
            if node.get("type") == "Reroute":
                return self.resolve_input(dto, 0, visited, want)
            return None  # PrimitiveNode: its value was written into the widgets it feeds
        return ("link", dto.id, slot)

    def _bypass_slot_index(self, dto: _Exec, slot: int, want: Any) -> int:
        """``_getBypassSlotIndex``: the same slot if compatible, else the first input of exactly the
        wanted type, else the first compatible one."""
        inputs = dto.inputs
        output_type = self.output_type(dto.node, slot)
        if want in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs):
            t = inputs[slot][1]
            if _is_valid_connection(t, output_type) and _is_valid_connection(t, want):
                return slot
        for i, (_n, t, _l) in enumerate(inputs):
            if t == want:
                return i
        for i, (_n, t, _l) in enumerate(inputs):
            if _is_valid_connection(t, output_type) and _is_valid_connection(t, want):
                return i
        return -1

    # ---- widgets -----------------------------------------------------------------------

    def widget_values(self, node: dict, graph: _Graph) -> dict[str, Any]:
        """``{widget: value}`` of a node (companions left out), PrimitiveNode values applied."""
        node_def = self.object_info[node["type"]]
        values = node.get("widgets_values")
        layout = widget_layout(node_def)
        if isinstance(values, dict):  # some exporters store widgets by name
            named = values
        else:
            values = list(values or [])
            named = {}
            for index, (name, companion) in enumerate(layout):
                if index < len(values) and not companion:
                    named[name] = values[index]
            if len(values) < len(layout) and isinstance(node.get("widgets_values_named"), dict):
                named = {**named, **node["widgets_values_named"]}
        out = {}
        for name, companion in layout:
            if not companion:
                value = named[name] if name in named else _widget_default(node_def, name)
                if value is None and _is_combo(node_def, name):
                    value = _widget_default(node_def, name)  # the editor shows a null combo as its first choice
                out[name] = value
        out.update(self.overrides.get((graph.id, str(node["id"])), {}))
        return out

    def apply_primitives(self, graph: _Graph) -> None:
        """Legacy ``PrimitiveNode.applyToGraph``: its value goes into every widget its output feeds."""
        for node_id, node in graph.nodes.items():
            if node.get("type") != "PrimitiveNode":
                continue
            values = node.get("widgets_values")
            outputs = node.get("outputs") or []
            link_ids = (outputs[0].get("links") or []) if outputs and isinstance(outputs[0], dict) else []
            if not link_ids:
                continue  # feeds nothing: the frontend ignores it
            if not isinstance(values, list) or not values:
                raise WorkflowError(f"{self.source}: PrimitiveNode {node_id}{graph.where} has no value "
                                    "(empty widgets_values); set its value in the editor")
            value = values[0]
            if value and (node.get("properties") or {}).get("Run widget replace on values") and isinstance(value, str):
                value = self.text_replacements(value)
            for link_id in link_ids:
                link = graph.links.get(str(link_id))
                target = graph.nodes.get(link[2]) if link else None
                if target is None or link[0] != node_id:
                    raise WorkflowError(
                        f"{self.source}: PrimitiveNode {node_id}{graph.where} feeds link {link_id}, which "
                        f"{'does not exist' if link is None else 'leads to no node'}; the workflow file is "
                        "damaged: reconnect the primitive in the editor")
                inp = next((i for i in (target.get("inputs") or [])
                            if isinstance(i, dict) and str(i.get("link")) == str(link_id)), None)
                wname = (inp.get("widget") or {}).get("name") if inp else None
                if not wname:
                    log.warning("%s: PrimitiveNode %s feeds input %r of node %s, which is not a widget; "
                                "ignored as the frontend does", self.source, node_id,
                                inp.get("name") if inp else None, target.get("id"))
                    continue
                self.overrides.setdefault((graph.id, str(target["id"])), {})[wname] = value

    # ---- the editor's text replacements (src/utils/searchAndReplace.ts) -------------------------

    def text_replacements(self, value: str) -> str:
        """``%date:yyyy-MM-dd%`` and ``%Node.widget%`` as the editor expands them when it queues: in a save
        node's ``filename_prefix`` and in PrimitiveNodes with "Run widget replace on values". A node is found
        by its "Node name for S&R" property, else by its title, first match in the workflow; anything not found
        stays as written (the editor only warns)."""

        def one(match: re.Match) -> str:
            text = match.group(1)
            split = text.split(".")
            if len(split) != 2:
                return _format_date(split[0][5:], datetime.datetime.now()) if split[0].startswith("date:") \
                    else match.group(0)
            found = self.find_node(split[0])
            if found is None:
                return match.group(0)
            node, graph = found
            widgets = self.widget_values(node, graph) if node.get("type") in self.object_info else {}
            if split[1] not in widgets:
                return match.group(0)
            return _FORBIDDEN_IN_NAMES.sub("_", _js_string(widgets[split[1]]))

        return re.sub(r"%([^%]+)%", one, value)

    def find_node(self, name: str) -> tuple[dict, _Graph] | None:
        every = [(n, g) for g in (self.root, *self.subgraphs.values()) for n in g.nodes.values()]
        for matches in (lambda n: (n.get("properties") or {}).get("Node name for S&R") == name,
                        lambda n: self.title(n) == name):
            hits = [(n, g) for n, g in every if matches(n)]
            if hits:
                if len(hits) > 1:
                    log.warning("%s: %d nodes match %r in a text replacement; using the first", self.source,
                                len(hits), name)
                return hits[0]
        return None

    def title(self, node: dict) -> str | None:
        """The title the editor shows: the saved one, else the node type's display name."""
        if isinstance(node.get("title"), str):
            return node["title"]
        node_def = self.object_info.get(node.get("type"))
        return (node_def or {}).get("display_name") or node.get("type")

    # ---- the conversion ------------------------------------------------------------------

    def convert(self) -> dict[str, dict]:
        for node_id, node in self.root.nodes.items():
            ntype = str(node.get("type"))
            if ntype.startswith(_GROUP_NODE_PREFIXES) or (_UUID.match(ntype) and self.subgraph_of(node) is None):
                kind = "group node" if ntype.startswith(_GROUP_NODE_PREFIXES) else "subgraph"
                raise WorkflowError(
                    f"{self.source}: node {node_id} is a {kind} ({ntype}) whose definition is missing from the "
                    f"workflow ({'extra.groupNodes' if kind == 'group node' else 'definitions.subgraphs'}); "
                    "the file was cut short or edited by hand: save it again from the editor")
        for graph in (self.root, *self.subgraphs.values()):
            self.apply_primitives(graph)
        # 1. graphToPrompt's node map: root nodes, and the inner nodes of active subgraph instances.
        for node in self.root.nodes.values():
            dto = self.make_exec(node, (), self.root, None)
            if node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
                continue
            if self.subgraph_of(node) is not None:
                self.expand(dto, ())
        # 2. Which nodes reach the server; unknown types are reported all at once.
        active: list[_Exec] = []
        unknown: dict[str, list[str]] = {}
        for dto in self.execs.values():
            node = dto.node
            if self.is_virtual(node) or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
                continue
            if node.get("type") not in self.object_info:
                unknown.setdefault(str(node.get("type")), []).append(dto.id)
                continue
            active.append(dto)
        if unknown:
            listing = "; ".join(f"{t} (node {', '.join(ids)})" for t, ids in sorted(unknown.items()))
            ids = [dto.id for dto in active]
            have = f"the other {len(ids)} node(s) ({', '.join(ids)}) are supported" if ids else \
                "none of its nodes are supported"
            raise WorkflowError(
                f"{self.source}: {sum(map(len, unknown.values()))} node(s) use types not available here (unknown "
                f"node types): {listing}; {have}. sdxl-nodes runs its own SDXL nodes and ComfyUI's core SDXL nodes "
                "(see NODES.md); nodes from other node packs (ControlNet, IPAdapter, custom nodes) must be removed or "
                "replaced. Nothing was run."
            )
        # 3. Widgets, then links (a linked widget's literal is replaced by the link or inlined value).
        output: dict[str, dict] = {}
        for dto in sorted(active, key=lambda d: _sort_key(d.id)):
            node = dto.node
            node_def = self.object_info[node["type"]]
            inputs: dict[str, Any] = {}
            for name, value in self.widget_values(node, dto.graph).items():
                if name == "filename_prefix" and isinstance(value, str) and node["type"] in SAVE_NODE_TYPES:
                    value = self.text_replacements(value)  # the editor's Comfy.SaveImageExtraOutput
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            for slot, (name, _t, _l) in enumerate(dto.inputs):
                resolved = self.resolve_input(dto, slot, set())
                if resolved is None:
                    continue
                if resolved[0] == "value":
                    inputs[name] = {"__value__": resolved[1]} if isinstance(resolved[1], list) else resolved[1]
                else:
                    inputs[name] = [resolved[1], resolved[2]]
            meta = {"title": node.get("title") or node_def.get("display_name") or node["type"]}
            for key in ("cnr_id", "aux_id", "ver"):
                if key in (node.get("properties") or {}):
                    meta[key] = node["properties"][key]
            output[dto.id] = {"inputs": inputs, "class_type": node["type"], "_meta": meta}
        # 4. Links to nodes that did not make it (muted, bypassed without a match) are removed.
        for entry in output.values():
            for name in [n for n, v in entry["inputs"].items() if is_link(v) and v[0] not in output]:
                del entry["inputs"][name]
        return output


def _ui_id(value: Any, what: str) -> str:
    """A node or link id of a UI workflow (an integer, or a string for subgraph ids) as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise WorkflowError(f"{what} must be an integer id, got {str(value)[:40]} ({type(value).__name__}); "
                            "the links list may be damaged: re-save the workflow from the editor")
    return str(value)


def _ui_slot(value: Any, what: str) -> int:
    """A slot index of a UI link row: an integer (a digit string is accepted, as ``int()`` did)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkflowError(f"{what} must be an integer slot index, got {str(value)[:40]} ({type(value).__name__}); "
                            "the links list may be damaged: re-save the workflow from the editor")
    return value


def _check_ui_node(node: dict, source: str) -> None:
    """The fields of a UI node that the conversion reads, with the JSON types the editor writes."""
    _ui_id(node["id"], f"{source}: node id")
    where = f"{source}: node {node['id']}"
    expected = {"type": (str,), "mode": (int,), "inputs": (list,), "outputs": (list,),
                "widgets_values": (list, dict), "properties": (dict,), "title": (str,)}
    for key, types in expected.items():
        value = node.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            want = " or ".join({"str": "a string", "int": "an integer", "list": "a list", "dict": "an object"}[t.__name__]
                               for t in types)
            raise WorkflowError(f"{where}: '{key}' must be {want}, got {type(value).__name__}: {str(value)[:40]}")
    for kind in ("inputs", "outputs"):
        for i, entry in enumerate(node.get(kind) or []):
            if not isinstance(entry, dict):
                raise WorkflowError(f"{where}: {kind}[{i}] must be an object with 'name' and 'type', "
                                    f"got {type(entry).__name__}: {str(entry)[:40]}")
            if not isinstance(entry.get("name", ""), str):
                raise WorkflowError(f"{where}: {kind}[{i}].name must be a string, got {str(entry.get('name'))[:40]}")
            if kind == "inputs" and entry.get("link") is not None:
                _ui_id(entry["link"], f"{where}: inputs[{i}].link")
            if kind == "inputs" and not isinstance(entry.get("widget") or {}, dict):
                raise WorkflowError(f"{where}: inputs[{i}].widget must be an object, got {str(entry['widget'])[:40]}")
            if kind == "outputs" and not isinstance(entry.get("links") or [], list):
                raise WorkflowError(f"{where}: outputs[{i}].links must be a list, got {str(entry['links'])[:40]}")


def _sort_key(node_id: str) -> tuple:
    # JavaScript objects list integer-like keys first, ascending; the frontend's prompt follows that.
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, dict], *, source: str = "<workflow>") -> dict[str, dict]:
    """Convert an editor workflow to an API prompt exactly as the frontend's ``graphToPrompt``.

    Follows frontend 1.58 (``executionUtil.ts``, litegraph's ``ExecutableNodeDTO`` and
    ``SubgraphNode``): Notes, Reroutes and PrimitiveNodes never reach the server (a PrimitiveNode's
    value is written into every widget it feeds first); muted nodes drop out; a bypassed node's
    consumers are rewired to its input of the matching type; subgraph instances are flattened,
    their inner nodes getting ids ``"<instance id>:<inner id>"`` (nested: ``"a:b:c"``), a promoted
    widget's value coming from the instance; groups and native reroutes do not matter.
    ``object_info`` maps class types to their ``/object_info`` definitions (for the widget order).
    Raises :class:`WorkflowError` listing every node type that has no definition, and for broken
    structures (dangling links inside subgraphs, missing subgraph or group-node definitions).
    """
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowError(f"{source}: not an editor workflow (no 'nodes' list)")
    return _Converter(_migrate_group_nodes(workflow, object_info, source), object_info, source).convert()


# --------------------------------------------------------------------------------------------
# Legacy group nodes (extra.groupNodes): frontend 1.58 turns each into a subgraph when it loads
# the workflow (groupNode.ts: GroupNodeConfig, GroupNodeHandler.convertToNodes, then
# LGraph.convertToSubgraph); the same is done here, so ids come out as the editor's.


def _def_inputs(node_def: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``{...required, ...optional}`` of a definition in key order, as the group-node code reads it."""
    inputs = node_def.get("input") or {}
    merged: dict[str, Any] = {}
    for category in ("required", "optional"):
        merged.update(inputs.get(category) or {})
    return list(merged.items())


def _is_widget_spec(node_def: Mapping[str, Any], name: str) -> bool:
    return any(n == name and not companion for n, companion in widget_layout(node_def))


def _migrate_group_nodes(workflow: Mapping[str, Any], object_info: Mapping[str, dict], source: str) -> Mapping[str, Any]:
    extra = workflow.get("extra") if isinstance(workflow.get("extra"), dict) else {}
    groups = extra.get("groupNodes") if isinstance(extra.get("groupNodes"), dict) else {}
    nodes = [n for n in workflow.get("nodes") or [] if isinstance(n, dict)]
    if not groups or not any(str(n.get("type")).startswith(_GROUP_NODE_PREFIXES) for n in nodes):
        return workflow
    ids = [n.get("id") for n in nodes if isinstance(n.get("id"), int) and not isinstance(n.get("id"), bool)]
    last = max([workflow.get("last_node_id") or 0, *ids]) if ids or workflow.get("last_node_id") else 0
    if not isinstance(last, int):
        raise WorkflowError(f"{source}: last_node_id {last!r} is not a number")
    out = dict(workflow)
    out["nodes"] = []
    definitions = dict(workflow.get("definitions") or {})
    definitions["subgraphs"] = list(definitions.get("subgraphs") or [])
    renamed: dict[str, int] = {}
    for node in workflow["nodes"]:
        ntype = str(node.get("type")) if isinstance(node, dict) else ""
        name = ntype[len("workflow>"):]
        if not ntype.startswith(_GROUP_NODE_PREFIXES) or name not in groups:
            out["nodes"].append(node)
            continue
        sub, instance, last = _group_to_subgraph(node, name, groups[name], object_info, last, source)
        definitions["subgraphs"].append(sub)
        out["nodes"].append(instance)
        renamed[str(node.get("id"))] = instance["id"]
    out["definitions"] = definitions
    # Links from a group node's outputs now leave its subgraph instance (same output order).
    links = []
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 5 and str(link[1]) in renamed:
            link = [link[0], renamed[str(link[1])], *link[2:]]
        elif isinstance(link, dict) and str(link.get("origin_id")) in renamed:
            link = {**link, "origin_id": renamed[str(link["origin_id"])]}
        links.append(link)
    out["links"] = links
    return out


def _group_to_subgraph(node: dict, name: str, data: Any, object_info: Mapping[str, dict], last: int,
                       source: str) -> tuple[dict, dict, int]:
    where = f"{source}: group node {node.get('id')} ({node.get('type')})"
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise WorkflowError(f"{where}: its definition in extra.groupNodes has no 'nodes' list")
    inner = data["nodes"]
    for index, n in enumerate(inner):
        if not isinstance(n, dict):
            raise WorkflowError(f"{where}: inner node {index} of its definition is not an object")
        if n.get("type") in ("PrimitiveNode", "Reroute"):
            raise WorkflowError(f"{where}: contains a {n.get('type')} (inner node {index}); group nodes with "
                                "those are not supported: open the workflow in the editor, which turns group "
                                "nodes into subgraphs, and save it again")
        if n.get("type") not in object_info:
            raise WorkflowError(f"{where}: contains unknown node type {n.get('type')!r} (inner node {index}); it "
                                "comes from a node pack that is not available here")
    if data.get("config"):
        raise WorkflowError(f"{where}: renamed or hidden group-node slots (its 'config') are not supported: open "
                            "the workflow in the editor, which turns group nodes into subgraphs, and save it again")
    links_to: dict[int, dict[int, list]] = {}
    links_from: dict[int, dict[int, list]] = {}
    internal = []
    for link in data.get("links") or []:
        if not isinstance(link, list) or len(link) < 4:
            raise WorkflowError(f"{where}: malformed link {link!r} in its definition")
        if link[0] is None:
            continue  # a link from outside the group when it was made
        internal.append(link)
        links_to.setdefault(link[2], {})[link[3]] = link
        links_from.setdefault(link[0], {}).setdefault(link[1], []).append(link)
    external = {(int(e[0]), int(e[1])) for e in data.get("external") or [] if isinstance(e, list) and len(e) >= 3
                and e[2] is not None}

    # GroupNodeConfig: the group node's widgets (in order), input sockets and outputs.
    seen: dict[str, int] = {}

    def config_name(n: dict, input_name: str) -> str:
        label = next((i.get("label") for i in n.get("inputs") or [] if isinstance(i, dict)
                      and i.get("name") == input_name and i.get("label")), None)
        new = key = label or input_name
        if new in seen:
            prefix = f"{n.get('title') or n.get('type')} "
            key = new = f"{prefix}{input_name}"
            if new in seen:
                new = f"{prefix}{seen[new]} {input_name}"
        seen[key] = seen.get(key, 1) + 1
        return new

    group_widgets: dict[str, Any] = {}  # new widget name -> input spec (for the widget layout)
    widget_names: dict[tuple[int, str], str] = {}
    sockets: list[tuple[str, int, str]] = []  # (group input name, inner node index, inner input name)
    outputs: list[tuple[int, int]] = []
    for index, n in enumerate(inner):
        node_def = object_info[n["type"]]
        saved = [i for i in n.get("inputs") or [] if isinstance(i, dict)]
        slots = []
        for input_name, spec in _def_inputs(node_def):
            if not _is_widget_spec(node_def, input_name):
                slots.append(input_name)
                continue
            if any(i.get("name") == input_name and (i.get("widget") or {}).get("name") == input_name for i in saved):
                raise WorkflowError(f"{where}: inner node {index} has widget {input_name!r} turned into an input; "
                                    "that is not supported: open the workflow in the editor, which turns group "
                                    "nodes into subgraphs, and save it again")
            new = config_name(n, input_name)
            spec = list(spec) if isinstance(spec, (list, tuple)) else [spec]
            options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if input_name in _SEED_NAMES:
                options[CONTROL_AFTER_GENERATE] = True
            group_widgets[new] = [spec[0], options]
            widget_names[(index, input_name)] = new
        for i, input_name in enumerate(slots):
            slot_index = next((k for k, s in enumerate(saved) if s.get("name") == input_name), i)
            if slot_index in links_to.get(index, {}):
                continue  # fed inside the group
            sockets.append((config_name(n, input_name), index, input_name))
        for output_id in range(len(node_def.get("output") or [])):
            if output_id in links_from.get(index, {}) and (index, output_id) not in external:
                continue  # used inside the group only: hidden
            outputs.append((index, output_id))

    # GroupNodeHandler.convertToNodes: new ids, the group node's widget values copied in.
    layout = widget_layout({"input": {"required": group_widgets}})
    outer_values = node.get("widgets_values") if isinstance(node.get("widgets_values"), list) else []
    consumed: set[int] = set()
    new_ids = []
    sub_nodes = []
    for index, n in enumerate(inner):
        last += 1
        new_ids.append(last)
        node_def = object_info[n["type"]]
        values = n.get("widgets_values")
        named = dict(values) if isinstance(values, dict) else {
            wname: v for (wname, companion), v in zip(widget_layout(node_def), values or []) if not companion}
        for (owner, old), new in widget_names.items():
            if owner != index:
                continue
            position = next((k for k, (wname, companion) in enumerate(layout)
                             if wname == new and not companion and k not in consumed), None)
            if position is None:
                continue
            consumed.add(position)
            named[old] = outer_values[position] if position < len(outer_values) else _widget_default(node_def, old)
        sub_nodes.append({**n, "id": last, "widgets_values": named, "inputs": [], "outputs": []})
    last += 1
    instance_id = last

    # LGraph.convertToSubgraph: the inner nodes inside a subgraph, wired through its input/output slots.
    sub_links = []

    def add_link(origin: int, origin_slot: int, target: int, target_slot: int, target_name: str | None) -> int:
        link_id = len(sub_links) + 1
        sub_links.append({"id": link_id, "origin_id": origin, "origin_slot": origin_slot, "target_id": target,
                          "target_slot": target_slot, "type": "*"})
        if target_name is not None:
            sub_nodes[[x["id"] for x in sub_nodes].index(target)]["inputs"].append({"name": target_name, "link": link_id})
        return link_id

    for link in internal:
        target_index, target_slot = link[2], link[3]
        saved = [i for i in inner[target_index].get("inputs") or [] if isinstance(i, dict)]
        target_name = saved[target_slot].get("name") if target_slot < len(saved) else None
        add_link(new_ids[link[0]], link[1], new_ids[target_index], target_slot, target_name)
    sub_inputs = []
    for k, (group_name, index, input_name) in enumerate(sockets):
        link_id = add_link(int(SUBGRAPH_INPUT_ID), k, new_ids[index], 0, input_name)
        sub_inputs.append({"name": group_name, "linkIds": [link_id]})
    sub_outputs = []
    for j, (index, output_id) in enumerate(outputs):
        link_id = add_link(new_ids[index], output_id, int(SUBGRAPH_OUTPUT_ID), j, None)
        sub_outputs.append({"name": f"output {j}", "linkIds": [link_id]})
    saved_links = {i.get("name"): i.get("link") for i in node.get("inputs") or [] if isinstance(i, dict)}
    sub_id = f"groupnode:{name}:{instance_id}"
    sub = {"id": sub_id, "name": name, "nodes": sub_nodes, "links": sub_links, "inputs": sub_inputs,
           "outputs": sub_outputs}
    instance = {"id": instance_id, "type": sub_id, "mode": MODE_ALWAYS, "title": node.get("title") or name,
                "inputs": [{"name": g, "link": saved_links.get(g)} for g, _i, _n in sockets],
                "outputs": [], "properties": {}, "widgets_values": []}
    return sub, instance, last
