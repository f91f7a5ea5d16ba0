"""`sdxl-nodes` on good and bad input: one clear message, a non-zero exit code, nothing written.

Most cases call `runtime.cli.main([...])` in-process; one runs the installed console script in a
subprocess to prove the exit code and stderr end to end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_nodes.nodes import environment
from sdxl_nodes.runtime import cli
from sdxl_nodes.runtime.workflow import load_workflow

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
DATA = Path(__file__).resolve().parent / "data"
BASE, REFINER = "sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"
SMALL_BASE = ["--set", "6.width=64", "--set", "6.height=64", "--set", "7.steps=2"]


@pytest.fixture
def d(tmp_path, models_dir, monkeypatch):
    dirs = {"models": models_dir, "input": tmp_path / "input", "output": tmp_path / "output", "temp": tmp_path / "temp",
            "tmp": tmp_path}
    dirs["input"].mkdir()
    return dirs


def folders(d, command: str = "run") -> list[str]:
    """The folder options each command takes (validate: models + input; convert: none)."""
    if command == "convert":
        return []
    read = ["--models-dir", str(d["models"]), "--input-dir", str(d["input"])]
    return read if command == "validate" else [*read, "--output-dir", str(d["output"]), "--temp-dir", str(d["temp"])]


def run(capsys, d, *argv) -> tuple[int, str, str]:
    code = cli.main([*argv, *folders(d, argv[0])])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(d) -> None:
    for key in ("output", "temp"):
        folder = d[key]
        assert not folder.exists() or list(folder.rglob("*")) == [], f"files written to {folder}"


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def example_png(folder: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(folder / "example.png")


# ------------------------------------------------------------------------------------------------
# Happy paths: validate and convert


@pytest.mark.parametrize("name,nodes,outputs", [("sdxl_base", 9, 1), ("sdxl_base_refiner", 15, 1),
                                                ("sdxl_img2img", 11, 2), ("sdxl_refine_image", 10, 1)])
def test_validate_shipped_workflows(capsys, d, name, nodes, outputs):
    example_png(d["input"])
    path = WORKFLOWS / f"{name}.json"
    code, out, err = run(capsys, d, "validate", str(path))
    assert (code, err) == (0, "")
    assert out == f"{path}: valid ({nodes} nodes, {outputs} output node(s))\n"
    assert_nothing_written(d)


def test_validate_without_the_input_image_names_it(capsys, d):
    code, out, err = run(capsys, d, "validate", str(WORKFLOWS / "sdxl_img2img.json"))
    assert code == 2 and out == ""
    assert "node 1" in err and "'image'" in err and "example.png" in err and str(d["input"].resolve()) in err


def test_convert_prints_and_writes_the_api_prompt(capsys, d):
    expected = json.loads((DATA / "sdxl_base_refiner.api.json").read_text())
    code, out, err = run(capsys, d, "convert", str(WORKFLOWS / "sdxl_base_refiner.json"))
    assert (code, err) == (0, "")
    assert json.loads(out) == expected

    target = d["tmp"] / "prompt.json"
    code, out, err = run(capsys, d, "convert", str(WORKFLOWS / "sdxl_base_refiner.json"), "-o", str(target),
                         "--set", "7.seed=5", "--set", "2.text_g=a red fox", "--set", "7.denoise_end=0.75")
    assert (code, out, err) == (0, "", "")
    expected["7"]["inputs"].update(seed=5, denoise_end=0.75)
    expected["2"]["inputs"]["text_g"] = "a red fox"
    assert json.loads(target.read_text()) == expected
    # the converted API prompt is itself a runnable/validatable workflow
    code, out, _ = run(capsys, d, "validate", str(target))
    assert code == 0 and "valid (15 nodes" in out


# ------------------------------------------------------------------------------------------------
# Bad workflow files


def test_malformed_json_names_file_line_and_column(capsys, d):
    bad = d["tmp"] / "broken.json"
    bad.write_text('{"nodes": [\n  {"id": 1,\n   "type": oops}]}\n')
    code, out, err = run(capsys, d, "run", str(bad))
    assert code == 2 and out == ""
    assert error_lines(err) == [f"error: {bad}: malformed JSON at line 3 column 12: Expecting value"]
    assert_nothing_written(d)


def test_missing_workflow_file(capsys, d):
    code, _, err = run(capsys, d, "run", str(d["tmp"] / "nope.json"))
    assert code == 2
    assert error_lines(err) == [f"error: {d['tmp'] / 'nope.json'}: cannot read: No such file or directory"]


OTHER_PACK_UI = {
    "last_node_id": 4, "last_link_id": 2, "version": 0.4,
    "links": [[1, 1, 0, 2, 0, "CONTROL_NET"], [2, 4, 0, 3, 0, "IMAGE"]],
    "nodes": [
        {"id": 1, "type": "ControlNetLoader", "mode": 0, "inputs": [],
         "outputs": [{"name": "CONTROL_NET", "type": "CONTROL_NET", "links": [1]}],
         "widgets_values": ["canny.safetensors"]},
        {"id": 2, "type": "IPAdapterAdvanced", "mode": 0,
         "inputs": [{"name": "model", "type": "CONTROL_NET", "link": 1}], "outputs": [], "widgets_values": [1]},
        {"id": 3, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 2}],
         "outputs": [], "widgets_values": ["x"]},
        {"id": 4, "type": "Some Custom Pack Node", "mode": 0, "inputs": [],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}], "widgets_values": []},
    ],
}


def test_workflow_from_another_node_pack_lists_every_unknown_type(capsys, d):
    path = d["tmp"] / "other_pack.json"
    path.write_text(json.dumps(OTHER_PACK_UI))
    code, out, err = run(capsys, d, "run", str(path))
    assert code == 2 and out == ""
    lines = error_lines(err)
    assert len(lines) == 1, err
    for type_, node in (("ControlNetLoader", 1), ("IPAdapterAdvanced", 2), ("Some Custom Pack Node", 4)):
        assert f"{type_} (node {node})" in lines[0]
    assert "SaveImage (node" not in lines[0]  # a ComfyUI core node we have
    assert "the other 1 node(s) (3) are supported" in lines[0]  # the UI form says what it can run, too
    assert_nothing_written(d)

    # the same graph as an API prompt: one message naming each unknown node, and what is supported
    api = {"1": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
           "2": {"class_type": "IPAdapterAdvanced", "inputs": {"model": ["1", 0]}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}},
           "4": {"class_type": "Some Custom Pack Node", "inputs": {}}}
    path.write_text(json.dumps(api))
    for command in ("validate", "run"):
        code, out, err = run(capsys, d, command, str(path))
        assert code == 2 and out == ""
        lines = error_lines(err)
        assert len(lines) == 1, err
        for type_, node in (("ControlNetLoader", 1), ("IPAdapterAdvanced", 2), ("Some Custom Pack Node", 4)):
            assert f"{type_} (node {node})" in lines[0]
        assert "the other 1 node(s) (3) are supported" in lines[0]
        assert_nothing_written(d)


# ------------------------------------------------------------------------------------------------
# Bad values


def test_missing_checkpoint_is_a_validation_error(capsys, d):
    code, out, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), "--set", "1.ckpt_name=missing.safetensors")
    assert code == 2 and out == ""
    assert "error: Prompt outputs failed validation" in err
    assert "node 1 (Load SDXL base), input 'ckpt_name': Value not in list" in err
    assert "'missing.safetensors' not in [" in err and f"'{BASE}'" in err
    folder = (d["models"] / "checkpoints").resolve()
    assert f"Searched {folder}: the file must be {d['models'] / 'checkpoints' / 'missing.safetensors'}" in err
    assert_nothing_written(d)


def test_no_checkpoints_in_the_models_folder(capsys, d):
    empty = d["tmp"] / "empty_models"
    empty.mkdir()
    code = cli.main(["run", str(WORKFLOWS / "sdxl_base.json"), "--models-dir", str(empty),
                     "--output-dir", str(d["output"]), "--temp-dir", str(d["temp"])])
    err = capsys.readouterr().err
    assert code == 2
    assert f"'{BASE}' not in []" in err and "ckpt_name" in err
    assert f"Searched {empty.resolve()}: the file must be {empty / BASE}" in err and "--models-dir" in err
    assert_nothing_written(d)


def test_models_folder_that_does_not_exist_is_named(capsys, d):
    missing = d["tmp"] / "no_such_models"
    code = cli.main(["validate", str(WORKFLOWS / "sdxl_base.json"), "--models-dir", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"Searched {missing} (does not exist): the file must be {missing / BASE}" in err


def test_pickle_checkpoint_is_refused_not_missing(capsys, d):
    models = d["tmp"] / "pickles"
    models.mkdir()
    (models / "sd_xl_base_1.0.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle; never loaded
    code = cli.main(["validate", str(WORKFLOWS / "sdxl_base.json"), "--models-dir", str(models),
                     "--set", "1.ckpt_name=sd_xl_base_1.0.ckpt"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{models / 'sd_xl_base_1.0.ckpt'} is a pickle file: pickles can run code when loaded, so they are refused" in err
    assert "Searched" not in err


def test_checkpoint_list_of_a_comfyui_models_folder(d):
    env = environment.configure(models_dir=d["models"], output_dir=d["output"])
    assert env.checkpoint_names() == [BASE, REFINER]


def test_width_not_a_multiple_of_8(capsys, d):
    code, out, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), "--set", "6.width=1004")
    assert code == 2 and out == ""
    assert error_lines(err) == ["error: Prompt outputs failed validation",
                                "  node 6 (SDXL Empty Latent), input 'width': Value 1004 not a multiple of 8: "
                                "width: try 1000 or 1008"]
    assert_nothing_written(d)


def test_multiple_of_8_error_is_on_the_offending_widget_only(capsys, d):
    code, _, err = run(capsys, d, "validate", str(WORKFLOWS / "sdxl_base.json"), "--set", "6.height=100",
                       "--set", "6.width=0")
    assert code == 2
    assert error_lines(err)[1:] == [
        "  node 6 (SDXL Empty Latent), input 'width': Value 0 smaller than min of 16: width",
        "  node 6 (SDXL Empty Latent), input 'height': Value 100 not a multiple of 8: height: try 96 or 104",
    ]


def test_width_1000_runs(capsys, d):
    code, _, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), "--set", "6.width=1000",
                       "--set", "6.height=64", "--set", "7.steps=2")
    assert code == 0, err
    assert Image.open(d["output"] / "sdxl_base_00001_.png").size == (1000, 64)


def test_out_of_range_widgets_are_all_reported(capsys, d):
    code, out, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), "--set", "7.steps=0",
                         "--set", "7.cfg=1000")
    assert code == 2 and out == ""
    assert error_lines(err) == [
        "error: Prompt outputs failed validation",
        "  node 7 (SDXL Base Sampler), input 'steps': Value 0 smaller than min of 1: steps",
        "  node 7 (SDXL Base Sampler), input 'cfg': Value 1000.0 bigger than max of 100.0: cfg",
    ]
    assert_nothing_written(d)


def test_unknown_sampler_name_is_rejected(capsys, d):
    code, _, err = run(capsys, d, "validate", str(WORKFLOWS / "sdxl_base.json"), "--set", "7.sampler_name=euler_x")
    assert code == 2
    assert "input 'sampler_name': Value not in list" in err and "'euler_x'" in err


def test_unknown_choice_names_the_closest_matches(capsys, d):
    code, _, err = run(capsys, d, "validate", str(WORKFLOWS / "sdxl_base.json"), "--set", "7.sampler_name=eulr")
    assert code == 2
    line = next(x for x in err.splitlines() if "sampler_name" in x)
    assert line.endswith("sampler_name: 'eulr' not in (list of length 44); did you mean 'euler'?"), line


def test_unknown_input_name_in_set_lists_the_inputs(capsys, d):
    code, out, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), "--set", "6.widht=256")
    assert (code, out) == (2, "")
    assert error_lines(err) == ["error: --set '6.widht=256': node 6 (SDXLEmptyLatent) has no input 'widht'; "
                                "did you mean 'width'? Its inputs: width, height, batch_size"]
    assert_nothing_written(d)


def test_null_is_not_a_prompt(capsys, d):
    code, _, err = run(capsys, d, "validate", str(WORKFLOWS / "sdxl_base.json"), "--set", "2.text_g=null")
    assert code == 2
    assert "node 2 (" in err and "input 'text_g': Failed to convert an input value to a STRING value" in err
    assert "null is not a value" in err


def test_refiner_checkpoint_in_the_base_workflow(capsys, d):
    """All of sdxl_base from the refiner file: the first node that cannot use it says what to do."""
    code, out, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), *SMALL_BASE,
                         "--set", f"1.ckpt_name={REFINER}")
    assert code == 1 and "saved" not in out
    assert error_lines(err) == [
        "error in node 4 (SDXLSizeCropConditioning): The prompt comes from an SDXL refiner checkpoint, but this "
        "node needs the base's. Encode it with the base checkpoint's clip, or use SDXL Refiner Conditioning for "
        "the refiner."
    ]
    assert_nothing_written(d)


def test_refiner_model_wired_into_the_base_sampler(capsys, d):
    prompt = json.loads((DATA / "sdxl_base_refiner.api.json").read_text())
    prompt["7"]["inputs"]["model"] = ["10", 0]  # the refiner's UNet into SDXL Base Sampler
    path = d["tmp"] / "miswired.json"
    path.write_text(json.dumps(prompt))
    code, out, err = run(capsys, d, "run", str(path), *SMALL_BASE)
    assert code == 1 and "saved" not in out
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error in node 7 (SDXLBaseSampler): SDXL Base Sampler got the refiner UNet (")
    assert REFINER in lines[0]
    assert "wire the base checkpoint's model here and the refiner's into SDXL Noise & Refine" in lines[0]
    assert_nothing_written(d)


# ------------------------------------------------------------------------------------------------
# --set


@pytest.mark.parametrize("item,message", [
    ("99.steps=3", "error: --set '99.steps=3': no node with id '99'; ids in this workflow: 1, 2, 3, 4, 5, 6, 7, 8, 9"),
    ("7steps=3", "error: --set '7steps=3': expected NODE_ID.INPUT=VALUE, e.g. --set 12.seed=42"),
    ("7.steps", "error: --set '7.steps': expected NODE_ID.INPUT=VALUE, e.g. --set 12.seed=42"),
    (".steps=3", "error: --set '.steps=3': expected NODE_ID.INPUT=VALUE, e.g. --set 12.seed=42"),
    ("7.model=1", "error: --set '7.model=1': input 'model' of node 7 is connected to another node; only widget "
                  "values can be set"),
])
def test_set_errors(capsys, d, item, message):
    code, out, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), "--set", item)
    assert (code, out) == (2, "")
    assert error_lines(err) == [message]
    assert_nothing_written(d)


def test_set_parses_json_values_and_plain_text(capsys, d):
    target = d["tmp"] / "p.json"
    code, _, err = run(capsys, d, "convert", str(WORKFLOWS / "sdxl_base.json"), "-o", str(target),
                       "--set", "7.cfg=6.5", "--set", "7.scheduler=karras", "--set", "2.text_l=(cat:1.2), 3 dogs",
                       "--set", "9.filename_prefix=\"42\"")
    assert code == 0, err
    prompt = json.loads(target.read_text())
    assert prompt["7"]["inputs"]["cfg"] == 6.5 and prompt["7"]["inputs"]["scheduler"] == "karras"
    assert prompt["2"]["inputs"]["text_l"] == "(cat:1.2), 3 dogs"
    assert prompt["9"]["inputs"]["filename_prefix"] == "42"


def test_run_output_follows_sys_stdout(d):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["run", str(WORKFLOWS / "sdxl_base.json"), *SMALL_BASE, *folders(d)])
    assert code == 0
    assert f"saved {d['output'] / 'sdxl_base_00001_.png'}" in buf.getvalue()


# ------------------------------------------------------------------------------------------------
# One real subprocess run of the console script


@pytest.fixture(scope="module")
def script_run(tmp_path_factory, models_dir):
    """`sdxl-nodes run sdxl_base.json` with the refiner checkpoint, in a fresh interpreter."""
    script = Path(sys.executable).parent / "sdxl-nodes"
    assert script.exists(), f"console script not installed next to {sys.executable}"
    tmp = tmp_path_factory.mktemp("script")
    out_dir = tmp / "output"
    argv = [str(script), "run", str(WORKFLOWS / "sdxl_base.json"), "--models-dir", str(models_dir),
            "--input-dir", str(tmp / "input"), "--output-dir", str(out_dir), "--temp-dir", str(tmp / "temp"),
            *SMALL_BASE, "--set", f"1.ckpt_name={REFINER}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp)
    return proc, tmp


def test_console_script_exit_code_and_message(script_run):
    proc, tmp = script_run
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "error in node 4 (SDXLSizeCropConditioning): The prompt comes from an SDXL refiner checkpoint, but this "
        "node needs the base's. Encode it with the base checkpoint's clip, or use SDXL Refiner Conditioning for "
        "the refiner."
    )
    assert not (tmp / "output").exists() or list((tmp / "output").rglob("*")) == []
    assert not (tmp / "temp").exists() or list((tmp / "temp").rglob("*")) == []


def test_console_script_prints_no_traceback_for_a_user_error(script_run):
    proc, _ = script_run
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_mid_sampling_stops_at_the_next_step_and_exits_130(tmp_path, models_dir):
    """SIGINT to a real `sdxl-nodes run` while its sampler steps: one line, exit 130, no file written.

    Catches: the executor on a worker thread with KeyboardInterrupt in the main thread (the KeyError
    'result' + SIGABRT of issue 9), an interrupt that waits for the whole sampler, a partial save.
    """
    import signal
    import threading
    import time

    script = Path(sys.executable).parent / "sdxl-nodes"
    out_dir, temp_dir = tmp_path / "output", tmp_path / "temp"
    argv = [str(script), "run", str(WORKFLOWS / "sdxl_base.json"), "--models-dir", str(models_dir),
            "--input-dir", str(tmp_path / "input"), "--output-dir", str(out_dir), "--temp-dir", str(temp_dir),
            "--set", "6.width=64", "--set", "6.height=64", "--set", "7.steps=1000"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    err = bytearray()

    def pump():
        while chunk := os.read(proc.stderr.fileno(), 4096):
            err.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"3/1000" not in err and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"3/1000" in err, err.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    reader.join(5)
    out = proc.stdout.read()
    text = err.decode()
    assert proc.returncode == 130, text
    assert out == b""
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]  # not tqdm
    assert len(lines) == 1, text
    assert lines[0].startswith("interrupted in node 7 (SDXL Base Sampler) at step "), lines
    assert lines[0].endswith("; nothing was saved")
    step = int(lines[0].split(" at step ")[1].split("/")[0])
    assert 3 <= step < 1000  # stopped within the sampler, not after it
    assert "Traceback" not in text and "KeyError" not in text
    for folder in (out_dir, temp_dir):
        assert not folder.exists() or list(folder.rglob("*")) == []


# ------------------------------------------------------------------------------------------------
# Every PNG re-runs to its own pixels from either embedded chunk (issue 9 item 4)


def rerun_chunks(capsys, d, png: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of `run` on the PNG's 'prompt' chunk and on its 'workflow' chunk (each as its own file)."""
    info = Image.open(png).info
    results = []
    for chunk in ("prompt", "workflow"):
        path = d["tmp"] / f"rerun_{chunk}.json"
        path.write_text(info[chunk])
        out = d["tmp"] / f"rerun_{chunk}"
        code = cli.main(["run", str(path), "--models-dir", str(d["models"]), "--input-dir", str(d["input"]),
                         "--output-dir", str(out), "--temp-dir", str(d["temp"])])
        err = capsys.readouterr().err
        assert code == 0, err
        (saved,) = sorted(out.rglob("*.png"))
        results.append(np.asarray(Image.open(saved)))
    return results[0], results[1]


