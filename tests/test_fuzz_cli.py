"""Fuzzing the CLI with mutated workflows (issue 10 items 3, 7 and the fuzzer itself).

Invariants for every case: no traceback reaches the user (and no exception escapes `main`), the exit
code is 0, 1 or 2, and nothing is written outside the models/input/output/temp folders. The default
run is FUZZ_CASES seeded mutations (UI workflows and their API conversions) through `validate` and
`convert`, and a handful through `run` on tiny checkpoints; `SDXL_FUZZ_CASES=5000 SDXL_FUZZ_RUN_CASES=100` run more. Every
case that once failed is checked in under tests/data/fuzz_seeds/cli/ and replayed here, and each of
the ten causes an attack run found has its own test with the message the user gets.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from fuzzing import mutate

from sdxl_nodes.runtime import cli

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SEEDS = sorted((Path(__file__).resolve().parent / "data" / "fuzz_seeds" / "cli").glob("*.json"))
FUZZ_CASES = int(os.environ.get("SDXL_FUZZ_CASES", "150"))  # × 2 commands
RUN_CASES = int(os.environ.get("SDXL_FUZZ_RUN_CASES", "6"))
FOLDERS = ("models", "input", "output", "temp")


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "models" / "checkpoints").mkdir(parents=True)
    for path in tiny_checkpoints.values():
        try:
            os.link(path, root / "models" / "checkpoints" / path.name)
        except OSError:
            shutil.copyfile(path, root / "models" / "checkpoints" / path.name)
    for name in ("input", "output", "temp", "cases"):
        (root / name).mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), "gray").save(root / "input" / "example.png")
    return root


@pytest.fixture(scope="module")
def docs(root):
    """The shipped UI workflows and their API conversions (by our converter: the mutations are the point)."""
    out = {}
    for path in WORKFLOWS:
        ui = json.loads(path.read_text())
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli.main(["convert", str(path), *_folders(root)]) == 0
        out[path.name] = ui
        out[path.stem + ".api.json"] = json.loads(buf.getvalue())
    return out


def _folders(root: Path) -> list[str]:
    return ["--models-dir", str(root / "models"), "--input-dir", str(root / "input"),
            "--output-dir", str(root / "output"), "--temp-dir", str(root / "temp")]


def _outside_files(root: Path) -> set[str]:
    """Everything under the test root but outside the four folders and the cases folder."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.relative_to(root).parts[0] not in (*FOLDERS, "cases")}


