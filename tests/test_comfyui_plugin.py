"""The repository folder loads and runs as a ComfyUI custom node pack.

A clean interpreter plays ComfyUI: fake top-level `nodes`, `folder_paths`, `comfy.utils` and
`comfy.model_management` modules, then `nodes.load_custom_node`'s import of
`custom_nodes/sdxl-nodes/__init__.py` (a folder name that is not a Python identifier), then the
node classes called the way ComfyUI's executor calls them (instantiate, `FUNCTION` with keyword
arguments, hidden `UNIQUE_ID`/`PROMPT`/`EXTRA_PNGINFO` inputs, no `SDXL_PROGRESS` reporter).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE_IDS = sorted([
    "SDXLCheckpointLoader", "SDXLDualCLIPEncode", "SDXLSizeCropConditioning", "SDXLRefinerConditioning",
    "SDXLEmptyLatent", "SDXLBaseSampler", "SDXLNoiseAndRefine", "SDXLVAEDecode", "SDXLVAEEncode",
    "SDXLLoadImage", "SDXLSaveImage", "SDXLPreviewImage", "SDXLLoraLoader", "SDXLVAELoader", "SDXLTorchCompile",
])

HOST = textwrap.dedent(r'''
    import importlib.util, json, os, sys, types

    root, pack_dir, models, out_dir = sys.argv[1:5]
    result = {}

    # -- ComfyUI's own modules, faked ----------------------------------------------------------
    comfy_nodes = types.ModuleType("nodes")          # ComfyUI's nodes.py: the name our subpackage must not take
    comfy_nodes.NODE_CLASS_MAPPINGS = {"KSampler": object}
    sys.modules["nodes"] = comfy_nodes

    folder_paths = types.ModuleType("folder_paths")
    ckpt_dir = os.path.join(models, "checkpoints")
    folder_paths.calls = []
    def get_filename_list(kind):
        folder_paths.calls.append(("get_filename_list", kind))
        if kind != "checkpoints":  # loras, vae, embeddings: empty folders here
            assert kind in ("loras", "vae", "embeddings"), kind
            return []
        return ["sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors", "sd15/old.ckpt"]
    def get_full_path(kind, name):
        folder_paths.calls.append(("get_full_path", kind, name))
        p = os.path.join(ckpt_dir, name)
        return p if kind == "checkpoints" and os.path.isfile(p) else None
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path
    folder_paths.get_folder_paths = lambda kind: [ckpt_dir]
    folder_paths.get_input_directory = lambda: os.path.join(root, "comfy_input")
    folder_paths.get_output_directory = lambda: out_dir
    folder_paths.get_temp_directory = lambda: os.path.join(root, "comfy_temp")
    sys.modules["folder_paths"] = folder_paths

    class InterruptProcessingException(Exception):
        pass
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")
    bars = []
    class ProgressBar:
        def __init__(self, total):
            self.total, self.updates = total, []
            bars.append(self)
        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total, preview[0] if preview else None, getattr(preview[1], "size", None) if preview else None))
    utils.ProgressBar = ProgressBar
    mm.interrupt_processing = False
    mm.checks = 0
    def throw_exception_if_processing_interrupted():
        mm.checks += 1
        if mm.interrupt_processing:
            mm.interrupt_processing = False
            raise InterruptProcessingException()
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.InterruptProcessingException = InterruptProcessingException
    import torch
    mm.get_torch_device = lambda: torch.device("cpu")
    comfy.utils, comfy.model_management = utils, mm
    sys.modules.update({"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm})
    import enum
    cli_args = types.ModuleType("comfy.cli_args")  # ComfyUI started with --preview-method auto
    class LatentPreviewMethod(enum.Enum):
        NoPreviews = "none"
        Auto = "auto"
    cli_args.LatentPreviewMethod = LatentPreviewMethod
    cli_args.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto)
    comfy.cli_args = cli_args
    sys.modules["comfy.cli_args"] = cli_args

    # -- ComfyUI nodes.load_custom_node ---------------------------------------------------------
    def load_custom_node(module_path, module_name):
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(module_path, "__init__.py"),
                                                      submodule_search_locations=[module_path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module

    sys_module_name = pack_dir.replace(".", "_x_")   # what ComfyUI uses for a folder
    pack = load_custom_node(pack_dir, sys_module_name)
    M, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    result["node_ids"] = sorted(M)
    result["display_ids"] = sorted(names)
    result["web_directory"] = getattr(pack, "WEB_DIRECTORY", None)
    result["nodes_is_comfy"] = sys.modules["nodes"] is comfy_nodes
    result["ckpt_combo"] = M["SDXLCheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    for nid, cls in M.items():   # what ComfyUI reads from every class
        assert isinstance(cls.INPUT_TYPES(), dict) and isinstance(cls.RETURN_TYPES, tuple), nid
        assert callable(getattr(cls, cls.FUNCTION)), nid
        assert isinstance(cls.CATEGORY, str), nid

    # -- a small graph, called as ComfyUI's executor calls nodes ----------------------------------
    def call(node_id, **kwargs):
        cls = M[node_id]
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        return out
    model, clip, vae = call("SDXLCheckpointLoader", ckpt_name="sd_xl_base_1.0.safetensors")
    (pos_text,) = call("SDXLDualCLIPEncode", clip=clip, text_g="a lighthouse", text_l="a lighthouse")
    (neg_text,) = call("SDXLDualCLIPEncode", clip=clip, text_g="blurry", text_l="blurry")
    size = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)
    (pos,) = call("SDXLSizeCropConditioning", text=pos_text, **size)
    (neg,) = call("SDXLSizeCropConditioning", text=neg_text, **size)
    (latent,) = call("SDXLEmptyLatent", width=64, height=64, batch_size=1)
    sampler_args = dict(model=model, positive=pos, negative=neg, latent=latent, seed=1, steps=2, cfg=5.0,
                        sampler_name="euler", scheduler="normal", denoise_end=1.0)
    (samples,) = call("SDXLBaseSampler", unique_id="5", **sampler_args)
    (image,) = call("SDXLVAEDecode", vae=vae, samples=samples)
    prompt = {"1": {"class_type": "SDXLCheckpointLoader", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}}}
    saved = call("SDXLSaveImage", images=image, filename_prefix="comfy/sdxl", prompt=prompt,
                 extra_pnginfo={"workflow": {"nodes": [], "links": []}})
    result["latent_shape"] = list(samples["samples"].shape)
    result["image_shape"] = list(image.shape)
    result["saved"] = saved
    result["bars"] = [(b.total, b.updates) for b in bars]
    result["interrupt_checks"] = mm.checks
    result["folder_paths_calls"] = sorted({c[0] for c in folder_paths.calls})

    # an interrupt from ComfyUI stops the sampler with ComfyUI's exception
    mm.interrupt_processing = True
    try:
        call("SDXLBaseSampler", unique_id="5", **sampler_args)
        result["interrupt"] = "not raised"
    except InterruptProcessingException:
        result["interrupt"] = "raised"

    # a missing checkpoint: a clear error naming the file and the folder
    try:
        call("SDXLCheckpointLoader", ckpt_name="missing.safetensors")
        result["missing"] = None
    except Exception as e:
        result["missing"] = f"{type(e).__name__}: {e}"

    # the pack also loads under its bare folder name (older ComfyUI versions)
    second = load_custom_node(pack_dir, os.path.basename(pack_dir))
    result["second_node_ids"] = sorted(second.NODE_CLASS_MAPPINGS)
    result["absolute_import_of_installed_package"] = sorted(m for m in sys.modules if m.split(".")[0] == "sdxl_nodes")
    print("RESULT " + json.dumps(result, default=str))
''')


def _copy_pack(dst: Path) -> None:
    """A clone of the repository as it would sit in ComfyUI/custom_nodes (no venv, tests or caches)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "tests", ".pytest_cache", ".ruff_cache",
                                    "*.egg-info", "node_modules")
    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("comfyui")
    pack_dir = root / "custom_nodes" / "sdxl-nodes"
    _copy_pack(pack_dir)
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    for path in tiny_checkpoints.values():
        shutil.copyfile(path, models / "checkpoints" / path.name)
    out_dir = root / "output"
    script = root / "host.py"
    script.write_text(HOST)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([sys.executable, str(script), str(root), str(pack_dir), str(models), str(out_dir)],
                          capture_output=True, text=True, timeout=180, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), root, out_dir


