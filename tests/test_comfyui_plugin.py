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

STANDINS = r'''
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

    # -- comfy.model_management's memory management, re-stated from ComfyUI v0.8.0 ---------------
    # (comfy/model_management.py: VRAMState, current_loaded_models, LoadedModel.__eq__, free_memory,
    # unload_all_models, cleanup_models_gc, cleanup_models, loaded_models, minimum_inference_memory,
    # get_free_memory, get_total_memory; comfy/cli_args.py: the precision and VRAM flags).
    # The stand-in's accelerator is torch's 'meta' device (set mm.accelerator = "meta"): networks load
    # on it without memory, and its free memory is mm.capacity minus what the loaded entries report.
    import gc as _gc, logging as _logging, psutil as _psutil
    class VRAMState(enum.Enum):
        DISABLED = 0
        NO_VRAM = 1
        LOW_VRAM = 2
        NORMAL_VRAM = 3
        HIGH_VRAM = 4
        SHARED = 5
    mm.VRAMState = VRAMState
    mm.vram_state = VRAMState.DISABLED   # ComfyUI with no GPU: cpu_state CPU, vram_state DISABLED
    mm.accelerator = None                # None: a CPU-only machine (or --cpu)
    mm.capacity = 1 << 40
    mm.MIN_WEIGHT_MEMORY_RATIO = 0.4
    mm.EXTRA_RESERVED_VRAM = 400 * 1024 * 1024
    mm.minimum_inference_memory = lambda: (1024 * 1024 * 1024) * 0.8 + mm.EXTRA_RESERVED_VRAM
    mm.current_loaded_models = []
    mm.free_calls = []
    def get_torch_device():
        if cli_args.args.cpu or mm.accelerator is None:
            return torch.device("cpu")
        return torch.device(mm.accelerator)
    def get_total_memory(dev=None, torch_total_too=False):
        dev = dev or get_torch_device()
        return _psutil.virtual_memory().total if dev.type == "cpu" else mm.capacity
    def get_free_memory(dev=None, torch_free_too=False):
        dev = dev or get_torch_device()
        if dev.type == "cpu":
            free = _psutil.virtual_memory().available
        else:
            free = mm.capacity - sum(e.model_loaded_memory() for e in mm.current_loaded_models if e.device == dev)
        return (free, free) if torch_free_too else free
    def cleanup_models_gc():
        dead = [e for e in mm.current_loaded_models if e.is_dead()]
        if dead:
            _gc.collect()
            for e in dead:
                _logging.warning("memory leak with model %s", e.real_model().__class__.__name__)
    def cleanup_models():
        mm.current_loaded_models[:] = [e for e in mm.current_loaded_models if e.real_model() is not None]
    def free_memory(memory_required, device, keep_loaded=[]):
        mm.free_calls.append((memory_required, str(device), [type(k).__name__ for k in keep_loaded]))
        cleanup_models_gc()
        models = mm.current_loaded_models
        can_unload = []
        for i in range(len(models) - 1, -1, -1):
            e = models[i]
            if e.device == device and e not in keep_loaded and not e.is_dead():
                can_unload.append((-e.model_offloaded_memory(), sys.getrefcount(e.model), e.model_memory(), i))
                e.currently_used = False
        unloaded = []
        for key in sorted(can_unload):
            i = key[-1]
            free = get_free_memory(device)
            if free > memory_required:
                break
            name = models[i].model.model.__class__.__name__   # ComfyUI formats its debug line eagerly
            _logging.debug("Unloading %s", name)
            if models[i].model_unload(memory_required - free):
                unloaded.append(i)
        return [models.pop(i) for i in sorted(unloaded, reverse=True)]
    def unload_all_models():
        free_memory(1e30, get_torch_device())
    def loaded_models(only_currently_used=False):
        return [e.model for e in mm.current_loaded_models if e.currently_used or not only_currently_used]
    class ComfyModel:
        """One of ComfyUI's own models as its LoadedModel shows it (a patcher whose .model is the module)."""
        def __init__(self, name, size, device):
            self.model = types.SimpleNamespace(model=type(name, (), {})(), load_device=device)
            self.device, self.size, self.loaded, self.currently_used = device, size, size, True
            self.real_model = lambda: self.model.model
        def __eq__(self, other):
            return self.model is other.model
        def model_memory(self):
            return self.size
        def model_loaded_memory(self):
            return self.loaded
        def model_offloaded_memory(self):
            return self.size - self.loaded
        def model_unload(self, memory_to_free=None, unpatch_weights=True):
            self.loaded = 0
            return True
        def is_dead(self):
            return False
    for f in (get_torch_device, get_total_memory, get_free_memory, cleanup_models_gc, cleanup_models, free_memory,
              unload_all_models, loaded_models):
        setattr(mm, f.__name__, f)
    mm.ComfyModel = ComfyModel
    FLAGS = ("cpu", "lowvram", "novram", "highvram", "force_fp32", "force_fp16", "fp32_unet", "fp64_unet", "bf16_unet",
             "fp16_unet", "fp8_e4m3fn_unet", "fp8_e5m2_unet", "fp8_e8m0fnu_unet", "fp16_vae", "fp32_vae", "bf16_vae",
             "cpu_vae", "fp8_e4m3fn_text_enc", "fp8_e5m2_text_enc", "fp16_text_enc", "fp32_text_enc", "bf16_text_enc")
    for f in FLAGS:
        setattr(cli_args.args, f, False)
    def start_comfyui(accelerator=None, capacity=1 << 40, **flags):
        """Set the flags and the state ComfyUI's start-up derives from them (cli_args, model_management import)."""
        for f in FLAGS:
            setattr(cli_args.args, f, flags.pop(f, False))
        assert not flags, flags
        a = cli_args.args
        if a.force_fp16:
            a.fp16_unet = True
        mm.accelerator, mm.capacity = accelerator, capacity
        if a.cpu or accelerator is None:
            mm.vram_state = VRAMState.DISABLED
        elif a.lowvram:
            mm.vram_state = VRAMState.LOW_VRAM
        elif a.novram:
            mm.vram_state = VRAMState.NO_VRAM
        elif a.highvram:
            mm.vram_state = VRAMState.HIGH_VRAM
        else:
            mm.vram_state = VRAMState.NORMAL_VRAM

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
'''

