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

**Abuse section** (``--abuse-only`` runs just this; ``--no-abuse`` skips it), loopback only, every
loop bounded:

* ``GET /api/queue`` latency p50/p95 idle (the reference), while the worker is busy with a prompt
  whose text is 1 MB (or, when the server refuses that prompt, while it is being posted again and
  again), and while 200 clients poll ``/api/queue`` at once;
* peak RSS of a server process (stub nodes, its own process) while a PNG declaring 13000² pixels
  is uploaded and then previewed (``/api/view?preview=webp``), for this tree and for the commit
  given by ``--before`` (extracted with ``git archive`` into a temp folder).

Never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
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
    parser.add_argument("--no-abuse", action="store_true", help="skip the abuse section")
    parser.add_argument("--abuse-only", action="store_true", help="run only the abuse section")
    parser.add_argument("--before", default="b3fb932",
                        help="commit whose server is the 'before' of the pixel-bomb RSS row (default: b3fb932)")
    parser.add_argument("--bomb-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bomb_child:
        print(json.dumps(bomb_child()))
        return
    if args.abuse_only:
        print_rows(abuse_section(args))
        os._exit(0)  # a worker thread may still be inside a prompt that ignores interrupts

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
    if not args.no_abuse:
        rows += abuse_section(args)
    print_rows(rows)
    if not args.no_abuse:
        os._exit(0)  # a worker thread may still be inside a prompt that ignores interrupts


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure':<{width}}  value\n{'-' * width}  {'-' * 30}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# -------------------------------------------------------------------------------------------------
# abuse


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def p50_p95(values: list[float]) -> str:
    return f"{pct(values, 0.5):.1f} / {pct(values, 0.95):.1f} ms (n={len(values)})"


def probe_queue(url: str, *, seconds: float, max_requests: int, while_=lambda: True) -> list[float]:
    """Sequential ``GET /api/queue`` latencies in ms, for at most ``seconds`` / ``max_requests``."""
    out: list[float] = []
    end = time.perf_counter() + seconds
    while len(out) < max_requests and time.perf_counter() < end and while_():
        t = time.perf_counter()
        urllib.request.urlopen(url + "api/queue", timeout=60).read()
        out.append((time.perf_counter() - t) * 1000)
    return out


def post_json(url: str, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def queue_busy(url: str) -> bool:
    q = json.load(urllib.request.urlopen(url + "api/queue", timeout=60))
    return bool(q["queue_running"] or q["queue_pending"])


def megabyte_prompt(kind: str, url: str) -> dict:
    text = ("a glass bottle with a galaxy inside, evening sunset, " * 20_000)[: 1 << 20]
    if kind == "stub":  # no text encoder among the stubs: a long busy node with a 1 MB widget
        return {"1": {"class_type": "StubNumber", "inputs": {"value": 1}},
                "2": {"class_type": "StubSlow", "inputs": {"value": ["1", 0], "steps": 1000, "delay": 0.01,
                                                          "preview": False, "note": text}},
                "3": {"class_type": "StubSaveText", "inputs": {"value": ["2", 0]}}}
    prompt = run_prompt(kind, url, 256, 4)
    for node in prompt.values():
        for k in ("text_g", "text_l", "text"):
            if k in node["inputs"] and isinstance(node["inputs"][k], str):
                node["inputs"][k] = text
    return prompt


async def many_pollers(url: str, clients: int, polls: int) -> tuple[list[float], float]:
    import aiohttp

    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def poller() -> None:
            for _ in range(polls):
                t = time.perf_counter()
                async with session.get(url + "api/queue") as r:
                    await r.read()
                latencies.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(poller() for _ in range(clients)))
        return latencies, time.perf_counter() - t0


def png_declaring(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width`` × ``height``: ~100 KB on disk, huge once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z, parts = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9), []
    for start in range(0, height, 2048):
        parts.append(z.compress(row * min(2048, height - start)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def bomb_child() -> dict:
    """In its own process: peak RSS while a 13000² PNG is uploaded, then previewed."""
    from sdxl_nodes.runtime.server import BackgroundServer

    root = Path(tempfile.mkdtemp(prefix="bench-bomb-"))
    app = build_app("stub", root)
    server = BackgroundServer(app)
    url = server.start()
    data = png_declaring(13000, 13000)
    boundary = "benchbomb"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bomb.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    samples, stop = [rss_mb()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb())
            time.sleep(0.005)

    base = rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    req = urllib.request.Request(url + "api/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t = time.perf_counter()
    try:
        upload_status = urllib.request.urlopen(req, timeout=300).status
    except urllib.error.HTTPError as e:
        upload_status = e.code
    upload_s = time.perf_counter() - t
    upload_peak = max(samples)
    (root / "output" / "bomb.png").write_bytes(data)  # as if a node had saved it
    t = time.perf_counter()
    try:
        view_status = urllib.request.urlopen(url + "api/view?filename=bomb.png&type=output&preview=webp;50",
                                             timeout=300).status
    except urllib.error.HTTPError as e:
        view_status = e.code
    view_s = time.perf_counter() - t
    stop.set()
    sampler.join()
    server.stop()
    return {"file_kb": len(data) / 1024, "base": base, "upload_peak": upload_peak, "upload_status": upload_status,
            "upload_s": upload_s, "view_peak": max(samples), "view_status": view_status, "view_s": view_s}


def run_bomb_child(pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bomb-child"], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bomb child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def abuse_section(args) -> list[tuple[str, str]]:
    from sdxl_nodes.runtime.server import BackgroundServer

    rows: list[tuple[str, str]] = []
    root = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    server = BackgroundServer(build_app(args.nodes, root))
    url = server.start()
    idle = probe_queue(url, seconds=20, max_requests=300)
    rows.append(("abuse: GET /api/queue idle p50 / p95 (reference)", p50_p95(idle)))

    prompt = megabyte_prompt(args.nodes, url)
    t = time.perf_counter()
    status, answer = post_json(url, "api/prompt", {"prompt": prompt})
    rows.append((f"abuse: POST a 1 MB prompt ({args.nodes} nodes)",
                 f"HTTP {status} in {(time.perf_counter() - t) * 1000:.0f} ms"
                 + (f": {str(answer.get('error', {}).get('message', ''))[:60]}" if status != 200 else "")))
    if status == 200:
        time.sleep(0.2)
        busy = probe_queue(url, seconds=15, max_requests=300, while_=lambda: queue_busy(url))
        label = "abuse: GET /api/queue p50 / p95, worker busy with the 1 MB prompt"
        post_json(url, "api/interrupt", {})
        t = time.perf_counter()
        while queue_busy(url) and time.perf_counter() - t < 10:
            time.sleep(0.1)
        freed = time.perf_counter() - t
        rows.append(("abuse: worker free after POST /api/interrupt",
                     f"{freed:.1f} s" if freed < 10 else "not within 10 s (the prompt ignores interrupts)"))
    else:  # refused: measure while the same 1 MB prompt is posted back to back
        stop = threading.Event()

        def hammer() -> None:
            for _ in range(50):
                if stop.is_set():
                    return
                post_json(url, "api/prompt", {"prompt": prompt})

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        busy = probe_queue(url, seconds=15, max_requests=300, while_=thread.is_alive)
        stop.set()
        thread.join(60)
        label = "abuse: GET /api/queue p50 / p95, 1 MB prompts posted back to back"
    if busy:
        rows.append((label, p50_p95(busy) + f", p95 ×{pct(busy, 0.95) / pct(idle, 0.95):.1f} vs idle"))
    latencies, wall = asyncio.run(many_pollers(url, clients=200, polls=10))
    rows.append(("abuse: 200 clients × 10 polls of /api/queue p50 / p95",
                 p50_p95(latencies) + f", {len(latencies) / wall:.0f} req/s, p95 ×{pct(latencies, 0.95) / pct(idle, 0.95):.1f}"
                                      " vs idle"))
    server.stop()

    after = run_bomb_child(None)
    before = None
    try:
        old = Path(tempfile.mkdtemp(prefix="bench-before-")) / "sdxl_nodes"
        old.mkdir()
        tar = subprocess.run(["git", "-C", str(REPO), "archive", args.before], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
        before = run_bomb_child(str(old.parent))
    except (subprocess.CalledProcessError, FileNotFoundError, RuntimeError) as e:
        rows.append((f"abuse: pixel bomb before ({args.before})", f"not measured: {str(e)[:80]}"))
    for name, m in (("before " + args.before, before), ("after (this tree)", after)):
        if m is None:
            continue
        rows.append((f"abuse: 13000² PNG ({m['file_kb']:.0f} KB) upload, {name}",
                     f"HTTP {m['upload_status']} in {m['upload_s']:.2f} s, RSS +{m['upload_peak'] - m['base']:.0f} MiB"))
        rows.append((f"abuse: 13000² PNG preview (webp), {name}",
                     f"HTTP {m['view_status']} in {m['view_s']:.2f} s, RSS +{m['view_peak'] - m['base']:.0f} MiB "
                     f"(peak {m['view_peak']:.0f} MiB)"))
    if before is not None:
        rows.append(("abuse: preview RSS growth after / before",
                     f"{(after['view_peak'] - after['base']) / max(1.0, before['view_peak'] - before['base']):.3f}"))
    return rows


if __name__ == "__main__":
    main()
