"""The HTTP/WebSocket server (runtime/server/) against the frontend's API (the recorded calls), with stub nodes.

Fast: aiohttp's test client, no browser, no torch. The recorded payloads in
``tests/data/frontend_samples/`` (vendored) are the reference for shapes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import threading
import uuid
import zlib
from pathlib import Path

import pytest
import pytest_asyncio
import stub_nodes
from aiohttp import FormData, WSMsgType, WSServerHandshakeError
from PIL import Image

from sdxl_nodes.runtime.limits import Limits
from sdxl_nodes.runtime.server import create_app, preview_frame, server_of

pytestmark = pytest.mark.asyncio

SAMPLES = Path(__file__).resolve().parent / "data" / "frontend_samples"  # vendored recordings


class StubSaveImage:
    """Output node that writes a PNG into the output folder and reports it like SaveImage."""

    CATEGORY = "stub/output"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    folder: Path | None = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True}),
                             "filename_prefix": ("STRING", {"default": "stub"})}}

    def save(self, value, filename_prefix):
        name = f"{filename_prefix}_{value:05d}_.png"
        Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(self.folder / name)
        return {"ui": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}, "result": ()}


CLASSES = {**stub_nodes.NODE_CLASS_MAPPINGS, "StubSaveImage": StubSaveImage}
WORKFLOW = {"id": "7f1f9a4e-0000-4000-8000-000000000001", "nodes": [{"id": 1, "type": "StubNumber"}], "links": []}


def png_bytes(color=(0, 128, 255), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def simple_prompt(value=3):
    return {"1": {"class_type": "StubNumber", "inputs": {"value": value}},
            "2": {"class_type": "StubSaveText", "inputs": {"value": ["1", 0]}}}


def slow_prompt(steps=2, delay=0.0, preview=True, value=1):
    return {"1": {"class_type": "StubNumber", "inputs": {"value": value}},
            "2": {"class_type": "StubSlow", "inputs": {"value": ["1", 0], "steps": steps, "delay": delay,
                                                      "preview": preview}},
            "3": {"class_type": "StubSaveImage", "inputs": {"value": ["2", 0], "filename_prefix": "slow"}}}


@pytest.fixture
def dirs(tmp_path):
    d = {k: tmp_path / k for k in ("input", "output", "temp", "user")}
    StubSaveImage.folder = d["output"]
    d["output"].mkdir()
    return d


@pytest.fixture
def make_app(dirs):
    def make(**kw):
        args = dict(input_dir=dirs["input"], output_dir=dirs["output"], temp_dir=dirs["temp"],
                    user_dir=dirs["user"], default_workflow=WORKFLOW, templates={"stub_flow": WORKFLOW})
        args.update(kw)
        return create_app(CLASSES, display_names={"StubNumber": "Stub Number"}, **args)
    return make


@pytest_asyncio.fixture
async def client(aiohttp_client, make_app):
    stub_nodes.reset()
    return await aiohttp_client(make_app())


async def post_prompt(client, prompt, **body):
    r = await client.post("/api/prompt", json={"prompt": prompt, **body})
    return r.status, await r.json()


async def wait_for(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def wait_history(client, prompt_id, timeout=10.0):
    async def done():
        r = await client.get(f"/api/history/{prompt_id}")
        return prompt_id in await r.json()
    await wait_for(done, timeout)
    return (await (await client.get(f"/api/history/{prompt_id}")).json())[prompt_id]


async def collect_run(ws, prompt_id, timeout=15.0):
    """Messages (JSON as (type, data), binary as ('binary', bytes)) until ``executing`` null of the prompt."""
    out = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == WSMsgType.BINARY:
            out.append(("binary", msg.data))
            continue
        assert msg.type == WSMsgType.TEXT, msg
        m = json.loads(msg.data)
        out.append((m["type"], m["data"]))
        if m["type"] == "executing" and m["data"]["node"] is None and m["data"].get("prompt_id") == prompt_id:
            return out


async def open_ws(client, sid="tester"):
    ws = await client.ws_connect(f"/ws?clientId={sid}")
    first = json.loads((await ws.receive(timeout=5)).data)
    assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}}
    await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    flags = json.loads((await ws.receive(timeout=5)).data)
    assert flags["type"] == "feature_flags" and flags["data"]["supports_preview_metadata"] is True
    return ws


# -------------------------------------------------------------------------------------------------
# boot endpoints (API.md §1, §2.2)


async def test_index_and_static_files(client):
    r = await client.get("/")
    assert r.status == 200
    assert "no-store" in r.headers["Cache-Control"] and r.headers["Pragma"] == "no-cache"
    html = await r.text()
    assert "<html" in html.lower()
    script = next(s for s in html.split('"') if s.startswith("./assets/") and s.endswith(".js"))
    r = await client.get(script[1:])
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/javascript")
    r = await client.get("/scripts/app.js")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/javascript")
    assert (await client.get("/no/such/file.js")).status == 404
    assert (await client.get("/..%2F..%2Fetc%2Fpasswd")).status == 404


async def test_boot_endpoints(client):
    assert await (await client.get("/api/users")).json() == {"storage": "server", "migrated": True}
    settings = await (await client.get("/api/settings")).json()
    assert settings == {"Comfy.TutorialCompleted": True}  # so a fresh editor opens the default graph
    assert await (await client.get("/api/extensions")).json() == ["/extensions/sdxl-nodes/sdxl_nodes.js"]
    r = await client.get("/extensions/sdxl-nodes/sdxl_nodes.js")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/javascript")
    assert "registerExtension" in await r.text()
    assert (await client.get("/extensions/sdxl-nodes/../server.py")).status == 404
    assert (await client.get("/extensions/other-pack/sdxl_nodes.js")).status == 404

    info = await (await client.get("/api/object_info")).json()
    assert set(info) == set(CLASSES)
    number = info["StubNumber"]
    assert number["name"] == "StubNumber" and number["display_name"] == "Stub Number"
    assert number["python_module"] == "custom_nodes.sdxl-nodes" and number["category"] == "stub"
    assert number["input"]["required"]["value"][1]["min"] == -1000
    assert await (await client.get("/api/object_info/StubAdd")).json() == {"StubAdd": info["StubAdd"]}
    assert await (await client.get("/api/object_info/Nope")).json() == {}
    assert await (await client.get("/object_info/StubAdd")).json() == {"StubAdd": info["StubAdd"]}  # no prefix

    features = await (await client.get("/api/features")).json()
    assert features["supports_preview_metadata"] is True and features["sdxl_nodes_standalone"] is True
    assert features["max_upload_size"] == Limits().request_bytes  # one upload request, all fields
    assert await (await client.get("/api/i18n")).json() == {}
    assert await (await client.get("/api/global_subgraphs")).json() == {}
    assert await (await client.get("/api/node_replacements")).json() == {}
    assert await (await client.get("/api/experiment/models")).json() == []
    assert await (await client.get("/api/prompt")).json() == {"exec_info": {"queue_remaining": 0}}
    assert await (await client.get("/api/sdxl_nodes/default_workflow")).json() == WORKFLOW
    assert await (await client.get("/api/workflow_templates")).json() == {}  # listed once, by the catalogue:
    assert await (await client.get("/templates/index.json")).json() == [{
        "moduleName": "sdxl-nodes", "title": "SDXL", "type": "image", "templates": [{
            "name": "stub_flow", "title": "stub_flow", "description": "", "mediaType": "image", "mediaSubtype": "jpg"}]}]
    assert await (await client.get("/api/workflow_templates/sdxl-nodes/stub_flow.json")).json() == WORKFLOW
    r = await client.get("/api/workflow_templates/sdxl-nodes/stub_flow.jpg")
    assert r.status == 200 and r.headers["Content-Type"].startswith("image/")
    assert (await client.get("/api/workflow_templates/sdxl-nodes/nope.json")).status == 404
    paths = await (await client.get("/internal/folder_paths")).json()
    assert set(paths) >= {"input", "output", "temp"}
    # The editor lists these at boot: empty lists, not 404s.
    r = await client.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")
    assert r.status == 200 and await r.json() == []


async def test_system_stats_merges_system_info(aiohttp_client, make_app):
    client = await aiohttp_client(make_app(system_info=lambda: {
        "system": {"pytorch_version": "9.9"}, "devices": [{"name": "cpu", "type": "cpu", "index": None,
                                                           "vram_total": 1, "vram_free": 1}]}))
    stats = await (await client.get("/api/system_stats")).json()
    assert stats["system"]["pytorch_version"] == "9.9"
    assert stats["system"]["os"] and stats["system"]["ram_total"] > 0 and stats["system"]["python_version"]
    assert stats["system"]["comfyui_version"] and stats["system"]["required_frontend_version"]
    assert stats["devices"][0]["name"] == "cpu"


async def test_no_default_workflow_means_no_tutorial_override(aiohttp_client, make_app):
    client = await aiohttp_client(make_app(default_workflow=None, templates=None))
    assert await (await client.get("/api/settings")).json() == {}
    assert (await client.get("/api/sdxl_nodes/default_workflow")).status == 404
    assert await (await client.get("/api/workflow_templates")).json() == {}


# -------------------------------------------------------------------------------------------------
# settings


async def test_settings_persist_across_restart(aiohttp_client, make_app, dirs):
    client = await aiohttp_client(make_app())
    assert (await client.post("/api/settings/Comfy.InstalledVersion", json="1.58.1")).status == 200
    assert (await client.post("/api/settings", json={"Comfy.Templates.SortBy": "popular", "A.b": [1, 2]})).status == 200
    assert (await client.post("/api/settings/Comfy.TutorialCompleted", json=False)).status == 200
    assert await (await client.get("/api/settings/Comfy.InstalledVersion")).json() == "1.58.1"
    await client.close()

    client2 = await aiohttp_client(make_app())  # a new app on the same user folder
    assert await (await client2.get("/api/settings")).json() == {
        "Comfy.TutorialCompleted": False, "Comfy.InstalledVersion": "1.58.1",
        "Comfy.Templates.SortBy": "popular", "A.b": [1, 2]}
    assert (dirs["user"] / "default" / "comfy.settings.json").is_file()


@pytest.mark.parametrize("method,path", [
    ("post", "/api/settings"), ("post", "/api/settings/X"), ("post", "/api/queue"), ("post", "/api/history"),
    ("post", "/api/jobs/cancel"), ("post", "/api/interrupt"), ("post", "/api/free")])
async def test_malformed_json_is_400_with_a_message(client, method, path):
    r = await getattr(client, method)(path, data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400
    body = await r.json()
    assert "malformed JSON" in body["error"]


async def test_prompt_malformed_json(client):
    r = await client.post("/api/prompt", data=b"{oops")
    assert r.status == 400
    body = await r.json()
    assert body["error"]["type"] == "invalid_prompt" and "JSON" in body["error"]["details"]
    assert body["node_errors"] == {}


async def test_cross_origin_requests_are_refused(client):
    r = await client.post("/api/prompt", json={"prompt": simple_prompt()}, headers={"Origin": "http://evil.example"})
    assert r.status == 403
    r = await client.get("/api/settings", headers={"Origin": f"http://{client.host}:{client.port}"})
    assert r.status == 200


# -------------------------------------------------------------------------------------------------
# prompt validation and queueing


async def test_prompt_ok_and_number(client):
    status, body = await post_prompt(client, simple_prompt(), client_id="")
    assert status == 200 and set(body) == {"prompt_id", "number", "node_errors"}
    assert uuid.UUID(body["prompt_id"]) and body["node_errors"] == {}
    first = body["number"]
    _, body2 = await post_prompt(client, simple_prompt(4))
    assert body2["number"] == first + 1
    _, front = await post_prompt(client, simple_prompt(5), front=True)
    assert front["number"] < 0
    _, explicit = await post_prompt(client, simple_prompt(6), number=42)
    assert explicit["number"] == 42
    own = str(uuid.uuid4())
    _, mine = await post_prompt(client, simple_prompt(7), prompt_id=own)
    assert mine["prompt_id"] == own
    status, dup = await post_prompt(client, simple_prompt(7), prompt_id=own)
    assert status == 400 and dup["error"]["type"] == "invalid_prompt_id"
    status, bad = await post_prompt(client, simple_prompt(7), prompt_id="NOT-A-UUID")
    assert status == 400 and bad["error"]["type"] == "invalid_prompt_id"
    entry = await wait_history(client, body2["prompt_id"])
    assert entry["outputs"] == {"2": {"text": ["v=4"]}}


async def test_unknown_node_is_missing_node_type(client):
    status, body = await post_prompt(client, {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert status == 400
    assert body["error"]["type"] == "missing_node_type"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "missing_node_type"


async def test_validation_errors_have_comfyui_shapes(client):
    status, body = await post_prompt(client, {"1": {"class_type": "StubNumber", "inputs": {"value": 1}}})
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs"
    status, body = await post_prompt(client, {"1": {"class_type": "StubNumber", "inputs": {"value": 5000}},
                                              "2": {"class_type": "StubSaveText", "inputs": {"value": ["1", 0]}}})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["1"]["errors"][0]
    assert err["type"] == "value_bigger_than_max" and err["extra_info"]["input_name"] == "value"
    r = await client.post("/api/prompt", json={"client_id": "x"})
    assert r.status == 400 and (await r.json())["error"]["type"] == "no_prompt"
    status, body = await post_prompt(client, simple_prompt(), partial_execution_targets="2")
    assert status == 400


async def test_partial_execution_targets(client):
    prompt = {**simple_prompt(), "3": {"class_type": "StubSink", "inputs": {"value": ["1", 0]}}}
    status, body = await post_prompt(client, prompt, partial_execution_targets=["3"])
    assert status == 200
    entry = await wait_history(client, body["prompt_id"])
    assert entry["prompt"][4] == ["3"]
    assert "StubSink" in stub_nodes.CALLS and "StubSaveText" not in stub_nodes.CALLS


# -------------------------------------------------------------------------------------------------
# websocket (API.md §5)


async def test_websocket_sequence_of_a_successful_run(client):
    ws = await open_ws(client)
    status, body = await post_prompt(client, slow_prompt(steps=2), client_id="tester",
                                     extra_data={"extra_pnginfo": {"workflow": WORKFLOW}})
    assert status == 200
    pid = body["prompt_id"]
    msgs = await collect_run(ws, pid)
    names = [n for n, _ in msgs]
    assert names[0] == "status" and msgs[0][1]["status"]["exec_info"]["queue_remaining"] == 1
    start = names.index("execution_start")
    assert all(n == "status" for n in names[:start])
    assert names[start + 1] == "execution_cached" and msgs[start + 1][1]["nodes"] == []
    assert names[-3:] == ["execution_success", "status", "executing"]
    assert msgs[-2][1]["status"]["exec_info"]["queue_remaining"] == 0
    assert msgs[-1][1] == {"node": None, "prompt_id": pid}
    # per node: progress_state(running) → executing → … → progress_state(finished)
    for node in ("1", "2", "3"):
        i = next(i for i, (n, d) in enumerate(msgs) if n == "executing" and d["node"] == node)
        assert msgs[i - 1][0] == "progress_state" and msgs[i - 1][1]["nodes"][node]["state"] == "running"
        assert msgs[i][1] == {"node": node, "display_node": node, "prompt_id": pid}
    progress = [d for n, d in msgs if n == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 2, "2"), (2, 2, "2")]
    binaries = [d for n, d in msgs if n == "binary"]
    assert len(binaries) == 2
    i_bin = names.index("binary")
    assert names[i_bin + 1] == "progress"  # preview frame first, as ComfyUI sends it
    executed = [d for n, d in msgs if n == "executed"]
    assert executed == [{"node": "3", "display_node": "3", "prompt_id": pid, "output": {
        "images": [{"filename": "slow_00003_.png", "subfolder": "", "type": "output"}]}}]
    final_state = [d for n, d in msgs if n == "progress_state"][-1]
    assert {k: v["state"] for k, v in final_state["nodes"].items()} == {"1": "finished", "2": "finished", "3": "finished"}

    # the same prompt again: everything cached, executed replayed
    status, body = await post_prompt(client, slow_prompt(steps=2), client_id="tester")
    msgs = await collect_run(ws, body["prompt_id"])
    cached = next(d for n, d in msgs if n == "execution_cached")
    assert sorted(cached["nodes"]) == ["1", "2", "3"]
    assert [n for n, _ in msgs if n in ("executed", "execution_success")] == ["executed", "execution_success"]
    await ws.close()


async def test_preview_frame_layout_matches_the_recorded_sample(client):
    sample = (SAMPLES / "ws_binary_type4_preview_frame.bin").read_bytes()
    s_type, s_len = struct.unpack(">II", sample[:8])
    s_meta = json.loads(sample[8:8 + s_len])
    assert s_type == 4

    ws = await open_ws(client)
    _, body = await post_prompt(client, slow_prompt(steps=1), client_id="tester")
    msgs = await collect_run(ws, body["prompt_id"])
    frame = next(d for n, d in msgs if n == "binary")
    f_type, f_len = struct.unpack(">II", frame[:8])
    raw_meta = frame[8:8 + f_len]
    meta = json.loads(raw_meta)
    assert f_type == 4
    assert list(meta) == list(s_meta)  # same keys, same order
    assert meta["node_id"] == meta["display_node_id"] == meta["real_node_id"] == "2"
    assert meta["prompt_id"] == body["prompt_id"] and meta["parent_node_id"] is None
    assert raw_meta.decode() == json.dumps(meta)  # Python's default separators, like the sample
    assert sample[8:8 + s_len].decode() == json.dumps(s_meta)
    image = frame[8 + f_len:]
    assert meta["image_type"] == "image/jpeg" and image[:3] == b"\xff\xd8\xff"
    Image.open(io.BytesIO(image)).verify()
    # the helper reproduces the sample byte for byte
    assert preview_frame(s_meta, sample[8 + s_len:]) == sample
    await ws.close()


async def test_legacy_clients_get_type1_previews(client):
    ws = await client.ws_connect("/ws?clientId=old")
    await ws.receive(timeout=5)  # status; this client never sends feature_flags
    _, body = await post_prompt(client, slow_prompt(steps=1), client_id="old")
    msgs = await collect_run(ws, body["prompt_id"])
    frame = next(d for n, d in msgs if n == "binary")
    assert struct.unpack(">II", frame[:8]) == (1, 1) and frame[8:11] == b"\xff\xd8\xff"
    await ws.close()


async def test_messages_are_routed_to_the_prompts_client(client):
    a = await open_ws(client, "client-a")
    b = await open_ws(client, "client-b")
    _, body = await post_prompt(client, simple_prompt(11), client_id="client-a")
    msgs_a = await collect_run(a, body["prompt_id"])
    assert "execution_start" in [n for n, _ in msgs_a]
    # b only saw status broadcasts
    seen_b = []
    while True:
        try:
            msg = await b.receive(timeout=0.3)
        except asyncio.TimeoutError:
            break
        seen_b.append(json.loads(msg.data)["type"])
    assert seen_b and set(seen_b) == {"status"}
    # a prompt without client_id goes to everyone
    _, body = await post_prompt(client, simple_prompt(12))
    for ws in (a, b):
        names = [n for n, _ in await collect_run(ws, body["prompt_id"])]
        assert "execution_success" in names
    await a.close()
    await b.close()


async def test_failing_node_gives_execution_error_and_server_keeps_serving(client):
    ws = await open_ws(client)
    prompt = {"1": {"class_type": "StubNumber", "inputs": {"value": 2}},
              "2": {"class_type": "StubFail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "StubSink", "inputs": {"value": ["2", 0]}}}
    status, body = await post_prompt(client, prompt, client_id="tester")
    assert status == 200
    msgs = await collect_run(ws, body["prompt_id"])
    names = [n for n, _ in msgs]
    assert names[-3:] == ["execution_error", "status", "executing"]
    err = msgs[-3][1]
    assert err["node_id"] == "2" and err["node_type"] == "StubFail" and "boom on 2" in err["exception_message"]
    assert err["exception_type"] == "RuntimeError" and isinstance(err["traceback"], list)
    assert err["prompt_id"] == body["prompt_id"] and err["executed"] == ["1"]

    jobs = await (await client.get("/api/jobs?status=completed,failed,cancelled")).json()
    job = jobs["jobs"][0]
    assert job["status"] == "failed" and job["execution_error"]["node_id"] == "2"

    _, ok = await post_prompt(client, simple_prompt(9), client_id="tester")
    names = [n for n, _ in await collect_run(ws, ok["prompt_id"])]
    assert "execution_success" in names
    await ws.close()


# -------------------------------------------------------------------------------------------------
# interrupt, queue, history, jobs


async def wait_running(client, pid):
    async def running():
        jobs = await (await client.get("/api/jobs?status=in_progress")).json()
        return any(j["id"] == pid for j in jobs["jobs"])
    await wait_for(running)


async def test_interrupt(client):
    ws = await open_ws(client)
    _, body = await post_prompt(client, slow_prompt(steps=400, delay=0.02, preview=False), client_id="tester")
    pid = body["prompt_id"]
    await wait_running(client, pid)
    assert (await client.post("/api/interrupt", json={"prompt_id": str(uuid.uuid4())})).status == 200
    await asyncio.sleep(0.1)
    assert (await (await client.get(f"/api/jobs/{pid}")).json())["status"] == "in_progress"  # other id: ignored
    assert (await client.post("/api/interrupt", json={"prompt_id": pid})).status == 200
    msgs = await collect_run(ws, pid)
    names = [n for n, _ in msgs]
    assert names[-3:] == ["execution_interrupted", "status", "executing"]
    assert msgs[-3][1]["node_id"] == "2"
    job = await (await client.get(f"/api/jobs/{pid}")).json()
    assert job["status"] == "cancelled"

    # without a body: interrupts whatever runs
    _, body = await post_prompt(client, slow_prompt(steps=400, delay=0.02, preview=False, value=2), client_id="tester")
    await wait_running(client, body["prompt_id"])
    assert (await client.post("/api/interrupt")).status == 200
    names = [n for n, _ in await collect_run(ws, body["prompt_id"])]
    assert "execution_interrupted" in names
    await ws.close()


async def test_jobs_listing_detail_and_cancel(client):
    ids = []
    for v in (1, 2):
        _, body = await post_prompt(client, slow_prompt(steps=1, preview=False, value=v),
                                    extra_data={"extra_pnginfo": {"workflow": WORKFLOW}, "api_key_comfy_org": "secret"})
        ids.append(body["prompt_id"])
        await wait_history(client, body["prompt_id"])
    # one running (slow) and two pending
    _, running = await post_prompt(client, slow_prompt(steps=400, delay=0.02, preview=False, value=3))
    await wait_running(client, running["prompt_id"])
    _, p1 = await post_prompt(client, simple_prompt(21))
    _, p2 = await post_prompt(client, simple_prompt(22))

    active = await (await client.get("/api/jobs?status=in_progress,pending&limit=200&offset=0")).json()
    assert [j["status"] for j in active["jobs"]].count("pending") == 2
    assert {j["id"] for j in active["jobs"]} == {running["prompt_id"], p1["prompt_id"], p2["prompt_id"]}
    assert active["pagination"] == {"offset": 0, "limit": 200, "total": 3, "has_more": False}
    required = {"id", "status", "priority", "create_time", "outputs_count", "previewable_outputs_count"}
    assert all(required <= set(j) for j in active["jobs"])

    done = await (await client.get("/api/jobs?status=completed,failed,cancelled&limit=1&offset=0")).json()
    assert done["pagination"] == {"offset": 0, "limit": 1, "total": 2, "has_more": True}
    newest = done["jobs"][0]
    assert newest["id"] == ids[1]  # newest first
    assert required | {"execution_start_time", "execution_end_time", "preview_output", "workflow_id"} <= set(newest)
    assert newest["outputs_count"] == 1 and newest["previewable_outputs_count"] == 1
    assert newest["preview_output"] == {"filename": "slow_00003_.png", "subfolder": "", "type": "output",
                                        "nodeId": "3", "mediaType": "images"}
    assert newest["workflow_id"] == WORKFLOW["id"]
    page2 = await (await client.get("/api/jobs?status=completed&limit=1&offset=1")).json()
    assert page2["jobs"][0]["id"] == ids[0] and page2["pagination"]["has_more"] is False
    assert (await client.get("/api/jobs?status=bogus")).status == 400
    assert (await client.get("/api/jobs?limit=x")).status == 400

    detail = await (await client.get(f"/api/jobs/{ids[0]}")).json()
    assert detail["outputs"] == {"3": {"images": [{"filename": "slow_00002_.png", "subfolder": "", "type": "output"}]}}
    assert detail["execution_status"]["status_str"] == "success" and detail["execution_status"]["completed"] is True
    assert detail["workflow"]["prompt"]["2"]["class_type"] == "StubSlow"
    assert detail["workflow"]["extra_data"]["extra_pnginfo"]["workflow"] == WORKFLOW
    assert "api_key_comfy_org" not in detail["workflow"]["extra_data"]
    assert (await client.get(f"/api/jobs/{uuid.uuid4()}")).status == 404

    # cancel a pending job, then a batch with the running one
    r = await client.post(f"/api/jobs/{p1['prompt_id']}/cancel")
    assert await r.json() == {"cancelled": True}
    assert (await client.get(f"/api/jobs/{p1['prompt_id']}")).status == 404
    r = await client.post("/api/jobs/cancel", json={"job_ids": [running["prompt_id"], ids[0]]})
    assert await r.json() == {"cancelled": [running["prompt_id"]]}
    entry = await wait_history(client, running["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    await wait_history(client, p2["prompt_id"])  # the remaining pending job still runs
    assert (await client.post(f"/api/jobs/{uuid.uuid4()}/cancel")).status == 404


async def test_queue_and_history_endpoints(client):
    _, running = await post_prompt(client, slow_prompt(steps=400, delay=0.02, preview=False))
    await wait_running(client, running["prompt_id"])
    pending = [(await post_prompt(client, simple_prompt(v)))[1]["prompt_id"] for v in (31, 32, 33)]
    q = await (await client.get("/api/queue")).json()
    assert q["queue_running"][0][1] == running["prompt_id"]
    assert [item[1] for item in q["queue_pending"]] == pending
    assert len(q["queue_pending"][0]) == 5
    assert await (await client.get("/api/prompt")).json() == {"exec_info": {"queue_remaining": 4}}
    assert (await client.post("/api/queue", json={"delete": [pending[0]]})).status == 200
    q = await (await client.get("/api/queue")).json()
    assert [item[1] for item in q["queue_pending"]] == pending[1:]
    assert (await client.post("/api/queue", json={"clear": True})).status == 200
    assert (await (await client.get("/api/queue")).json())["queue_pending"] == []
    await client.post("/api/interrupt")
    await wait_history(client, running["prompt_id"])

    done = [(await post_prompt(client, simple_prompt(v)))[1]["prompt_id"] for v in (41, 42, 43)]
    for pid in done:
        await wait_history(client, pid)
    hist = await (await client.get("/api/history?max_items=2")).json()
    assert list(hist) == done[1:]
    entry = hist[done[2]]
    assert set(entry) == {"prompt", "outputs", "status", "meta"}
    assert entry["prompt"][1] == done[2] and entry["outputs"] == {"2": {"text": ["v=43"]}}
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert (await client.post("/api/history", json={"delete": [done[0]]})).status == 200
    assert await (await client.get(f"/api/history/{done[0]}")).json() == {}
    assert (await client.post("/api/history", json={"clear": True})).status == 200
    assert await (await client.get("/api/history")).json() == {}


async def test_free_calls_the_hook(aiohttp_client, make_app):
    called = threading.Event()
    seen = []

    def on_free(body):
        seen.append(body)
        called.set()

    client = await aiohttp_client(make_app(on_free=on_free))
    assert (await client.post("/api/free", json={"unload_models": True, "free_memory": True})).status == 200
    assert await asyncio.to_thread(called.wait, 5)
    assert seen == [{"unload_models": True, "free_memory": True}]


# -------------------------------------------------------------------------------------------------
# files: view, upload, internal/files


async def test_view_serves_files_from_the_three_folders(client, dirs):
    for kind in ("output", "input", "temp"):
        (dirs[kind] / "sub").mkdir(parents=True, exist_ok=True)
        (dirs[kind] / "sub" / f"{kind}.png").write_bytes(png_bytes())
    r = await client.get("/api/view", params={"filename": "output.png", "subfolder": "sub", "type": "output",
                                             "rand": "0.5"})
    assert r.status == 200 and r.headers["Content-Type"] == "image/png" and await r.read() == png_bytes()
    r = await client.get("/api/view", params={"filename": "input.png [input]", "subfolder": "sub"})
    assert r.status == 200
    r = await client.get("/api/view", params={"filename": "temp.png", "subfolder": "sub", "type": "temp"})
    assert r.status == 200
    r = await client.get("/api/view", params={"filename": "output.png", "subfolder": "sub", "preview": "webp;50"})
    assert r.status == 200 and r.headers["Content-Type"] == "image/webp"
    r = await client.get("/api/view", params={"filename": "output.png", "subfolder": "sub", "channel": "rgb"})
    assert r.status == 200 and Image.open(io.BytesIO(await r.read())).mode == "RGB"
    assert (await client.get("/api/view", params={"filename": "nope.png"})).status == 404
    assert (await client.get("/api/view", params={"filename": "output.png", "subfolder": "sub",
                                                  "type": "models"})).status == 400
    (dirs["output"] / "page.html").write_text("<script>alert(1)</script>")
    r = await client.get("/api/view", params={"filename": "page.html"})
    assert r.status == 200 and r.headers["Content-Type"] == "application/octet-stream"


async def test_view_refuses_paths_outside_the_folders(client, dirs, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    (dirs["input"]).mkdir(parents=True, exist_ok=True)
    os.symlink(secret, dirs["output"] / "link.png")
    os.symlink(tmp_path, dirs["output"] / "linkdir")
    cases = {
        ("../secret.png", ""): 400,
        ("/etc/passwd", ""): 400,
        (str(secret), ""): 400,
        ("..\\secret.png", ""): 400,
        ("../secret.png [input]", ""): 400,
        ("secret.png", "../.."): 403,
        ("secret.png", ".."): 403,
        ("secret.png", str(tmp_path)): 403,
        ("link.png", ""): 403,
        ("secret.png", "linkdir"): 403,
        ("secret.png [output]", "../"): 403,
        ("", ""): 400,
    }
    for (filename, subfolder), expected in cases.items():
        r = await client.get("/api/view", params={"filename": filename, "subfolder": subfolder, "type": "output"})
        assert r.status == expected, (filename, subfolder, r.status)
    # the annotation only names a folder; a bogus one is part of the name
    r = await client.get("/api/view", params={"filename": "x.png [etc]"})
    assert r.status == 404


async def upload(client, data, name="pic.png", **fields):
    form = FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for k, v in fields.items():
        form.add_field(k, v)
    return await client.post("/api/upload/image", data=form)


async def test_upload_image_renames_on_clash(client, dirs):
    r = await upload(client, png_bytes((1, 2, 3)))
    assert r.status == 200 and await r.json() == {"name": "pic.png", "subfolder": "", "type": "input"}
    r = await upload(client, png_bytes((1, 2, 3)))  # identical content: same name, no copy
    assert (await r.json())["name"] == "pic.png"
    r = await upload(client, png_bytes((9, 9, 9)))
    assert (await r.json())["name"] == "pic (1).png"
    r = await upload(client, png_bytes((8, 8, 8)))
    assert (await r.json())["name"] == "pic (2).png"
    r = await upload(client, png_bytes((7, 7, 7)), overwrite="true")
    assert (await r.json())["name"] == "pic.png"
    assert (dirs["input"] / "pic.png").read_bytes() == png_bytes((7, 7, 7))
    r = await upload(client, png_bytes(), name="clip.png", subfolder="pasted", type="temp")
    assert await r.json() == {"name": "clip.png", "subfolder": "pasted", "type": "temp"}
    assert (dirs["temp"] / "pasted" / "clip.png").is_file()
    files = await (await client.get("/internal/files/input")).json()
    assert sorted(files) == ["pic (1).png [input]", "pic (2).png [input]", "pic.png [input]"]
    r = await client.get("/api/view", params={"filename": "pic (1).png [input]"})
    assert r.status == 200


async def test_upload_refuses_bad_input(aiohttp_client, make_app, dirs):
    client = await aiohttp_client(make_app(max_upload_bytes=2000))
    assert (await client.get("/api/features")).status == 200
    big = png_bytes(size=(300, 300)) + b"\0" * 3000
    assert (await upload(client, big)).status == 413
    assert (await upload(client, b"hello, not an image", name="x.png")).status == 400
    assert (await upload(client, png_bytes(), name="../evil.png")).status in (200, 400)
    assert not (dirs["input"].parent / "evil.png").exists()
    assert (await upload(client, png_bytes(), subfolder="../..")).status == 403
    assert (await upload(client, png_bytes(), subfolder="/tmp")).status == 403
    assert (await upload(client, png_bytes(), type="models")).status == 400
    r = await client.post("/api/upload/image", data=b"x", headers={"Content-Type": "text/plain"})
    assert r.status == 400


# -------------------------------------------------------------------------------------------------
# user data (saved workflows)


async def test_userdata_save_list_open_move_delete(client, dirs):
    wf = json.dumps(WORKFLOW).encode()
    r = await client.post("/api/userdata/workflows%2Fmy%20flow.json?overwrite=false&full_info=true", data=wf)
    assert r.status == 200
    info = await r.json()
    assert info["path"] == "workflows/my flow.json" and info["size"] == len(wf)
    assert isinstance(info["modified"], int) and isinstance(info["created"], int)
    assert (dirs["user"] / "default" / "workflows" / "my flow.json").read_bytes() == wf
    r = await client.post("/api/userdata/workflows%2Fmy%20flow.json?overwrite=false", data=b"{}")
    assert r.status == 409
    r = await client.post("/api/userdata/workflows%2Fmy%20flow.json", data=wf)  # overwrite defaults to true
    assert r.status == 200 and await r.json() == "workflows/my flow.json"
    await client.post("/api/userdata/workflows%2Fsub%2Fnested.json", data=b"{}")

    listing = await (await client.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")).json()
    assert [e["path"] for e in listing] == ["my flow.json", "sub/nested.json"]
    assert await (await client.get("/api/userdata?dir=workflows")).json() == ["my flow.json"]
    assert await (await client.get("/api/userdata?dir=workflows&recurse=true&split=true")).json() == [
        ["my flow.json", "my flow.json"], ["sub/nested.json", "sub", "nested.json"]]
    assert (await client.get("/api/userdata?dir=nothing")).status == 404
    assert (await client.get("/api/userdata")).status == 400

    r = await client.get("/api/userdata/workflows%2Fmy%20flow.json")
    assert r.status == 200 and json.loads(await r.read()) == WORKFLOW
    assert (await client.get("/api/userdata/comfy.templates.json")).status == 404

    r = await client.post("/api/userdata/workflows%2Fmy%20flow.json/move/workflows%2Fsub%2Fnested.json?overwrite=false")
    assert r.status == 409
    r = await client.post("/api/userdata/workflows%2Fmy%20flow.json/move/workflows%2Frenamed.json?full_info=true")
    assert r.status == 200 and (await r.json())["path"] == "workflows/renamed.json"
    assert (await client.delete("/api/userdata/workflows%2Frenamed.json")).status == 204
    assert (await client.delete("/api/userdata/workflows%2Frenamed.json")).status == 404


async def test_userdata_is_confined_to_the_user_folder(client, dirs, tmp_path):
    (tmp_path / "outside.json").write_text("{}")
    os.symlink(tmp_path / "outside.json", dirs["user"] / "default" / "workflows" / "link.json")
    for path in ("..%2F..%2Foutside.json", "..%2Fother_user%2Fcomfy.settings.json", "%2Fetc%2Fpasswd",
                 "workflows%2F..%2F..%2F..%2Foutside.json", "workflows%2Flink.json"):
        assert (await client.get(f"/api/userdata/{path}")).status == 403, path
        assert (await client.post(f"/api/userdata/{path}", data=b"x")).status == 403, path
        assert (await client.delete(f"/api/userdata/{path}")).status == 403, path
    assert (await client.post("/api/userdata/workflows%2Fa.json/move/..%2F..%2Fb.json", data=b"")).status == 403
    assert (await client.get("/api/userdata?dir=..")).status == 403
    listing = await (await client.get("/api/userdata?dir=workflows&recurse=true")).json()
    assert "link.json" not in listing
    assert (tmp_path / "outside.json").read_text() == "{}"


async def test_server_state_is_reachable_for_embedding(make_app):
    app = make_app()
    assert server_of(app).pack_name == "sdxl-nodes"


@pytest.mark.filterwarnings("ignore")
def test_server_and_cli_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, sdxl_nodes.runtime.server, sdxl_nodes.runtime.cli; "
            "bad = [m for m in sys.modules if m == 'torch' or m == 'sdxl_nodes.nodes' or "
            "(m.startswith('sdxl_nodes.sdxl_core.') and m != 'sdxl_nodes.sdxl_core.errors')]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or result.stdout


# -------------------------------------------------------------------------------------------------
# hardening (issue 10) and the first hour with `serve` (issue 9)


def png_declaring(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width`` × ``height``: tiny on disk, huge once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    body, left = [], height
    while left:
        n = min(left, 2048)
        body.append(z.compress(row * n))
        left -= n
    body.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")


def strict_json(text: str):
    """Parse like a browser: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