GRAPH_HOST = textwrap.dedent(STANDINS + r'''
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


MEMORY_HOST = textwrap.dedent(STANDINS + r"""
    import logging
    from safetensors import safe_open

    warnings = []
    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())
    logging.getLogger().addHandler(Catch())
    pack.NODE_CLASS_MAPPINGS                      # the nodes load, environment with them
    environment = sys.modules[sys_module_name + ".nodes.environment"]
    base = os.path.join(models, "checkpoints", "sd_xl_base_1.0.safetensors")
    base_key = os.path.realpath(base)

    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    def resident(manager):
        # our networks on ComfyUI's device (moved to host RAM counts as freed there, as ComfyUI's offload)
        return [item[1] for item in manager.resident() if len(item) < 3 or item[2] == "gpu"
                or str(manager.options.device) == "cpu"]
    def registered(manager):
        return [e is manager.entry for e in mm.current_loaded_models].count(True)
    def dtype(module):
        return str(next(module.parameters()).dtype)

    # 1. a CPU-only ComfyUI: our networks register once loaded; unload_all_models (POST /free) frees them
    start_comfyui()
    env = environment.current()
    m = env.manager
    result["cpu_same_env"] = environment.current() is env
    for part in ("unet", "clip_l", "clip_g", "vae"):
        m.get(base, part)
    result["cpu_resident"] = resident(m)
    result["cpu_registered"] = registered(m)
    result["cpu_free_calls"] = list(mm.free_calls)          # ComfyUI never frees for the CPU before a load
    mm.unload_all_models()
    result["cpu_after_unload_all"] = resident(m)
    result["cpu_registered_after"] = registered(m)
    m.get(base, "vae")                                         # loads again and registers again
    result["cpu_reload"] = [resident(m), registered(m)]
    mm.unload_all_models()
    result["cpu_free_calls_total"] = len(mm.free_calls)

    # 2. a ComfyUI with an accelerator: ComfyUI's models give way to ours, ours to its, least recently used first
    mm.free_calls.clear()
    start_comfyui(accelerator="meta")
    env2 = environment.current()
    result["flags_change_new_env"] = env2 is not env
    result["old_env_dropped"] = [resident(m), registered(m)]   # the old manager unloaded and left ComfyUI's list
    m = env2.manager
    def bookkeeping_only(manager):
        # 'meta' tensors hold no data to copy: tier moves (GPU <-> pinned RAM) and block streaming (a network
        # bigger than the VRAM cap) only change the manager's bookkeeping on this stand-in accelerator
        manager._to_host = lambda module: None
        manager._to_device = lambda module, host: None
        manager._start_streaming = lambda entry: None
    bookkeeping_only(m)
    with safe_open(base, framework="pt") as f:                 # the UNet's tensors, from the file's header
        unet_numel = 0
        for k in f.keys():
            if k.startswith("model.diffusion_model."):
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                unet_numel += n
    comfy_unet = mm.ComfyModel("ComfyUNet", size=1000, device=torch.device("meta"))
    mm.current_loaded_models.insert(0, comfy_unet)
    mm.capacity = 1000 + int(mm.minimum_inference_memory())    # ComfyUI's model fills all but the inference reserve
    unet = m.get(base, "unet")
    result["preload_call"] = mm.free_calls[-1]
    result["preload_expected"] = unet_numel * 4 * 1.1 + mm.minimum_inference_memory()   # fp32 weights, load_models_gpu's rule
    result["comfy_model_unloaded"] = [comfy_unet.loaded, comfy_unet in mm.current_loaded_models]
    result["unet_device"] = str(next(unet.parameters()).device)
    mm.capacity = 1 << 40
    sizes = {"unet": nbytes(unet)}
    del unet  # a network a caller still holds is in use: never freed (the manager's rule)
    for part in ("clip_l", "clip_g", "vae"):
        sizes[part] = nbytes(m.get(base, part))
    m.get(base, "clip_l")                                      # least recently used first: unet, clip_g, vae, clip_l
    result["lru_before"] = resident(m)
    result["calls_before_pressure"] = len(mm.free_calls)
    held = sum(sizes.values())
    mm.capacity = held + 10_000                                # 10 kB free
    free_now = mm.get_free_memory(torch.device("meta"))
    result["free_now"] = [free_now, 10_000]
    mm.free_memory(free_now + sizes["unet"] + 1, torch.device("meta"))   # needs a bit more than the UNet
    result["after_first_pressure"] = resident(m)
    mm.free_memory(mm.get_free_memory(torch.device("meta")) + 1, torch.device("meta"))
    result["after_second_pressure"] = resident(m)
    result["registered_under_pressure"] = registered(m)
    # ComfyUI's loaded_models(only_currently_used=True) (ControlNet) never hands our entry to load_models_gpu
    result["currently_used_models"] = [type(x).__name__ for x in mm.loaded_models(only_currently_used=True)]
    mm.unload_all_models()
    result["meta_after_unload_all"] = [resident(m), registered(m)]

    # 3. ComfyUI's flags reach the networks we load
    def loaded_with(accelerator="meta", **flags):
        warnings.clear()
        start_comfyui(accelerator=accelerator, capacity=8 * 1024**3, **flags)
        e = environment.current()
        bookkeeping_only(e.manager)
        out = {"device": e.manager.options.device,
               "unet": dtype(e.manager.get(base, "unet")), "clip_g": dtype(e.manager.get(base, "clip_g")),
               "vae": dtype(e.manager.get(base, "vae")),
               "unet_on": str(next(e.manager.get(base, "unet").parameters()).device),
               "vram_limit_bytes": getattr(e.manager.options, "vram_limit_bytes", "no such field"),
               "requested": {k: str(v) for k, v in e.manager.requested.items()},
               "warnings": list(warnings)}
        return out
    result["flags"] = {
        "default": loaded_with(),
        "fp16_unet": loaded_with(fp16_unet=True),
        "bf16_unet": loaded_with(bf16_unet=True),
        "force_fp16": loaded_with(force_fp16=True),
        "force_fp32": loaded_with(force_fp32=True),
        "fp16_text_enc+bf16_vae": loaded_with(fp16_text_enc=True, bf16_vae=True),
        "cpu": loaded_with(cpu=True),
        "cpu+fp16_unet": loaded_with(cpu=True, fp16_unet=True),
        "lowvram": loaded_with(lowvram=True),
        "novram": loaded_with(novram=True),
    }
    result["min_inference"] = mm.minimum_inference_memory()
    print("RESULT " + json.dumps(result, default=str))
""")


def _copy_pack(dst: Path) -> None:
    """A clone of the repository as it would sit in ComfyUI/custom_nodes (no venv, tests or caches)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "tests", ".pytest_cache", ".ruff_cache",
                                    "*.egg-info", "node_modules")
    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)


def _run_host(host: str, root: Path, tiny_checkpoints) -> tuple[dict, Path]:
    """Run `host` as ComfyUI would run our pack: the repository copied into root/custom_nodes/."""
    pack_dir = root / "custom_nodes" / "sdxl-nodes"
    _copy_pack(pack_dir)
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    for path in tiny_checkpoints.values():
        shutil.copyfile(path, models / "checkpoints" / path.name)
    out_dir = root / "output"
    script = root / "host.py"
    script.write_text(host)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([sys.executable, str(script), str(root), str(pack_dir), str(models), str(out_dir)],
                          capture_output=True, text=True, timeout=180, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), out_dir


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("comfyui")
    result, out_dir = _run_host(GRAPH_HOST, root, tiny_checkpoints)
    return result, root, out_dir


@pytest.fixture(scope="module")
def comfy_memory(tmp_path_factory, tiny_checkpoints):
    return _run_host(MEMORY_HOST, tmp_path_factory.mktemp("comfyui_memory"), tiny_checkpoints)[0]


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



# -- inside ComfyUI, our networks live under ComfyUI's memory management ------------------------------
def test_comfyui_unload_all_models_frees_ours(comfy_memory):
    """POST /free (and an out-of-memory error) call ComfyUI's unload_all_models: our networks go too."""
    r = comfy_memory
    assert r["cpu_same_env"] is True  # built once for ComfyUI's flags
    assert r["cpu_resident"] == ["unet", "clip_l", "clip_g", "vae"]
    assert r["cpu_registered"] == 1  # one entry in current_loaded_models for the whole manager
    assert r["cpu_after_unload_all"] == []
    assert r["cpu_registered_after"] == 0  # the entry left ComfyUI's list with the networks
    assert r["cpu_reload"] == [["vae"], 1]  # next use loads again and registers again
    assert r["meta_after_unload_all"] == [[], 0]  # the same on an accelerator


def test_comfyui_memory_pressure_frees_ours_least_recently_used_first(comfy_memory):
    """ComfyUI's free_memory (what its loads call) frees our networks oldest use first, only as much as asked."""
    r = comfy_memory
    assert r["lru_before"] == ["unet", "clip_g", "vae", "clip_l"]  # clip_l used again last
    assert r["free_now"] == [10_000, 10_000]
    # a bit more than the UNet is asked for: the UNet alone is not enough, clip_g (next oldest) goes too
    assert r["after_first_pressure"] == ["vae", "clip_l"]
    assert r["after_second_pressure"] == ["clip_l"]  # one more byte: the next oldest, vae
    assert r["registered_under_pressure"] == 1  # something of ours is left: the entry stays
    assert r["currently_used_models"] == []  # never handed to load_models_gpu as if it were a ModelPatcher


def test_comfyui_frees_its_models_before_ours_load(comfy_memory):
    """Before a network loads on ComfyUI's device, ComfyUI is asked for it as its load_models_gpu asks:
    1.1 x the weights + minimum_inference_memory(), our own entry kept (our manager orders ours)."""
    r = comfy_memory
    required, device, keep = r["preload_call"]
    assert required == pytest.approx(r["preload_expected"], rel=1e-12)
    assert device == "meta" and keep == ["ComfyUIEntry"]
    assert r["comfy_model_unloaded"] == [0, False]  # ComfyUI's own model gave way
    assert r["unet_device"] == "meta"
    assert r["calls_before_pressure"] == 4  # one request per network not yet on the device, none for a reuse
    assert r["cpu_free_calls"] == []  # on the CPU ComfyUI's loads never free, and neither do ours


def test_comfyui_flags_change_builds_a_new_environment(comfy_memory):
    r = comfy_memory
    assert r["flags_change_new_env"] is True
    assert r["old_env_dropped"] == [[], 0]  # the old manager unloaded its networks and left ComfyUI's list


@pytest.mark.parametrize("case, device, like, flagged", [
    # like: the case whose dtypes the networks no flag names must keep (our device default, whatever it is)
    ("default", "meta", None, {}),
    ("fp16_unet", "meta", "default", {"unet": "float16"}),
    ("bf16_unet", "meta", "default", {"unet": "bfloat16"}),
    ("force_fp16", "meta", "default", {"unet": "float16"}),
    ("force_fp32", "meta", "default", {"unet": "float32", "clip_g": "float32", "vae": "float32"}),
    ("fp16_text_enc+bf16_vae", "meta", "default", {"clip_g": "float16", "vae": "bfloat16"}),
    ("cpu", "cpu", None, {}),  # --cpu: ComfyUI's device is the CPU, and so is ours
    ("cpu+fp16_unet", "cpu", "cpu", {"unet": "float16"}),
])
def test_comfyui_flags_reach_loaded_networks(comfy_memory, case, device, like, flagged):
    got = comfy_memory["flags"][case]
    assert (got["device"], got["unet_on"]) == (device, device)
    for net in ("unet", "clip_g", "vae"):
        want = f"torch.{flagged[net]}" if net in flagged else comfy_memory["flags"][like][net] if like else got[net]
        assert got[net] == want, net
    assert got["warnings"] == []


def test_comfyui_lowvram_and_novram_reach_our_options(comfy_memory):
    """--lowvram caps our weights on the device, --novram keeps them off it (RuntimeOptions.vram_limit_bytes);
    a manager without that option says so in a warning instead of ignoring the flag."""
    r = comfy_memory
    gib = 1024**3
    expected = {"lowvram": int(min(0.4 * 8 * gib, 8 * gib - r["min_inference"])), "novram": 0}
    assert expected["lowvram"] == 3435973836  # 40 % of the stand-in's 8 GiB
    for case, limit in expected.items():
        got = r["flags"][case]
        assert got["requested"] == {"device": "meta", "vram_limit_bytes": str(limit)}
        if got["vram_limit_bytes"] == "no such field":
            assert len(got["warnings"]) == 1 and f"vram_limit_bytes={limit}" in got["warnings"][0]
        else:
            assert got["vram_limit_bytes"] == limit and got["warnings"] == []


F16, BF16, F32 = "float16", "bfloat16", "float32"


@pytest.mark.parametrize("on, vram_state, expected, notes", [
    # no flag: every dtype left to our device default
    ((), "NORMAL_VRAM", {}, 0),
    # unet_dtype(): fp32_unet, fp64_unet, bf16_unet, fp16_unet are checked first, in that order
    (("fp16_unet",), "NORMAL_VRAM", {"unet_dtype": F16}, 0),
    (("bf16_unet",), "NORMAL_VRAM", {"unet_dtype": BF16}, 0),
    (("fp32_unet",), "NORMAL_VRAM", {"unet_dtype": F32}, 0),
    (("fp64_unet",), "NORMAL_VRAM", {"unet_dtype": F32}, 1),  # we have no fp64 UNet: said, not silent
    (("fp8_e4m3fn_unet",), "NORMAL_VRAM", {"unet_dtype": F16}, 1),  # no fp8 storage: fp16, said
    # cli_args: --force-fp16 sets fp16_unet; with --bf16-unet as well, unet_dtype() takes bf16 first
    (("force_fp16",), "NORMAL_VRAM", {"unet_dtype": F16}, 0),
    (("force_fp16", "fp16_unet", "bf16_unet"), "NORMAL_VRAM", {"unet_dtype": BF16}, 0),
    # --force-fp32: should_use_fp16/should_use_bf16 answer False, so unet_dtype() and vae_dtype() fall to
    # fp32; text_encoder_dtype() would store fp16 but CLIP computes in fp32 (set_model_compute_dtype)
    (("force_fp32",), "NORMAL_VRAM", {"unet_dtype": F32, "text_dtype": F32, "vae_dtype": F32}, 0),
    # an explicit per-network flag wins over --force-fp32 (checked before the automatic choice)
    (("force_fp32", "fp16_unet", "bf16_vae"), "NORMAL_VRAM", {"unet_dtype": F16, "text_dtype": F32, "vae_dtype": BF16}, 0),
    # text_encoder_dtype(): fp8 variants, fp16, bf16, fp32; vae_dtype(): fp16, bf16, fp32
    (("fp16_text_enc",), "NORMAL_VRAM", {"text_dtype": F16}, 0),
    (("bf16_text_enc",), "NORMAL_VRAM", {"text_dtype": BF16}, 0),
    (("fp32_text_enc",), "NORMAL_VRAM", {"text_dtype": F32}, 0),
    (("fp8_e5m2_text_enc",), "NORMAL_VRAM", {"text_dtype": F16}, 1),
    (("fp16_vae",), "NORMAL_VRAM", {"vae_dtype": F16}, 0),
    (("fp32_vae",), "NORMAL_VRAM", {"vae_dtype": F32}, 0),
    # --cpu: get_torch_device() is the CPU (and vram_state DISABLED); dtypes still follow the flags
    (("cpu",), "DISABLED", {"device": "cpu"}, 0),
    (("cpu", "fp16_unet"), "DISABLED", {"device": "cpu", "unet_dtype": F16}, 0),
    (("cpu_vae",), "NORMAL_VRAM", {}, 1),  # one device for all our networks: said
    # load_models_gpu under LOW_VRAM grants weights at least min(0.4 x free, free - minimum_inference_memory())
    ((), "LOW_VRAM", {"vram_limit_bytes": 4 * 1024**3}, 0),  # 0.4 x 10 GiB < 10 GiB - 1.2 GiB
    ((), "NO_VRAM", {"vram_limit_bytes": 0}, 0),  # load_models_gpu loads 0.1 byte of weights: none
    ((), "HIGH_VRAM", {}, 0),
])
def test_comfyui_flags_to_runtime_options_table(on, vram_state, expected, notes):
    """ComfyUI's flags → RuntimeOptions, hand-derived from ComfyUI v0.8.0's comfy/model_management.py
    (unet_dtype, text_encoder_dtype, vae_dtype, should_use_fp16, should_use_bf16, load_models_gpu,
    MIN_WEIGHT_MEMORY_RATIO) and comfy/cli_args.py (--force-fp16 sets fp16_unet); the device is cuda:0."""
    import torch

    from sdxl_nodes.nodes.comfy_memory import ComfyFlags, ComfyMemory, runtime_kwargs

    device = "cpu" if "cpu" in on else "cuda:0"
    memory = ComfyMemory(total_vram=10 * 1024**3, minimum_inference=int(1.2 * 1024**3), weight_ratio=0.4)
    kwargs, got_notes = runtime_kwargs(ComfyFlags(device=device, vram_state=vram_state, on=frozenset(on)), memory)
    want = {"device": device, **{k: getattr(torch, v) if k.endswith("dtype") else v for k, v in expected.items()}}
    if vram_state == "LOW_VRAM":
        assert want["vram_limit_bytes"] == int(0.4 * 10 * 1024**3)
    assert kwargs == want
    assert len(got_notes) == notes


def _comfy_mm(**extra):
    """The part of comfy.model_management the manager reads, as a namespace (in-process tests)."""
    import types

    return types.SimpleNamespace(current_loaded_models=[], free_memory=lambda *a, **k: [],
                                 minimum_inference_memory=lambda: 0, **extra)


def test_comfyui_release_uses_a_tiered_managers_free(tiny_checkpoints):
    """Where the model manager has free(bytes, device) (the three-tier manager), ComfyUI's requests go to
    it with the bytes asked; 1e30 bytes (unload_all_models) unloads everything, in every tier."""
    import torch

    from sdxl_nodes.nodes.comfy_memory import UNLOAD_EVERYTHING, ComfyUIModelManager
    from sdxl_nodes.sdxl_core.memory import RuntimeOptions

    class Tiered(ComfyUIModelManager):
        calls = []

        def free(self, n, device):
            self.calls.append((n, device))
            oldest = self.resident()[0]
            self.evict(oldest[0], oldest[1])
            return 1

    mm = _comfy_mm()
    m = Tiered(RuntimeOptions(), mm)
    base = tiny_checkpoints["base"]
    m.get(base, "unet")
    m.get(base, "vae")
    assert mm.current_loaded_models == [m.entry]
    assert m.entry.model_unload(12345) is False  # something of ours left: ComfyUI keeps the entry
    assert Tiered.calls == [(12345, torch.device("cpu"))]
    assert [k[1] for k in m.resident()] == ["vae"]
    assert m.entry.model_unload(None) is True  # --disable-smart-memory: all on the device
    assert Tiered.calls[-1] == (UNLOAD_EVERYTHING, torch.device("cpu"))
    m.get(base, "unet")
    m.get(base, "clip_g")
    assert m.entry.model_unload(1e30) is True and m.resident() == []
    assert len(Tiered.calls) == 2  # unload_all_models goes to unload_all, not to free


def test_comfyui_without_memory_api_says_so(tiny_checkpoints, caplog):
    """An old or stripped ComfyUI without current_loaded_models: our manager works alone, with a warning."""
    import types

    from sdxl_nodes.nodes.comfy_memory import ComfyUIModelManager
    from sdxl_nodes.sdxl_core.memory import RuntimeOptions

    with caplog.at_level("WARNING"):
        m = ComfyUIModelManager(RuntimeOptions(), types.SimpleNamespace())
    assert m.cooperates is False
    assert "will not unload sdxl-nodes networks" in caplog.text
    assert type(m.get(tiny_checkpoints["base"], "vae")).__name__ == "AutoencoderKL"
