"""Executor: order, partial execution, caching, events, errors, interrupt, hidden inputs (stub nodes)."""

from __future__ import annotations

import threading
import time

import pytest
import stub_nodes
from stub_nodes import CALLS, SEEN
from stub_nodes import NODE_CLASS_MAPPINGS as CLASSES

from sdxl_nodes.runtime.executor import Executor, Interrupted, ProgressReporter


@pytest.fixture(autouse=True)
def _reset():
    stub_nodes.reset()
    yield
    stub_nodes.reset()


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, name, data):
        with self.lock:
            self.events.append((name, data))

    def names(self):
        return [name for name, _ in self.events]

    def brief(self):
        """Compact event log: progress_state as {node: state}, others with their node id."""
        out = []
        for name, data in self.events:
            if name == "progress_state":
                out.append((name, {k: v["state"] for k, v in data["nodes"].items()}))
            elif name in ("executing", "executed", "progress"):
                out.append((name, data["node"]))
            elif name == "execution_cached":
                out.append((name, data["nodes"]))
            elif name == "preview":
                out.append((name, data["node_id"]))
            else:
                out.append((name, None))
        return out


def n(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}


def sampler_prompt(seed=1):
    return {
        "1": n("StubNumber", value=2),
        "2": n("StubAdd", a=["1", 0], b=3),
        "3": n("StubSampler", base=["2", 0], seed=seed, sampler_name="euler", scheduler="karras", text="hi",
               enabled=True),
        "4": n("StubSaveText", value=["3", 0]),
    }


def test_dependency_order_and_outputs():
    rec = Recorder()
    ex = Executor(CLASSES, on_event=rec)
    result = ex.execute(sampler_prompt(), "p1")
    assert result.success and result.status == "success" and result.error is None
    assert CALLS == ["StubNumber", "StubAdd", "StubSampler", "StubSaveText"]
    assert result.executed == ["1", "2", "3", "4"]
    assert result.outputs == {"4": {"text": ["v=5:1:euler:karras:hi:True:None:0.5"]}}
    assert [m[0] for m in result.messages] == ["execution_start", "execution_cached", "execution_success"]
    assert all("timestamp" in m[1] for m in result.messages)


def test_only_needed_nodes_run_and_partial_targets():
    prompt = sampler_prompt()
    prompt["5"] = n("StubFail", value=["1", 0])  # not needed by any output: never runs
    prompt["6"] = n("StubNumber", value=9)
    prompt["7"] = n("StubSink", value=["6", 0])
    ex = Executor(CLASSES)
    assert ex.execute(prompt, "p1", outputs=["7"]).executed == ["6", "7"]
    assert CALLS == ["StubNumber", "StubSink"]
    CALLS.clear()
    result = ex.execute(prompt, "p2")
    assert result.success and "StubFail" not in CALLS and "5" not in result.executed
    assert result.cached == ["6", "7"]


def test_output_nodes_run_as_soon_as_ready():
    # like the recorded run: a preview right after its source, before the longer branch
    prompt = {
        "1": n("StubNumber", value=1),
        "2": n("StubAdd", a=["1", 0], b=1),
        "3": n("StubAdd", a=["2", 0], b=1),
        "5": n("StubSaveText", value=["3", 0]),
        "8": n("StubSaveText", value=["1", 0]),
    }
    assert Executor(CLASSES).execute(prompt, "p").executed == ["1", "8", "2", "3", "5"]


