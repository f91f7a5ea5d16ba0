"""The official ComfyUI editor (comfyui-frontend-package) in real Chromium against our server.

Starts ``runtime/server.py`` on a free port with the real node pack and tiny random checkpoints,
then drives Debian's Chromium with Playwright: the page boots without console errors (only the
expected optional 404s and offline failures), our nodes are in ``/api/object_info`` and the node
library, the shipped default workflow opens with no missing-node dialog, and Run puts the saved
image on the save node. A screenshot goes to ``test-artifacts/``.

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
    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from sdxl_nodes.nodes.environment import configure
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
    configure(models_dir=root / "models", **{f"{k}_dir": v for k, v in dirs.items()})
    workflows = load_shipped_workflows()
    assert DEFAULT_WORKFLOW_NAME in workflows, "workflows/sdxl_base_refiner.json is missing"
    app = create_app(NODE_CLASS_MAPPINGS, display_names=NODE_DISPLAY_NAME_MAPPINGS,
                     input_dir=dirs["input"], output_dir=dirs["output"], temp_dir=dirs["temp"],
                     user_dir=root / "user", default_workflow=workflows[DEFAULT_WORKFLOW_NAME],
                     templates=workflows, model_folders={"checkpoints": [str(root / "models")]})
    server = BackgroundServer(app)
    url = server.start()
    yield url
    server.stop()


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
