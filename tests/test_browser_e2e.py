"""The official ComfyUI editor (comfyui-frontend-package) in real Chromium against our server.

Starts ``runtime/server.py`` on a free port with the real node pack and tiny random checkpoints,
then drives Debian's Chromium with Playwright: the page boots without console errors (only the
expected optional 404s and offline failures), our nodes are in ``/api/object_info`` and the node
library, the shipped default workflow opens with no missing-node dialog, and Run puts the saved
image on the save node.

The editor is also the independent reference for our UI → API converter: every workflow in
``workflows/`` and ``tests/data/ui_workflows/`` is loaded into the real frontend, and the prompt its own
``app.graphToPrompt()`` builds, and the ``POST /api/prompt`` body it sends when Run is clicked, must equal
``runtime.workflow.ui_to_api``. For the shipped workflows the frontend's prompt must also equal the recorded
``tests/data/<name>.api.json`` (captured here, see ``RECORD``), which the headless tests use as goldens.

Each shipped workflow must open readable at 1400×900 (zoom at or above the frontend's low-quality
threshold, every node on screen and not under the minimap or any other overlay), with no two nodes
overlapping at the sizes the frontend gives them (real widget heights, images shown). Screenshots go to
``test-artifacts/`` (ignored by git).

Never skipped: without Chromium or the playwright package this fails with how to install them
(``apt-get install -y chromium``, ``pip install playwright``; never ``playwright install``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
DATA = Path(__file__).resolve().parent / "data"
SHIPPED = sorted((REPO / "workflows").glob("*.json"))
# Every UI workflow the frontend is compared on; a file added to tests/data/ui_workflows/ is picked up.
def _recorded_ui_workflows() -> list[Path]:
    """``tests/data/ui_workflows/X.json`` that have the frontend's recorded ``X.frontend_prompt.json``, except
    those built from the made-up probe nodes (support/probe_object_info.json) that no server serves: those are
    checked against their recorded prompt by tests/test_ui_conversion.py."""
    folder = DATA / "ui_workflows"
    probes = set(json.loads((folder / "support" / "probe_object_info.json").read_text(encoding="utf-8")))
    found = []
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".frontend_prompt.json") or not path.with_name(f"{path.stem}.frontend_prompt.json").is_file():
            continue
        if {n.get("type") for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]} & probes:
            continue
        found.append(path)
    return found


UI_WORKFLOWS = SHIPPED + _recorded_ui_workflows()
# SDXL_NODES_RECORD_FRONTEND_PROMPTS=1 writes the prompts the frontend builds for the shipped workflows to
# tests/data/<name>.api.json (after a shipped workflow changed); the comparisons still run.
RECORD = os.environ.get("SDXL_NODES_RECORD_FRONTEND_PROMPTS") == "1"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Requests the editor makes on every boot that legitimately answer 404 (API.md §2.2).
EXPECTED_404_PATHS = {"/user.css", "/api/userdata/user.css", "/api/userdata/comfy.templates.json"}
OUR_NODES = ["SDXLCheckpointLoader", "SDXLDualCLIPEncode", "SDXLSizeCropConditioning", "SDXLRefinerConditioning",
             "SDXLEmptyLatent", "SDXLBaseSampler", "SDXLNoiseAndRefine", "SDXLVAEDecode", "SDXLVAEEncode",
             "SDXLLoadImage", "SDXLSaveImage", "SDXLPreviewImage"]
BOOT_TIMEOUT_MS = 60_000
RUN_TIMEOUT_MS = 90_000


def _chromium() -> str:
    path = os.environ.get("SDXL_NODES_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium is needed for the browser end-to-end test and was not found at /usr/bin/chromium "
                    "(install it with `apt-get install -y chromium`, or set SDXL_NODES_CHROMIUM)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    from sdxl_nodes.nodes.environment import configure
    from sdxl_nodes.runtime.cli import node_pack
    from sdxl_nodes.runtime.server import (
        DEFAULT_WORKFLOW_NAME,
        BackgroundServer,
        create_app,
        load_shipped_workflows,
    )
    from sdxl_nodes.sdxl_core.checkpoint import write_tiny_checkpoints

    root = tmp_path_factory.mktemp("editor")
    write_tiny_checkpoints(root / "models")
    dirs = {k: root / k for k in ("input", "output", "temp")}
    dirs["input"].mkdir(parents=True)
    _write_png(dirs["input"] / "example.png", (512, 512))  # what the img2img/refine workflows load
    configure(models_dir=root / "models", **{f"{k}_dir": v for k, v in dirs.items()})
    workflows = load_shipped_workflows()
    assert DEFAULT_WORKFLOW_NAME in workflows, "workflows/sdxl_base_refiner.json is missing"
    classes, names = node_pack(standalone=True)  # what `sdxl-nodes serve` registers: ours + the core set
    app = create_app(classes, display_names=names,
                     input_dir=dirs["input"], output_dir=dirs["output"], temp_dir=dirs["temp"],
                     user_dir=root / "user", default_workflow=workflows[DEFAULT_WORKFLOW_NAME],
                     templates=workflows, model_folders={"checkpoints": [str(root / "models")]})
    server = BackgroundServer(app)
    url = server.start()
    yield url
    server.stop()


def _write_png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    Image.new("RGB", size, (200, 110, 40)).save(path)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is needed (`pip install playwright`; it drives the "
                    "system Chromium, so never run `playwright install`)", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Editor:
    """A fresh browser profile with the editor open; records console problems and socket frames."""

    def __init__(self, browser, url: str):
        self.url = url
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(BOOT_TIMEOUT_MS)
        self.problems: list[str] = []
        self.binary_frames = 0
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("response", self._response)
        self.page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload) -> None:
        if isinstance(payload, (bytes, bytearray)):
            self.binary_frames += 1

    def _local(self, url: str) -> bool:
        return urlsplit(url).netloc == urlsplit(self.url).netloc

    def _console(self, msg) -> None:
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "")
        if msg.text.startswith("Failed to load resource"):
            if not self._local(url):
                return  # api.comfy.org and other hosts: offline here, harmless (API.md §9.14)
            if "404" in msg.text and urlsplit(url).path in EXPECTED_404_PATHS:
                return
        self.problems.append(f"console error: {msg.text} ({url})")

    def _response(self, response) -> None:
        if response.status >= 400 and self._local(response.url):
            path = urlsplit(response.url).path
            if not (response.status == 404 and path in EXPECTED_404_PATHS):
                self.problems.append(f"HTTP {response.status} for {response.url}")

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_function("() => window.app?.graph?._nodes?.length > 0", timeout=BOOT_TIMEOUT_MS)
        # the websocket is up once the run button is usable
        self.page.get_by_role("button", name="Run", exact=True).wait_for(state="visible")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def editor(browser, server_url):
    e = Editor(browser, server_url)
    e.open()
    yield e
    e.close()


def _shipped_default() -> dict:
    return json.loads((REPO / "workflows" / "sdxl_base_refiner.json").read_text(encoding="utf-8"))


def test_boots_with_our_default_workflow_and_no_errors(editor):
    page = editor.page
    graph = page.evaluate("() => app.graph._nodes.map(n => [String(n.id), n.type, !!n.has_errors])")
    shipped = _shipped_default()
    assert sorted((str(n["id"]), n["type"]) for n in shipped["nodes"]) == sorted((i, t) for i, t, _ in graph)
    assert not any(err for _, _, err in graph)
    page.wait_for_timeout(1000)  # let late boot requests and dialogs settle
    assert page.get_by_text("Missing Node", exact=False).count() == 0
    assert page.locator("[role=dialog]:visible").count() == 0
    names = page.evaluate("async () => Object.keys(await (await fetch('api/object_info')).json())")
    assert set(OUR_NODES) <= set(names)
    assert editor.problems == []


def test_node_library_lists_our_nodes(editor):
    page = editor.page
    page.get_by_role("button", name="Node Library (n)").click()
    page.get_by_placeholder("Search Nodes", exact=False).first.fill("SDXL")
    for title in ("SDXL Checkpoint Loader", "SDXL Base Sampler", "SDXL Save Image"):
        page.get_by_text(title, exact=True).first.wait_for(state="visible")
    assert editor.problems == []


def test_run_shows_the_image_on_the_save_node(editor):
    from sdxl_nodes.runtime.workflow import read_png_text

    page = editor.page
    save_id = next(n["id"] for n in _shipped_default()["nodes"] if n["type"] == "SDXLSaveImage")
    # Like a user would: a small picture and few steps, so the tiny networks finish in seconds.
    page.evaluate("""() => { for (const node of app.graph._nodes) for (const w of node.widgets ?? []) {
        if (['width', 'height', 'target_width', 'target_height'].includes(w.name)) w.value = 128;
        if (w.name === 'steps') w.value = 4; } }""")
    t0 = time.monotonic()
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function(f"() => app.nodeOutputs?.['{save_id}']?.images?.length > 0", timeout=RUN_TIMEOUT_MS)
    image = page.evaluate(f"() => app.nodeOutputs['{save_id}'].images[0]")
    assert image["type"] == "output" and image["filename"].endswith(".png")
    # the node shows it: an <img> from /api/view, loaded
    page.wait_for_function(
        f"""() => (app.graph.getNodeById({save_id}).imgs ?? []).some(
            i => i.src.includes('/api/view?') && i.complete && i.naturalWidth > 0)""", timeout=RUN_TIMEOUT_MS)
    src = page.evaluate(f"() => app.graph.getNodeById({save_id}).imgs[0].src")
    assert image["filename"] in src
    page.wait_for_timeout(500)  # one more frame so the screenshot shows it
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "editor_after_run.png"))
    # the samplers' live previews and the saved image made no node grow over another
    state = page.evaluate(CANVAS_STATE_JS)
    assert _overlaps(state["nodes"]) == []
    assert page.evaluate("() => app.graph._nodes.filter(n => n.imgs?.length).length") >= 2  # previews shown

    response = page.request.get(src)
    assert response.status == 200 and response.headers["content-type"] == "image/png"
    chunks = read_png_text(response.body())
    assert json.loads(chunks["prompt"])[str(save_id)]["class_type"] == "SDXLSaveImage"
    assert len(json.loads(chunks["workflow"])["nodes"]) == len(_shipped_default()["nodes"])
    assert editor.binary_frames > 0, "no live preview frames reached the page"
    assert editor.problems == []
    print(f"run + image shown in {time.monotonic() - t0:.1f} s")


def test_extension_leaves_other_servers_alone(browser, server_url):
    """Without our flag in /api/features (as inside ComfyUI) the editor keeps its own default graph."""
    e = Editor(browser, server_url)

    def strip_flag(route):
        response = route.fetch()
        features = response.json()
        features.pop("sdxl_nodes_standalone", None)
        route.fulfill(response=response, json=features)

    e.page.route("**/api/features", strip_flag)
    try:
        e.open()
        types = set(e.page.evaluate("() => app.graph._nodes.map(n => n.type)"))
        assert not types & set(OUR_NODES), types  # the frontend's own (Z-Image/KSampler) default graph
    finally:
        e.close()


# ------------------------------------------------------------------------------------------------
# The frontend as the reference for our converter, and the shipped workflows' views


@pytest.fixture(scope="module")
def shared_editor(browser, server_url):
    """One editor for the per-workflow tests (each loads its workflow into a new tab)."""
    e = Editor(browser, server_url)
    e.open()
    yield e
    e.close()


@pytest.fixture(scope="module")
def server_object_info(shared_editor):
    """The node definitions the frontend works from: the server's own /api/object_info."""
    response = shared_editor.page.request.get(shared_editor.url.rstrip("/") + "/api/object_info")
    assert response.status == 200
    return response.json()