def test_cache_reruns_only_downstream_of_a_changed_seed():
    rec = Recorder()
    ex = Executor(CLASSES, on_event=rec)
    ex.execute(sampler_prompt(seed=1), "a")
    CALLS.clear()
    rec.events.clear()

    same = ex.execute(sampler_prompt(seed=1), "b")
    assert CALLS == [] and same.executed == [] and same.cached == ["1", "2", "3", "4"]
    # the cached output node replays its UI output
    assert rec.brief() == [
        ("execution_start", None), ("execution_cached", ["1", "2", "3", "4"]),
        ("executed", "4"), ("progress_state", {"4": "finished"}), ("execution_success", None),
    ]
    assert same.outputs == {"4": {"text": ["v=5:1:euler:karras:hi:True:None:0.5"]}}

    changed = ex.execute(sampler_prompt(seed=2), "c")
    assert CALLS == ["StubSampler", "StubSaveText"]
    assert changed.cached == ["1", "2"] and changed.executed == ["3", "4"]
    assert changed.outputs["4"] == {"text": ["v=5:2:euler:karras:hi:True:None:0.5"]}

    # a literal given as a string coerces to the same value: still cached
    CALLS.clear()
    p = sampler_prompt(seed=2)
    p["1"]["inputs"]["value"] = "2"
    ex.execute(p, "d")
    assert CALLS == []


def test_cache_is_bounded_to_the_latest_prompt():
    ex = Executor(CLASSES)
    ex.execute(sampler_prompt(seed=1), "a")
    assert ex.cache_size == 4
    ex.execute(sampler_prompt(seed=2), "b")
    assert ex.cache_size == 4  # the old sampler/save entries were dropped
    ex.execute({"1": n("StubNumber", value=7), "2": n("StubSink", value=["1", 0])}, "c")
    assert ex.cache_size == 2
    ex.clear_cache()
    assert ex.cache_size == 0


def test_is_changed_nan_always_reruns():
    prompt = {"1": n("StubVolatile", value=1), "2": n("StubSink", value=["1", 0])}
    ex = Executor(CLASSES)
    ex.execute(prompt, "a")
    ex.execute(prompt, "b")
    assert CALLS.count("StubVolatile") == 2 and CALLS.count("StubSink") == 2


def test_event_sequence_matches_api_order():
    rec = Recorder()
    ex = Executor(CLASSES, on_event=rec)
    prompt = {
        "1": n("StubNumber", value=2),
        "2": n("StubSlow", value=["1", 0], steps=2, delay=0.0, preview=True),
        "3": n("StubSaveText", value=["2", 0]),
    }
    result = ex.execute(prompt, "pid")
    assert result.success
    assert rec.brief() == [
        ("execution_start", None),
        ("execution_cached", []),
        ("progress_state", {"1": "running"}), ("executing", "1"),
        ("progress_state", {"1": "finished"}),
        ("progress_state", {"1": "finished", "2": "running"}), ("executing", "2"),
        ("preview", "2"), ("progress", "2"), ("progress_state", {"1": "finished", "2": "running"}),
        ("preview", "2"), ("progress", "2"), ("progress_state", {"1": "finished", "2": "running"}),
        ("progress_state", {"1": "finished", "2": "finished"}),
        ("progress_state", {"1": "finished", "2": "finished", "3": "running"}), ("executing", "3"),
        ("executed", "3"),
        ("progress_state", {"1": "finished", "2": "finished", "3": "finished"}),
        ("execution_success", None),
    ]
    events = dict(rec.events[:2])
    assert set(events["execution_start"]) == {"prompt_id", "timestamp"}
    assert set(events["execution_cached"]) == {"nodes", "prompt_id", "timestamp"}
    executing = next(d for name, d in rec.events if name == "executing")
    assert executing == {"node": "1", "display_node": "1", "prompt_id": "pid"}
    progress = [d for name, d in rec.events if name == "progress"]
    assert progress == [{"value": 1, "max": 2, "prompt_id": "pid", "node": "2"},
                        {"value": 2, "max": 2, "prompt_id": "pid", "node": "2"}]
    state = [d for name, d in rec.events if name == "progress_state"][-1]
    assert state["prompt_id"] == "pid"
    assert state["nodes"]["2"] == {"value": 2, "max": 2, "state": "finished", "node_id": "2", "prompt_id": "pid",
                                   "display_node_id": "2", "parent_node_id": None, "real_node_id": "2"}
    preview = next(d for name, d in rec.events if name == "preview")
    assert preview["image_type"] == "image/jpeg" and preview["image"][:2] == b"\xff\xd8"
    assert {k: v for k, v in preview.items() if k != "image"} == {
        "node_id": "2", "prompt_id": "pid", "display_node_id": "2", "parent_node_id": None, "real_node_id": "2",
        "image_type": "image/jpeg"}
    executed = next(d for name, d in rec.events if name == "executed")
    assert executed == {"node": "3", "display_node": "3", "output": {"text": ["v=4"]}, "prompt_id": "pid"}
    assert set(rec.events[-1][1]) == {"prompt_id", "timestamp"}