def cli_case(root: Path, text: str, command: str, *extra: str) -> tuple[int, str]:
    """Run one CLI command on workflow `text` in-process; check the invariants; return (code, stderr)."""
    case = root / "cases" / "case.json"
    case.write_bytes(text.encode("utf-8", "surrogatepass"))
    before = _outside_files(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([command, str(case), *_folders(root), *extra])  # an exception here is a traceback
    shown = out.getvalue() + err.getvalue()
    assert "Traceback" not in shown, shown[-2000:]
    assert code in (0, 1, 2), (code, shown[-2000:])
    assert _outside_files(root) == before
    return code, err.getvalue()


def test_fuzz_validate_and_convert(root, docs):
    names = sorted(docs)
    codes = {0: 0, 1: 0, 2: 0}
    for seed in range(FUZZ_CASES):
        name = names[seed % len(names)]
        text = mutate(docs[name], seed)
        for command in ("validate", "convert"):
            code, _ = cli_case(root, text, command)
            codes[code] += 1
    # the fuzzer must reach both outcomes, or it tests nothing (an engine that only breaks JSON finds nothing)
    assert codes[0] > FUZZ_CASES // 10 and codes[2] > FUZZ_CASES // 10, codes


def _small(api: dict) -> dict:
    """A quick version of an API prompt: 64×64, 2 steps (tiny checkpoints)."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        inputs = node["inputs"]
        for key in ("width", "height", "target_width", "target_height"):
            if isinstance(inputs.get(key), int):
                inputs[key] = 64
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = 2
    return api


def test_fuzz_run_on_tiny_checkpoints(root, docs):
    api = _small(docs["sdxl_base.api.json"])
    codes = []
    for seed in range(RUN_CASES):
        code, _ = cli_case(root, mutate(api, 10_000 + seed, max_mutations=1), "run")
        codes.append(code)
    assert set(codes) <= {0, 1, 2}


@pytest.mark.parametrize("seed_file", SEEDS, ids=[p.stem for p in SEEDS])
def test_regression_seeds(root, seed_file):
    text = seed_file.read_bytes().decode("utf-8", "surrogatepass")
    code, err = cli_case(root, text, "validate")
    assert code == 2 and err.startswith("error"), err  # each of these once crashed; all are invalid workflows
    cli_case(root, text, "convert")  # an API prompt is printed as it is; a UI one fails as validate did


# --- the ten causes of CLI tracebacks (issue 10 item 7), each with the message the user gets -------


def _ui(docs, name="sdxl_base.json"):
    return json.loads(json.dumps(docs[name]))


def _api(docs, name="sdxl_base.api.json"):
    return json.loads(json.dumps(docs[name]))


def _first_node(ui, ntype):
    return next(n for n in ui["nodes"] if n["type"] == ntype)


def _set(doc, fn):
    fn(doc)
    return json.dumps(doc)


CAUSES = [
    ("class_type list", "api", lambda d: d["8"].update(class_type=["SDXLVAEDecode"]), "class_type must be a string"),
    ("class_type int and str", "api", lambda d: (d["8"].update(class_type=5), d["9"].update(class_type="Nope")),
     "class_type must be a string"),
    ("_meta list", "api", lambda d: d["8"].update(_meta=["title"]), "_meta must be an object"),
    ("_meta string", "api", lambda d: d["8"].update(_meta="title"), "_meta must be an object"),
    ("link row shifted", "ui", lambda d: d["links"][0].pop(0), "target slot must be an integer"),
    ("link slot a dict", "ui", lambda d: d["links"][0].__setitem__(2, {"a": 1}), "origin slot must be an integer"),
    ("link slot Infinity", "ui", lambda d: d["links"][0].__setitem__(4, float("inf")),
     "target slot must be an integer"),
    ("node type a list", "ui", lambda d: d["nodes"][0].update(type=["SDXLVAEDecode"]), "'type' must be a string"),
    ("input entry not an object", "ui",
     lambda d: _first_node(d, "SDXLVAEDecode")["inputs"].__setitem__(0, "vae"), "inputs[0] must be an object"),
    ("clip false (literal for a link)", "api", lambda d: d["2"]["inputs"].update(clip=False),
     "must be connected to a SDXL_CLIP output"),
    ("lone surrogate in a prompt", "api", lambda d: d["2"]["inputs"].update(text_g="cat \ud800"),
     "lone surrogate U+D800 at character 4"),
]


@pytest.mark.parametrize(("form", "mutation", "message"), [c[1:] for c in CAUSES], ids=[c[0] for c in CAUSES])
def test_each_cause_is_one_clear_error(root, docs, form, mutation, message):
    doc = _api(docs) if form == "api" else _ui(docs)
    code, err = cli_case(root, _set(doc, mutation), "validate")
    assert code == 2 and message in err, err


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 100_000 + "]" * 100_000, "the limit json_depth is 64"),
    ('{"a": ' * 65 + "1" + "}" * 65, "the limit json_depth is 64"),
    ('{"1": {"class_type": "SDXLVAEDecode", "inputs": {"x": ' + "9" * 5000 + "}}}", "the limit int_digits is 32"),
    ('{"1": {"class_type": "SDXLVAEDecode", "inputs": {"x": -' + "9" * 33 + "}}}", "the limit int_digits is 32"),
])
def test_deep_nesting_and_huge_integers_are_refused_by_limit(root, text, message):
    code, err = cli_case(root, text, "validate")
    assert code == 2 and message in err, err


def test_clip_false_no_longer_validates_but_fails_at_run(root, docs):
    # `validate` called it valid and `run` failed: now both refuse it before anything loads.
    text = _set(_api(docs), lambda d: d["2"]["inputs"].update(clip=False))
    code, err = cli_case(root, text, "run")
    assert code == 2 and "must be connected to a SDXL_CLIP output" in err


# --- limits at validation (issue 10 item 3) ---------------------------------------------------------


@pytest.mark.parametrize(("mutation", "message"), [
    (lambda d: d["2"]["inputs"].update(text_g="a" * 200_001), "Text longer than the limit prompt_chars"),
    (lambda d: d["9"]["inputs"].update(filename_prefix="p" * 257), "the limit filename_prefix_chars"),
    (lambda d: d["9"]["inputs"].update(filename_prefix="sub/.."), "does not name a file inside the output folder"),
    (lambda d: d["6"]["inputs"].update(width=8192, height=8192, batch_size=2), "the limit latent_pixels"),
])
def test_limits_are_refused_at_validation_naming_the_limit(root, docs, mutation, message):
    code, err = cli_case(root, _set(_api(docs), mutation), "validate")
    assert code == 2 and message in err, err


def test_a_latent_at_the_budget_is_valid(root, docs):
    text = _set(_api(docs), lambda d: d["6"]["inputs"].update(width=4096, height=4096, batch_size=4))
    assert cli_case(root, text, "validate")[0] == 0


@pytest.mark.parametrize("prefix", ["", "sub/../."])  # all five: tests/test_image_files.py
def test_run_with_a_prefix_naming_the_output_folder_writes_nothing_beside_it(root, docs, prefix):
    # Issue 10 item 1 through the CLI: these wrote output_00001_.png beside the output folder.
    text = _set(_small(_api(docs)), lambda d: d["9"]["inputs"].update(filename_prefix=prefix))
    before = {p.name for p in (root / "output").iterdir()}
    code, err = cli_case(root, text, "run")
    assert code == 2 and "does not name a file inside the output folder" in err, err  # refused at validation
    assert {p.name for p in (root / "output").iterdir()} == before


def test_nan_widget_is_refused_at_validation(root, docs):
    text = _set(_api(docs), lambda d: d["7"]["inputs"].update(cfg=float("nan")))
    code, err = cli_case(root, text, "validate")
    assert code == 2 and "nan is not a finite number" in err, err


def test_decompression_bomb_in_the_input_folder_is_a_validation_error(root, docs, tmp_path):
    # Issue 10 item 5: a 30000² PNG gave traceback frames in the CLI; now one line naming image_pixels.
    from test_image_files import _png_header_only

    api = _api(docs, "sdxl_img2img.api.json")
    _png_header_only(root / "input" / "bomb.png", 30_000, 30_000)
    try:
        text = _set(api, lambda d: d["1"]["inputs"].update(image="bomb.png"))
        code, err = cli_case(root, text, "validate")
    finally:
        (root / "input" / "bomb.png").unlink()
    assert code == 2 and "the limit image_pixels is 67,108,864" in err, err