def _load_into_editor(editor: Editor, workflow: dict) -> None:
    """Open ``workflow`` the way the editor opens a file (``app.loadGraphData``) and let it draw."""
    editor.page.evaluate("async (wf) => { await app.loadGraphData(wf) }", workflow)
    editor.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    editor.page.wait_for_timeout(300)  # images on Load Image nodes and DOM widgets settle


def _workflow_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=_workflow_id)
def test_frontend_prompt_equals_our_converter(shared_editor, server_object_info, path):
    """graphToPrompt() and the queued POST /api/prompt body, both from the real frontend, equal ui_to_api."""
    from sdxl_nodes.runtime.workflow import ui_to_api

    editor, page = shared_editor, shared_editor.page
    editor.problems.clear()
    workflow = json.loads(path.read_text(encoding="utf-8"))
    _load_into_editor(editor, workflow)
    frontend = page.evaluate("async () => (await app.graphToPrompt()).output")
    ours = ui_to_api(json.loads(path.read_text(encoding="utf-8")), server_object_info)
    assert ours == frontend, _prompt_diff(ours, frontend)
    # and in the frontend's order: nodes (not for flattened subgraphs / group nodes, whose key order is the
    # editor's traversal and decides nothing), and each node's inputs (as in a prompt the editor saves)
    if not any(":" in k for k in frontend):
        assert list(ours) == list(frontend)
    assert {k: list(v["inputs"]) for k, v in ours.items()} == {k: list(v["inputs"]) for k, v in frontend.items()}

    # What Run sends: captured before it reaches the server (the job itself is not run here).
    sent = []

    def capture(route):
        if route.request.method != "POST":
            return route.continue_()
        sent.append(route.request.post_data_json)
        return route.fulfill(status=200, json={"prompt_id": f"captured-{len(sent)}", "number": len(sent),
                                                "node_errors": {}})

    page.route("**/api/prompt", capture)
    try:
        page.get_by_role("button", name="Run", exact=True).click()
        page.wait_for_function("() => true")  # the click's handler runs before the next evaluate
        deadline = time.monotonic() + 20
        while not sent and time.monotonic() < deadline:
            page.wait_for_timeout(100)
    finally:
        page.unroute("**/api/prompt", capture)
    assert len(sent) == 1, "Run did not send exactly one POST /api/prompt"
    body = sent[0]
    assert body["prompt"] == ours, _prompt_diff(ours, body["prompt"])
    sent_workflow = body["extra_data"]["extra_pnginfo"]["workflow"]
    if not (workflow.get("extra") or {}).get("groupNodes"):  # the editor turns legacy group nodes into subgraphs
        assert sorted(str(n["id"]) for n in sent_workflow["nodes"]) == sorted(str(n["id"]) for n in workflow["nodes"])

    if path.parent.name == "workflows":  # the recorded golden the headless tests use
        golden = DATA / f"{path.stem}.api.json"
        if RECORD:
            golden.write_text(json.dumps(frontend, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        assert golden.is_file(), f"{golden} is missing: record it with SDXL_NODES_RECORD_FRONTEND_PROMPTS=1"
        recorded = json.loads(golden.read_text(encoding="utf-8"))
        assert frontend == recorded, ("the frontend no longer builds the recorded prompt (a shipped workflow "
                                      "changed?); re-record with SDXL_NODES_RECORD_FRONTEND_PROMPTS=1\n"
                                      + _prompt_diff(recorded, frontend))


def _prompt_diff(ours: dict, frontend: dict) -> str:
    lines = [f"only in ours: {sorted(set(ours) - set(frontend))}",
             f"only in the frontend's: {sorted(set(frontend) - set(ours))}"]
    for k in sorted(set(ours) & set(frontend)):
        if ours[k] != frontend[k]:
            lines.append(f"node {k}: ours {json.dumps(ours[k])}\n        frontend {json.dumps(frontend[k])}")
    return "\n".join(lines)


# Reads the canvas through the app's JS API: zoom vs the low-quality threshold, every node's rectangle
# (LGraphNode.boundingRect: title bar included, at the size the frontend gave it) in graph and screen
# coordinates, and what the browser actually shows at points of each node (elementFromPoint).
CANVAS_STATE_JS = """() => {
  const c = app.canvas, ds = c.ds, box = c.canvas.getBoundingClientRect();
  const threshold = c._lowQualityZoomThreshold
      ?? c._min_font_size_for_lod / (LiteGraph.NODE_TEXT_SIZE * Math.sqrt(window.devicePixelRatio));
  const shown = (x, y) => {
    const el = document.elementFromPoint(x, y);
    if (el === c.canvas || el?.closest?.('.dom-widget')) return null;
    return el ? `${el.tagName}.${String(el.className).slice(0, 80)}` : 'nothing';
  };
  const nodes = app.graph._nodes.map(n => {
    const [x, y, w, h] = n.boundingRect;
    const sx = (x + ds.offset[0]) * ds.scale + box.left, sy = (y + ds.offset[1]) * ds.scale + box.top;
    const sw = w * ds.scale, sh = h * ds.scale, covered = [];
    for (const fx of [0.02, 0.5, 0.98]) for (const fy of [0.02, 0.5, 0.98]) {
      const what = shown(sx + fx * sw, sy + fy * sh);
      if (what) covered.push(what);
    }
    return {id: String(n.id), type: n.type, rect: [x, y, w, h], screen: [sx, sy, sw, sh], covered,
            size: [...n.size], min: [...n.computeSize()]};
  });
  const mm = document.querySelector('.litegraph-minimap');
  return {scale: ds.scale, threshold, lowQuality: c.low_quality, nodes, viewport: [box.left, box.top,
          box.width, box.height], minimap: mm ? mm.getBoundingClientRect().toJSON() : null};
}"""


def _overlaps(nodes: list[dict]) -> list[str]:
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax, ay, aw, ah = a["rect"]
            bx, by, bw, bh = b["rect"]
            dx, dy = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                out.append(f"{a['type']} {a['id']} and {b['type']} {b['id']} overlap by {dx:.0f}×{dy:.0f} px")
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_workflow_opens_readable_at_1400x900(shared_editor, path):
    editor, page = shared_editor, shared_editor.page
    editor.problems.clear()
    _load_into_editor(editor, json.loads(path.read_text(encoding="utf-8")))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"workflow_{path.stem}.png"))
    state = page.evaluate(CANVAS_STATE_JS)
    assert page.viewport_size == {"width": 1400, "height": 900}
    # readable: not drawn as blank low-quality boxes
    assert state["scale"] >= state["threshold"] and state["lowQuality"] is False, (state["scale"], state["threshold"])
    assert state["minimap"] is not None, "the minimap was not found (.litegraph-minimap)"
    left, top, width, height = state["viewport"]
    mm = state["minimap"]
    for n in state["nodes"]:
        x, y, w, h = n["screen"]
        where = f"{n['type']} {n['id']} at {x:.0f},{y:.0f} {w:.0f}×{h:.0f}"
        assert x >= left and y >= top and x + w <= left + width and y + h <= top + height, f"off screen: {where}"
        assert not (x < mm["right"] and mm["left"] < x + w and y < mm["bottom"] and mm["top"] < y + h), \
            f"under the minimap: {where}"
        assert n["covered"] == [], f"{where} is covered by {n['covered']}"
    # real widget heights: the frontend grew no node beyond its saved size, and none overlap
    grown = [(n["id"], n["type"], n["min"]) for n in state["nodes"] if n["min"][1] > n["size"][1] + 0.5]
    assert grown == []
    assert _overlaps(state["nodes"]) == []
    assert editor.problems == []
    # the picture tools/make_thumbnails.py turns into workflows/<name>.jpg: the graph, without overlays
    xs = [v for n in state["nodes"] for v in (n["screen"][0], n["screen"][0] + n["screen"][2])]
    ys = [v for n in state["nodes"] for v in (n["screen"][1], n["screen"][1] + n["screen"][3])]
    x0, y0 = max(min(xs) - 12, 0), max(min(ys) - 12, 0)
    clip = {"x": x0, "y": y0, "width": min(max(xs) + 12, 1400) - x0, "height": min(max(ys) + 12, 900) - y0}
    page.screenshot(path=str(ARTIFACTS / f"thumb_{path.stem}.png"), clip=clip,
                    style=".minimap-main-container, .p-toast { visibility: hidden !important; }")