def test_failing_node_reports_error_and_executor_recovers():
    rec = Recorder()
    ex = Executor(CLASSES, on_event=rec)
    prompt = {"1": n("StubNumber", value=4), "2": n("StubFail", value=["1", 0]), "3": n("StubSink", value=["2", 0])}
    result = ex.execute(prompt, "bad")
    assert result.status == "error" and not result.success
    name, data = rec.events[-1]
    assert name == "execution_error" and result.error == data
    assert data["node_id"] == "2" and data["node_type"] == "StubFail" and data["prompt_id"] == "bad"
    assert data["exception_message"] == "boom on 4" and data["exception_type"] == "RuntimeError"
    assert data["executed"] == ["1"] and data["current_inputs"] == {"value": [4]}
    assert isinstance(data["traceback"], list) and any("boom on" in line for line in data["traceback"])
    assert set(data) == {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                         "traceback", "current_inputs", "current_outputs", "timestamp"}
    assert rec.brief()[-2] == ("progress_state", {"1": "finished", "2": "error"})

    ok = ex.execute(sampler_prompt(), "next")
    assert ok.success and ok.outputs["4"]["text"]


def test_bad_return_and_unknown_class_are_errors_not_crashes():
    ex = Executor(CLASSES)
    r = ex.execute({"1": n("StubBadReturn"), "2": n("StubSink", value=["1", 0])}, "a")
    assert r.status == "error" and r.error["exception_type"] == "TypeError" and "tuple" in r.error["exception_message"]
    r = ex.execute({"1": n("Nope"), "2": n("StubSink", value=["1", 0])}, "b")
    assert r.status == "error" and r.error["node_id"] == "1" and r.error["node_type"] == "Nope"
    r = ex.execute({"1": n("StubAdd", a=["2", 0], b=1), "2": n("StubAdd", a=["1", 0], b=1),
                    "3": n("StubSink", value=["1", 0])}, "c")
    assert r.status == "error" and "cycle" in r.error["exception_message"]
    assert ex.execute(sampler_prompt(), "d").success


def test_interrupt_from_another_thread_stops_within_one_step():
    rec = Recorder()
    ex = Executor(CLASSES, on_event=rec)
    prompt = {"1": n("StubNumber", value=1), "2": n("StubSlow", value=["1", 0], steps=200, delay=0.02, preview=False),
              "3": n("StubSink", value=["2", 0])}
    started = threading.Event()

    def on_event(name, data):
        rec(name, data)
        if name == "progress" and data["value"] == 2:
            started.set()

    ex.on_event = on_event
    results = []
    worker = threading.Thread(target=lambda: results.append(ex.execute(prompt, "slow")))
    worker.start()
    assert started.wait(5)
    steps_at_interrupt = SEEN["StubSlow"]["steps_done"]
    t0 = time.monotonic()
    ex.interrupt()
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - t0 < 1.0
    (result,) = results
    assert result.status == "interrupted"
    assert SEEN["StubSlow"]["steps_done"] <= steps_at_interrupt + 1
    name, data = rec.events[-1]
    assert name == "execution_interrupted"
    assert {k: data[k] for k in ("prompt_id", "node_id", "node_type", "executed")} == {
        "prompt_id": "slow", "node_id": "2", "node_type": "StubSlow", "executed": ["1"]}
    assert "timestamp" in data and result.error == data
    assert "StubSink" not in CALLS

    # the flag is cleared by the next run
    CALLS.clear()
    again = ex.execute({"1": n("StubNumber", value=5), "2": n("StubSink", value=["1", 0])}, "after")
    assert again.success and CALLS == ["StubNumber", "StubSink"]