def test_mappings_and_web_directory(comfy_run):
    r, _, _ = comfy_run
    assert r["node_ids"] == NODE_IDS
    # inside ComfyUI none of the core-compatible set is registered: ComfyUI's own nodes stand
    comfy_ids = set((Path(__file__).parent / "data" / "comfyui_node_ids_v0.8.0.txt").read_text().splitlines())
    assert "KSamplerAdvanced" in comfy_ids and not set(r["node_ids"]) & comfy_ids
    assert r["display_ids"] == NODE_IDS
    assert r["web_directory"] == "./web"
    assert r["nodes_is_comfy"] is True  # ComfyUI's top-level `nodes` module is untouched
    assert r["second_node_ids"] == NODE_IDS


def test_checkpoint_combo_comes_from_folder_paths(comfy_run):
    r, _, _ = comfy_run
    assert r["ckpt_combo"] == ["sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"]  # .ckpt filtered
    assert r["folder_paths_calls"] == ["get_filename_list", "get_full_path"]


def test_small_graph_runs_inside_comfyui(comfy_run):
    r, _, out_dir = comfy_run
    assert r["latent_shape"] == [1, 4, 8, 8]
    assert r["image_shape"] == [1, 64, 64, 3]
    assert r["saved"] == {"ui": {"images": [{"filename": "sdxl_00001_.png", "subfolder": "comfy", "type": "output"}]},
                          "result": []}
    png = out_dir / "comfy" / "sdxl_00001_.png"
    assert png.is_file()
    from sdxl_nodes.runtime.workflow import read_png_text

    chunks = read_png_text(png.read_bytes())
    assert json.loads(chunks["prompt"])["1"]["class_type"] == "SDXLCheckpointLoader"
    assert json.loads(chunks["workflow"]) == {"nodes": [], "links": []}
    # progress went to ComfyUI's ProgressBar, one update per step, with a JPEG preview
    assert len(r["bars"]) == 1
    total, updates = r["bars"][0]
    assert total == 2
    assert [u[:3] for u in updates] == [[1, 2, "JPEG"], [2, 2, "JPEG"]]
    assert r["interrupt_checks"] >= 3  # before sampling and at every step


def test_comfyui_interrupt_and_missing_checkpoint(comfy_run):
    r, root, _ = comfy_run
    assert r["interrupt"] == "raised"
    assert r["missing"].startswith("NodeInputError: checkpoint 'missing.safetensors' not found. Searched ")
    assert "ComfyUI" in r["missing"] and "--models-dir" not in r["missing"]
    assert str(root / "models" / "checkpoints") in r["missing"]


def test_pack_does_not_import_the_installed_package(comfy_run):
    """Inside ComfyUI everything must come from the folder itself (relative imports only)."""
    r, _, _ = comfy_run
    assert r["absolute_import_of_installed_package"] == []