def test_load_image_does_not_grow_over_its_neighbours_after_an_upload(shared_editor):
    """Upload a tall image into the img2img workflow's Load Image node, as the upload button does."""
    editor, page = shared_editor, shared_editor.page
    editor.problems.clear()
    _load_into_editor(editor, json.loads((REPO / "workflows" / "sdxl_img2img.json").read_text(encoding="utf-8")))
    before = {n["id"]: n["rect"] for n in page.evaluate(CANVAS_STATE_JS)["nodes"]}
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 960), (30, 90, 200)).save(buf, format="PNG")
    response = page.request.post(editor.url.rstrip("/") + "/api/upload/image", multipart={
        "image": {"name": "tall_upload.png", "mimeType": "image/png", "buffer": buf.getvalue()}})
    assert response.status == 200
    name = response.json()["name"]
    load_id = page.evaluate(f"""() => {{
        const node = app.graph._nodes.find(n => n.type === 'SDXLLoadImage');
        const w = node.widgets.find(w => w.name === 'image');
        w.value = {json.dumps(name)}; w.callback?.(w.value);
        return String(node.id); }}""")
    page.wait_for_function(f"""() => (app.graph.getNodeById({load_id}).imgs ?? []).some(
        i => i.src.includes({json.dumps(name)}) && i.complete && i.naturalHeight === 960)""")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    state = page.evaluate(CANVAS_STATE_JS)
    after = {n["id"]: n["rect"] for n in state["nodes"]}
    assert after[load_id] == before[load_id]
    assert _overlaps(state["nodes"]) == []
    assert editor.problems == []


