"""Prompt execution: order, caching, progress events and interrupt.

:class:`Executor` runs an API prompt (validated by :func:`.validate.validate_prompt`) through V1
node classes and reports what happens through ``on_event(name, data)`` with ComfyUI's websocket
message names and payloads (``../shared/frontend/API.md`` §5.2; ComfyUI ``execution.py`` and
``comfy_execution/progress.py``). Per run the sequence is::

    execution_start {prompt_id, timestamp}
    execution_cached {nodes, prompt_id, timestamp}
    per node, in dependency order:
      cached output node: executed (replayed UI output) ; progress_state (finished)
      otherwise:          progress_state (running) ; executing {node, display_node, prompt_id}
                          [preview ; progress {value, max, prompt_id, node} ; progress_state]*
                          executed {node, display_node, output, prompt_id} (nodes with UI output)
                          progress_state (finished | error)
    execution_success | execution_error | execution_interrupted   (each with a timestamp)

``progress_state`` is ``{"prompt_id", "nodes": {id: {"value", "max", "state", "node_id",
"prompt_id", "display_node_id", "parent_node_id", "real_node_id"}}}`` with every non-pending node.
``preview`` is our pseudo-event for the server's binary type-4 frame: ``{"node_id", "prompt_id",
"display_node_id", "parent_node_id", "real_node_id", "image_type", "image"}`` — everything but
``image`` (the encoded bytes) is the frame's JSON metadata. The server adds ``status`` and the
final ``executing {"node": null}`` itself.

Caching is ComfyUI's classic cache: a node's outputs are stored under a signature of its class,
its literal inputs, the signatures of the nodes feeding it and its ``IS_CHANGED`` value; entries
whose signature no longer occurs in the latest prompt are dropped, so the cache holds at most one
prompt's worth of outputs. Changing a seed therefore re-runs the sampler and what follows it only.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import io
import json
import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .nodeinfo import iter_input_specs
from .validate import coerce_literal, full_type_name, is_link

__all__ = ["ExecutionResult", "Executor", "Interrupted", "ProgressReporter", "PROGRESS_HIDDEN_TYPE"]

log = logging.getLogger(__name__)

PROGRESS_HIDDEN_TYPE = "SDXL_PROGRESS"
"""Hidden input type through which a node receives its :class:`ProgressReporter`."""

EventCallback = Callable[[str, dict], None]


class Interrupted(Exception):
    """Raised inside a running node (by its :class:`ProgressReporter`) after an interrupt request."""


class _PlanError(Exception):
    def __init__(self, node_id: str | None, node_type: str | None, message: str, exception_type: str):
        super().__init__(message)
        self.node_id, self.node_type, self.exception_type = node_id, node_type, exception_type


@dataclass
class _CacheEntry:
    outputs: tuple
    ui: dict | None


@dataclass
class ExecutionResult:
    """What one :meth:`Executor.execute` call did.

    ``status`` is ``"success"``, ``"error"`` or ``"interrupted"``; ``outputs`` maps output node
    ids to their UI output (``{"images": [...]}``; replayed ones included); ``executed`` lists the
    nodes that ran, ``cached`` those found in the cache; ``error`` is the ``execution_error`` or
    ``execution_interrupted`` payload; ``messages`` the ``(event, data)`` status messages as in
    ComfyUI's history (``execution_start``, ``execution_cached`` and the final one); ``meta``
    the per-node ids history entries carry.
    """

    prompt_id: str
    status: str
    outputs: dict[str, dict] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: dict | None = None
    messages: list[tuple[str, dict]] = field(default_factory=list)
    meta: dict[str, dict] = field(default_factory=dict)
    exception: BaseException | None = None
    """The exception a failed node raised, without its traceback (callers tell user errors from bugs
    by its type; the formatted traceback is in ``error``)."""

    @property
    def success(self) -> bool:
        return self.status == "success"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _format_value(x: Any) -> Any:
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


def _encode_preview(preview: Any) -> tuple[str, bytes]:
    """``(mime, bytes)`` for a PIL image (JPEG) or an already encoded ``(mime, bytes)`` pair."""
    if isinstance(preview, tuple) and len(preview) == 2 and isinstance(preview[1], (bytes, bytearray)):
        return str(preview[0]), bytes(preview[1])
    image = preview
    if getattr(image, "mode", "RGB") not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return "image/jpeg", buf.getvalue()


class ProgressReporter:
    """Handed to a node through a hidden input of type ``SDXL_PROGRESS``.

    ``progress(value, total, preview=None)`` reports a step (``preview``: a PIL image, or a
    ``(mime, bytes)`` pair) and raises :class:`Interrupted` when an interrupt was requested, as
    does ``check_interrupted()``; ``interrupted`` tells without raising.
    """

    def __init__(self, run: "_Run", node_id: str):
        self._run = run
        self.node_id = node_id
        self.prompt_id = run.prompt_id

    @property
    def interrupted(self) -> bool:
        return self._run.executor._interrupt.is_set()

    @property
    def preview_method(self) -> str:
        """The prompt's ``extra_data["preview_method"]`` (the editor's setting): "none" turns previews off."""
        return str(self._run.extra_data.get("preview_method") or "default")

    def check_interrupted(self) -> None:
        if self.interrupted:
            raise Interrupted(f"interrupted while running node {self.node_id}")

    def progress(self, value: float, total: float, preview: Any = None) -> None:
        self.check_interrupted()
        self._run.report_progress(self.node_id, value, total, preview)


class Executor:
    """Runs API prompts through a ``{class_type: NodeClass}`` mapping; keeps a cache between runs.

    One prompt runs at a time (concurrent calls wait). ``interrupt()`` may be called from any
    thread. Every prompt runs in (a copy of) the ``contextvars`` context the executor was created
    in, so what its creator set there (the nodes' environment: folders, model manager) reaches the
    nodes on whatever thread ``execute`` is called from; nothing is passed through module globals. Node exceptions never escape ``execute``: they become an ``execution_error`` event and
    a result with ``status == "error"``; the executor stays usable.
    """

    def __init__(self, node_classes: Mapping[str, type], *, on_event: EventCallback | None = None):
        self.node_classes = node_classes
        self.on_event = on_event
        self._interrupt = threading.Event()
        self._run_lock = threading.Lock()
        self._cache: dict[str, _CacheEntry] = {}
        self._context = contextvars.copy_context()

    def interrupt(self) -> None:
        """Ask the running prompt to stop at its next check (between nodes, or a reporter call)."""
        self._interrupt.set()

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def execute(
        self,
        prompt: Mapping[str, dict],
        prompt_id: str,
        *,
        extra_data: Mapping[str, Any] | None = None,
        outputs: Iterable[str] | None = None,
    ) -> ExecutionResult:
        """Run the nodes that ``outputs`` (default: every output node of the prompt) need.

        ``extra_data`` is the ``POST /api/prompt`` field; ``extra_data["extra_pnginfo"]`` is what
        ``EXTRA_PNGINFO`` hidden inputs receive.
        """
        with self._run_lock:
            self._interrupt.clear()
            run = _Run(self, prompt, str(prompt_id), dict(extra_data or {}))
            targets = None if outputs is None else [str(o) for o in outputs]
            return self._context.copy().run(run.execute, targets)

    def execute_batch(
        self,
        prompts: list[Mapping[str, dict]],
        prompt_id: str,
        *,
        extra_datas: list[Mapping[str, Any] | None] | None = None,
    ) -> list[ExecutionResult]:
        """Run several prompts of the same graph (only literal inputs differ: seeds, prompt texts) as one
        execution, one :class:`ExecutionResult` each, as if each ran alone through :meth:`execute`.

        Each node runs once per distinct signature among the prompts (a loader or an unchanged text encoder
        once for all, a text encoder once per distinct text), with each prompt's own hidden inputs; a node
        class with ``BATCH_FUNCTION`` (a method taking the list of the calls' keyword arguments and returning
        each call's return value) gets all its distinct calls at once, so a sampler can put several jobs in
        one UNet batch. Outputs are cached under each prompt's signatures, as separate runs would. Events are
        those of one run (``prompt_id``), ``executed`` once per prompt's output node. A node that fails (or an
        interrupt) ends every prompt of the batch with that error.
        """
        extra_datas = list(extra_datas) if extra_datas is not None else [None] * len(prompts)
        if len(extra_datas) != len(prompts) or not prompts:
            raise ValueError(f"execute_batch: {len(prompts)} prompts and {len(extra_datas)} extra_data")
        with self._run_lock:
            self._interrupt.clear()
            batch = _BatchRun(self, prompts, str(prompt_id), extra_datas)
            return self._context.copy().run(batch.execute)


class _Run:
    """State of one execution."""

    def __init__(self, executor: Executor, prompt: Mapping[str, dict], prompt_id: str, extra_data: dict):
        self.executor = executor
        self.classes = executor.node_classes
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.result = ExecutionResult(prompt_id, "success")
        self.states: dict[str, dict] = {}
        self.signatures: dict[str, str] = {}
        self.values: dict[str, tuple] = {}
        self._signing: set[str] = set()
        self.input_types: dict[str, dict] = {}

    # -- events -------------------------------------------------------------------------------

    def emit(self, name: str, data: dict, *, status_message: bool = False) -> None:
        if status_message:
            data = {**data, "timestamp": _now_ms()}
            self.result.messages.append((name, data))
        if self.executor.on_event is None:
            return
        try:
            self.executor.on_event(name, data)
        except Exception:  # noqa: BLE001 - a listener (websocket, progress bar) must never fail the prompt; logged
            log.exception("on_event handler failed for %s", name)

    def _ids(self, node_id: str) -> dict:
        return {"node_id": node_id, "prompt_id": self.prompt_id, "display_node_id": node_id,
                "parent_node_id": None, "real_node_id": node_id}

    def emit_progress_state(self) -> None:
        nodes = {nid: {**s, **self._ids(nid)} for nid, s in self.states.items()}
        self.emit("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes})

    def set_state(self, node_id: str, state: str, value: float | None = None, total: float | None = None) -> None:
        entry = self.states.setdefault(node_id, {"value": 0.0, "max": 1.0, "state": state})
        entry["state"] = state
        if total is not None:
            entry["max"] = total
        if value is not None:
            entry["value"] = value
        if state == "finished":
            entry["value"] = entry["max"]
        self.emit_progress_state()

    def report_progress(self, node_id: str, value: float, total: float, preview: Any) -> None:
        if preview is not None:
            try:
                mime, data = _encode_preview(preview)
            except Exception:  # noqa: BLE001 - a preview is optional; the step goes on, the error is logged
                log.exception("could not encode the preview of node %s", node_id)
            else:
                self.emit("preview", {**self._ids(node_id), "image_type": mime, "image": data})
        self.emit("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id})
        self.set_state(node_id, "running", value, total)

    # -- planning -----------------------------------------------------------------------------

    def node(self, node_id: str) -> tuple[dict, type]:
        node = self.prompt.get(node_id)
        if not isinstance(node, Mapping) or "class_type" not in node:
            raise _PlanError(node_id, None, f"node #{node_id} is not in the prompt or has no class_type",
                             "KeyError")
        cls = self.classes.get(node["class_type"])
        if cls is None:
            raise _PlanError(node_id, node["class_type"],
                             f"node type {node['class_type']!r} of node #{node_id} is not available", "KeyError")
        return node, cls

    def declared_inputs(self, node_id: str) -> Iterable[tuple[str, str, Any, dict]]:
        """Hidden inputs and the declared inputs the prompt sets (``INPUT_TYPES`` read once a run)."""
        node, cls = self.node(node_id)
        inputs = node.get("inputs") or {}
        if node["class_type"] not in self.input_types:
            self.input_types[node["class_type"]] = cls.INPUT_TYPES()
        for category, name, input_type, options in iter_input_specs(self.input_types[node["class_type"]]):
            if category == "hidden" or name in inputs:
                yield category, name, input_type, options

    def signature(self, node_id: str) -> str:
        if node_id in self.signatures:
            return self.signatures[node_id]
        if node_id in self._signing:
            node, _ = self.node(node_id)
            raise _PlanError(node_id, node["class_type"], "Dependency cycle detected", "graph.DependencyCycleError")
        self._signing.add(node_id)
        node, cls = self.node(node_id)
        inputs = node.get("inputs") or {}
        parts: list[Any] = [node["class_type"]]
        for category, name, input_type, _options in self.declared_inputs(node_id):
            if category == "hidden":
                continue
            value = inputs[name]
            if is_link(value):
                parts.append([name, "link", self.signature(value[0]), value[1]])
            else:
                parts.append([name, "value", self.literal(input_type, value)])
        parts.append(["is_changed", self.is_changed(node_id, cls)])
        text = json.dumps(parts, sort_keys=True, default=repr)
        sig = hashlib.sha256(text.encode()).hexdigest()
        self._signing.discard(node_id)
        self.signatures[node_id] = sig
        return sig

    @staticmethod
    def literal(input_type: Any, value: Any) -> Any:
        try:
            return coerce_literal(input_type, value)
        except (ValueError, TypeError, OverflowError):
            return value

    def is_changed(self, node_id: str, cls: type) -> Any:
        fn = getattr(cls, "IS_CHANGED", None)
        if fn is None:
            return None
        try:
            kwargs = self.call_kwargs(node_id, fn, links_as_none=True)
            value = fn(**kwargs)
        except Exception:  # noqa: BLE001 - a node pack's IS_CHANGED: on any error the node re-runs (ComfyUI too), logged
            log.warning("IS_CHANGED of node %s failed; it will run", node_id, exc_info=True)
            return f"unique:{time.monotonic_ns()}"
        if isinstance(value, float) and math.isnan(value):
            return f"unique:{time.monotonic_ns()}"  # NaN never equals itself: always re-run
        return value

    def call_kwargs(self, node_id: str, fn: Any, *, links_as_none: bool = False) -> dict:
        """Keyword arguments for a node function (or IS_CHANGED, with links as None)."""
        node, _ = self.node(node_id)
        inputs = node.get("inputs") or {}
        kwargs: dict[str, Any] = {}
        for category, name, input_type, _options in self.declared_inputs(node_id):
            if category == "hidden":
                hidden = input_type[0] if isinstance(input_type, (list, tuple)) and input_type else input_type
                if hidden == "PROMPT":
                    kwargs[name] = self.prompt
                elif hidden == "EXTRA_PNGINFO":
                    kwargs[name] = self.extra_data.get("extra_pnginfo")
                elif hidden == "UNIQUE_ID":
                    kwargs[name] = node_id
                elif hidden == PROGRESS_HIDDEN_TYPE and not links_as_none:
                    kwargs[name] = ProgressReporter(self, node_id)
                continue  # unknown hidden types are ignored, as ComfyUI does
            value = inputs[name]
            if is_link(value):
                kwargs[name] = None if links_as_none else self.values[value[0]][value[1]]
            else:
                kwargs[name] = self.literal(input_type, value)
        if links_as_none:  # IS_CHANGED may declare only some of the inputs
            try:
                spec = inspect.getfullargspec(fn)
            except TypeError:
                return kwargs
            if spec.varkw is None:
                kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
        return kwargs

    def plan(self, targets: list[str] | None, keep_also: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """``(cached node ids, execution order)``; also trims the cache to this prompt (and ``keep_also``)."""
        if targets is None:
            targets = []
            for nid in self.prompt:
                _, cls = self.node(nid)
                if getattr(cls, "OUTPUT_NODE", False) is True:
                    targets.append(nid)
        for nid in targets:
            self.node(nid)
        # Signatures of every node of the prompt decide what the cache keeps.
        keep = set()
        for nid in self.prompt:
            try:
                keep.add(self.signature(nid))
            except _PlanError:
                self._signing.clear()  # broken nodes matter only if needed; then they fail below
        keep.update(keep_also)
        cache = self.executor._cache
        for sig in [s for s in cache if s not in keep]:
            del cache[sig]
        cached = [nid for nid in self.prompt if self.signatures.get(nid) in cache]

        # Needed nodes: targets plus everything upstream that is not cached.
        needed: dict[str, set[str]] = {}  # node -> nodes it waits for
        todo = list(targets)
        while todo:
            nid = todo.pop()
            if nid in needed:
                continue
            node, _ = self.node(nid)
            waits: set[str] = set()
            needed[nid] = waits
            if self.signature(nid) in cache:  # raises for cycles / unknown types on the way
                continue  # a cached target only replays its UI output; its inputs are not needed
            for category, name, _t, _o in self.declared_inputs(nid):
                value = (node.get("inputs") or {}).get(name)
                if category == "hidden" or not is_link(value):
                    continue
                src = value[0]
                if self.signatures[src] in cache:
                    self.values[src] = cache[self.signatures[src]].outputs
                else:
                    waits.add(src)
                    todo.append(src)
        # Consumers of each node, for the "close to an output" preference.
        consumers: dict[str, set[str]] = {nid: set() for nid in needed}
        for nid, waits in needed.items():
            for src in waits:
                consumers[src].add(nid)
        is_output = {nid: nid in targets for nid in needed}
        position = {nid: i for i, nid in enumerate(self.prompt)}

        def priority(nid: str) -> tuple:
            feeds_output = any(is_output[c] for c in consumers[nid])
            return (not is_output[nid], not feeds_output, position.get(nid, 0))

        order: list[str] = []
        remaining = {nid: set(w) for nid, w in needed.items()}
        while remaining:
            ready = [nid for nid, w in remaining.items() if not w]
            if not ready:
                blamed = min(remaining, key=lambda n: position.get(n, 0))
                raise _PlanError(blamed, self.prompt[blamed]["class_type"], "Dependency cycle detected",
                                 "graph.DependencyCycleError")
            nid = min(ready, key=priority)
            order.append(nid)
            del remaining[nid]
            for w in remaining.values():
                w.discard(nid)
        return cached, order

    # -- running ------------------------------------------------------------------------------

    def execute(self, targets: list[str] | None) -> ExecutionResult:
        self.emit("execution_start", {"prompt_id": self.prompt_id}, status_message=True)
        try:
            cached, order = self.plan(targets)
        except _PlanError as e:
            self.emit("execution_cached", {"nodes": [], "prompt_id": self.prompt_id}, status_message=True)
            return self.fail(e.node_id, e.node_type, str(e), e.exception_type, [], {})
        except Exception as e:  # INPUT_TYPES / IS_CHANGED machinery broke
            self.emit("execution_cached", {"nodes": [], "prompt_id": self.prompt_id}, status_message=True)
            return self.fail(None, None, str(e), full_type_name(type(e)), traceback.format_tb(e.__traceback__), {})
        self.result.cached = cached
        self.emit("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id}, status_message=True)

        cache = self.executor._cache
        for nid in order:
            node, cls = self.node(nid)
            self.result.meta[nid] = {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
            entry = cache.get(self.signatures[nid])
            if entry is not None:  # a cached output node: replay its UI output
                self.values[nid] = entry.outputs
                if entry.ui:
                    self.result.outputs[nid] = entry.ui
                    self.emit("executed", {"node": nid, "display_node": nid, "output": entry.ui,
                                           "prompt_id": self.prompt_id})
                self.set_state(nid, "finished")
                continue
            if self.executor._interrupt.is_set():
                return self.interrupted(nid, node["class_type"])
            kwargs: dict[str, Any] = {}
            try:
                self.set_state(nid, "running", 0.0, 1.0)
                self.emit("executing", {"node": nid, "display_node": nid, "prompt_id": self.prompt_id})
                kwargs = self.call_kwargs(nid, None)
                outputs, ui = self.call_node(nid, cls, kwargs)
            except Interrupted:
                return self.interrupted(nid, node["class_type"])
            except Exception as e:
                log.info("node %s (%s) failed: %s", nid, node["class_type"], e)  # reported via execution_error
                log.debug("traceback of node %s", nid, exc_info=True)
                self.set_state(nid, "error")
                current = {k: [_format_value(v)] for k, v in kwargs.items()
                           if not isinstance(v, ProgressReporter)}
                tb = traceback.format_tb(e.__traceback__)
                self.result.exception = e.with_traceback(None)  # keep no frames (and their tensors) alive
                return self.fail(nid, node["class_type"], str(e), full_type_name(type(e)), tb, current)
            self.values[nid] = outputs
            cache[self.signatures[nid]] = _CacheEntry(outputs, ui)
            self.result.executed.append(nid)
            if ui:
                self.result.outputs[nid] = ui
                self.emit("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": self.prompt_id})
            self.set_state(nid, "finished")
        self.emit("execution_success", {"prompt_id": self.prompt_id}, status_message=True)
        return self.result

    @staticmethod
    def call_node(node_id: str, cls: type, kwargs: dict) -> tuple[tuple, dict | None]:
        function_name = getattr(cls, "FUNCTION", None)
        if not function_name:
            raise TypeError(f"node class {cls.__name__} has no FUNCTION")
        return _Run.outputs_of(node_id, cls, getattr(cls(), function_name)(**kwargs))

    @staticmethod
    def outputs_of(node_id: str, cls: type, returned: Any) -> tuple[tuple, dict | None]:
        """``(outputs, ui)`` of what a node function returned."""
        function_name = getattr(cls, "FUNCTION", None)
        ui = None
        if isinstance(returned, dict):
            ui = returned.get("ui")
            returned = returned.get("result", ())
        if returned is None:
            returned = ()
        if not isinstance(returned, (tuple, list)):
            raise TypeError(
                f"node #{node_id} ({cls.__name__}.{function_name}) returned {type(returned).__name__}; "
                "a node must return a tuple of outputs or {'ui': ..., 'result': (...)}"
            )
        return tuple(returned), ui

    def fail(self, node_id, node_type, message, exception_type, tb, current_inputs) -> ExecutionResult:
        payload = {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": node_type,
            "executed": list(self.result.executed),
            "exception_message": message,
            "exception_type": exception_type,
            "traceback": tb,
            "current_inputs": current_inputs,
            "current_outputs": list(self.result.cached),
        }
        self.emit("execution_error", payload, status_message=True)
        self.result.status = "error"
        self.result.error = self.result.messages[-1][1]
        return self.result

    def interrupted(self, node_id: str, node_type: str) -> ExecutionResult:
        log.info("prompt %s interrupted at node %s", self.prompt_id, node_id)
        payload = {"prompt_id": self.prompt_id, "node_id": node_id, "node_type": node_type,
                   "executed": list(self.result.executed)}
        self.emit("execution_interrupted", payload, status_message=True)
        self.result.status = "interrupted"
        self.result.error = self.result.messages[-1][1]
        return self.result


class _BatchRun:
    """State of one :meth:`Executor.execute_batch`: a :class:`_Run` per prompt, nodes run for all of them."""

    def __init__(self, executor: Executor, prompts, prompt_id: str, extra_datas):
        self.executor = executor
        self.runs = [_Run(executor, p, prompt_id, dict(e or {})) for p, e in zip(prompts, extra_datas)]
        self.lead = self.runs[0]  # emits the run's events

    def finish_all(self, result: ExecutionResult) -> list[ExecutionResult]:
        for run in self.runs[1:]:
            run.result.status, run.result.error, run.result.exception = result.status, result.error, result.exception
        return [run.result for run in self.runs]

    def order(self, orders: list[list[str]]) -> list[str]:
        """The union of the prompts' execution orders, dependencies first, else in first-seen order."""
        rank = {nid: i for i, nid in enumerate(dict.fromkeys(n for o in orders for n in o))}
        waits = {nid: {v[0] for v in (self.lead.prompt[nid].get("inputs") or {}).values() if is_link(v) and v[0] in rank}
                 for nid in rank}
        out: list[str] = []
        while waits:
            nid = min((n for n, w in waits.items() if not w), key=rank.__getitem__)
            out.append(nid)
            del waits[nid]
            for w in waits.values():
                w.discard(nid)
        return out

    def execute(self) -> list[ExecutionResult]:
        lead = self.lead
        lead.emit("execution_start", {"prompt_id": lead.prompt_id}, status_message=True)
        try:
            every = set()  # the cache keeps what any of the prompts uses
            for run in self.runs:
                for nid in run.prompt:
                    try:
                        every.add(run.signature(nid))
                    except _PlanError:
                        run._signing.clear()
            plans = [run.plan(None, keep_also=every) for run in self.runs]
        except _PlanError as e:
            lead.emit("execution_cached", {"nodes": [], "prompt_id": lead.prompt_id}, status_message=True)
            return self.finish_all(lead.fail(e.node_id, e.node_type, str(e), e.exception_type, [], {}))
        except Exception as e:  # INPUT_TYPES / IS_CHANGED machinery broke
            lead.emit("execution_cached", {"nodes": [], "prompt_id": lead.prompt_id}, status_message=True)
            return self.finish_all(lead.fail(None, None, str(e), full_type_name(type(e)),
                                             traceback.format_tb(e.__traceback__), {}))
        for run, (cached, _order) in zip(self.runs, plans):
            run.result.cached = cached
        lead.emit("execution_cached", {"nodes": plans[0][0], "prompt_id": lead.prompt_id}, status_message=True)

        cache = self.executor._cache
        needs = [set(order) for _cached, order in plans]
        for nid in self.order([order for _cached, order in plans]):
            node, cls = lead.node(nid)
            pending: dict[str, list[_Run]] = {}  # signature -> the prompts that need it run
            for run, needed in zip(self.runs, needs):
                if nid not in needed:
                    continue
                run.result.meta[nid] = {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                entry = cache.get(run.signatures[nid])
                if entry is not None:  # cached (an output node replays its UI output)
                    run.values[nid] = entry.outputs
                    if entry.ui:
                        run.result.outputs[nid] = entry.ui
                        run.emit("executed", {"node": nid, "display_node": nid, "output": entry.ui,
                                              "prompt_id": run.prompt_id})
                    continue
                pending.setdefault(run.signatures[nid], []).append(run)
            if not pending:
                continue
            if self.executor._interrupt.is_set():
                return self.finish_all(lead.interrupted(nid, node["class_type"]))
            heads = [runs[0] for runs in pending.values()]
            calls: list[dict] = []
            try:
                lead.set_state(nid, "running", 0.0, 1.0)
                lead.emit("executing", {"node": nid, "display_node": nid, "prompt_id": lead.prompt_id})
                calls = [run.call_kwargs(nid, None) for run in heads]
                batch_function = getattr(cls, "BATCH_FUNCTION", None)
                if batch_function and len(calls) > 1:
                    returned = getattr(cls(), batch_function)(calls)
                    if len(returned) != len(calls):
                        raise TypeError(f"{cls.__name__}.{batch_function} returned {len(returned)} results for "
                                        f"{len(calls)} calls")
                    results = [_Run.outputs_of(nid, cls, r) for r in returned]
                else:
                    results = [_Run.call_node(nid, cls, kwargs) for kwargs in calls]
            except Interrupted:
                return self.finish_all(lead.interrupted(nid, node["class_type"]))
            except Exception as e:
                log.info("node %s (%s) failed in a batch of %d: %s", nid, node["class_type"], len(self.runs), e)
                log.debug("traceback of node %s", nid, exc_info=True)
                lead.set_state(nid, "error")
                current = {k: [_format_value(v)] for k, v in (calls[0] if calls else {}).items()
                           if not isinstance(v, ProgressReporter)}
                tb = traceback.format_tb(e.__traceback__)
                lead.result.exception = e.with_traceback(None)
                return self.finish_all(lead.fail(nid, node["class_type"], str(e), full_type_name(type(e)), tb,
                                                 current))
            for (outputs, ui), (sig, runs) in zip(results, pending.items()):
                cache[sig] = _CacheEntry(outputs, ui)
                for run in runs:
                    run.values[nid] = outputs
                    run.result.executed.append(nid)
                    if ui:
                        run.result.outputs[nid] = ui
                        run.emit("executed", {"node": nid, "display_node": nid, "output": ui,
                                              "prompt_id": run.prompt_id})
            lead.set_state(nid, "finished")
        lead.emit("execution_success", {"prompt_id": lead.prompt_id}, status_message=True)
        return [run.result for run in self.runs]
