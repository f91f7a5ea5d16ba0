"""Every shipped workflow end to end on tiny checkpoints (STYLE.md tests, layer e).

* UI → API conversion of each `workflows/*.json` equals `tests/data/<name>.api.json`, the prompt the
  real ComfyUI frontend builds for it (captured by tests/test_browser_e2e.py).
* Each workflow, shrunk to 64×64 and a few steps by editing its widgets, validates and runs headless
  through `runtime.cli.main` to a PNG whose embedded `workflow`/`prompt` chunks give the graph back.
* Caching: a new base seed re-runs only the base sampler and what follows it; no network is re-read.
* The base + refiner split equals ComfyUI's KSamplerAdvanced pair called on `sdxl_core.sampling.sample`.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, environment
from sdxl_nodes.nodes.environment import NodeInputError
from sdxl_nodes.runtime import cli
from sdxl_nodes.runtime.executor import Executor
from sdxl_nodes.runtime.nodeinfo import object_info
from sdxl_nodes.runtime.validate import validate_prompt
from sdxl_nodes.runtime.workflow import load_workflow, read_png_text, ui_to_api, widget_layout
from sdxl_nodes.sdxl_core import checkpoint as ckpt_module
from sdxl_nodes.sdxl_core.sampling import sample

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
DATA = Path(__file__).resolve().parent / "data"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
BASE, REFINER = "sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"

# Small sizes for CPU: widget edits applied to both the UI workflow and the expected API prompt.
SMALL = {
    "SDXLEmptyLatent": {"width": 64, "height": 64},
    "SDXLSizeCropConditioning": {"width": 64, "height": 64, "target_width": 64, "target_height": 64},
    "SDXLRefinerConditioning": {"width": 64, "height": 64},
    "SDXLBaseSampler": {"steps": 5},  # with denoise_end 0.8: base steps 0-4, refiner step 4-5
    "SDXLNoiseAndRefine": {"steps": 4},
}


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def dirs(tmp_path, models_dir, monkeypatch):
    """Fresh input/output/temp folders, made the current environment (conftest.py resets it afterwards)."""
    d = {"models": models_dir, "input": tmp_path / "input", "output": tmp_path / "output", "temp": tmp_path / "temp"}
    d["input"].mkdir()
    environment.configure(models_dir=models_dir, input_dir=d["input"], output_dir=d["output"], temp_dir=d["temp"])
    return d


def write_example_png(folder: Path, size=(64, 64)) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path = folder / "example.png"
    Image.fromarray(arr).save(path)
    return path


def info() -> dict:
    return object_info(NODE_CLASS_MAPPINGS, "custom_nodes.sdxl-nodes", display_names=NODE_DISPLAY_NAME_MAPPINGS)


def ui_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api_prompt(name: str) -> dict:
    return json.loads((DATA / f"{name}.api.json").read_text())


def shrink_ui(workflow: dict, oi: dict) -> dict:
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        edits = SMALL.get(node["type"])
        if not edits:
            continue
        names = [n for n, _companion in widget_layout(oi[node["type"]])]
        for name, value in edits.items():
            node["widgets_values"][names.index(name)] = value
    return wf


def shrink_api(prompt: dict) -> dict:
    p = copy.deepcopy(prompt)
    for node in p.values():
        node["inputs"].update(SMALL.get(node["class_type"], {}))
    return p


def cli_args(d: dict) -> list[str]:
    return ["--models-dir", str(d["models"]), "--input-dir", str(d["input"]), "--output-dir", str(d["output"]),
            "--temp-dir", str(d["temp"])]


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------
# 2. UI → API conversion


def test_every_shipped_workflow_has_an_expected_prompt():
    assert NAMES == ["sdxl_base", "sdxl_base_refiner", "sdxl_img2img", "sdxl_refine_image"]
    assert sorted(p.name for p in DATA.glob("*.api.json")) == [f"{n}.api.json" for n in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_ui_to_api_matches_expected_prompt(name, dirs):
    oi = info()
    assert load_workflow(WORKFLOWS / f"{name}.json", oi).prompt == api_prompt(name)
    assert ui_to_api(ui_workflow(name), oi) == api_prompt(name)
    # the shrinking helper edits the same values in both formats
    assert ui_to_api(shrink_ui(ui_workflow(name), oi), oi) == shrink_api(api_prompt(name))


# ------------------------------------------------------------------------------------------------
# 1. Every shipped workflow validates and runs headless; the PNG gives the graph back


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_runs_to_png_with_embedded_graph(name, dirs, tmp_path, capsys):
    oi = info()
    expected = shrink_api(api_prompt(name))
    needs_image = any(n["class_type"] == "SDXLLoadImage" for n in expected.values())
    if needs_image:
        write_example_png(dirs["input"])
    small_ui = shrink_ui(ui_workflow(name), oi)
    wf_path = tmp_path / f"{name}.json"
    wf_path.write_text(json.dumps(small_ui))

    # validates (the command and the validator agree on the output nodes)
    assert cli.main(["validate", str(wf_path), *cli_args(dirs)]) == 0
    ok, error, node_errors, outputs = validate_prompt(expected, NODE_CLASS_MAPPINGS)
    assert ok, (error, node_errors)
    assert "valid" in capsys.readouterr().out

    assert cli.main(["run", str(wf_path), *cli_args(dirs)]) == 0
    assert "error" not in capsys.readouterr().err
    prefix = next(n["inputs"]["filename_prefix"] for n in expected.values() if n["class_type"] == "SDXLSaveImage")
    png_name = f"{prefix}_00001_.png"
    assert files_under(dirs["output"]) == [png_name]  # one file, no .partial-* leftovers
    if any(n["class_type"] == "SDXLPreviewImage" for n in expected.values()):
        assert files_under(dirs["temp"]) == ["preview_00001_.png"]

    png = dirs["output"] / png_name
    with Image.open(png) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert pixels.std() > 0  # not a blank image

    chunks = read_png_text(png.read_bytes())
    assert json.loads(chunks["prompt"]) == expected  # exactly the executed API prompt
    embedded = json.loads(chunks["workflow"])
    assert embedded["nodes"] == small_ui["nodes"]
    assert embedded["links"] == small_ui["links"]
    assert [n["widgets_values"] for n in embedded["nodes"]] == [n["widgets_values"] for n in small_ui["nodes"]]
    assert embedded == small_ui

    loaded = load_workflow(png, oi)
    assert loaded.kind == "ui"
    assert loaded.workflow == small_ui
    assert loaded.prompt == expected


def test_saved_png_reruns_to_the_same_pixels(dirs, tmp_path, capsys):
    """A saved PNG is itself a workflow: running it again gives a second, identical image."""
    oi = info()
    wf_path = tmp_path / "sdxl_base.json"
    wf_path.write_text(json.dumps(shrink_ui(ui_workflow("sdxl_base"), oi)))
    assert cli.main(["run", str(wf_path), *cli_args(dirs)]) == 0
    first = dirs["output"] / "sdxl_base_00001_.png"
    assert cli.main(["run", str(first), *cli_args(dirs)]) == 0
    capsys.readouterr()
    assert files_under(dirs["output"]) == ["sdxl_base_00001_.png", "sdxl_base_00002_.png"]
    second = dirs["output"] / "sdxl_base_00002_.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert read_png_text(first.read_bytes())["workflow"] == read_png_text(second.read_bytes())["workflow"]


def test_set_overrides_are_reflected_in_the_embedded_workflow(dirs, capsys):
    args = ["--set", "6.width=64", "--set", "6.height=64", "--set", "7.steps=2", "--set", "7.seed=5"]
    assert cli.main(["run", str(WORKFLOWS / "sdxl_base.json"), *args, *cli_args(dirs)]) == 0
    capsys.readouterr()
    png = dirs["output"] / "sdxl_base_00001_.png"
    chunks = read_png_text(png.read_bytes())
    executed = json.loads(chunks["prompt"])
    assert executed["7"]["inputs"]["seed"] == 5 and executed["6"]["inputs"]["width"] == 64
    assert load_workflow(png, info()).prompt == executed  # dragging the PNG into the editor gives this image


def test_symlinked_checkpoint_loads(tmp_path, tiny_checkpoints, monkeypatch):
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / BASE).symlink_to(tiny_checkpoints["base"])
    env = environment.configure(models_dir=tmp_path / "models", output_dir=tmp_path / "out")
    assert BASE in env.checkpoint_names()
    model, _clip, _vae = NODE_CLASS_MAPPINGS["SDXLCheckpointLoader"]().run(BASE)
    assert model.kind == "base"


# ------------------------------------------------------------------------------------------------
# 3. Caching across runs in one executor


def test_new_base_seed_reruns_only_the_sampler_and_downstream(dirs, monkeypatch):
    oi = info()
    small_ui = shrink_ui(ui_workflow("sdxl_base_refiner"), oi)
    prompt = shrink_api(api_prompt("sdxl_base_refiner"))

    calls: dict[str, int] = {}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        original = getattr(cls, cls.FUNCTION)

        def counted(self, *args, _original=original, _id=node_id, **kwargs):
            calls[_id] = calls.get(_id, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, cls.FUNCTION, counted)
    disk_reads = []
    real_load_part = ckpt_module.load_part
    monkeypatch.setattr(ckpt_module, "load_part", lambda *a, **k: disk_reads.append(a[1]) or real_load_part(*a, **k))

    manager = environment.current().manager
    executor = Executor(NODE_CLASS_MAPPINGS)
    extra = {"extra_pnginfo": {"workflow": small_ui}}

    first = executor.execute(prompt, str(uuid.uuid4()), extra_data=extra)
    assert first.status == "success", first.error
    assert sorted(first.executed, key=int) == [str(i) for i in range(1, 16)]
    assert first.cached == []
    assert sum(calls.values()) == 15
    loads_after_first = manager.loads
    # base: unet, clip_l, clip_g; refiner: unet, clip_g, vae (the base VAE is not wired in this workflow)
    assert loads_after_first == 6 == len(disk_reads)
    assert sorted(disk_reads) == sorted(["unet", "clip_l", "clip_g", "unet", "clip_g", "vae"])

    calls.clear()
    second_prompt = copy.deepcopy(prompt)
    second_prompt["7"]["inputs"]["seed"] = 12345
    second = executor.execute(second_prompt, str(uuid.uuid4()), extra_data=extra)
    assert second.status == "success", second.error
    assert sorted(second.executed, key=int) == ["7", "8", "9", "15"]
    assert sorted(second.cached, key=int) == ["1", "2", "3", "4", "5", "6", "10", "11", "12", "13", "14"]
    assert calls == {"SDXLBaseSampler": 1, "SDXLNoiseAndRefine": 1, "SDXLVAEDecode": 1, "SDXLSaveImage": 1}
    assert manager.loads == loads_after_first  # no checkpoint network re-read from disk
    assert len(disk_reads) == 6

    out = dirs["output"]
    assert files_under(out) == ["sdxl_refined_00001_.png", "sdxl_refined_00002_.png"]
    a, b = (np.asarray(Image.open(out / f"sdxl_refined_0000{i}_.png")) for i in (1, 2))
    assert not np.array_equal(a, b)  # the new seed made a new picture
    assert json.loads(read_png_text((out / "sdxl_refined_00002_.png").read_bytes())["prompt"]) == second_prompt

    # the same prompt again: nothing runs; the save node only replays its UI output
    calls.clear()
    third = executor.execute(second_prompt, str(uuid.uuid4()), extra_data=extra)
    assert third.status == "success" and third.executed == [] and calls == {}
    assert third.outputs["9"] == second.outputs["9"]
    assert len(files_under(out)) == 2


# ------------------------------------------------------------------------------------------------
# 4. The base + refiner split equals ComfyUI's KSamplerAdvanced pair


@pytest.fixture
def pipeline(dirs):
    """Loaded tiny base + refiner and real conditioning built by our nodes."""
    m = NODE_CLASS_MAPPINGS
    loader = m["SDXLCheckpointLoader"]()
    base_model, base_clip, _ = loader.run(BASE)
    ref_model, ref_clip, _ = loader.run(REFINER)
    enc, size, aes = m["SDXLDualCLIPEncode"](), m["SDXLSizeCropConditioning"](), m["SDXLRefinerConditioning"]()
    pos_text, neg_text = "a glass bottle with a galaxy in it, (sunset:1.2)", "text, watermark"
    pos = size.run(enc.run(base_clip, pos_text, pos_text)[0], 64, 64, 0, 0, 64, 64)[0]
    neg = size.run(enc.run(base_clip, neg_text, neg_text)[0], 64, 64, 0, 0, 64, 64)[0]
    rpos = aes.run(enc.run(ref_clip, pos_text, "")[0], 6.0, 64, 64)[0]
    rneg = aes.run(enc.run(ref_clip, neg_text, "")[0], 2.5, 64, 64)[0]
    latent = m["SDXLEmptyLatent"]().run(64, 64, 1)[0]
    return dict(base=base_model, ref=ref_model, pos=pos, neg=neg, rpos=rpos, rneg=rneg, latent=latent)


@pytest.mark.parametrize("sampler_name,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_base_refiner_split_equals_ksampler_advanced_pair(pipeline, sampler_name, scheduler):
    p = pipeline
    assert (p["pos"].kind, p["rpos"].kind) == ("base", "refiner")
    base_out = NODE_CLASS_MAPPINGS["SDXLBaseSampler"]().run(
        p["base"], p["pos"], p["neg"], p["latent"], seed=42, steps=25, cfg=7.0, sampler_name=sampler_name,
        scheduler=scheduler, denoise_end=0.8)[0]
    assert base_out["sdxl_continue"] == {"steps": 25, "start_step": 20, "scheduler": scheduler}
    # steps/scheduler/strength/seed of the refiner node are ignored in continue mode
    refined = NODE_CLASS_MAPPINGS["SDXLNoiseAndRefine"]().run(
        p["ref"], p["rpos"], p["rneg"], base_out, seed=999, cfg=7.0, sampler_name=sampler_name, mode="continue",
        steps=3, scheduler="simple", strength=0.9)[0]
    assert "sdxl_continue" not in refined

    # ComfyUI: KSamplerAdvanced(base, add_noise, 0..20, return_with_leftover_noise) then
    #          KSamplerAdvanced(refiner, add_noise=disable, 20..end) on the same 25-step schedule
    ref_base = sample(p["base"].load(), p["pos"], p["neg"], p["latent"]["samples"], seed=42, steps=25, cfg=7.0,
                      sampler_name=sampler_name, scheduler=scheduler, end_step=20, return_with_leftover_noise=True)
    ref_final = sample(p["ref"].load(), p["rpos"], p["rneg"], ref_base, seed=0, steps=25, cfg=7.0,
                       sampler_name=sampler_name, scheduler=scheduler, start_step=20, add_noise=False)
    torch.testing.assert_close(base_out["samples"], ref_base, rtol=0, atol=1e-6)
    torch.testing.assert_close(refined["samples"], ref_final, rtol=0, atol=1e-6)
    assert refined["samples"].shape == (1, 4, 8, 8)
    # the pieces are not trivially equal: the leftover noise is large and the refiner removed it
    assert (refined["samples"] - base_out["samples"]).abs().max() > 1e-2
    full = sample(p["base"].load(), p["pos"], p["neg"], p["latent"]["samples"], seed=42, steps=25, cfg=7.0,
                  sampler_name=sampler_name, scheduler=scheduler)
    assert (full - base_out["samples"]).abs().max() > 1e-2


def test_renoise_equals_sample_with_denoise_strength(pipeline):
    p = pipeline
    finished = NODE_CLASS_MAPPINGS["SDXLBaseSampler"]().run(
        p["base"], p["pos"], p["neg"], p["latent"], seed=3, steps=6, cfg=5.0, sampler_name="euler",
        scheduler="normal", denoise_end=1.0)[0]
    assert "sdxl_continue" not in finished
    refine = NODE_CLASS_MAPPINGS["SDXLNoiseAndRefine"]()
    out = refine.run(p["ref"], p["rpos"], p["rneg"], finished, seed=5, cfg=5.0, sampler_name="euler",
                     mode="renoise", steps=10, scheduler="normal", strength=0.3)[0]
    expected = sample(p["ref"].load(), p["rpos"], p["rneg"], finished["samples"], seed=5, steps=10, cfg=5.0,
                      sampler_name="euler", scheduler="normal", denoise=0.3)
    torch.testing.assert_close(out["samples"], expected, rtol=0, atol=1e-6)
    assert (out["samples"] - finished["samples"]).abs().max() > 1e-3
    other_seed = refine.run(p["ref"], p["rpos"], p["rneg"], finished, seed=6, cfg=5.0, sampler_name="euler",
                            mode="renoise", steps=10, scheduler="normal", strength=0.3)[0]
    assert not torch.equal(other_seed["samples"], out["samples"])

    # strength 0 is a no-op; continue on a finished latent is a clear error
    same = refine.run(p["ref"], p["rpos"], p["rneg"], finished, seed=5, cfg=5.0, sampler_name="euler",
                      mode="renoise", steps=10, scheduler="normal", strength=0.0)[0]
    assert torch.equal(same["samples"], finished["samples"])
    with pytest.raises(NodeInputError, match="renoise"):
        refine.run(p["ref"], p["rpos"], p["rneg"], finished, seed=5, cfg=5.0, sampler_name="euler",
                   mode="continue", steps=10, scheduler="normal", strength=0.3)
