"""A seeded mutation fuzzer over the server's JSON endpoints (issue 10), with the real node pack.

Each case is a plain request description (method, path, query, JSON or raw body, or an upload form)
made by mutating the shipped workflows (API form from ``tests/data/*.api.json``, UI form from
``workflows/*.json``) and a few hand-picked shapes. Invariants, for every case:

* no HTTP 5xx, and no Python traceback in the body;
* nothing is written outside the input, output, temp and user folders (the working directory stays
  empty);
* the server still answers ``/api/queue`` afterwards.

Every case that once failed is kept in ``tests/data/fuzz_seeds/server/`` and replayed first.
``SDXL_FUZZ_CASES=N`` (default 600) and ``SDXL_FUZZ_SEED=S`` change the run; a failure prints
the case as JSON, ready to be saved as a new seed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time
from pathlib import Path

import pytest
from aiohttp import FormData
from PIL import Image

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).resolve().parent / "data" / "fuzz_seeds" / "server"
CASES = int(os.environ.get("SDXL_FUZZ_CASES", "600"))
SEED = int(os.environ.get("SDXL_FUZZ_SEED", "20261130"))

NASTY = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 1e308, -0.0, 0.5, "", " ", "x" * 300,
         "\x00", "a\x00b", "\ud800", "../../etc/passwd", "/etc/passwd", "..", ".", "sub/..", "%2e%2e%2f",
         "C:\\Windows", "€" * 100, [], {}, ["1", 0], ["999", 0], ["1", "a"], ["1", -1], ["1", 0, 1], [["1"], 0],
         [None, 0], {"a": 1}, [1, 2, 3], {"class_type": "SDXLCheckpointLoader"}]


def _deep(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def api_workflows() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((REPO / "tests" / "data").glob("*.api.json"))]


def ui_workflows() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((REPO / "workflows").glob("*.json"))]


def png(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (rng.randint(1, 16), rng.randint(1, 16)), (rng.randrange(256), 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------
# mutations


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    out = [(prefix, value)]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _set(root, path, value):
    if not path:
        return value
    target = root
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return root


def _copy(value):
    return json.loads(json.dumps(value))  # deepcopy recurses three frames a level; deep values are the point


def mutate(rng: random.Random, value, rounds: int | None = None):
    value = _copy(value)
    for _ in range(rounds or rng.randint(1, 4)):
        path, current = rng.choice(_paths(value))
        kind = rng.randrange(9)
        if kind == 0:
            new = _copy(rng.choice(NASTY))
        elif kind == 1:
            new = _deep(rng.choice([10, 65, 200, 400]))
        elif kind == 2:
            new = int("9" * rng.choice([25, 40, 400]))
        elif kind == 3 and isinstance(current, dict) and current:
            new = dict(current)
            del new[rng.choice(list(new))]
        elif kind == 4 and isinstance(current, dict):
            new = {**current, rng.choice(["class_type", "inputs", "_meta", "x", "0", ""]): rng.choice(NASTY)}
        elif kind == 5 and isinstance(current, list) and current:
            new = list(current)
            rng.shuffle(new)
            new = new[: rng.randint(0, len(new))]
        elif kind == 6 and isinstance(current, str):
            new = current * rng.choice([2, 50]) if len(current) < 1000 else current[::-1]
        elif kind == 7 and isinstance(current, (int, float)) and not isinstance(current, bool) and abs(current) < 1e30:
            new = rng.choice([-current, current * 10**9, current + 0.5, 0, -1])
        else:
            new = _copy(rng.choice(NASTY))
        value = _set(value, path, new)
    return value


def to_body(rng: random.Random, value) -> dict:
    """The JSON text of ``value``, sometimes damaged on the byte level."""
    text = json.dumps(value)
    roll = rng.random()
    if roll < 0.08 and text:
        text = text[: rng.randrange(len(text))]
    elif roll < 0.14:
        text = text.replace("1", "NaN", 1) if "1" in text else "NaN"
    elif roll < 0.18:
        i = rng.randrange(len(text) + 1)
        text = text[:i] + rng.choice(["\x00", "}", "]", '"', "\\", "\ud800", "Infinity"]) + text[i:]
    return {"raw": base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()}


def make_case(rng: random.Random, apis: list[dict], uis: list[dict]) -> dict:
    kind = rng.choices(["prompt", "prompt_ui", "settings", "setting", "userdata", "upload", "view", "misc"],
                       weights=[30, 10, 8, 6, 12, 12, 12, 10])[0]
    if kind == "prompt":
        body = {"prompt": mutate(rng, rng.choice(apis)), "client_id": "fuzz"}
        if rng.random() < 0.4:
            body = mutate(rng, body, rounds=1)
        return {"method": "POST", "path": "/api/prompt", **to_body(rng, body)}
    if kind == "prompt_ui":  # the UI workflow rides along in extra_pnginfo, as the editor sends it
        body = {"prompt": rng.choice(apis),
                "extra_data": {"extra_pnginfo": {"workflow": mutate(rng, rng.choice(uis))}}}
        return {"method": "POST", "path": "/api/prompt", **to_body(rng, mutate(rng, body, rounds=1))}
    if kind == "settings":
        body = mutate(rng, {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                            "Comfy.Templates.SortBy": "popular"})
        return {"method": "POST", "path": "/api/settings", **to_body(rng, body)}
    if kind == "setting":
        name = rng.choice(["Comfy.X", "a/b", "..", "%2e%2e", "x" * 300, "\u00e9"])
        return {"method": rng.choice(["POST", "GET"]), "path": f"/api/settings/{name}",
                **to_body(rng, rng.choice(NASTY))}
    if kind == "userdata":
        name = rng.choice(["workflows/fuzz.json", "workflows/sub/fuzz.json", "comfy.settings.json", "../x.json",
                           "workflows/../../x.json", "workflows/" + "n" * 300 + ".json", "workflows/.partial-x.png",
                           "workflows", "/etc/passwd", "a\x00b", "workflows/fuzz.json/x", "."])
        method = rng.choice(["POST", "POST", "GET", "DELETE"])
        case = {"method": method, "path": "/api/userdata/" + _quote(name),
                "query": {"overwrite": rng.choice(["true", "false", "x"]), "full_info": rng.choice(["true", ""])}}
        if method == "POST":
            case.update(to_body(rng, mutate(rng, rng.choice(uis))))
        return case
    if kind == "upload":
        fields = {"type": rng.choice(["input", "temp", "output", "models", "", "../x"]),
                  "subfolder": rng.choice(["", "pasted", "../..", "/tmp", "a\x00", "s" * 300, "a/../b", "."]),
                  "overwrite": rng.choice(["true", "false", ""])}
        image = png(rng)
        roll = rng.random()
        if roll < 0.2:
            image = image[: rng.randrange(len(image))]
        elif roll < 0.3:
            image = b"GIF89a" + os.urandom(rng.randint(0, 64))
        name = rng.choice(["pic.png", "../pic.png", "a" * 300 + ".png", "", ".partial-x.png", "x/y.png",
                           "C:\\pic.png", "pic.PNG", "\u00e9.png", ".png"])
        return {"method": "POST", "path": "/api/upload/image",
                "form": {"fields": fields, "name": name, "image": base64.b64encode(image).decode()}}
    if kind == "view":
        query = {"filename": rng.choice(["fuzz.png", "../x.png", "", "a" * 300 + ".png", "x.png [input]",
                                         ".partial-x.png", "fuzz.png [temp]", "\u00e9.png"]),
                 "type": rng.choice(["output", "input", "temp", "models", ""]),
                 "subfolder": rng.choice(["", "..", "sub", "/etc", "s" * 300]),
                 "preview": rng.choice(["", "webp;50", "jpeg;999999999999", "png;-1", "bmp"]),
                 "channel": rng.choice(["rgba", "rgb", "a", "zz"])}
        return {"method": "GET", "path": "/api/view", "query": query}
    path = rng.choice(["/api/queue", "/api/history", "/api/interrupt", "/api/jobs/cancel", "/api/free"])
    case = {"method": "POST", "path": path, **to_body(rng, mutate(rng, {"delete": ["x"], "clear": False,
                                                                        "job_ids": ["x"]}))}
    if rng.random() < 0.3:
        case = {"method": "GET", "path": rng.choice(["/api/jobs", "/api/history"]),
                "query": {"limit": rng.choice(["1", "-1", "x", "9" * 40]), "offset": rng.choice(["0", "9" * 40]),
                          "status": rng.choice(["completed", "bogus", ""]), "max_items": rng.choice(["2", "x"])}}
    return case


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


# -------------------------------------------------------------------------------------------------
# running a case


async def send(client, case: dict):
    kwargs: dict = {"params": case.get("query") or None}
    if "nested_prompt" in case:  # {"prompt": [[[...]]]} this deep, kept short in a seed file
        depth = case["nested_prompt"]
        case = {**case, "raw": base64.b64encode(b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}").decode()}
    if "raw" in case:
        kwargs["data"] = base64.b64decode(case["raw"])
        kwargs["headers"] = {"Content-Type": case.get("content_type", "application/json")}
    elif "form" in case:
        form = FormData()
        for k, v in case["form"]["fields"].items():
            form.add_field(k, v)
        form.add_field("image", base64.b64decode(case["form"]["image"]), filename=case["form"]["name"],
                       content_type="image/png")
        kwargs["data"] = form
    return await client.request(case["method"], case["path"], **kwargs)


def strict_json(text: str):
    """Parse like a browser: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def real_app(tmp_path, monkeypatch):
    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, environment
    from sdxl_nodes.runtime.server import create_app, load_shipped_workflows

    dirs = {k: tmp_path / k for k in ("models", "input", "output", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    (dirs["output"] / "fuzz.png").write_bytes(png(random.Random(1)))
    (dirs["temp"] / "fuzz.png").write_bytes(png(random.Random(2)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    environment.configure(models_dir=dirs["models"], input_dir=dirs["input"], output_dir=dirs["output"],
                          temp_dir=dirs["temp"])
    workflows = load_shipped_workflows()
    app = create_app(NODE_CLASS_MAPPINGS, display_names=NODE_DISPLAY_NAME_MAPPINGS, input_dir=dirs["input"],
                     output_dir=dirs["output"], temp_dir=dirs["temp"], user_dir=dirs["user"],
                     default_workflow=workflows.get("sdxl_base_refiner"), templates=workflows,
                     model_folders={"checkpoints": [str(dirs["models"])]})
    return app, tmp_path, dirs


def seed_cases() -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(SEEDS.glob("*.json"))]


async def test_fuzz_server_json_endpoints(aiohttp_client, real_app, caplog):
    app, root, dirs = real_app
    client = await aiohttp_client(app)
    rng = random.Random(SEED)
    apis, uis = api_workflows(), ui_workflows()
    cases = seed_cases() + [(f"seed {SEED} case {i}", make_case(rng, apis, uis)) for i in range(CASES)]
    assert len(seed_cases()) >= 10  # the regression seeds are checked in
    allowed = ("input", "output", "temp", "user", "models")
    before = snapshot(root)
    t0 = time.perf_counter()
    statuses: dict[int, int] = {}
    for name, case in cases:
        r = await send(client, case)
        body = await r.read()
        statuses[r.status] = statuses.get(r.status, 0) + 1
        assert r.status < 500, f"{name}: HTTP {r.status} {body[:300]!r}\ncase: {json.dumps(case)}"
        assert b"Traceback" not in body and b'File "' not in body, f"{name}: traceback\ncase: {json.dumps(case)}"
        if case["path"] == "/api/prompt":  # one bad prompt must not break the API for everyone
            for path in ("/api/jobs", "/api/history", "/api/queue"):
                r = await client.get(path)
                assert r.status == 200, f"{path} after {name}: HTTP {r.status}\ncase: {json.dumps(case)}"
                strict_json(await r.text())
    elapsed = time.perf_counter() - t0
    new = snapshot(root) - before
    outside = sorted(p for p in new if p.split(os.sep)[0] not in allowed)
    assert outside == [], outside
    assert not any((root / "cwd").iterdir())
    r = await client.get("/api/queue")
    assert r.status == 200 and set(await r.json()) == {"queue_running", "queue_pending"}
    crashes = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("validating prompt")]
    print(f"\nfuzz: {len(cases)} cases ({len(cases) - CASES} seeds) in {elapsed:.2f} s, statuses {statuses}; "
          f"{len(crashes)} prompts crashed the validator (answered 400, traceback in the log)")
