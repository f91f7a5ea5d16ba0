"""Prompt validation before anything loads, with ComfyUI's error shapes.

:func:`validate_prompt` returns ``(ok, error, node_errors, outputs_to_execute)``:

* ``error`` — ``None`` or ``{"type", "message", "details", "extra_info"}`` with type
  ``invalid_prompt``, ``missing_node_type``, ``prompt_no_outputs`` or
  ``prompt_outputs_failed_validation``;
* ``node_errors`` — ``{node_id: {"errors": [...], "dependent_outputs": [...], "class_type"}}``,
  each error ``{"type", "message", "details", "extra_info": {"input_name", "input_config",
  "received_value", ...}}``;
* ``outputs_to_execute`` — the output node ids that passed (ComfyUI runs those and reports the
  rest in ``node_errors``; ``ok`` is False only when none passed).

Messages, types and the rules (``*`` matches anything, comma-separated types are unions, literal
coercion with ``int()``/``float()``/``str()``, min/max and combo checks skipped for inputs that
``VALIDATE_INPUTS`` takes over) follow ComfyUI ``execution.py`` ``validate_inputs`` /
``validate_prompt`` and ``comfy_execution/validation.py``. Deliberate differences, all in the
direction of reporting more and crashing less: every error of every node is collected at once;
dangling links and bad output indices are ``bad_linked_input`` (ComfyUI raises); cycles are
``dependency_cycle`` on each node of the cycle (ComfyUI only finds them while running); all
unknown node types are listed (ComfyUI stops at the first); BOOLEAN accepts the strings
``"true"``/``"false"`` and rejects other strings (ComfyUI's ``bool("false")`` is True); a JSON
``null`` literal is ``invalid_input_type`` (ComfyUI would turn it into the string ``"None"``); an
unknown combo value's details add the closest choices and, where the node class has
``EXPLAIN_CHOICE(input_name, value)``, where the value was looked for (e.g. the models folder); an
INT option ``multiple_of`` (ignored by ComfyUI) is checked as ``value_not_multiple``, on that input
only.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import traceback
from typing import Any, Iterable, Mapping

from .limits import DEFAULT_LIMITS, Limits
from .nodeinfo import iter_input_specs, to_json_value
from .workflow import _WIDGET_TYPES as WIDGET_TYPES
from .workflow import is_link

__all__ = [
    "coerce_literal",
    "full_type_name",
    "is_link",
    "types_compatible",
    "validate_prompt",
]

log = logging.getLogger(__name__)


def full_type_name(cls: type) -> str:
    """``module.QualName`` (builtins without module), as ComfyUI reports exception types."""
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def types_compatible(received: Any, expected: Any) -> bool:
    """Whether an output of type ``received`` may feed an input of type ``expected``."""
    if received == expected:
        return True
    if received == "*" or expected == "*":
        return True
    if isinstance(expected, list):  # combo input: fed by a combo output or a generic one
        return received in ("COMBO", "STRING") or isinstance(received, list)
    if isinstance(received, list) and expected == "COMBO":
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return "*" in got or "*" in want or bool(got & want)


def coerce_literal(input_type: Any, value: Any) -> Any:
    """A widget literal converted to its declared type (raises ``ValueError``/``TypeError``)."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if input_type == "INT":
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return int(value)
    if input_type == "FLOAT":
        return float(value)
    if input_type == "STRING":
        return str(value)
    if input_type == "BOOLEAN":
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "false"):
                return lowered == "true"
            raise ValueError(f"{value!r} is not a boolean (true/false)")
        return bool(value)
    return value


def _error(etype: str, message: str, details: str, **extra_info: Any) -> dict:
    return {"type": etype, "message": message, "details": details, "extra_info": extra_info}


def _input_config(input_type: Any, options: dict) -> list:
    return to_json_value([input_type, options])


def _function_args(fn: Any) -> tuple[list[str], bool]:
    try:
        spec = inspect.getfullargspec(fn)
    except TypeError:
        return [], True
    return spec.args, spec.varkw is not None