def test_demo_png_reruns_from_either_chunk_and_example_image_workflows_run(capsys, tmp_path):
    """Catches the demo's size going into the prompt but not the UI workflow (1024² from 'workflow')."""
    root = tmp_path / "demo"
    assert cli.main(["demo", "--dir", str(root), "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert f"next: open the editor with `sdxl-nodes serve --models-dir {root / 'models'} " in out
    (png,) = sorted((root / "output").glob("*.png"))
    original = np.asarray(Image.open(png))
    assert original.shape == (64, 64, 3)
    workflow = json.loads(Image.open(png).info["workflow"])
    latent = next(n for n in workflow["nodes"] if n["type"] == "SDXLEmptyLatent")
    assert latent["widgets_values"][:2] == [64, 64]
    d = {"models": root / "models", "input": root / "input", "temp": root / "temp", "tmp": tmp_path}
    from_prompt, from_workflow = rerun_chunks(capsys, d, png)
    assert np.array_equal(from_prompt, original) and np.array_equal(from_workflow, original)

    # the example image the demo put in input/ is what the image workflows load, out of the box
    # (validated here; running them is what tests/test_workflows_e2e.py does with the same file name)
    assert (root / "input" / "example.png").read_bytes() == cli.EXAMPLE_IMAGE.read_bytes()
    for name in ("sdxl_img2img", "sdxl_refine_image"):
        code = cli.main(["validate", str(WORKFLOWS / f"{name}.json"), "--models-dir", str(root / "models"),
                         "--input-dir", str(root / "input")])
        assert code == 0, capsys.readouterr().err


def test_run_set_png_reruns_from_either_chunk(capsys, d):
    """Catches --set reaching the API prompt but not the embedded UI workflow."""
    code, _, err = run(capsys, d, "run", str(WORKFLOWS / "sdxl_base.json"), *SMALL_BASE, "--set", "7.seed=5",
                       "--set", "7.cfg=3.5")
    assert code == 0, err
    png = d["output"] / "sdxl_base_00001_.png"
    nodes = {n["id"]: n for n in json.loads(Image.open(png).info["workflow"])["nodes"]}
    assert nodes[6]["widgets_values"][:2] == [64, 64] and nodes[7]["widgets_values"][0] == 5
    original = np.asarray(Image.open(png))
    from_prompt, from_workflow = rerun_chunks(capsys, d, png)
    assert np.array_equal(from_prompt, original) and np.array_equal(from_workflow, original)


@pytest.mark.asyncio
async def test_server_queued_png_reruns_from_either_chunk(aiohttp_client, capsys, d):
    """A prompt queued over the HTTP API, as the editor does (prompt + extra_pnginfo.workflow)."""
    import asyncio

    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from sdxl_nodes.runtime.server import create_app

    environment.configure(models_dir=d["models"], input_dir=d["input"], output_dir=d["output"], temp_dir=d["temp"])
    info = cli.object_info_for(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    loaded = load_workflow(WORKFLOWS / "sdxl_base.json", info)  # what the editor holds: both formats
    edits = [*SMALL_BASE[1::2], "7.seed=11"]
    cli.apply_overrides(loaded.prompt, edits, info)
    cli.apply_overrides_to_ui(loaded.workflow, edits, info)
    app = create_app(NODE_CLASS_MAPPINGS, display_names=NODE_DISPLAY_NAME_MAPPINGS, input_dir=d["input"],
                     output_dir=d["output"], temp_dir=d["temp"], user_dir=d["tmp"] / "user")
    client = await aiohttp_client(app)
    r = await client.post("/api/prompt", json={"prompt": loaded.prompt, "client_id": "t",
                                               "extra_data": {"extra_pnginfo": {"workflow": loaded.workflow}}})
    assert r.status == 200, await r.text()
    prompt_id = (await r.json())["prompt_id"]
    for _ in range(600):
        history = await (await client.get(f"/api/history/{prompt_id}")).json()
        if prompt_id in history:
            break
        await asyncio.sleep(0.1)
    assert history[prompt_id]["status"]["status_str"] == "success", history[prompt_id]["status"]
    (png,) = sorted(d["output"].glob("*.png"))
    original = np.asarray(Image.open(png))
    from_prompt, from_workflow = rerun_chunks(capsys, d, png)
    assert np.array_equal(from_prompt, original) and np.array_equal(from_workflow, original)


# ------------------------------------------------------------------------------------------------
# Small things: help, version, progress rate, one error family, the environment


def test_help_lists_only_the_options_each_command_uses(capsys):
    def help_of(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--help"])
        assert e.value.code == 0
        return capsys.readouterr().out

    validate, convert, demo = help_of("validate"), help_of("convert"), help_of("demo")
    for unused in ("--output-dir", "--temp-dir", "--device", "--dtype", "--vae-dtype"):
        assert unused not in validate and unused not in convert
    assert "--models-dir" in validate and "--input-dir" in validate and "--models-dir" not in convert
    assert "--output" in convert
    demo_actions = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items()
                        if a[0] == "demo")[1]._actions
    assert all(a.help for a in demo_actions), [a.option_strings for a in demo_actions if not a.help]
    assert "--dir" in demo and "--device" in demo


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"sdxl-nodes {version('sdxl-nodes')}\n"


def test_progress_rate_counts_the_first_step_from_the_node_start():
    """Catches the bar timing the first step from its own creation (issue 9: '59,074 step/s')."""
    import time

    progress = ConsoleProgressForTest()
    progress("executing", {"node": "7"})
    time.sleep(0.3)
    progress("progress", {"node": "7", "value": 1, "max": 20})
    rate = progress.bar.format_dict["rate"] or progress.bar.format_dict["n"] / progress.bar.format_dict["elapsed"]
    assert 0.5 < rate < 4, rate  # one step in ≥ 0.3 s
    progress.close_bar()


def ConsoleProgressForTest():  # noqa: N802
    return cli.ConsoleProgress({"7": {"class_type": "SDXLBaseSampler"}}, io.StringIO())


def test_every_user_error_type_has_one_root():
    from sdxl_nodes.runtime.workflow import WorkflowError
    from sdxl_nodes.sdxl_core import errors

    for cls in (environment.NodeInputError, WorkflowError, cli.CLIError, errors.CheckpointError,
                errors.ConditioningError, errors.SamplingError, errors.SDXLError):
        assert issubclass(cls, errors.UserError), cls
    assert not issubclass(errors.Cancelled, errors.UserError)  # stopping is not bad input


def test_environment_is_not_a_process_global(d):
    """`use` scopes an environment; nothing is left behind once the block ends."""
    a = environment.build(models_dir=d["models"], output_dir=d["tmp"] / "a")
    b = environment.build(models_dir=d["models"], output_dir=d["tmp"] / "b")
    with environment.use(a):
        assert environment.current() is a
        with environment.use(b):
            assert environment.current() is b
        assert environment.current() is a
    assert environment.current() not in (a, b)
    assert not hasattr(environment, "_current")
