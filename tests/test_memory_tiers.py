"""The model manager's tiers (GPU → host RAM → disk), in-use protection, file-change keys and prefetch.

No GPU here: a "fake GPU" is a CPU manager with `offload` switched on, so it keeps a gpu tier above the
cpu tier. Its tier budgets replace `_free_bytes` (budget minus the measured bytes of the networks the
manager reports in that tier), and the real move functions run (CPU → host buffers → CPU), wrapped to
record each move and to check where the tensors went. Disk reads are counted by `manager.loads`.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from sdxl_nodes.sdxl_core import checkpoint as ckpt_module
from sdxl_nodes.sdxl_core import memory
from sdxl_nodes.sdxl_core.memory import ModelManager, RuntimeOptions

PLENTY = 1 << 40


def res(path, part, tier):
    return (str(Path(path).resolve()), part, tier)


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def nets(tiny_checkpoints, tmp_path_factory):
    """Paths: base, refiner, and base2 (a second name for the base file: a separate network to the manager)."""
    d = tmp_path_factory.mktemp("tiers")
    base2 = d / "other_base.safetensors"
    try:
        os.link(tiny_checkpoints["base"], base2)
    except OSError:
        shutil.copyfile(tiny_checkpoints["base"], base2)
    return {"base": tiny_checkpoints["base"], "refiner": tiny_checkpoints["refiner"], "base2": base2}


@pytest.fixture(scope="module")
def sizes(nets):
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    out = {}
    for name, parts in (("base", ("unet", "vae", "clip_l", "clip_g")), ("base2", ("vae",)),
                        ("refiner", ("unet", "vae", "clip_g"))):
        for part in parts:
            out[(str(Path(nets[name]).resolve()), part)] = nbytes(m.get(nets[name], part))
    return out


class Tiers:
    """A fake-GPU manager with tier budgets, plus a record of its moves by network name."""

    def __init__(self, monkeypatch, sizes, gpu: int, cpu: int, **options):
        self.m = m = ModelManager(RuntimeOptions(reserve_bytes=0, **options))
        m.offload = True
        self.budgets = {"gpu": gpu, "cpu": cpu}
        self.moves: list[tuple[str, str]] = []
        self.names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        def free_bytes(tier):
            return self.budgets[tier] - sum(sizes[(p, part)] for p, part, t in m.resident() if t == tier)

        real_host, real_device = m._to_host, m._to_device

        def to_host(module):
            store = real_host(module)
            spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in store.buffers]
            for p in module.parameters():  # every weight now lives in the store's buffers
                assert any(lo <= p.data_ptr() < hi for lo, hi in spans), "a weight was left out of the host buffers"
            self.moves.append(("down", self.names.get(module, "?")))
            return store

        def to_device(module, host):
            spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in host.buffers] if host else []
            real_device(module, host)
            for p in module.parameters():  # copied out: nothing points into the released buffers
                assert not any(lo <= p.data_ptr() < hi for lo, hi in spans)
            self.moves.append(("up", self.names.get(module, "?")))

        monkeypatch.setattr(m, "_free_bytes", free_bytes)
        monkeypatch.setattr(m, "_to_host", to_host)
        monkeypatch.setattr(m, "_to_device", to_device)

    def load(self, name: str, path, part: str) -> None:
        """get() without keeping a reference (a kept one would make it in use)."""
        module = self.m.get(path, part)
        self.names[module] = name
        del module


def test_order_is_gpu_then_cpu_then_disk(nets, sizes, monkeypatch):
    """Two networks fit the GPU, one fits RAM: the least recently used goes down a tier at a time."""
    base, base2, ref = nets["base"], nets["base2"], nets["refiner"]
    L = sizes[(str(Path(base).resolve()), "clip_l")]
    t = Tiers(monkeypatch, sizes, gpu=2 * L + 1, cpu=L + 1)  # every VAE (5.6 MB) is smaller than CLIP-L (6.4 MB)
    m = t.m
    t.load("A", base, "vae")
    t.load("B", base2, "vae")
    assert m.resident() == [res(base, "vae", "gpu"), res(base2, "vae", "gpu")] and t.moves == []

    t.load("C", ref, "vae")  # the GPU is full: A (LRU) moves down to RAM, not to disk
    assert m.resident() == [res(base, "vae", "cpu"), res(base2, "vae", "gpu"), res(ref, "vae", "gpu")]
    assert t.moves == [("down", "A")] and m.loads == 3

    t.load("D", base, "clip_l")  # B moves down; RAM holds one network, so A (older) leaves RAM for disk
    assert m.resident() == [res(base2, "vae", "cpu"), res(ref, "vae", "gpu"), res(base, "clip_l", "gpu")]
    assert t.moves == [("down", "A"), ("down", "B")] and m.loads == 4

    t.moves.clear()
    assert m.get(base2, "vae") is not None and m.loads == 4  # B comes back up from RAM: no disk read
    # C had to leave the GPU; RAM still held B while C's copy would be made, so C was dropped
    assert t.moves == [("up", "B")]
    assert m.resident() == [res(base, "clip_l", "gpu"), res(base2, "vae", "gpu")]

    m.get(base, "vae")  # A was dropped: read from the file again
    assert m.loads == 5


def _unet_out(unet, cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    y = torch.randn(1, cfg.unet.adm_in_channels, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500.0]), ctx, y)


def test_alternating_base_and_refiner_never_rereads_when_ram_allows(nets, sizes, monkeypatch):
    base, ref = nets["base"], nets["refiner"]
    monkeypatch.setattr(memory._HostStore, "CHUNK_BYTES", 1 << 20)  # many chunks: packing across chunk edges
    U = max(sizes[(str(Path(p).resolve()), "unet")] for p in (base, ref))
    t = Tiers(monkeypatch, sizes, gpu=U + 1, cpu=PLENTY)  # one UNet on the GPU at a time
    m = t.m
    cfgs = {p: m.inspect(p)[0] for p in (base, ref)}
    first = {}
    for rnd in range(3):
        for name, p in (("base", base), ("refiner", ref)):
            unet = m.get(p, "unet")
            t.names[unet] = name
            sd = params(unet)
            out = _unet_out(unet, cfgs[p])
            del unet
            if rnd == 0:
                first[name] = (sd, out)
            else:  # the weights made the round trip bit for bit, and the network computes the same; CPU
                # GEMMs round differently with the weights' address alignment (the file's tensors are
                # memory-mapped at any offset, ours 64-byte aligned): 2.9e-6 measured, hence the atol
                assert all(torch.equal(sd[k], first[name][0][k]) for k in sd)
                torch.testing.assert_close(out, first[name][1], rtol=0, atol=1e-5)
    assert m.loads == 2  # each UNet read once
    # bringing one up first moves the other down
    assert t.moves == [("down", "base"), ("down", "refiner"), ("up", "base"), ("down", "base"), ("up", "refiner"),
                       ("down", "refiner"), ("up", "base"), ("down", "base"), ("up", "refiner")]
    assert m.resident() == [res(base, "unet", "cpu"), res(ref, "unet", "gpu")]


def test_with_ram_short_the_evicted_network_is_dropped_and_read_again(nets, sizes, monkeypatch):
    base, ref = nets["base"], nets["refiner"]
    U = max(sizes[(str(Path(p).resolve()), "unet")] for p in (base, ref))
    t = Tiers(monkeypatch, sizes, gpu=U + 1, cpu=0)
    m = t.m
    for i, p in enumerate((base, ref, base, ref)):
        t.load("u", p, "unet")
        assert m.loads == i + 1
        assert m.resident() == [res(p, "unet", "gpu")]
    assert t.moves == []


def test_vram_limit_caps_the_gpu_tier(nets, sizes, monkeypatch):
    """`vram_limit_bytes` makes a roomy GPU act small: weights on it stay under the cap."""
    base, ref = nets["base"], nets["refiner"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: PLENTY)
    U = max(sizes[(str(Path(p).resolve()), "unet")] for p in (base, ref))
    m = ModelManager(RuntimeOptions(reserve_bytes=0, vram_limit_bytes=U + 1024))
    m.offload = True
    assert m._free_bytes("gpu") == U + 1024
    m.get(base, "unet")
    used = sizes[(str(Path(base).resolve()), "unet")]
    assert m._free_bytes("gpu") == U + 1024 - used and m._free_bytes("cpu") == PLENTY
    m.get(ref, "unet")
    assert m.resident() == [res(base, "unet", "cpu"), res(ref, "unet", "gpu")] and m.loads == 2


# ------------------------------------------------------------------------------------------------
# In use is never freed


def test_a_network_in_use_is_never_moved_or_counted_as_freed(nets, sizes, monkeypatch, caplog):
    """A ClipRef holds CLIP-L while bigG loads: CLIP-L stays, only the idle VAE goes, nothing else is emptied."""
    base = nets["base"]
    G = sizes[(str(Path(base).resolve()), "clip_g")]
    t = Tiers(monkeypatch, sizes, gpu=G + 1, cpu=PLENTY)  # each fits alone (bigG is the largest), not all three
    m = t.m
    t.load("vae", base, "vae")
    clip_l = m.get(base, "clip_l")  # held, as TextEncoders holds it
    t.names[clip_l] = "clip_l"
    assert t.moves == [] and m.resident() == [res(base, "vae", "gpu"), res(base, "clip_l", "gpu")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdxl_nodes.sdxl_core.memory"):
        t.load("clip_g", base, "clip_g")
    assert m.resident() == [res(base, "vae", "cpu"), res(base, "clip_l", "gpu"), res(base, "clip_g", "gpu")]
    assert t.moves == [("down", "vae")] and m.loads == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "clip_g" in warnings[0] and memory._gib(G) in warnings[0]
    assert "in use, so kept: the clip_l of sd_xl_base_1.0.safetensors" in warnings[0]

    # ComfyUI's memory pressure: only the idle network counts as freed
    gpu = m.options.device  # the fake GPU's compute device names the gpu tier
    assert m.free(PLENTY, gpu) == G
    assert m.resident() == [res(base, "vae", "cpu"), res(base, "clip_l", "gpu"), res(base, "clip_g", "cpu")]
    del clip_l
    L = sizes[(str(Path(base).resolve()), "clip_l")]
    assert m.free(PLENTY, gpu) == L  # let go of: now it can move
    assert [r[2] for r in m.resident()] == ["cpu", "cpu", "cpu"]


def test_using_marks_a_network_in_use_without_a_reference(nets, sizes, monkeypatch):
    base = nets["base"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    monkeypatch.setattr(m, "_free_bytes", lambda tier: 0)  # CPU manager, nothing ever fits
    with m.using(base, "clip_l") as module:
        assert type(module).__name__ == "CLIPTextModel"
        del module  # only the using() block marks it now
        m.get(base, "clip_g")
        assert m.resident() == [res(base, "clip_l", "cpu"), res(base, "clip_g", "cpu")]
        assert m.free(PLENTY, "cpu") == sizes[(str(Path(base).resolve()), "clip_g")]
    m.get(base, "vae")  # the block is over: CLIP-L can go
    assert m.resident() == [res(base, "vae", "cpu")] and m.loads == 3


def test_free_drops_least_recently_used_first_and_reports_bytes(nets, sizes):
    base = nets["base"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    for part in ("vae", "clip_l", "clip_g"):
        m.get(base, part)
    V = sizes[(str(Path(base).resolve()), "vae")]
    L = sizes[(str(Path(base).resolve()), "clip_l")]
    assert m.free(1, "cpu") == V  # at least one byte: the whole LRU network
    assert m.resident() == [res(base, "clip_l", "cpu"), res(base, "clip_g", "cpu")]
    assert m.free(V, "cuda:0") == 0  # nothing of ours on a GPU
    assert m.free(L, torch.device("cpu")) == L
    assert m.resident() == [res(base, "clip_g", "cpu")]


# ------------------------------------------------------------------------------------------------
# Keys: (path, size, mtime, part)


def test_a_replaced_file_is_read_again(nets, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copyfile(nets["base"], path)
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    old = weakref.ref(m.get(path, "vae"))
    assert m.get(path, "vae") is old() and m.loads == 1

    other = ckpt_module.write_tiny_checkpoints(tmp_path / "other", seed=99)["base"]
    st = path.stat()
    shutil.copyfile(other, path)  # same size (same layout), new weights
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime even on coarse clocks
    assert path.stat().st_size == st.st_size

    new = m.get(path, "vae")
    gc.collect()
    assert m.loads == 2 and old() is None  # the stale entry was dropped, not kept beside the new one
    assert m.resident() == [res(path, "vae", "cpu")]
    want = ckpt_module.load_part(other, "vae")
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), want.state_dict().values(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(new.state_dict().values(),
                                                      ckpt_module.load_part(nets["base"], "vae").state_dict().values()))


# ------------------------------------------------------------------------------------------------
# Prefetch


@pytest.fixture
def gated_reads(monkeypatch):
    """checkpoint.load_part counts its calls and, while `gate` is clear, waits for it (a slow disk)."""
    state = {"calls": [], "gate": threading.Event(), "started": threading.Event()}
    state["gate"].set()
    real = ckpt_module.load_part

    def load_part(path, part, **kw):
        state["calls"].append((str(path), part, threading.current_thread().name))
        state["started"].set()
        assert state["gate"].wait(30)
        return real(path, part, **kw)

    monkeypatch.setattr(ckpt_module, "load_part", load_part)
    return state


def test_prefetch_then_get_reads_once_and_get_waits_for_the_read(nets, gated_reads):
    ref = nets["refiner"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    gated_reads["gate"].clear()
    assert m.prefetch(ref, "unet") is True
    assert gated_reads["started"].wait(30)
    assert m.resident() == []  # still being read
    assert m.prefetch(ref, "unet") is False  # a second prefetch does not read again

    got = {}
    getter = threading.Thread(target=lambda: got.setdefault("unet", m.get(ref, "unet")))
    getter.start()
    getter.join(0.3)
    assert getter.is_alive()  # get() waits for the read in progress instead of reading itself
    gated_reads["gate"].set()
    getter.join(30)
    assert not getter.is_alive()
    assert len(gated_reads["calls"]) == 1 and gated_reads["calls"][0][2].startswith("sdxl-prefetch")
    assert m.loads == 1 and m.resident() == [res(ref, "unet", "cpu")]
    assert m.get(ref, "unet") is got["unet"] and m.loads == 1


def test_prefetch_of_a_resident_network_reads_nothing(nets, gated_reads):
    base = nets["base"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    m.get(base, "vae")
    assert m.prefetch(base, "vae") is False
    assert m.loads == 1 and len(gated_reads["calls"]) == 1


def test_prefetch_is_a_no_op_when_ram_is_short(nets, sizes, gated_reads, monkeypatch, caplog):
    ref = nets["refiner"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    R = sizes[(str(Path(ref).resolve()), "unet")]
    monkeypatch.setattr(m, "_free_bytes", lambda tier: R - 1)
    with caplog.at_level(logging.DEBUG, logger="sdxl_nodes.sdxl_core.memory"):
        assert m.prefetch(ref, "unet") is False
    assert "not prefetching the unet" in caplog.text
    assert m.resident() == [] and m.loads == 0 and gated_reads["calls"] == []
    monkeypatch.setattr(m, "_free_bytes", lambda tier: R)  # exactly enough: it never evicts, it fits
    assert m.prefetch(ref, "unet") is True
    m.get(ref, "unet")
    assert m.loads == 1


def test_prefetch_on_a_gpu_with_room_reads_straight_onto_it(nets, sizes, monkeypatch, gated_reads):
    """With room on the GPU the prefetch reads there (no trip through pinned RAM: slower on an H200)."""
    ref = nets["refiner"]
    t = Tiers(monkeypatch, sizes, gpu=PLENTY, cpu=PLENTY)
    m = t.m
    assert m.prefetch(ref, "unet") is True
    for _ in range(3000):
        if m.resident():
            break
        time.sleep(0.01)
    assert m.resident() == [res(ref, "unet", "gpu")] and m.loads == 1
    m.get(ref, "unet")
    assert m.loads == 1 and t.moves == []


def test_prefetch_on_a_full_gpu_reads_into_ram_and_get_brings_it_up(nets, sizes, monkeypatch, gated_reads):
    ref, base = nets["refiner"], nets["base"]
    U = sizes[(str(Path(ref).resolve()), "unet")]
    t = Tiers(monkeypatch, sizes, gpu=U + 1, cpu=PLENTY)
    m = t.m
    t.load("A", base, "vae")  # the GPU is partly taken: no room up there for the UNet, so RAM it is
    assert m.prefetch(ref, "unet") is True
    for _ in range(3000):  # the read ends in the background
        if len(m.resident()) == 2:
            break
        time.sleep(0.01)
    assert m.resident() == [res(base, "vae", "gpu"), res(ref, "unet", "cpu")] and m.loads == 2
    unet = m.get(ref, "unet")  # brought up; the VAE makes room by moving down
    t.names[unet] = "refiner"
    assert m.resident() == [res(base, "vae", "cpu"), res(ref, "unet", "gpu")] and m.loads == 2
    assert t.moves == [("down", "A"), ("up", "?")]  # named after the move: the prefetched module was new here


def test_a_network_evicted_while_prefetched_is_discarded(nets, gated_reads):
    ref = nets["refiner"]
    m = ModelManager(RuntimeOptions(reserve_bytes=0))
    gated_reads["gate"].clear()
    assert m.prefetch(ref, "vae") is True
    assert gated_reads["started"].wait(30)
    m.evict(ref, "vae")
    gated_reads["gate"].set()
    m.get(ref, "vae")  # read again: the evicted read is not installed behind the caller's back
    assert len(gated_reads["calls"]) == 2 and m.resident() == [res(ref, "vae", "cpu")]


# ------------------------------------------------------------------------------------------------
# Sequential offload: a network larger than the GPU


def test_a_network_larger_than_the_gpu_runs_block_by_block_from_ram(nets, sizes, monkeypatch):
    base = nets["base"]
    U = sizes[(str(Path(base).resolve()), "unet")]
    cfg = ModelManager().inspect(base)[0]
    want = _unet_out(ckpt_module.load_part(base, "unet"), cfg)
    t = Tiers(monkeypatch, sizes, gpu=U // 4, cpu=PLENTY)  # the UNet is four times the GPU
    m = t.m
    up_now: dict[int, int] = {}
    stats = {"peak": 0, "ups": 0}
    real_up, real_down = m._block_up, m._block_down

    def block_up(unit, recurse, keep):
        real_up(unit, recurse, keep)
        up_now[id(unit)] = sum(h.numel() * h.element_size() for _t, _w, h in unit._sdxl_streamed_up)
        stats["peak"] = max(stats["peak"], sum(up_now.values()))
        stats["ups"] += 1

    def block_down(unit):
        del up_now[id(unit)]
        real_down(unit)

    monkeypatch.setattr(m, "_block_up", block_up)
    monkeypatch.setattr(m, "_block_down", block_down)

    unet = m.get(base, "unet")
    assert m.resident() == [res(base, "unet", "cpu")] and m.loads == 1 and t.moves == []
    first = id(next(unet.parameters()))  # stays on the device: callers read the device from it
    in_ram = {p.data_ptr() for p in unet.parameters() if id(p) != first}
    seen = []

    def check(module, _args):  # runs after the manager's hook: this layer's weights are up, not in RAM
        seen.append(module)
        assert all(p.data_ptr() not in in_ram for p in module.parameters(recurse=False) if id(p) != first)

    checks = [mod.register_forward_pre_hook(check) for mod in unet.modules()
              if any(True for _ in mod.parameters(recurse=False))]
    out = _unet_out(unet, cfg)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)  # alignment-level rounding, as above
    assert len(seen) == len(checks) > 100  # every layer with weights ran, each checked
    assert stats["ups"] >= 8 and 0 < stats["peak"] <= U // 4  # several blocks, never more than fits at once
    assert not up_now and {p.data_ptr() for p in unet.parameters() if id(p) != first} == in_ram  # all back
    for h in checks:
        h.remove()
    del unet

    t.budgets["gpu"] = PLENTY  # room now: the next get() puts it on the GPU whole, hooks removed
    ups = stats["ups"]
    unet = m.get(base, "unet")
    assert m.resident() == [res(base, "unet", "gpu")] and m.loads == 1
    torch.testing.assert_close(_unet_out(unet, cfg), want, rtol=0, atol=1e-5)
    assert stats["ups"] == ups and t.moves == [("up", "?")]


def test_stream_blocks_are_modules_that_get_called():
    """Hand-derived: a ModuleList is never a block (nobody calls it, so its hook would never fire); a split
    module keeps a block of its own tensors; a leaf larger than the limit is still one block."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))  # 16 bytes, used by Net.forward itself
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])  # 2 × 80 bytes
            self.head = torch.nn.Linear(4, 64)  # 1,280 bytes
            self.act = torch.nn.SiLU()  # no tensors: no block

    units = memory._stream_units(Net(), limit=200)
    assert [(type(m).__name__, whole) for m, whole in units] == [
        ("Net", False), ("Linear", True), ("Linear", True), ("Linear", True)]
    whole = memory._stream_units(Net(), limit=1456)  # 16 + 160 + 1,280 bytes: fits, one block
    assert [(type(m).__name__, w) for m, w in whole] == [("Net", True)]