async def test_host_allowlist_and_origin_stop_dns_rebinding(aiohttp_client, make_app):
    client = await aiohttp_client(make_app(allow_hosts=["studio.lan"]))
    port = client.port
    # the attack: a page on evil.example, whose name now resolves to 127.0.0.1
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    for method, path, body in (("post", "/api/prompt", {"prompt": simple_prompt()}),
                               ("post", "/api/settings", {"A": 1}), ("get", "/api/userdata?dir=workflows", None)):
        r = await getattr(client, method)(path, json=body, headers=evil)
        assert r.status == 403, (path, r.status)
        assert "host name" in (await r.json())["error"]
    assert (await client.get("/api/settings", headers={"Host": f"evil.example:{port}"})).status == 403
    for headers in (evil, {"Origin": "http://evil.example"}):  # the websocket too
        with pytest.raises(WSServerHandshakeError) as refused:
            await client.ws_connect("/ws?clientId=evil", headers=headers)
        assert refused.value.status == 403
    assert "A" not in await (await client.get("/api/settings")).json()
    # loopback names, IP literals and --allow-host names are served
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"192.168.1.20:{port}",
                 f"studio.lan:{port}", f"app.localhost:{port}"):
        r = await client.get("/api/settings", headers={"Host": host, "Origin": f"http://{host}"})
        assert r.status == 200, host
    # the Origin must match scheme, host and port
    me = f"127.0.0.1:{port}"
    for origin in (f"https://{me}", f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}", "null"):
        r = await client.post("/api/settings", json={"B": 1}, headers={"Host": me, "Origin": origin})
        assert r.status == 403, origin