def test_interrupt_between_nodes():
    ex = Executor(CLASSES)

    class Stopper:
        CATEGORY, FUNCTION, RETURN_TYPES = "stub", "run", ("INT",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            ex.interrupt()
            return (1,)

    ex.node_classes = {**CLASSES, "Stopper": Stopper}
    r = ex.execute({"1": n("Stopper"), "2": n("StubSink", value=["1", 0])}, "x")
    assert r.status == "interrupted" and r.error["node_id"] == "2" and r.executed == ["1"]


def test_reporter_api():
    class FakeRun:
        prompt_id = "p"

        class executor:  # noqa: N801
            _interrupt = threading.Event()

    reporter = ProgressReporter(FakeRun(), "9")
    assert reporter.interrupted is False
    reporter.check_interrupted()
    FakeRun.executor._interrupt.set()
    assert reporter.interrupted is True
    with pytest.raises(Interrupted):
        reporter.check_interrupted()
    with pytest.raises(Interrupted):
        reporter.progress(1, 2)


def test_hidden_inputs_and_python_types():
    ex = Executor(CLASSES)
    prompt = {
        "1": n("StubNumber", value="7"),
        "2": n("StubScale", value=["1", 0], factor=2),
        "3": n("StubSaveText", value=["2", 0], prefix="f="),
        "4": n("StubSlow", value=["1", 0], steps=1, delay=0.0, preview=False),
        "5": n("StubSink", value=["4", 0]),
    }
    extra = {"extra_pnginfo": {"workflow": {"nodes": []}}, "client_id": "abc"}
    result = ex.execute(prompt, "h", extra_data=extra)
    assert result.success
    assert SEEN["StubNumber"]["value_type"] is int and SEEN["StubScale"]["factor_type"] is float
    assert result.outputs["3"] == {"text": ["f=14.0"]}
    seen = SEEN["StubSaveText#3"]
    assert seen["prompt"] == prompt and seen["unique_id"] == "3"
    assert seen["extra_pnginfo"] == {"workflow": {"nodes": []}}
    assert SEEN["StubSlow"]["kwargs"] == []  # the unknown hidden type was not passed
    assert SEEN["StubSlow"]["steps_done"] == 1


def test_event_callback_errors_do_not_break_runs():
    def broken(name, data):
        raise RuntimeError("listener bug")

    assert Executor(CLASSES, on_event=broken).execute(sampler_prompt(), "p").success


# ------------------------------------------------------------------------------------------------
# Context: what the executor's creator set reaches the nodes, on any thread, without globals


def test_nodes_see_the_context_the_executor_was_created_in_on_a_worker_thread():
    """Catches the executor running nodes in the calling thread's (empty) context, the reason the
    nodes' environment used to be a process global (the server calls execute from a worker thread)."""
    import contextvars

    var: contextvars.ContextVar = contextvars.ContextVar("test_env", default="unset")
    seen = []

    class ReadsContext:
        RETURN_TYPES = ("INT",)
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"value": ("INT", {"default": 0})}}

        def run(self, value):
            seen.append(var.get())
            return (value,)

    token = var.set("env A")
    try:
        executor_a = Executor({"ReadsContext": ReadsContext})
    finally:
        var.reset(token)
    executor_b = Executor({"ReadsContext": ReadsContext})  # created where nothing is set
    results = []
    for ex, value in ((executor_a, 1), (executor_b, 2)):
        worker = threading.Thread(target=lambda e=ex, v=value: results.append(
            e.execute({"1": {"class_type": "ReadsContext", "inputs": {"value": v}}}, f"p{v}")))
        worker.start()
        worker.join()
    assert all(r.success for r in results)
    assert seen == ["env A", "unset"]
    assert var.get() == "unset"


def test_failed_node_result_carries_the_exception_for_type_checks():
    result = Executor(CLASSES).execute({"1": n("StubNumber", value=2), "2": n("StubFail", value=["1", 0])}, "p",
                                       outputs=["2"])
    assert result.status == "error"
    assert isinstance(result.exception, Exception) and str(result.exception) == result.error["exception_message"]
