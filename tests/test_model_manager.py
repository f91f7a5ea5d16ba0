"""The model manager: networks loaded on demand and cached, LRU order, eviction when memory is short.

Memory pressure is simulated by replacing `sdxl_core.memory.available_bytes` with a fixed budget
minus the bytes of the networks the manager holds.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import uuid
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, environment
from sdxl_nodes.runtime.executor import Executor
from sdxl_nodes.sdxl_core import checkpoint as ckpt_module
from sdxl_nodes.sdxl_core import memory
from sdxl_nodes.sdxl_core.errors import SDXLError
from sdxl_nodes.sdxl_core.memory import ModelManager, ModelRef, RuntimeOptions

DATA = Path(__file__).resolve().parent / "data"


def key(path, part):
    return (str(Path(path).resolve()), part)


def res(path, part, tier="cpu"):
    """An entry of `ModelManager.resident()`: on a CPU manager every network is in the cpu tier."""
    return (str(Path(path).resolve()), part, tier)


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def sizes(tiny_checkpoints):
    """Bytes of each network of the tiny checkpoints, measured once without memory pressure."""
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    out = {}
    for kind, parts in (("base", ("unet", "vae", "clip_l", "clip_g")), ("refiner", ("unet", "vae", "clip_g"))):
        for part in parts:
            out[key(tiny_checkpoints[kind], part)] = nbytes(m.get(tiny_checkpoints[kind], part))
    return out


@pytest.fixture
def budget(monkeypatch):
    """Set `state["budget"]` (bytes) for the manager in `state["manager"]`; None = plenty of memory."""
    state = {"budget": None, "manager": None, "sizes": {}, "queries": 0}

    def fake_available(device):
        state["queries"] += 1
        assert device == torch.device("cpu")
        if state["budget"] is None:
            return 1 << 50
        used = sum(state["sizes"][(p, part)] for p, part, _tier in state["manager"].resident())
        return state["budget"] - used

    monkeypatch.setattr(memory, "available_bytes", fake_available)
    return state


def test_networks_load_on_demand_and_are_cached(tiny_checkpoints):
    base = tiny_checkpoints["base"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    assert m.loads == 0 and m.resident() == []
    cfg, _shapes = m.inspect(base)  # reads the header only
    assert cfg.kind == "base" and m.loads == 0 and m.resident() == []

    unet = m.get(base, "unet")
    assert m.loads == 1 and m.resident() == [res(base, "unet")]
    assert m.get(base, "unet") is unet and m.get(str(base), "unet") is unet
    assert m.loads == 1
    assert type(unet).__name__ == "UNetModel" and next(unet.parameters()).dtype == torch.float32
    assert next(unet.parameters()).device.type == "cpu"

    with pytest.raises(SDXLError, match="refiner checkpoint has no clip_l"):
        m.get(tiny_checkpoints["refiner"], "clip_l")
    assert m.loads == 1


def test_inspect_is_cached(tiny_checkpoints, monkeypatch):
    calls = []
    real = ckpt_module.inspect_checkpoint
    monkeypatch.setattr(ckpt_module, "inspect_checkpoint", lambda p: calls.append(p) or real(p))
    m = ModelManager()
    a = m.inspect(tiny_checkpoints["refiner"])
    b = m.inspect(tiny_checkpoints["refiner"])
    m.get(tiny_checkpoints["refiner"], "vae")
    assert a is b and len(calls) == 1 and a[0].kind == "refiner"


def test_lru_order(tiny_checkpoints):
    base, ref = tiny_checkpoints["base"], tiny_checkpoints["refiner"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    m.get(base, "unet")
    m.get(base, "vae")
    m.get(ref, "clip_g")
    assert m.resident() == [res(base, "unet"), res(base, "vae"), res(ref, "clip_g")]
    m.get(base, "unet")  # a hit moves it to the most recently used end
    assert m.resident() == [res(base, "vae"), res(ref, "clip_g"), res(base, "unet")]
    assert m.loads == 3


def test_least_recently_used_is_freed_when_memory_is_short(tiny_checkpoints, sizes, budget):
    base, ref = tiny_checkpoints["base"], tiny_checkpoints["refiner"]
    U, V, R = sizes[key(base, "unet")], sizes[key(base, "vae")], sizes[key(ref, "unet")]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    budget.update(manager=m, sizes=sizes, budget=U + R + V // 2)  # both UNets fit, not both UNets and the VAE

    base_unet = weakref.ref(m.get(base, "unet"))  # not held: a held network would be in use (test_memory_tiers)
    m.get(base, "vae")
    m.get(base, "unet")  # touch: the VAE is now least recently used
    assert m.resident() == [res(base, "vae"), res(base, "unet")] and m.loads == 2

    m.get(ref, "unet")  # needs R: freeing the VAE (LRU) is enough, the base UNet stays
    assert m.resident() == [res(base, "unet"), res(ref, "unet")] and m.loads == 3
    assert m.get(base, "unet") is base_unet() and m.loads == 3

    m.get(ref, "unet")  # refiner most recent again
    m.get(base, "vae")  # needs V: the base UNet (LRU) goes
    assert m.resident() == [res(ref, "unet"), res(base, "vae")] and m.loads == 4
    gc.collect()
    assert base_unet() is None  # really freed, not just forgotten

    # a freed network comes back transparently through its handle
    cfg, _ = m.inspect(base)
    handle = ModelRef(m, str(base), "unet", cfg)
    assert handle.kind == "base"
    unet = handle.load()
    assert m.loads == 5
    assert m.resident() == [res(base, "vae"), res(base, "unet")]  # the refiner UNet (LRU) made room
    assert handle.load() is unet and m.loads == 5
    ctx = cfg.unet.context_dim
    with torch.no_grad():
        eps = unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, ctx),
                   torch.randn(1, cfg.unet.adm_in_channels))
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
    assert budget["queries"] > 0


def test_a_network_larger_than_free_memory_still_loads(tiny_checkpoints, sizes, budget):
    """Nothing left to free: the manager loads anyway (and holds only that network)."""
    base = tiny_checkpoints["base"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    budget.update(manager=m, sizes=sizes, budget=0)
    m.get(base, "clip_l")
    m.get(base, "clip_g")
    assert m.resident() == [res(base, "clip_g")] and m.loads == 2


def test_reserve_bytes_counts_against_free_memory(tiny_checkpoints, sizes, budget):
    base = tiny_checkpoints["base"]
    V, L = sizes[key(base, "vae")], sizes[key(base, "clip_l")]
    m = ModelManager(RuntimeOptions(reserve_bytes=10 * 1024**2))
    budget.update(manager=m, sizes=sizes, budget=V + L + 1024)  # both fit, but not with the 10 MiB reserve
    m.get(base, "vae")
    m.get(base, "clip_l")
    assert m.resident() == [res(base, "clip_l")]


def test_unload_all_and_evict(tiny_checkpoints):
    base, ref = tiny_checkpoints["base"], tiny_checkpoints["refiner"]
    m = ModelManager()
    vae = weakref.ref(m.get(base, "vae"))
    m.get(ref, "vae")
    gc.collect()
    assert vae() is not None
    m.evict(str(ref), "unet")  # not resident: a no-op
    assert len(m.resident()) == 2
    m.unload_all()
    gc.collect()
    assert m.resident() == [] and vae() is None
    m.get(base, "vae")
    assert m.loads == 3 and m.resident() == [res(base, "vae")]


def test_runtime_options_dtypes(tiny_checkpoints):
    r = RuntimeOptions().resolved()
    assert (r.device, r.unet_dtype, r.text_dtype, r.vae_dtype) == ("cpu", None, None, None)  # as in the file
    assert {r.compute_dtype_for(p) for p in ("unet", "clip_l", "clip_g", "vae")} == {torch.float32}
    opts = RuntimeOptions(unet_dtype=torch.bfloat16)
    assert opts.dtype_for("unet") == torch.bfloat16 and opts.dtype_for("clip_g") is None
    m = ModelManager(opts)
    assert next(m.get(tiny_checkpoints["base"], "unet").parameters()).dtype == torch.bfloat16
    assert next(m.get(tiny_checkpoints["base"], "vae").parameters()).dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(SDXLError, match="CUDA is not available; use --device cpu"):
            ModelManager(RuntimeOptions(device="cuda"))


# ------------------------------------------------------------------------------------------------
# Base and refiner both usable in one workflow when only one network fits at a time


SMALL = {"SDXLEmptyLatent": {"width": 64, "height": 64}, "SDXLBaseSampler": {"steps": 5}}


def _run_base_refiner(tmp_path, models_dir, name):
    environment.configure(models_dir=models_dir, output_dir=tmp_path / name, temp_dir=tmp_path / "temp")
    prompt = json.loads((DATA / "sdxl_base_refiner.api.json").read_text())
    for node in prompt.values():
        node["inputs"].update(copy.deepcopy(SMALL.get(node["class_type"], {})))
    result = Executor(NODE_CLASS_MAPPINGS).execute(prompt, str(uuid.uuid4()))
    assert result.status == "success", result.error
    return np.asarray(Image.open(tmp_path / name / "sdxl_refined_00001_.png")), environment.current().manager


def test_workflow_runs_when_only_one_network_fits(tmp_path, tiny_checkpoints, sizes, budget, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    for p in tiny_checkpoints.values():
        try:
            os.link(p, models / p.name)
        except OSError:
            shutil.copyfile(p, models / p.name)
    # keys of the copies
    sizes = {(str((models / Path(k[0]).name).resolve()), k[1]): v for k, v in sizes.items()}

    plenty, m1 = _run_base_refiner(tmp_path, models, "plenty")
    assert m1.loads == 6

    budget.update(sizes=sizes, budget=0)
    budget["manager"] = None

    real_configure = environment.configure

    def configure_and_track(**kw):
        env = real_configure(**kw)
        budget["manager"] = env.manager
        return env

    monkeypatch.setattr(environment, "configure", configure_and_track)
    short, m2 = _run_base_refiner(tmp_path, models, "short")
    # every network was freed before the next one loaded, except those still in use: CLIP-L stays while
    # the ClipRef holds it and bigG loads, so no network is read twice (dropping CLIP-L there made the
    # next prompt's encode read it again)
    assert len(m2.resident()) == 1
    assert m2.loads == 6, m2.loads
    assert np.array_equal(plenty, short)  # reloading is invisible in the result
