"""Server benchmark: editor first paint, /api/object_info latency, websocket event latency, RSS.

    python benchmarks/bench_server.py [--nodes real|stub] [--size 256] [--steps 8] [--repeat 20]

* start → listening, and navigation → first contentful paint / graph on canvas in Debian's
  Chromium (Playwright, a fresh profile; browser start-up itself is reported separately);
* ``GET /api/object_info`` over HTTP (median / p95 of ``--repeat`` requests);
* websocket latency: the time between the executor emitting an event (on the worker thread) and
  a websocket client in another thread receiving it, for every event of one run;
* resident memory of this process (server and benchmark clients share it) idle and, sampled every
  20 ms, during the run.

The server runs in this process (``BackgroundServer``) so one clock times both ends. With
``--nodes real`` the run is the shipped base + refiner workflow on tiny random checkpoints.
Never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def build_app(kind: str, root: Path):
    from sdxl_nodes.runtime.server import DEFAULT_WORKFLOW_NAME, create_app, load_shipped_workflows

    dirs = {k: root / k for k in ("input", "output", "temp")}
    workflows = load_shipped_workflows()
    if kind == "real":
        from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS as classes
        from sdxl_nodes.nodes import NODE_DISPLAY_NAME_MAPPINGS as names
        from sdxl_nodes.nodes.environment import configure
        from sdxl_nodes.sdxl_core.checkpoint import write_tiny_checkpoints

        write_tiny_checkpoints(root / "models")
        configure(models_dir=root / "models", **{f"{k}_dir": v for k, v in dirs.items()})
    else:
        sys.path.insert(0, str(REPO / "tests"))
        import stub_nodes

        classes, names = stub_nodes.NODE_CLASS_MAPPINGS, {}
    return create_app(classes, display_names=names, user_dir=root / "user",
                      default_workflow=workflows.get(DEFAULT_WORKFLOW_NAME), templates=workflows,
                      **{f"{k}_dir": v for k, v in dirs.items()})


def run_prompt(kind: str, url: str, size: int, steps: int) -> dict:
    if kind == "stub":
        return {"1": {"class_type": "StubNumber", "inputs": {"value": 1}},
                "2": {"class_type": "StubSlow", "inputs": {"value": ["1", 0], "steps": steps * 10,
                                                          "delay": 0.002, "preview": True}},
                "3": {"class_type": "StubSaveText", "inputs": {"value": ["2", 0]}}}
    from sdxl_nodes.runtime.workflow import load_workflow_data

    info = json.load(urllib.request.urlopen(url + "api/object_info"))
    workflow = json.loads((REPO / "workflows" / "sdxl_base_refiner.json").read_text())
    prompt = load_workflow_data(workflow, info).prompt
    for node in prompt.values():
        for k in ("width", "height", "target_width", "target_height"):
            if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                node["inputs"][k] = size
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def measure_browser(url: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        t0 = time.perf_counter()
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS)
        launched = time.perf_counter()
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        nav = time.perf_counter()
        page.goto(url)
        page.wait_for_function("() => window.app?.graph?._nodes?.length > 0", timeout=120_000)
        graph = time.perf_counter()
        fcp = page.evaluate("""() => (performance.getEntriesByType('paint')
            .find(e => e.name === 'first-contentful-paint') ?? {startTime: NaN}).startTime""")
        browser.close()
    return {"launch": launched - t0, "fcp": fcp / 1000, "graph": graph - nav}


async def ws_run(url: str, prompt: dict, emitted: list, received: list) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws") + "ws?clientId=bench") as ws:
            await ws.receive()  # status
            await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            await ws.receive()  # feature_flags
            async with session.post(url + "api/prompt", json={"prompt": prompt, "client_id": "bench"}) as r:
                body = await r.json()
                assert r.status == 200, body
            async for msg in ws:
                now = time.perf_counter()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    received.append(("preview", now))
                    continue
                m = json.loads(msg.data)
                if m["type"] == "status" or (m["type"] == "executing" and m["data"]["node"] is None):
                    if m["type"] == "executing":
                        return
                    continue
                received.append((m["type"], now))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", choices=["real", "stub"], default="real")
    parser.add_argument("--size", type=int, default=256, help="image size of the measured run (real nodes)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()

    from sdxl_nodes.runtime.server import BackgroundServer, server_of

    rows: list[tuple[str, str]] = []
    root = Path(tempfile.mkdtemp(prefix="bench-server-"))
    t0 = time.perf_counter()
    app = build_app(args.nodes, root)
    t_app = time.perf_counter()
    server = BackgroundServer(app)
    url = server.start()
    t_listen = time.perf_counter()
    rows += [("nodes", args.nodes), ("create_app (incl. node import, tiny checkpoints)", f"{t_app - t0:.2f} s"),
             ("start → listening", f"{(t_listen - t_app) * 1000:.0f} ms")]

    if not args.no_browser:
        b = measure_browser(url)
        rows += [("chromium launch (not the server's)", f"{b['launch']:.2f} s"),
                 ("navigation → first contentful paint", f"{b['fcp'] * 1000:.0f} ms"),
                 ("navigation → default graph on canvas", f"{b['graph']:.2f} s"),
                 ("server start → graph on canvas (excl. browser launch)",
                  f"{(t_listen - t_app) + b['graph']:.2f} s")]

    times = []
    for _ in range(args.repeat):
        s = time.perf_counter()
        urllib.request.urlopen(url + "api/object_info").read()
        times.append(time.perf_counter() - s)
    times.sort()
    rows.append(("GET /api/object_info median / p95",
                 f"{statistics.median(times) * 1000:.1f} / {times[int(0.95 * (len(times) - 1))] * 1000:.1f} ms"))

    idle = rss_mb()
    rows.append(("RSS idle (server + bench in one process)", f"{idle:.0f} MiB"))

    # websocket latency: stamp each executor event where it is emitted
    srv = server_of(app)
    emitted: list[tuple[str, float]] = []
    original = srv.queue.executor.on_event

    def stamped(name, data):
        emitted.append((name, time.perf_counter()))
        original(name, data)

    srv.queue.executor.on_event = stamped
    prompt = run_prompt(args.nodes, url, args.size, args.steps)
    peak, sampling = [idle], threading.Event()

    def sample():
        while not sampling.is_set():
            peak.append(rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    received: list[tuple[str, float]] = []
    t_run = time.perf_counter()
    asyncio.run(ws_run(url, prompt, emitted, received))
    run_s = time.perf_counter() - t_run
    sampling.set()
    sampler.join()
    server.stop()

    by_name: dict[str, list[float]] = {}
    for name, t in emitted:
        by_name.setdefault(name, []).append(t)
    latencies = []
    seen: dict[str, int] = {}
    for name, t in received:
        i = seen.get(name, 0)
        seen[name] = i + 1
        if i < len(by_name.get(name, [])):
            latencies.append((t - by_name[name][i]) * 1000)
    latencies.sort()
    rows += [("run (prompt → executing null)", f"{run_s:.2f} s, {len(received)} events"),
             ("ws latency median / p95 / max",
              f"{statistics.median(latencies):.2f} / {latencies[int(0.95 * (len(latencies) - 1))]:.2f} / "
              f"{latencies[-1]:.2f} ms"),
             ("RSS peak during the run", f"{max(peak):.0f} MiB")]

    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure':<{width}}  value\n{'-' * width}  {'-' * 30}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
