"""The prompt queue: pending items, the running one, history, cancel, and the worker (no aiohttp).

One asyncio task is the worker. It hands each prompt to one dedicated worker thread that runs
:class:`..executor.Executor` (so the event loop stays responsive); executor events come back to the
loop with ``call_soon_threadsafe`` and are handed to ``on_event`` in emission order. History
entries and ``/api/jobs`` shapes follow ComfyUI's ``server.py`` and ``comfy_execution/jobs.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..executor import ExecutionResult, Executor
from .common import now_ms, prune

log = logging.getLogger(__name__)

MAX_HISTORY = 1000
# Keys the frontend may put into extra_data that must not be echoed by history/jobs.
SENSITIVE_EXTRA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
PREVIEWABLE_MEDIA = frozenset({"images", "video", "audio", "3d", "text"})
JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")


def workflow_id_of(extra_data: Mapping[str, Any]) -> str | None:
    pnginfo = extra_data.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return workflow.get("id") if isinstance(workflow, dict) else None


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict  # as posted, plus create_time and client_id
    outputs: list[str]
    client_id: str | None
    create_time: int
    start_time: int | None = None

    def public_extra(self) -> dict:
        return {k: v for k, v in self.extra_data.items() if k not in SENSITIVE_EXTRA_KEYS}

    def as_tuple(self) -> list:
        """ComfyUI's queue item ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
        return [self.number, self.prompt_id, self.prompt, self.public_extra(), list(self.outputs)]

    @property
    def workflow_id(self) -> str | None:
        return workflow_id_of(self.extra_data)


# -------------------------------------------------------------------------------------------------
# jobs (the /api/jobs shapes of ComfyUI's comfy_execution/jobs.py, written for our history entries)


def _is_previewable(media_type: str, item: dict) -> bool:
    if media_type in PREVIEWABLE_MEDIA:
        return True
    fmt = str(item.get("format", ""))
    return fmt.startswith(("video/", "audio/"))


def outputs_summary(outputs: Mapping[str, Any]) -> tuple[int, int, dict | None]:
    """``(outputs_count, previewable_outputs_count, preview_output)``; saved files preferred."""
    count = previewable = 0
    preview = fallback = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue  # text strings are metadata, not files
                count += 1
                if not _is_previewable(media_type, item):
                    continue
                previewable += 1
                entry = {**item, "nodeId": node_id}
                entry.setdefault("mediaType", media_type)
                if preview is None and item.get("type") == "output":
                    preview = entry
                elif fallback is None:
                    fallback = entry
    return count, previewable, preview or fallback


def history_job(prompt_id: str, entry: dict, *, detail: bool = False) -> dict:
    """A finished prompt as a job.

    A cancelled job carries its ``execution_end_time`` only in the detail view: the 1.58.1 editor
    raises a "Job failed" banner for every finished job with an end time that is not completed
    (its notification code maps Cancelled to failed), and a cancel the user asked for is not a
    failure. The queue panel still lists it as Cancelled.
    """
    number, _, prompt, extra_data, _ = entry["prompt"]
    status = entry.get("status") or {}
    start = end = error = None
    interrupted = False
    for name, data in status.get("messages", []):
        if not isinstance(data, dict):
            continue
        if name == "execution_start":
            start = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if name == "execution_error":
                error = data
            interrupted = interrupted or name == "execution_interrupted"
    if status.get("status_str") == "error":
        state = "cancelled" if interrupted else "failed"
    else:
        state = "completed"
    outputs = entry.get("outputs") or {}
    count, previewable, preview = outputs_summary(outputs)
    if state == "cancelled" and not detail:
        end = None
    job = prune({
        "id": prompt_id,
        "status": state,
        "priority": number,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": start,
        "execution_end_time": end,
        "execution_error": error,
        "outputs_count": count,
        "previewable_outputs_count": previewable,
        "preview_output": preview,
        "workflow_id": workflow_id_of(extra_data),
    })
    if detail:
        job["outputs"] = outputs
        job["execution_status"] = status
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def queue_job(item: QueueItem, state: str, *, detail: bool = False) -> dict:
    job = prune({
        "id": item.prompt_id,
        "status": state,
        "priority": item.number,
        "create_time": item.create_time,
        "execution_start_time": item.start_time if state == "in_progress" else None,
        "outputs_count": 0,
        "previewable_outputs_count": 0,
        "workflow_id": item.workflow_id,
    })
    if detail:
        job["outputs"] = {}
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.public_extra()}
    return job


# -------------------------------------------------------------------------------------------------
# the queue