class _Validator:
    def __init__(self, prompt: Mapping[str, dict], node_classes: Mapping[str, type], limits: Limits):
        self.prompt = prompt
        self.classes = node_classes
        self.limits = limits
        self.results: dict[str, tuple[bool, list[dict]]] = {}
        self.cycle_errors: dict[str, list[dict]] = {}

    # -- cycles -------------------------------------------------------------------------------

    def find_cycles(self, roots: Iterable[str]) -> None:
        """Mark each input that closes a link cycle (reachable from ``roots``) with ``dependency_cycle``.

        Strongly connected components (Tarjan, iterative); a component with more than one node, or
        a node linked to itself, is a cycle.
        """
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        on_stack: set[str] = set()
        stack: list[str] = []
        components: list[list[str]] = []

        def deps(nid: str) -> list[str]:
            return [v[0] for v in (self.prompt[nid].get("inputs") or {}).values()
                    if is_link(v) and v[0] in self.prompt]

        for root in roots:
            if root in index:
                continue
            work = [(root, iter(deps(root)))]
            index[root] = low[root] = len(index)
            stack.append(root)
            on_stack.add(root)
            while work:
                nid, children = work[-1]
                child = next(children, None)
                if child is not None:
                    if child not in index:
                        index[child] = low[child] = len(index)
                        stack.append(child)
                        on_stack.add(child)
                        work.append((child, iter(deps(child))))
                    elif child in on_stack:
                        low[nid] = min(low[nid], index[child])
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[nid])
                if low[nid] == index[nid]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == nid:
                            break
                    components.append(component)

        for component in components:
            members = set(component)
            if len(component) == 1 and component[0] not in deps(component[0]):
                continue
            path = " -> ".join(f"#{m}" for m in sorted(members, key=_natural))
            for member in component:
                for name, value in (self.prompt[member].get("inputs") or {}).items():
                    if is_link(value) and value[0] in members:
                        self.cycle_errors.setdefault(member, []).append(_error(
                            "dependency_cycle", "Dependency cycle detected",
                            f"{name}: node #{member} depends on itself (cycle through {path})",
                            input_name=name, input_config=None, received_value=value,
                        ))

    # -- one node -----------------------------------------------------------------------------

    def validate_node(self, node_id: str) -> tuple[bool, list[dict]]:
        if node_id in self.results:
            return self.results[node_id]
        self.results[node_id] = (False, [])  # provisional: guards against cycles
        node = self.prompt[node_id]
        cls = self.classes[node["class_type"]]
        inputs = node.get("inputs") or {}
        errors: list[dict] = list(self.cycle_errors.get(node_id, []))
        upstream_ok = True
        try:
            input_types = cls.INPUT_TYPES()
            validate_fn = getattr(cls, "VALIDATE_INPUTS", None)
            fn_args, fn_kwargs = _function_args(validate_fn) if validate_fn is not None else ([], False)
            received_types: dict[str, Any] = {}
            for category, name, input_type, options in iter_input_specs(input_types):
                if category == "hidden":
                    continue
                info = _input_config(input_type, options)
                if name not in inputs:
                    if category == "required":
                        errors.append(_error("required_input_missing", "Required input is missing", name,
                                             input_name=name))
                    continue
                value = inputs[name]
                if isinstance(value, list):  # a link (literal lists arrive as {"__value__": [...]})
                    ok = self._check_link(node_id, name, value, input_type, info, fn_args, errors, received_types)
                    upstream_ok = upstream_ok and ok
                    continue
                self._check_literal(cls, name, value, input_type, options, info, fn_args, fn_kwargs, errors)
            self._check_latent_budget(node_id, cls, inputs, errors)
            if validate_fn is not None and (fn_args or fn_kwargs):
                self._custom_validation(node_id, cls, validate_fn, input_types, inputs, fn_args, fn_kwargs,
                                        received_types, errors)
        except Exception as ex:  # a broken INPUT_TYPES / VALIDATE_INPUTS must not crash validation
            errors.append(_error(
                "exception_during_validation", "Exception when validating node", str(ex),
                exception_type=full_type_name(type(ex)), traceback=traceback.format_tb(ex.__traceback__),
            ))
        result = (not errors and upstream_ok, errors)
        self.results[node_id] = result
        return result

    def _check_link(self, node_id, name, value, input_type, info, fn_args, errors, received_types) -> bool:
        if not is_link(value):
            errors.append(_error(
                "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name, input_name=name, input_config=info, received_value=value,
            ))
            return True
        src_id, slot = value
        src = self.prompt.get(src_id)
        if src is None:
            errors.append(_error(
                "bad_linked_input", "Bad linked input, the linked node does not exist",
                f"{name}: node #{src_id} is not in the prompt", input_name=name, input_config=info,
                received_value=value,
            ))
            return True
        src_cls = self.classes.get(src.get("class_type"))
        if src_cls is None:
            return False  # reported as missing_node_type already
        return_types = getattr(src_cls, "RETURN_TYPES", ())
        if not 0 <= slot < len(return_types):
            errors.append(_error(
                "bad_linked_input", "Bad linked input, the linked node has no such output",
                f"{name}: node #{src_id} ({src['class_type']}) has {len(return_types)} output(s), "
                f"link asks for output {slot}",
                input_name=name, input_config=info, received_value=value,
            ))
            return True
        received = return_types[slot]
        received_types[name] = received
        if "input_types" not in fn_args and not types_compatible(received, input_type):
            errors.append(_error(
                "return_type_mismatch", "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({input_type})",
                input_name=name, input_config=info, received_type=received, linked_node=value,
            ))
            return True
        ok, _ = self.validate_node(src_id)  # a cycle ends at the provisional result of validate_node
        return ok

    def _check_literal(self, cls, name, value, input_type, options, info, fn_args, fn_kwargs, errors) -> None:
        if isinstance(input_type, str) and input_type not in WIDGET_TYPES and input_type != "*":
            # a socket (SDXL_CLIP, LATENT…) takes a link only: a literal would reach the node as a bogus object
            errors.append(_error(
                "invalid_input_type", f"Input must be connected to a {input_type} output",
                f"{name}: got the value {_shown(str(value))[:60]!r} instead of a link [node_id, output_index]",
                input_name=name, input_config=info, received_value=_shown(value),
            ))
            return
        if value is None or (isinstance(value, dict) and value.get("__value__", 0) is None):
            errors.append(_error(
                "invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                f"{name}: null is not a value; give a {input_type if isinstance(input_type, str) else 'choice'}",
                input_name=name, input_config=info, received_value=None, exception_message="null value",
            ))
            return
        try:
            value = coerce_literal(input_type, value)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{value} is not a finite number")
        except (ValueError, TypeError, OverflowError) as ex:
            errors.append(_error(
                "invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                f"{name}, {_shown(str(value))[:60]}, {ex}", input_name=name, input_config=info, received_value=_shown(value),
                exception_message=str(ex),
            ))
            return
        if isinstance(value, str) and self._check_text(name, value, info, errors):
            return
        if name in fn_args or fn_kwargs:
            return  # VALIDATE_INPUTS takes over range and list checks for this input
        if "min" in options and _comparable(value) and value < options["min"]:
            errors.append(_error(
                "value_smaller_than_min", f"Value {value} smaller than min of {options['min']}", name,
                input_name=name, input_config=info, received_value=value,
            ))
            return
        if "max" in options and _comparable(value) and value > options["max"]:
            errors.append(_error(
                "value_bigger_than_max", f"Value {value} bigger than max of {options['max']}", name,
                input_name=name, input_config=info, received_value=value,
            ))
            return
        multiple = options.get("multiple_of")
        if input_type == "INT" and isinstance(multiple, int) and multiple > 1 and value % multiple:
            errors.append(_error(
                "value_not_multiple", f"Value {value} not a multiple of {multiple}",
                f"{name}: try {value - value % multiple} or {value - value % multiple + multiple}",
                input_name=name, input_config=info, received_value=value,
            ))
            return
        if isinstance(input_type, list) or input_type == "COMBO":
            choices = input_type if isinstance(input_type, list) else options.get("options", [])
            if value not in choices:
                big = len(choices) > 20
                list_info = f"(list of length {len(choices)})" if big else str(choices)
                details = f"{name}: '{value}' not in {list_info}"
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.6)
                if close:
                    details += f"; did you mean {' or '.join(repr(c) for c in close)}?"
                explain = getattr(cls, "EXPLAIN_CHOICE", None)
                if explain is not None:
                    try:
                        hint = explain(name, value)
                    except Exception:  # a broken hook must not hide the validation error itself
                        log.exception("EXPLAIN_CHOICE of %s failed", getattr(cls, "__name__", cls))
                        hint = None
                    if hint:
                        details += f". {hint}"
                errors.append(_error(
                    "value_not_in_list", "Value not in list", details,
                    input_name=name, input_config=None if big else info, received_value=value,
                ))

    def _check_text(self, name: str, value: str, info, errors) -> bool:
        """Length limit and valid Unicode for a text literal; True when an error was added."""
        limit_name = "filename_prefix_chars" if name == "filename_prefix" else "prompt_chars"
        limit = getattr(self.limits, limit_name)
        if len(value) > limit:
            errors.append(_error(
                "limit_exceeded", f"Text longer than the limit {limit_name} ({limit} characters)",
                f"{name}: {len(value)} characters", input_name=name, input_config=info,
                received_value=_shown(value[:60]) + "…", limit=limit_name,
            ))
            return True
        if _has_surrogate(value):
            lone = next(i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff")
            errors.append(_error(
                "invalid_input_type", "Text is not valid Unicode",
                f"{name}: a lone surrogate U+{ord(value[lone]):04X} at character {lone} (a \\u escape in the JSON "
                "without its pair); retype that character", input_name=name, input_config=info,
                received_value=_shown(value[:60]),
            ))
            return True
        return False

    def _check_latent_budget(self, node_id: str, cls, inputs: Mapping, errors: list) -> None:
        """``latent_pixels``: a node that makes a LATENT from literal width/height(/batch_size) (EmptyLatent
        and its kin) may not ask for more than width × height × batch_size pixels."""
        if "LATENT" not in (getattr(cls, "RETURN_TYPES", ()) or ()):
            return
        sizes = [inputs.get(k, 1 if k == "batch_size" else None) for k in ("width", "height", "batch_size")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            return  # linked or invalid: reported elsewhere or checked by the node
        width, height, batch = sizes
        limit = self.limits.latent_pixels
        if width * height * batch > limit:
            errors.append(_error(
                "limit_exceeded", f"Latent larger than the limit latent_pixels ({limit:,} pixels)",
                f"width × height × batch_size = {width} × {height} × {batch} = {width * height * batch:,} pixels; "
                "make the image or the batch smaller", input_name="width", input_config=None,
                received_value=width, limit="latent_pixels",
            ))

    def _custom_validation(self, node_id, cls, validate_fn, input_types, inputs, fn_args, fn_kwargs,
                           received_types, errors) -> None:
        kwargs: dict[str, Any] = {}
        for category, name, input_type, _options in iter_input_specs(input_types):
            if category == "hidden":
                if name in fn_args and input_type == "UNIQUE_ID":
                    kwargs[name] = node_id
                continue
            if name not in inputs or not (name in fn_args or fn_kwargs):
                continue
            value = inputs[name]
            if isinstance(value, list):
                kwargs[name] = None  # linked: not known before execution (ComfyUI passes None too)
            else:
                try:
                    kwargs[name] = coerce_literal(input_type, value)
                except (ValueError, TypeError, OverflowError):
                    kwargs[name] = value
        if "input_types" in fn_args:
            kwargs["input_types"] = received_types
        try:
            result = validate_fn(**kwargs)
        except Exception as ex:
            errors.append(_error(
                "exception_during_validation", "Exception when validating node", str(ex),
                exception_type=full_type_name(type(ex)), traceback=traceback.format_tb(ex.__traceback__),
            ))
            return
        if result is True:
            return
        for name in kwargs:
            details = name if result is False else f"{name} - {result}"
            errors.append(_error("custom_validation_failed", "Custom validation failed for node", details,
                                 input_name=name))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(value: Any) -> Any:
    """A received value as the error may echo it: long text cut, lone surrogates escaped (JSON-safe)."""
    if isinstance(value, str):
        return value[:200].encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _comparable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _natural(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def validate_prompt(
    prompt: Any,
    node_classes: Mapping[str, type],
    partial_execution_targets: Iterable[str] | None = None,
    *,
    limits: Limits | None = None,
) -> tuple[bool, dict | None, dict[str, dict], list[str]]:
    """Validate an API prompt; see the module docstring for the returned shapes.

    ``partial_execution_targets`` restricts the outputs to those ids (the editor's "run selected
    outputs"). Nothing is executed and no node function is called except ``INPUT_TYPES`` and
    ``VALIDATE_INPUTS``. ``limits`` (default :data:`.limits.DEFAULT_LIMITS`) bounds text widgets
    (``prompt_chars``, ``filename_prefix_chars``) and the latent a width/height/batch_size node makes
    (``latent_pixels``); a value over one is a ``limit_exceeded`` error that names it.
    """
    # 1. Structure and node types.
    if not isinstance(prompt, Mapping):
        return False, _error("invalid_prompt", "Prompt must be an object of nodes",
                                 f"got {type(prompt).__name__}"), {}, []
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or "class_type" not in node:
            return False, _error(
                "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'"), {}, []
        if not isinstance(node["class_type"], str):
            return False, _error(
                "invalid_prompt", "Node class_type must be a string (a node type such as 'SDXLVAEDecode')",
                f"Node ID '#{node_id}': got {type(node['class_type']).__name__} {str(node['class_type'])[:60]}"), {}, []
        if not isinstance(node.get("inputs", {}), Mapping):
            return False, _error("invalid_prompt", "Node inputs must be an object",
                                     f"Node ID '#{node_id}'"), {}, []
        if not isinstance(node.get("_meta", {}), Mapping):
            return False, _error("invalid_prompt", "Node _meta must be an object such as {\"title\": \"...\"}",
                                 f"Node ID '#{node_id}': got {type(node['_meta']).__name__}"), {}, []
    missing = [(nid, n["class_type"]) for nid, n in prompt.items() if n["class_type"] not in node_classes]
    if missing:
        node_errors = {}
        for nid, ctype in missing:
            title = (prompt[nid].get("_meta") or {}).get("title", ctype)
            node_errors[nid] = {
                "errors": [_error("missing_node_type",
                                  f"Node '{ctype}' not found. The custom node may not be installed.",
                                  f"Node ID '#{nid}'", node_id=nid, class_type=ctype, node_title=title)],
                "dependent_outputs": [],
                "class_type": ctype,
            }
        nid, ctype = missing[0]
        types = sorted({c for _, c in missing})
        error = _error(
            "missing_node_type",
            f"Node '{ctype}' not found. The custom node may not be installed." if len(types) == 1 else
            f"Nodes not found: {', '.join(types)}. The custom nodes may not be installed.",
            "; ".join(f"Node ID '#{i}': {c}" for i, c in missing),
            node_id=nid, class_type=ctype, node_title=(prompt[nid].get("_meta") or {}).get("title", ctype),
        )
        return False, error, node_errors, []

    # 2. Output nodes.
    targets = None if partial_execution_targets is None else {str(t) for t in partial_execution_targets}
    outputs = [
        nid for nid, n in prompt.items()
        if getattr(node_classes[n["class_type"]], "OUTPUT_NODE", False) is True
        and (targets is None or nid in targets)
    ]
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), {}, []

    # 3. Every node reachable from an output; all errors collected.
    validator = _Validator(prompt, node_classes, limits or DEFAULT_LIMITS)
    validator.find_cycles(outputs)
    good: list[str] = []
    node_errors: dict[str, dict] = {}
    for out in outputs:
        ok, _ = validator.validate_node(out)
        if ok:
            good.append(out)
            continue
        for nid in _upstream(prompt, out):
            valid, reasons = validator.results.get(nid, (True, []))
            if valid or not reasons:
                continue  # nodes downstream of an error are invalid but carry no errors of their own
            entry = node_errors.setdefault(nid, {"errors": reasons, "dependent_outputs": [],
                                                 "class_type": prompt[nid]["class_type"]})
            entry["dependent_outputs"].append(out)
        log.warning("output node %s (%s) failed validation and will not run", out, prompt[out]["class_type"])
    if not good:
        return False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", ""), node_errors, []
    return True, None, node_errors, good


def _upstream(prompt: Mapping[str, dict], root: str) -> list[str]:
    """``root`` and every node it depends on through links, in DFS order."""
    seen: list[str] = []
    todo = [root]
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.append(nid)
        for value in (prompt[nid].get("inputs") or {}).values():
            if is_link(value):
                todo.append(value[0])
    return seen



def unsupported_nodes(prompt: Mapping, node_classes: Mapping[str, type]) -> dict[str, list[str]]:
    """``{class_type: [node ids]}`` of the prompt's nodes whose type is not in ``node_classes`` (sorted)."""
    out: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        ctype = node.get("class_type") if isinstance(node, Mapping) else None
        if isinstance(ctype, str) and ctype not in node_classes:  # a malformed entry is the validator's to report
            out.setdefault(str(ctype), []).append(str(node_id))
    return {t: sorted(ids, key=lambda i: (len(i), i)) for t, ids in sorted(out.items())}


def unsupported_message(source: str, prompt: Mapping, node_classes: Mapping[str, type]) -> str | None:
    """One message naming every node (id and type) this runner cannot run, and what it can; None if all can."""
    if any(not isinstance(n, Mapping) or not isinstance(n.get("class_type"), str) for n in prompt.values()):
        return None  # a malformed prompt: the validator reports it all, unknown types included
    missing = unsupported_nodes(prompt, node_classes)
    if not missing:
        return None
    listing = "; ".join(f"{t} (node {', '.join(ids)})" for t, ids in missing.items())
    supported = [str(i) for i, n in prompt.items()
                 if isinstance(n, Mapping) and isinstance(n.get("class_type"), str) and n["class_type"] in node_classes]
    have = f"the other {len(supported)} node(s) ({', '.join(supported)}) are supported" if supported else \
        "none of its nodes are supported"
    return (f"{source}: {sum(map(len, missing.values()))} node(s) use types not available here: {listing}; {have}. "
            "sdxl-nodes runs its own SDXL nodes and ComfyUI's core SDXL nodes (see NODES.md); nodes from other "
            "packs (ControlNet, IPAdapter, custom nodes) must be removed or replaced. Nothing was run.")