async def test_token_is_required_by_bearer_cookie_or_the_printed_url(aiohttp_client, make_app):
    client = await aiohttp_client(make_app(token="s3cret-token"))
    for path in ("/api/queue", "/api/settings", "/", "/api/view?filename=x.png"):
        r = await client.get(path)
        assert r.status == 401, path
        assert "token" in (await r.json())["error"]
    assert (await client.get("/api/queue", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/api/queue", headers={"Authorization": "Bearer s3cret-token"})).status == 200
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/ws?clientId=x")
    assert refused.value.status == 401
    # the printed URL: sets a cookie, drops the token from the address bar
    r = await client.get("/?token=s3cret-token", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/"
    cookie = r.cookies[f"sdxl_nodes_token_{client.port}"]
    assert cookie.value == "s3cret-token" and cookie["httponly"] and cookie["samesite"] == "Strict"
    assert (await client.get("/api/queue")).status == 200  # the test client keeps cookies, as a browser does
    ws = await open_ws(client, "with-cookie")
    await ws.close()


async def test_corrupt_settings_are_kept_aside_not_overwritten(aiohttp_client, make_app, dirs, caplog):
    settings = dirs["user"] / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    for broken in ('{"Comfy.Theme": "dark", oops', "[1, 2]"):
        for old in settings.parent.glob("comfy.settings.json.corrupt-*"):
            old.unlink()
        settings.write_text(broken)
        client = await aiohttp_client(make_app())
        assert await (await client.get("/api/settings")).json() == {"Comfy.TutorialCompleted": True}
        assert (await client.post("/api/settings", json={"A.b": 1})).status == 200
        kept = list(settings.parent.glob("comfy.settings.json.corrupt-*"))
        assert len(kept) == 1 and kept[0].read_text() == broken  # the user's bytes survive
        assert json.loads(settings.read_text()) == {"A.b": 1}
        assert any("unusable" in r.getMessage() and str(kept[0]) in r.getMessage() for r in caplog.records)
        await client.close()


async def test_a_bad_extra_pnginfo_never_breaks_the_jobs_api(client, make_app):
    r = await client.post("/api/prompt", json={"prompt": simple_prompt(), "extra_data": {"extra_pnginfo": "x"}})
    assert r.status == 400 and "extra_pnginfo" in (await r.json())["error"]["message"]
    # even if such an entry reaches the history (an embedding app), /api/jobs keeps answering
    srv = server_of(client.server.app)
    for bad in ("x", ["y"], {"workflow": "z"}, {"workflow": ["w"]}):
        srv.queue.history[str(uuid.uuid4())] = {
            "prompt": [0, "id", simple_prompt(), {"extra_pnginfo": bad, "create_time": 1}, ["2"]],
            "outputs": {}, "status": {"status_str": "success", "completed": True, "messages": []}, "meta": {}}
    r = await client.get("/api/jobs?status=completed,failed,cancelled&limit=64&offset=0")
    assert r.status == 200 and len((await r.json())["jobs"]) == 4
    pid = next(iter(srv.queue.history))
    assert (await client.get(f"/api/jobs/{pid}")).status == 200


async def test_nan_number_is_refused_and_history_stays_strict_json(client):
    for raw in (b'{"prompt": %s, "number": NaN}', b'{"prompt": %s, "number": Infinity}',
                b'{"prompt": %s, "number": "nan"}', b'{"prompt": %s, "number": 1e999}',
                b'{"prompt": %s, "number": true}'):
        r = await client.post("/api/prompt", data=raw % json.dumps(simple_prompt()).encode())
        assert r.status == 400, raw
        assert (await r.json())["error"]["type"] == "invalid_prompt"
    r = await client.post("/api/prompt", data=b'{"prompt": {"1": {"class_type": "StubNumber", "inputs": '
                                              b'{"value": NaN}}, "2": {"class_type": "StubSaveText", '
                                              b'"inputs": {"value": ["1", 0]}}}}')
    assert r.status == 400
    status, ok = await post_prompt(client, simple_prompt(), number=2.5)
    assert status == 200
    await wait_history(client, ok["prompt_id"])
    for path in ("/api/history", "/api/queue", "/api/jobs"):
        strict_json(await (await client.get(path)).text())


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


MULTIPART = "multipart/form-data; boundary=XyZ"


@pytest.mark.parametrize("case", [
    "class_type list", "class_type dict", "_meta string", "_meta list", "nested 5000", "nested 100000",
    "5000-digit integer", "settings nested 5000", "settings 5000-digit integer", "setting nested 100000",
    "upload 300-char filename", "upload NUL in filename", "upload broken multipart"])
async def test_former_500s_are_400s_with_a_message(client, dirs, case):
    """The 13 requests that answered HTTP 500 in the attack run (issue 10, finding 6)."""
    prompt = simple_prompt()
    if case.startswith("class_type"):
        prompt["1"]["class_type"] = ["StubNumber"] if "list" in case else {"a": 1}
        r = await client.post("/api/prompt", json={"prompt": prompt})
    elif case.startswith("_meta"):
        prompt["1"]["_meta"] = "title" if "string" in case else ["t"]
        r = await client.post("/api/prompt", json={"prompt": prompt})
    elif case.startswith("nested"):
        r = await client.post("/api/prompt", data=_nested(int(case.split()[1])))
    elif case == "5000-digit integer":
        r = await client.post("/api/prompt", data=json.dumps({"prompt": simple_prompt()}).replace(
            '"value": 3', '"value": ' + "9" * 5000).encode())
    elif case == "settings nested 5000":
        r = await client.post("/api/settings", data=b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    elif case == "settings 5000-digit integer":
        r = await client.post("/api/settings", data=b'{"a": ' + b"7" * 5000 + b"}")
    elif case == "setting nested 100000":
        r = await client.post("/api/settings/X", data=b"[" * 100000 + b"]" * 100000)
    elif case == "upload 300-char filename":
        r = await upload(client, png_bytes(), name="a" * 296 + ".png")
    elif case == "upload NUL in filename":
        body = (b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a\x00b.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--XyZ--\r\n")
        r = await client.post("/api/upload/image", data=body, headers={"Content-Type": MULTIPART})
    else:
        body = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + png_bytes()[:20]
        r = await client.post("/api/upload/image", data=body, headers={"Content-Type": MULTIPART})
    text = await r.text()
    assert r.status == 400, (case, r.status, text[:300])
    assert "Traceback" not in text and len(text) < 2000
    message = json.dumps(json.loads(text))
    assert any(word in message for word in ("class_type", "_meta", "json_depth", "int_digits", "bytes long",
                                            "invalid file name", "multipart")), message
    assert (await client.get("/api/queue")).status == 200
    assert sorted(p.name for p in dirs["input"].iterdir()) == [] if dirs["input"].exists() else True


async def test_each_limit_is_refused_naming_its_setting(aiohttp_client, make_app, dirs):
    limits = Limits(json_depth=8, int_digits=5, request_bytes=4000, image_pixels=64 * 64)
    client = await aiohttp_client(make_app(limits=limits))
    cases = [
        ("json_depth", await client.post("/api/settings", data=b'{"a": ' + b"[" * 9 + b"]" * 9 + b"}")),
        ("int_digits", await client.post("/api/settings", data=b'{"a": 123456}')),
        ("request_bytes", await client.post("/api/settings", json={"a": "x" * 5000})),
        ("request_bytes", await upload(client, png_bytes() + b"\0" * 5000)),
        ("image_pixels", await upload(client, png_bytes(size=(65, 64)))),
    ]
    for name, r in cases:
        assert r.status in (400, 413), name
        assert name in (await r.json())["error"], name
    assert (await client.post("/api/settings", data=b'{"a": [[[[[[[1]]]]]]], "b": 12345}')).status == 200
    assert (await upload(client, png_bytes(size=(64, 64)))).status == 200


async def test_pixel_bombs_are_refused_from_the_header(client, dirs):
    for side in (13000, 30000):
        data = png_declaring(side, side)
        assert len(data) < 300_000
        r = await upload(client, data, name=f"bomb{side}.png")
        assert r.status == 400, side
        error = (await r.json())["error"]
        assert "image_pixels" in error, error
        assert not (dirs["input"] / f"bomb{side}.png").exists()
    # a huge image already in a folder: served as a file, never decoded for a preview
    (dirs["output"] / "huge.png").write_bytes(png_declaring(13000, 13000))
    r = await client.get("/api/view", params={"filename": "huge.png", "preview": "webp;50"})
    assert r.status == 400 and "image_pixels" in (await r.json())["error"]
    r = await client.get("/api/view", params={"filename": "huge.png", "channel": "rgb"})
    assert r.status == 400
    r = await client.get("/api/view", params={"filename": "huge.png"})
    assert r.status == 200 and await r.read() == (dirs["output"] / "huge.png").read_bytes()


async def test_the_upload_limit_counts_the_whole_request(aiohttp_client, make_app, dirs):
    client = await aiohttp_client(make_app(max_upload_bytes=4000))
    form = FormData()
    for i in range(4):  # four fields under the limit each, over it together
        form.add_field(f"extra{i}", "x" * 1500)
    form.add_field("image", png_bytes(), filename="pic.png", content_type="image/png")
    r = await client.post("/api/upload/image", data=form)
    assert r.status == 413 and "request_bytes" in (await r.json())["error"]
    # the same without a Content-Length (chunked): the bytes are counted as they stream in
    body = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="extra%d"\r\n\r\n' % i + b"x" * 1500 + b"\r\n"
                    for i in range(4))
    body += (b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="pic.png"\r\n\r\n'
             + png_bytes() + b"\r\n--XyZ--\r\n")

    async def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = await client.post("/api/upload/image", data=chunks(), headers={"Content-Type": MULTIPART})
    assert r.status == 413 and "request_bytes" in (await r.json())["error"]
    assert not (dirs["input"] / "pic.png").exists()


async def test_stale_partial_files_are_removed_at_start_and_never_served(aiohttp_client, make_app, dirs):
    (dirs["output"] / "sub").mkdir(parents=True)
    dirs["temp"].mkdir()
    stale = [dirs["output"] / ".partial-k2j3h4.png", dirs["output"] / "sub" / ".partial-x.png",
             dirs["temp"] / ".partial-y.png"]
    for p in stale:
        p.write_bytes(png_bytes()[:30])
    keep = dirs["output"] / "ComfyUI_00001_.png"
    keep.write_bytes(png_bytes())
    client = await aiohttp_client(make_app())
    assert not any(p.exists() for p in stale) and keep.exists()
    late = dirs["output"] / ".partial-late.png"  # a save in progress while the server runs
    late.write_bytes(png_bytes())
    r = await client.get("/api/view", params={"filename": ".partial-late.png"})
    assert r.status == 404
    assert (await client.get("/api/view", params={"filename": keep.name})).status == 200


def frontend_total(msgs, prompt_ids):
    """The 1.58.1 editor's "Total" (executionStore): nodes seen in execution_cached or executed / all nodes."""
    done = set()
    totals = []
    for name, data in msgs:
        if name == "execution_cached":
            done.update(data["nodes"])
        elif name == "executed":
            done.add(data["node"])
        elif name == "progress":
            totals.append((data["node"], data["value"], len(done & prompt_ids) / len(prompt_ids)))
    return totals


async def test_total_progress_moves_while_a_node_runs(client):
    ws = await open_ws(client)
    prompt = slow_prompt(steps=5, preview=False)
    _, body = await post_prompt(client, prompt, client_id="tester")
    msgs = await collect_run(ws, body["prompt_id"])
    totals = frontend_total(msgs, set(prompt))
    assert [t[:2] for t in totals] == [("2", v) for v in range(1, 6)]
    assert all(abs(total - 1 / 3) < 1e-9 for _, _, total in totals), totals  # node 1 is done while 2 runs
    cached = [d for n, d in msgs if n == "execution_cached"]
    assert cached[0]["nodes"] == []  # the executor's own message is unchanged
    assert sorted(n for d in cached[1:] for n in d["nodes"]) == ["1", "2"]  # 3 is reported by executed
    await ws.close()


def frontend_toasts_failure(job: dict) -> bool:
    """The 1.58.1 banner: a finished job with an end time that is not completed toasts "Job failed"."""
    return isinstance(job.get("execution_end_time"), int) and job["status"] != "completed"


async def test_cancel_reads_as_cancelled_not_failed(client):
    _, body = await post_prompt(client, slow_prompt(steps=400, delay=0.02, preview=False))
    pid = body["prompt_id"]
    await wait_running(client, pid)
    assert await (await client.post(f"/api/jobs/{pid}/cancel")).json() == {"cancelled": True}
    await wait_history(client, pid)
    prompt = {"1": {"class_type": "StubNumber", "inputs": {"value": 2}},
              "2": {"class_type": "StubFail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "StubSink", "inputs": {"value": ["2", 0]}}}
    _, failed = await post_prompt(client, prompt)
    await wait_history(client, failed["prompt_id"])
    jobs = {j["id"]: j for j in (await (await client.get(
        "/api/jobs?status=completed,failed,cancelled&limit=64&offset=0")).json())["jobs"]}
    assert jobs[pid]["status"] == "cancelled" and not frontend_toasts_failure(jobs[pid])
    assert jobs[failed["prompt_id"]]["status"] == "failed" and frontend_toasts_failure(jobs[failed["prompt_id"]])
    detail = await (await client.get(f"/api/jobs/{pid}")).json()
    assert detail["execution_end_time"] >= detail["execution_start_time"]  # kept where nothing toasts


async def test_serve_logs_each_prompt_and_node_failures(client, caplog):
    caplog.set_level("INFO", logger="sdxl_nodes.runtime.server")
    _, ok = await post_prompt(client, simple_prompt(5))
    await wait_history(client, ok["prompt_id"])
    prompt = {"1": {"class_type": "StubNumber", "inputs": {"value": 2}},
              "2": {"class_type": "StubFail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "StubSink", "inputs": {"value": ["2", 0]}}}
    _, bad = await post_prompt(client, prompt)
    await wait_history(client, bad["prompt_id"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"queued prompt {ok['prompt_id']}") for line in lines)
    finished = [line for line in lines if line.startswith(f"prompt {ok['prompt_id']} finished: success in ")]
    assert len(finished) == 1 and finished[0].endswith(" s")
    failure = next(r for r in caplog.records if r.levelname == "ERROR" and bad["prompt_id"] in r.getMessage())
    text = failure.getMessage()
    assert "node 2 (StubFail) failed" in text and "boom on 2" in text and "Traceback" in text


SERVE_SCRIPT = """
import logging, sys
from types import SimpleNamespace
sys.path.insert(0, {tests!r})
import stub_nodes
from sdxl_nodes.runtime.server import serve_from_cli
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
args = SimpleNamespace(host={host!r}, port={port}, user_dir={root!r} + "/user", input_dir={root!r} + "/input",
                       output_dir={root!r} + "/output", temp_dir=None, models_dir={models!r}, token=None,
                       allow_host=None, limit=None)
sys.exit(serve_from_cli(args, stub_nodes.NODE_CLASS_MAPPINGS))
"""


def start_serve(tmp_path, host="127.0.0.1", port=0, models=None):
    import subprocess
    import sys

    code = SERVE_SCRIPT.format(tests=str(Path(__file__).parent), host=host, port=port, root=str(tmp_path),
                               models=str(models or tmp_path / "no-such-models"))
    return subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def read_until(proc, marker, timeout=60.0):
    """stdout lines of ``proc`` up to and including the one that contains ``marker``."""
    import queue

    if not hasattr(proc, "lines"):  # one reader thread per process: select() cannot see Python's buffer
        proc.lines = queue.Queue()

        def pump():
            for line in proc.stdout:
                proc.lines.put(line.rstrip("\n"))
            proc.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
    lines = []
    while True:
        try:
            line = proc.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{marker!r} not printed within {timeout} s; got {lines}") from None
        if line is None:
            raise AssertionError(f"{marker!r} not printed before exit; got {lines}, stderr {proc.stderr.read()}")
        lines.append(line)
        if marker in line:
            return lines


@pytest.mark.filterwarnings("ignore")
def test_serve_prints_where_it_listens_refuses_a_busy_port_and_stops_cleanly(tmp_path):
    import re
    import signal

    proc = start_serve(tmp_path)
    try:
        lines = read_until(proc, "Ctrl-C stops")
        url = next(re.search(r"http://127\.0\.0\.1:(\d+)/", line) for line in lines if "editor:" in line)
        port = int(url.group(1))
        assert lines[0] == f"sdxl-nodes editor: http://127.0.0.1:{port}/"  # loopback: no token, no warning
        assert any("no-such-models does not exist" in line for line in lines)
        # a second server on the same port: one line, exit 1, no traceback
        busy = start_serve(tmp_path / "b", port=port)
        out, err = busy.communicate(timeout=60)
        assert busy.returncode == 1, (out, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"port {port} is already in use" in errors[0] and "--port 0" in errors[0]
        assert "Traceback" not in err
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
        assert "sdxl-nodes editor stopped" in read_until(proc, "stopped")
        err = proc.stderr.read()
        assert "Traceback" not in err and "does not exist" in err  # the warning went to the log too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.filterwarnings("ignore")
def test_serve_on_all_interfaces_warns_and_requires_a_token(tmp_path):
    import re
    import signal
    import urllib.error
    import urllib.request

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "sd_xl_base_1.0.safetensors").write_bytes(b"")
    proc = start_serve(tmp_path, host="0.0.0.0", models=models)
    try:
        lines = read_until(proc, "Ctrl-C stops")
        text = "\n".join(lines)
        assert lines[0].startswith("WARNING: the editor listens on all network interfaces")
        assert "http://0.0.0.0" not in text
        m = re.search(r"editor: http://127\.0\.0\.1:(\d+)/\?token=([\w-]{20,})$", text, re.MULTILINE)
        assert m, text
        port, token = m.groups()
        assert "from another machine: http://" in text and f":{port}/?token={token}" in text
        assert "1 checkpoint found" in text
        base = f"http://127.0.0.1:{port}/api/queue"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base, timeout=10)
        assert refused.value.code == 401
        req = urllib.request.Request(base, headers={"Authorization": f"Bearer {token}"})
        assert json.load(urllib.request.urlopen(req, timeout=10)) == {"queue_running": [], "queue_pending": []}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.filterwarnings("ignore")
def test_limit_options_name_the_settings():
    from sdxl_nodes.runtime.server import parse_limits

    assert parse_limits(["image_pixels=100_000_000", "json-depth=10"]) == Limits(image_pixels=10**8, json_depth=10)
    for bad, expected in (("pixels=5", "NAME one of prompt_chars"), ("image_pixels", "NAME=VALUE"),
                          ("image_pixels=big", "whole number"), ("json_depth=0", "at least 1")):
        with pytest.raises(ValueError, match=expected):
            parse_limits([bad])