def test_templates_dialog_shows_our_thumbnails(shared_editor):
    page = shared_editor.page
    shared_editor.problems.clear()
    page.get_by_role("button", name="Templates").first.click()
    try:
        # the dialog shows each card's picture as a blob: URL; ours are 400 px wide (the fallback card is 512)
        page.wait_for_function(f"""() => [...document.querySelectorAll('img')].filter(
            i => i.complete && i.naturalWidth === 400).length >= {len(SHIPPED)}""")
        catalogue = page.request.get(f"{shared_editor.url.rstrip('/')}/templates/index.json").json()
        cards = {c["name"]: c for c in catalogue[0]["templates"]}
        for path in SHIPPED:  # each card shows its title; the catalogue carries its description
            about = json.loads(path.read_text(encoding="utf-8"))["extra"]["sdxl_nodes"]
            assert about["description"] and cards[path.stem]["description"] == about["description"]
            page.get_by_text(about["title"], exact=True).first.wait_for(state="visible")
            response = page.request.get(f"{shared_editor.url.rstrip('/')}/api/workflow_templates/sdxl-nodes/{path.stem}.jpg")
            assert response.status == 200 and response.headers["content-type"] == "image/jpeg"
            assert response.body() == path.with_suffix(".jpg").read_bytes()
    finally:
        page.keyboard.press("Escape")
    assert shared_editor.problems == [], "\n".join(shared_editor.problems)