class PromptQueue:
    """Pending prompts, the running one and the history, with the worker that runs them.

    ``on_event(name, data, client_id)`` receives every executor event on the event loop, plus the
    ``status`` broadcasts (``client_id`` None) and the final ``executing`` null of each prompt.
    """

    def __init__(self, node_classes: Mapping[str, type], on_event: Callable[[str, dict, str | None], None]):
        self.on_event = on_event
        self.executor = Executor(node_classes, on_event=self._on_executor_event)
        self.pool: ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: list[QueueItem] = []
        self.running: QueueItem | None = None
        self.last_node: str | None = None
        self.interrupt_requested: str | None = None  # prompt id; see _on_executor_event
        self.history: dict[str, dict] = {}
        self.counter = 0
        self._done_nodes: set[str] = set()  # of the running prompt, as the editor has been told
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-nodes-exec")
        self._wakeup = asyncio.Event()
        self._worker = self.loop.create_task(self._worker_loop(), name="sdxl-nodes-queue")

    async def stop(self) -> None:
        self.pending.clear()
        self.executor.interrupt()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    # -- status -------------------------------------------------------------------------------

    def status_data(self) -> dict:
        remaining = len(self.pending) + (1 if self.running is not None else 0)
        return {"status": {"exec_info": {"queue_remaining": remaining}}}

    def broadcast_status(self) -> None:
        self.on_event("status", self.status_data(), None)

    # -- worker -------------------------------------------------------------------------------

    def _on_executor_event(self, name: str, data: dict) -> None:
        """Called on the worker thread; hands the event to the loop in emission order."""
        if name == "execution_start" and self.interrupt_requested == data.get("prompt_id"):
            # Executor.execute clears its interrupt flag when it starts: an interrupt that came
            # between dequeueing and that moment is applied again here, on the worker thread.
            self.executor.interrupt()
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._route_event, name, data)

    def _route_event(self, name: str, data: dict) -> None:
        item = self.running
        sid = item.client_id if item is not None and item.prompt_id == data.get("prompt_id") else None
        if name == "executing":
            self.last_node = data.get("node")
        elif name in ("execution_cached", "executed"):
            nodes = data.get("nodes") if name == "execution_cached" else [data.get("node")]
            self._done_nodes.update(str(n) for n in nodes or ())
        elif name == "execution_error" and data.get("node_id") is not None:
            log.error("prompt %s: node %s (%s) failed: %s: %s\nTraceback (most recent call last):\n%s",
                      data.get("prompt_id"), data.get("node_id"),
                      data.get("node_type"), data.get("exception_type"), data.get("exception_message"),
                      "".join(data.get("traceback") or []).rstrip())
        self.on_event(name, data, sid)
        if name == "progress_state":
            self._announce_finished(data, sid)

    def _announce_finished(self, data: dict, sid: str | None) -> None:
        """Tell the editor which nodes are done, so its total progress moves.

        The 1.58.1 editor computes "Total" as the share of the prompt's nodes that it saw in
        ``execution_cached`` or ``executed``; a node without UI output (a loader, a sampler) never
        appears in either, so the total stayed at 0 % while a sampler was at 40 %. ``progress_state``
        says when a node finished; the finished nodes the editor has not counted yet are sent in an
        ``execution_cached`` message, the one event that only marks nodes done.
        """
        nodes = data.get("nodes")
        if not isinstance(nodes, dict):
            return
        finished = [str(n) for n, state in nodes.items()
                    if isinstance(state, dict) and state.get("state") == "finished" and str(n) not in self._done_nodes]
        if finished:
            self._done_nodes.update(finished)
            self.on_event("execution_cached", {"nodes": finished, "prompt_id": data.get("prompt_id"),
                                               "timestamp": now_ms()}, sid)

    async def _worker_loop(self) -> None:
        if self._wakeup is None or self.loop is None:
            raise RuntimeError("internal: the queue worker started before the app")
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self.pending.pop(0)
            self.running, self.last_node, self.interrupt_requested = item, None, None
            self._done_nodes = set()
            item.start_time = now_ms()
            self.broadcast_status()
            try:
                result = await self.loop.run_in_executor(self.pool, self._execute, item)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the executor never raises; this guards the server anyway
                log.exception("prompt %s crashed the executor", item.prompt_id)
                payload = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                           "exception_message": str(e), "exception_type": type(e).__name__,
                           "traceback": [], "current_inputs": {}, "current_outputs": [], "timestamp": now_ms()}
                self.on_event("execution_error", payload, item.client_id)
                result = ExecutionResult(item.prompt_id, "error", error=payload,
                                         messages=[("execution_error", payload)])
            self.record(item, result)
            self.running, self.last_node = None, None
            self.broadcast_status()
            self.on_event("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)

    def _execute(self, item: QueueItem) -> ExecutionResult:
        log.info("running prompt %s (%d nodes)", item.prompt_id, len(item.prompt))
        t0 = time.perf_counter()
        result = self.executor.execute(item.prompt, item.prompt_id, extra_data=item.extra_data,
                                       outputs=item.outputs)
        log.info("prompt %s finished: %s in %.2f s", item.prompt_id, result.status, time.perf_counter() - t0)
        return result

    def run_on_worker(self, fn: Callable[[], None]) -> asyncio.Future:
        """Run ``fn`` on the worker thread (never while a prompt runs)."""
        if self.loop is None:
            raise RuntimeError("internal: the worker is used before the app started")
        return self.loop.run_in_executor(self.pool, fn)

    # -- queue and history --------------------------------------------------------------------

    def record(self, item: QueueItem, result: ExecutionResult) -> None:
        self.history[item.prompt_id] = {
            "prompt": item.as_tuple(),
            "outputs": result.outputs,
            "status": {
                "status_str": "success" if result.success else "error",
                "completed": result.success,
                "messages": [[name, data] for name, data in result.messages],
            },
            "meta": result.meta,
        }
        while len(self.history) > MAX_HISTORY:
            del self.history[next(iter(self.history))]

    def next_number(self) -> int:
        number = self.counter
        self.counter += 1
        return number

    def enqueue(self, item: QueueItem) -> None:
        log.info("queued prompt %s (%d nodes, %d ahead of it)", item.prompt_id, len(item.prompt),
                 len(self.pending) + (self.running is not None))
        self.pending.append(item)
        self.pending.sort(key=lambda it: it.number)  # stable: equal numbers keep their order
        if self._wakeup is not None:
            self._wakeup.set()
        self.broadcast_status()

    def dequeue(self, prompt_ids: set[str]) -> list[str]:
        removed = [it.prompt_id for it in self.pending if it.prompt_id in prompt_ids]
        if removed:
            self.pending = [it for it in self.pending if it.prompt_id not in prompt_ids]
            self.broadcast_status()
        return removed

    def interrupt(self, prompt_id: str | None = None) -> bool:
        running = self.running
        if running is None or (prompt_id and running.prompt_id != prompt_id):
            return False
        log.info("interrupting prompt %s", running.prompt_id)
        self.interrupt_requested = running.prompt_id
        self.executor.interrupt()
        return True

    def cancel(self, prompt_id: str) -> bool:
        if self.dequeue({prompt_id}):
            return True
        return self.interrupt(prompt_id)

    def known_prompt(self, prompt_id: str) -> bool:
        return (prompt_id in self.history or any(it.prompt_id == prompt_id for it in self.pending)
                or (self.running is not None and self.running.prompt_id == prompt_id))

    def history_page(self, max_items: int | None, offset: int | None) -> dict:
        items = list(self.history.items())
        if offset is None:
            offset = max(0, len(items) - max_items) if max_items is not None else 0
        end = offset + max_items if max_items is not None else None
        return dict(items[offset:end])

    def delete_history(self, ids: list | None = None, *, clear: bool = False) -> None:
        if clear:
            self.history.clear()
        for prompt_id in ids or ():
            self.history.pop(str(prompt_id), None)

    # -- jobs ---------------------------------------------------------------------------------

    def jobs(self, wanted: set[str], *, sort_by: str = "created_at", descending: bool = True,
             workflow_id: str | None = None) -> list[dict]:
        out: list[dict] = []
        if "in_progress" in wanted and self.running is not None:
            out.append(queue_job(self.running, "in_progress"))
        if "pending" in wanted:
            out.extend(queue_job(it, "pending") for it in self.pending)
        if wanted & {"completed", "failed", "cancelled"}:
            for prompt_id, entry in self.history.items():
                job = history_job(prompt_id, entry)
                if job["status"] in wanted:
                    out.append(job)
        if workflow_id:
            out = [j for j in out if j.get("workflow_id") == workflow_id]

        def key(job: dict) -> float:
            if sort_by == "execution_duration":
                start, end = job.get("execution_start_time"), job.get("execution_end_time")
                return end - start if start and end else 0
            return job.get("create_time") or 0

        out.sort(key=key, reverse=descending)
        return out

    def find_job(self, prompt_id: str, *, detail: bool) -> dict | None:
        if prompt_id in self.history:
            return history_job(prompt_id, self.history[prompt_id], detail=detail)
        if self.running is not None and self.running.prompt_id == prompt_id:
            return queue_job(self.running, "in_progress", detail=detail)
        for it in self.pending:
            if it.prompt_id == prompt_id:
                return queue_job(it, "pending", detail=detail)
        return None
