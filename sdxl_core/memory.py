"""Runtime options and the model manager: which networks are resident, in which memory tier, in which dtype.

The manager is an object the caller creates and passes around (never a module global). It loads one
network of a checkpoint at a time (`unet`, `vae`, `clip_l`, `clip_g`) and keeps recently used ones in
memory tiers, fastest first:

    gpu    the compute device (CUDA); absent when computing on the CPU
    cpu    host RAM; on CUDA the host copies are page-locked ("pinned"), so going back up is a DMA
    disk   the checkpoint file itself: a network in neither tier is read from it again

Before a network is read or brought back up, the least recently used networks of its tier make room:
a GPU network moves down to host RAM if RAM allows (older host-tier networks make way for it when that
is enough), otherwise it is dropped; a host-tier network is dropped. So SDXL base and refiner both run
in 24 GiB of RAM even in fp32, and on an 8 GB GPU, alternating them never reads the disk again when
RAM holds the one not in use. Networks are keyed by (resolved path, size, mtime_ns, part): a file
replaced on disk is read again and its stale entry dropped.

A network in use is never moved and never counted as freed: one inside ``with manager.using(...)``,
or one some caller still holds a reference to (a node mid-run; a ClipRef's CLIP-L while bigG loads),
seen from its reference count as ComfyUI's ``free_memory`` does. When nothing else can be freed the
network loads anyway, and one warning says how much was needed and what is held.

A network that does not fit the GPU at all (more than `vram_limit_bytes`, or than the free VRAM plus
everything of ours on it) is not loaded anyway: its weights stay in (pinned) host RAM and each block
moves to the GPU just before its forward and back after it (sequential offload, ComfyUI's lowvram at
block granularity); `resident()` shows it in the cpu tier, and once it fits, `get()` moves it up whole.

Semantics follow ComfyUI's ``comfy/model_management.py`` (``free_memory``, ``LoadedModel``: LRU
order, models moved to the offload device rather than dropped, the reserve for inference memory).

Public API (stable: the ComfyUI adapter and the CUDA path build on it):

    get(path, part, patches=())   the module on the compute device, loaded or brought up as needed
    using(path, part, patches=()) the same as a context manager that marks it in use while inside
    prefetch(path, part) -> bool  start reading it into host RAM in a background thread (when RAM
                                  allows); a later get() waits for that read instead of reading again
    evict(path, part)             forget it (all tiers); its memory goes once no caller holds it
    unload_all()                  evict everything
    free(bytes_needed, device) -> int
                                  free at least that many bytes on `device` ("cuda:0": move networks
                                  down to host RAM, or drop them; "cpu": drop host-tier networks), least
                                  recently used first, never one in use; returns the bytes freed
    resident() -> [(path, part, tier)]   LRU order (oldest first); tier "gpu" or "cpu"
    loads                         how many networks were read from disk
    options.vram_limit_bytes      cap on our weights on the GPU (None: all free VRAM)
    options.reserve_bytes         kept free on each tier (activations, the OS)
    options.pin_memory            page-lock host copies on CUDA (default True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, ops
from .config import SDXLConfig
from .errors import SDXLError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTES_PER = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
HOST = torch.device("cpu")
# RAM beyond a checkpoint's networks that a CPU UNet prefetch wants free: the encode and sampling working
# set (about 0.6 GiB at 1024²) and room for the page cache the read streams through
CPU_PREFETCH_MARGIN = 2 * 1024**3


@dataclass(frozen=True)
class RuntimeOptions:
    """Device and precision policy: per network a storage dtype (what its weights are kept in) and a
    compute dtype (what its layers run in; `compute_dtype_for`).

    dtypes left as None take the device's default (`resolved`):
    - CPU: None stays None = each tensor kept as the file stores it (SDXL releases: fp16), computed in
      fp32 through ops.manual_cast layers: the pixels of an fp32 run at half its memory. An fp32 file
      stays fp32 (never rounded down unasked). `fp32` stores and computes in fp32, `bf16` stores and
      computes in bf16 (faster, not exact), `fp16` rounds to fp16 and computes in fp32.
    - CUDA: fp16 storage and compute for UNet and text encoders; VAE bf16 where supported, else fp32.
    """

    device: str = "cpu"  # or "cuda", "cuda:N", "auto" (the GPU when there is one; see `resolved`)
    unet_dtype: torch.dtype | None = None
    text_dtype: torch.dtype | None = None
    vae_dtype: torch.dtype | None = None
    # Leave this many bytes free when deciding whether a network fits (OS, activations).
    reserve_bytes: int = 2 * 1024**3
    # torch.compile the UNet for sampling (accel.COMPILE_BACKENDS; None = eager), and channels_last
    # convolution weights on CUDA (cuDNN's native layout for fp16/bf16)
    compile: str | None = None
    channels_last: bool = False  # measured on an H200 (bench_gpu): NCHW 23.0 it/s, channels_last 22.3 it/s
    # checkpoint loaders start reading their UNet at once in a background thread (onto the GPU when it has
    # room, else into (pinned) RAM). True/False: always/never. None (default): on the CPU when RAM has room
    # for the whole checkpoint and CPU_PREFETCH_MARGIN more (`prefetch_unet_wanted`): there the read overlaps
    # the text encoders' load and encode (2-core CPU, fp16 base at 256², 2 steps, in-process: the ~3 s UNet
    # load is hidden but the encode slows by ~1.5 s, so with the file in the page cache 20.9 → 20.8 s median
    # of 3; after the cache was partly evicted 26.7 → 21.0 s; peak RSS unchanged at 7.2 GiB); off on CUDA:
    # on the H200 runs, with the files in the page cache, the cold graph
    # took 13.1 s (into RAM) and 9.0 s (onto the GPU) with it vs 5.9 s and 7.8 s without (the read competes
    # with the main thread's own reads). On CUDA it can pay off on slow disks.
    prefetch_unet: bool | None = None

    # Most bytes of network weights kept on the GPU (None = whatever VRAM is free): a cap such as 8 GiB makes
    # a large GPU behave like a small one (the "8 GB-VRAM mode"); the reserve above comes out of it too.
    vram_limit_bytes: int | None = None
    # Page-lock the host copies of networks moved off a CUDA GPU, so they go back up by asynchronous DMA.
    pin_memory: bool = True

    def resolved(self) -> RuntimeOptions:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise SDXLError(f"device '{self.device}' requested but CUDA is not available; use --device cpu")
            half = torch.float16
            vae = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32  # never fp16: NaNs
        else:
            # ComfyUI computes in fp32 on the CPU; storing as the file does and computing in fp32 (ops.py)
            # gives the same bits at half the memory. bf16 halves memory at some cost in exactness.
            half = vae = None
        return RuntimeOptions(
            device=str(dev),
            unet_dtype=self.unet_dtype or half,
            text_dtype=self.text_dtype or half,
            vae_dtype=self.vae_dtype or vae,
            reserve_bytes=self.reserve_bytes,
            compile=self.compile,
            channels_last=self.channels_last,
            prefetch_unet=self.prefetch_unet,
        )

    def dtype_for(self, part: str) -> torch.dtype | None:
        """Storage dtype of a network ('unet', 'vae', 'clip_l', 'clip_g'); None: as the file stores it."""
        r = self.resolved()
        return {"unet": r.unet_dtype, "vae": r.vae_dtype}.get(part, r.text_dtype)

    def compute_dtype_for(self, part: str) -> torch.dtype:
        """The dtype a network computes in (ops.compute_dtype of its storage dtype on this device)."""
        return ops.compute_dtype(self.resolved().device, self.dtype_for(part))


# Fields the manager reads from the options it was given, whatever `resolved()` copies over.
_MANAGER_FIELDS = ("vram_limit_bytes", "pin_memory")


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: on CUDA the driver's free bytes plus what PyTorch's cache holds unused."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _stat(path) -> tuple[int, int]:
    """(size, mtime_ns) of a checkpoint file; of a diffusers folder, the total size and newest mtime of its files."""
    p = Path(path)
    if p.is_dir():
        size = mtime = 0
        for f in p.rglob("*"):
            if f.is_file():
                st = f.stat()
                size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
        return size, mtime
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _key_stat(path) -> tuple[int, int]:
    try:
        return _stat(path)
    except OSError:  # a missing file: the reader raises the clear error
        return -1, -1


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if abs(n) >= 1024**3 else f"{n / 1024**2:.1f} MiB"


# ------------------------------------------------------------------------------------------------
# Moving a network's tensors between devices in place (the module object stays the same)


def _tensors(module: nn.Module) -> list[tuple[torch.Tensor, list[tuple[nn.Module, bool, str]]]]:
    """Every parameter and buffer tensor once, with where it is registered ((owner, is_parameter, name), …)."""
    found: dict[int, tuple[torch.Tensor, list]] = {}
    for owner in module.modules():
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for name, t in table.items():
                if t is not None:
                    found.setdefault(id(t), (t, []))[1].append((owner, is_param, name))
    return list(found.values())


def _rebind(t: torch.Tensor, where, new: torch.Tensor) -> None:
    if isinstance(t, nn.Parameter):
        t.data = new  # the same Parameter object everywhere it is registered (tied weights stay tied)
    else:
        for owner, _is_param, name in where:
            owner._buffers[name] = new


def _own_tensors(module: nn.Module) -> list[tuple[torch.Tensor, list]]:
    """The module's own parameters and buffers (not its children's), as `_tensors` lists them."""
    return [(t, [(module, is_param, name)])
            for is_param, table in ((True, module._parameters), (False, module._buffers))
            for name, t in table.items() if t is not None]


def _stream_units(module: nn.Module, limit: int) -> list[tuple[nn.Module, bool]]:
    """Blocks for sequential offload: (module, whole subtree?) pairs. A module small enough (or a leaf)
    is one block; a larger one is split into its children, plus its own tensors around its forward.
    ModuleList/ModuleDict are always split: they are never called, so their hooks would never run."""
    containers = (nn.ModuleList, nn.ModuleDict)
    children = list(module.children())
    size = _nbytes(module)
    if size == 0:
        return []
    if not children or (size <= limit and not isinstance(module, containers)):
        return [(module, True)]
    units = [(module, False)] if _own_tensors(module) else []
    for child in children:
        units += _stream_units(child, limit)
    return units


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t, _ in _tensors(module))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and without gaps (contiguous in some dimension order, e.g. channels_last)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _touch(module: nn.Module) -> None:
    """Read one value of every page of the module's tensors: memory-mapped weights are then really read
    from the file now (in the prefetch thread), not page by page in the middle of the computation."""
    with torch.no_grad():
        for t, _ in _tensors(module):
            if t.device.type == "cpu" and t.numel() and t.is_contiguous():
                t.view(-1)[:: max(1, 4096 // t.element_size())].sum()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class _HostStore:
    """Host RAM holding one network's tensors while it is in the cpu tier: a few large buffers
    (`CHUNK_BYTES` each, or one tensor's size when larger), page-locked with cudaHostRegister on CUDA.

    Why a few registered buffers rather than `pin_memory()` per tensor: PyTorch's pinned allocator
    rounds every block up to a power of two and keeps freed blocks cached and locked, so a 2,500-tensor
    UNet could lock up to twice its size, for good; a few exact-size buffers lock exactly the network's
    bytes in a few driver calls and are unlocked (`release`) as soon as the network leaves the tier.
    Why chunks rather than one flat buffer: packing tensors that are already in RAM (a prefetched
    network) then needs at most one chunk of extra memory instead of a second copy of the network.
    """

    CHUNK_BYTES = 256 * 1024**2
    ALIGN = 64

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: list[torch.Tensor] = []
        self._registered: list[int] = []

    def allocate(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=HOST)
        if self.pin and nbytes:
            rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
            if int(rc) == 0:
                self._registered.append(buf.data_ptr())
            else:  # still correct, only the upload is synchronous
                log.debug("cudaHostRegister of %s failed (error %s): that buffer stays pageable", _gib(nbytes), rc)
        self.buffers.append(buf)
        return buf

    @property
    def pinned_bytes(self) -> int:
        ptrs = set(self._registered)
        return sum(b.numel() for b in self.buffers if b.data_ptr() in ptrs)

    def release(self) -> None:
        """Unlock and let go of the buffers (call once nothing reads them any more: after a sync). A caller
        still holding the module keeps the memory alive; it is then ordinary pageable memory."""
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered = []
        self.buffers = []

    def __del__(self):
        if self._registered:
            self.release()

    @classmethod
    def layout(cls, tensors) -> tuple[list[tuple[int, list]], list]:
        """Tensors → ([(chunk bytes, [(tensor, where, offset), …]), …], [(tensor, where) not dense])."""
        chunks: list[tuple[int, list]] = []
        loose, placed, used = [], [], 0
        for t, where in tensors:
            if not _dense(t):
                loose.append((t, where))
                continue
            n = t.numel() * t.element_size()
            start = -(-used // cls.ALIGN) * cls.ALIGN
            if placed and start + n > cls.CHUNK_BYTES:
                chunks.append((used, placed))
                placed, start = [], 0
            placed.append((t, where, start))
            used = start + n
        if placed:
            chunks.append((used, placed))
        return chunks, loose


def pack_to_host(module: nn.Module, pin: bool) -> _HostStore:
    """Move every tensor of `module` (on any device) into host buffers, one chunk at a time (the old
    tensors go as their chunk is filled); pinned when `pin`. Returns the store that owns the memory."""
    store = _HostStore(pin)
    tensors = _tensors(module)
    devices = {t.device for t, _ in tensors}
    chunks, loose = _HostStore.layout(tensors)
    del tensors
    for size, placed in chunks:
        buf = store.allocate(size)
        for t, where, off in placed:
            n = t.numel() * t.element_size()
            dst = buf[off:off + n].view(t.dtype).as_strided(t.shape, t.stride())
            dst.copy_(t, non_blocking=True)
            _rebind(t, where, dst)
        del placed[:]  # the old tensors of this chunk can go now
    for t, where in loose:
        _rebind(t, where, t.to(HOST))
    for d in devices:
        _sync(d)  # the device→host copies are done before anyone reads the host copies
    return store


def move_to_device(module: nn.Module, device: torch.device, host: _HostStore | None = None) -> None:
    """Copy every tensor of `module` to `device` (asynchronously from pinned memory, one sync at the end),
    then release `host`, the store the tensors were in."""
    for t, where in _tensors(module):
        new = torch.empty_like(t, device=device)  # same strides for dense tensors (channels_last stays)
        new.copy_(t, non_blocking=True)
        _rebind(t, where, new)
    _sync(device)  # the host buffers must outlive the copies out of them
    if host is not None:
        host.release()


# ------------------------------------------------------------------------------------------------
# The manager


@dataclass(eq=False)
class _Entry:
    key: tuple  # (resolved path, size, mtime_ns, part)
    tier: str  # "gpu" | "cpu"
    nbytes: int
    module: nn.Module | None = None  # None while a prefetch reads it
    host: _HostStore | None = None  # the buffers holding the module's tensors in the cpu tier (offloading only)
    loading: bool = False
    users: int = 0  # `using()` blocks inside which it is in use
    streamed: list | None = None  # hook handles while it runs block by block from host RAM (sequential offload)

    @property
    def label(self) -> str:
        return f"{self.key[3]} of {Path(self.key[0]).name}"


def _refcount(entry) -> int:
    return sys.getrefcount(entry.module)


# The count `_refcount` sees for a module referenced by nothing but its entry (the attribute, plus the
# argument where the interpreter counts it), measured rather than assumed: CPython versions differ.
class _Probe:
    def __init__(self):
        self.module = object()


_OWN_REFS = _refcount(_Probe())


class ModelManager:
    """Loads networks on demand, keeps them in tiers (GPU → host RAM → disk), least recently used out first."""

    def __init__(self, options: RuntimeOptions | None = None):
        given = options or RuntimeOptions()
        # `resolved()` fills in the dtypes; the manager's own fields come from what the caller gave
        self.options = dataclasses.replace(given.resolved(), **{f: getattr(given, f) for f in _MANAGER_FIELDS})
        self.device = torch.device(self.options.device)
        # a GPU tier above host RAM (False on the CPU; tests set it on a CPU manager to simulate a GPU)
        self.offload = self.device.type != "cpu"
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a prefetch finished
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # LRU order: oldest first
        self._inspected: dict[tuple[str, int, int], tuple[SDXLConfig, dict]] = {}
        self.loads = 0  # how many networks were read from disk (tests and stats)
        self._vae_files: dict[str, tuple] = {}  # resolved path → (VAEFile, shapes) of standalone VAEs
        self._loras: OrderedDict[tuple, object] = OrderedDict()  # LoRA files read and matched, LRU order
        self.lora_reads = 0
        self._dropped = False  # a network was dropped since `_release` began (then gc is worth its time)

    @property
    def _pin(self) -> bool:
        return self.options.pin_memory and torch.cuda.is_available()

    # -- standalone VAE files --------------------------------------------------------------------
    def inspect_vae(self, path: str | os.PathLike) -> checkpoint.VAEFile:
        """Check a standalone VAE file (SGM or diffusers keys); `get(path, "vae")` then loads it."""
        p = Path(path)
        with self._lock:
            info = checkpoint.inspect_vae(p)
            self._vae_files[str(p.resolve())] = info
            return info[0]

    def vae_dtype(self, info: checkpoint.VAEFile) -> torch.dtype:
        """fp16 for the fp16-fix VAE on CUDA (what it was made for); otherwise the usual VAE dtype
        (fp32, or bf16 on a GPU that has it: the original SDXL VAE overflows in fp16)."""
        if info.fp16_fix and torch.device(self.options.device).type == "cuda":
            return torch.float16
        return self.options.dtype_for("vae")

    # -- LoRA files ------------------------------------------------------------------------------
    MAX_LORAS = 16

    def lora(self, path: str | os.PathLike, config: SDXLConfig):
        """The LoRA at `path` matched to `config` (lora.LoraPatches), cached by path, size and mtime, so
        the same file gives the same object run after run and a strength change re-patches only."""
        from . import lora

        p = Path(path)
        key = (str(p.resolve()), *_stat(p), config)
        with self._lock:
            if key in self._loras:
                self._loras.move_to_end(key)
                return self._loras[key]
            lp = lora.load_lora(p, config)
            self.lora_reads += 1
            self._loras[key] = lp
            while len(self._loras) > self.MAX_LORAS:
                self._loras.popitem(last=False)
            return lp

    # -- files -----------------------------------------------------------------------------------
    def inspect(self, path: str | os.PathLike) -> tuple[SDXLConfig, dict]:
        """Detect and strictly check a checkpoint (cached by path, size and mtime)."""
        p = Path(path)
        key = (str(p.resolve()), *_key_stat(p))
        with self._lock:
            if key not in self._inspected:
                self._inspected[key] = checkpoint.inspect_checkpoint(p)
            return self._inspected[key]

    def _key(self, path, part: str) -> tuple:
        return (str(Path(path).resolve()), *_key_stat(path), part)

    def _reader(self, path, part: str):
        """(bytes the network will take, a function reading it onto a device) — header work only."""
        vae_file = self._vae_files.get(str(Path(path).resolve())) if part == "vae" else None
        if vae_file is not None:
            info, shapes = vae_file
            dtype = self.vae_dtype(info)
            n = sum(int(torch.Size(s).numel()) for k, s in shapes.items() if not k.startswith("loss."))
            return n * BYTES_PER.get(dtype, 4), lambda device: checkpoint.load_vae_file(
                path, device=device, dtype=dtype, inspected=vae_file)
        cfg, shapes = self.inspect(path)
        dtype = self.options.dtype_for(part)
        # computing as on the manager's device even when read into host RAM first (a prefetch on CUDA):
        # the module is built for where it will run
        compute = self.options.compute_dtype_for(part)
        nbytes = checkpoint.part_nbytes(path, part, dtype, (cfg, shapes))  # dtype None: the file's own sizes
        return nbytes, lambda device: checkpoint.load_part(
            path, part, device=device, dtype=dtype, compute_dtype=compute, inspected=(cfg, shapes))

    # -- networks --------------------------------------------------------------------------------
    def get(self, path: str | os.PathLike, part: str, patches: tuple = ()) -> nn.Module:
        """The network `part` of the checkpoint at `path` on the compute device: brought up from host RAM,
        waited for (a prefetch in progress) or read from the file, whichever applies.

        `patches`: the LoRA stack `((LoraPatches, strength), …)` the caller wants applied (lora.py).
        The resident module is patched in place to exactly that stack; weights patched for an earlier
        request are first put back exactly from their small undo records (lora.py), so neither a second
        copy is kept nor the checkpoint read again.
        """
        with self._lock:
            return self._patch(path, part, self._get(path, part).module, patches)

    @contextlib.contextmanager
    def using(self, path: str | os.PathLike, part: str, patches: tuple = ()) -> Iterator[nn.Module]:
        """`get()` as a context: inside the block the network is in use (never moved or dropped to make room)."""
        with self._lock:
            entry = self._get(path, part)
            self._patch(path, part, entry.module, patches)
            entry.users += 1
        try:
            yield entry.module  # (no local of this frame refers to it: the count alone marks it in use)
        finally:
            with self._lock:
                entry.users -= 1

    def _patch(self, path, part, module: nn.Module, patches: tuple) -> nn.Module:
        from . import lora

        state = getattr(module, "_sdxl_patch_state", None)
        if not patches and (state is None or not state.patched):
            return module
        cfg, shapes = self.inspect(path)  # the module is the file's as it is now: entries are keyed by mtime
        dtype = self.options.dtype_for(part)

        def restore(keys):
            return checkpoint.read_module_tensors(path, part, keys, device=self.options.device, dtype=dtype,
                                                  inspected=(cfg, shapes))

        lora.patch_module(module, part, tuple(patches), restore)
        return module

    def _get(self, path: str | os.PathLike, part: str) -> _Entry:
        with self._lock:
            key = self._key(path, part)
            while True:
                self._drop_stale(key)
                entry = self._entries.get(key)
                if entry is None:
                    break
                if entry.loading:  # a prefetch is reading it: wait for that read, never a second one
                    self._changed.wait()
                    continue
                self._entries.move_to_end(key)
                if entry.tier == "cpu" and self.offload:
                    if self._fits_gpu(entry.nbytes, keep=key):
                        self._promote(entry)
                    elif entry.streamed is None:
                        self._start_streaming(entry)
                return entry
            tier = "gpu" if self.offload else "cpu"
            nbytes, read = self._reader(path, part)
            if self.offload and not self._fits_gpu(nbytes, keep=key):  # read it into RAM, run it from there
                self._make_room("cpu", nbytes, keep=key, what=f"{part} of {Path(path).name}")
                tier, device = "cpu", HOST
            else:
                self._make_room(tier, nbytes, keep=key, what=f"{part} of {Path(path).name}")
                device = self.device
            module = read(device)
            self.loads += 1
            entry = _Entry(key, tier, _nbytes(module), module)
            del module
            self._entries[key] = entry
            if tier == "cpu" and self.offload:
                self._start_streaming(entry)
            return entry

    def _drop_stale(self, key: tuple) -> None:
        """Forget entries of the same file and part read before the file changed."""
        for old in [e for k, e in self._entries.items() if k[0] == key[0] and k[3] == key[3] and k != key]:
            log.info("%s changed on disk since its %s was loaded: reading it again", key[0], key[3])
            self._drop(old)

    def prefetch_unet_wanted(self, path: str | os.PathLike) -> bool:
        """Whether a checkpoint loader should start reading this checkpoint's UNet at once (`prefetch`):
        `options.prefetch_unet` when set; by default on the CPU only, and only while available RAM holds every
        network of the checkpoint plus the reserve and CPU_PREFETCH_MARGIN (the UNet is then read while the
        text encoders load and encode, so all of them are in RAM at once)."""
        if self.options.prefetch_unet is not None:
            return self.options.prefetch_unet
        if torch.device(self.options.device).type != "cpu":
            return False
        try:
            cfg, _shapes = self.inspect(path)
            need = sum(self._reader(path, part)[0] for part in ("unet", "vae", "clip_l", "clip_g")
                       if part != "clip_l" or cfg.clip_l is not None)
        except SDXLError as err:
            log.debug("not prefetching the UNet of %s: %s", path, err)
            return False
        room = self._free_bytes("cpu") - self.options.reserve_bytes
        if room < need + CPU_PREFETCH_MARGIN:
            log.debug("not prefetching the UNet of %s: %s free in RAM, %s wanted", path, _gib(room),
                      _gib(need + CPU_PREFETCH_MARGIN))
            return False
        return True

    def prefetch(self, path: str | os.PathLike, part: str) -> bool:
        """Start reading a network into host RAM in a background thread, so a later `get()` finds it there.

        True if a read started; False (a no-op) when it is already resident or being read, or when host
        RAM (less the reserve) cannot take it without freeing anything: a prefetch is only a guess, so it
        never evicts. Errors are left for `get()` to raise in the caller's thread.
        """
        with self._lock:
            key = self._key(path, part)
            self._drop_stale(key)
            if key in self._entries:
                return False
            try:
                nbytes, read = self._reader(path, part)
            except SDXLError as err:
                log.debug("not prefetching the %s of %s: %s", part, path, err)
                return False
            # Straight onto the GPU when it has room (measured on an H200: reading a page-cached UNet into
            # pinned RAM and up again took longer than the read it overlapped), else into host RAM.
            tier = "gpu" if self.offload and self._free_bytes("gpu") - self.options.reserve_bytes >= nbytes \
                else "cpu"
            room = self._free_bytes("cpu") - self.options.reserve_bytes
            extra = _HostStore.CHUNK_BYTES if self.offload and self._pin else 0  # packing into pinned chunks
            if tier == "cpu" and room < nbytes + extra:
                log.debug("not prefetching the %s of %s: %s needed, %s free in RAM", part, path,
                          _gib(nbytes + extra), _gib(room))
                return False
            entry = _Entry(key, tier, nbytes, loading=True)
            self._entries[key] = entry
            threading.Thread(target=self._prefetch_read, args=(entry, read), daemon=True,
                             name=f"sdxl-prefetch-{part}").start()
            return True

    def _prefetch_read(self, entry: _Entry, read) -> None:
        module = host = None
        try:
            module = read(self.device if entry.tier == "gpu" else HOST)  # a GPU read syncs its own stream
            if entry.tier == "gpu":
                pass
            elif self.offload and self._pin:
                host = pack_to_host(module, pin=True)
            else:
                _touch(module)
        except Exception as err:  # noqa: BLE001 - a thread must not die silently; get() reads it again and raises
            log.warning("prefetching the %s failed (%s: %s); it will be read when it is needed",
                        entry.label, type(err).__name__, err)
            module = host = None
        with self._lock:
            if module is not None:
                self.loads += 1
            entry.loading = False
            if module is not None and self._entries.get(entry.key) is entry:
                entry.module, entry.host, entry.nbytes = module, host, _nbytes(module)
            else:  # evicted (or failed) while it was being read
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
                if host is not None:
                    host.release()
            module = host = None  # no reference of this thread may look like a user
            self._changed.notify_all()

    # -- tiers -----------------------------------------------------------------------------------
    def _free_bytes(self, tier: str) -> int:
        """Bytes free for networks in `tier` ("gpu": the compute device, within vram_limit_bytes; "cpu": RAM)."""
        if tier == "gpu":
            free = available_bytes(self.device)
            if self.options.vram_limit_bytes is not None:
                free = min(free, self.options.vram_limit_bytes - self._tier_bytes("gpu"))
            return free
        return available_bytes(HOST)

    def _tier_bytes(self, tier: str) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.tier == tier)

    def _tier_for(self, device) -> str | None:
        dev = torch.device(device)
        if self.offload and dev.type == self.device.type and (dev.index or 0) == (self.device.index or 0):
            return "gpu"
        return "cpu" if dev.type == "cpu" else None

    def _in_use(self, entry: _Entry) -> bool:
        if entry.users or entry.loading:
            return True
        return _refcount(entry) > _OWN_REFS

    def _to_host(self, module: nn.Module) -> _HostStore:
        """GPU → host RAM (pinned when CUDA is available). A seam tests replace to watch the moves."""
        return pack_to_host(module, pin=self._pin)

    def _to_device(self, module: nn.Module, host: _HostStore | None) -> None:
        """Host RAM → the compute device, asynchronously from pinned memory. A seam, like `_to_host`."""
        move_to_device(module, self.device, host)

    def _promote(self, entry: _Entry) -> None:
        if entry.streamed is not None:  # it fits now: whole on the GPU, without the hooks
            for handle in entry.streamed:
                handle.remove()
            entry.streamed = None
        self._make_room("gpu", entry.nbytes, keep=entry.key, what=entry.label)
        self._to_device(entry.module, entry.host)
        entry.host, entry.tier = None, "gpu"

    def _fits_gpu(self, nbytes: int, keep=None) -> bool:
        """Whether the network fits the GPU at all: with every other network of ours off it (held or not)."""
        ours = sum(e.nbytes for e in self._entries.values() if e.tier == "gpu" and e.key != keep)
        return self._free_bytes("gpu") + ours - self.options.reserve_bytes >= nbytes

    # -- sequential offload: a network larger than the GPU, run block by block from host RAM ---------
    def _start_streaming(self, entry: _Entry) -> None:
        """Keep the network's weights in (pinned) host RAM and move each block to the GPU just before its
        forward and back after it (ComfyUI's lowvram, at block granularity). Blocks are the largest
        modules that fit what is free on the GPU once idle networks made room; its first parameter stays
        on the GPU, so callers that read the device from it (`next(m.parameters()).device`) see the GPU."""
        if entry.host is None:
            entry.host = pack_to_host(entry.module, pin=self._pin)
        self._release("gpu", entry.nbytes, keep=entry.key)
        limit = max(self._free_bytes("gpu") - self.options.reserve_bytes, 0)
        module = entry.module
        first = next(module.parameters(), None)
        keep = frozenset() if first is None else frozenset({id(first)})
        if first is not None:
            first.data = first.data.to(self.device)
        handles = []
        for unit, recurse in _stream_units(module, limit):
            pre = functools.partial(self._stream_pre, recurse=recurse, keep=keep)
            handles.append(unit.register_forward_pre_hook(pre))
            handles.append(unit.register_forward_hook(self._stream_post))
        entry.streamed = handles
        log.warning("the %s (%s) does not fit the GPU (%s free for it): running it block by block from RAM, "
                    "%d blocks of at most %s (slower: every step copies the weights up)", entry.label,
                    _gib(entry.nbytes), _gib(limit), len(handles) // 2, _gib(limit))

    def _stream_pre(self, unit: nn.Module, _args, *, recurse: bool, keep: frozenset) -> None:
        if getattr(unit, "_sdxl_streamed_up", None) is not None:
            return  # re-entered: already up
        self._block_up(unit, recurse, keep)

    def _stream_post(self, unit: nn.Module, _args, _out) -> None:
        if getattr(unit, "_sdxl_streamed_up", None) is not None:
            self._block_down(unit)

    def _block_up(self, unit: nn.Module, recurse: bool, keep: frozenset) -> None:
        """One block's tensors → the GPU (asynchronous copies from pinned memory). A seam for tests."""
        saved = []
        for t, where in _tensors(unit) if recurse else _own_tensors(unit):
            if id(t) in keep:
                continue
            host = t.data if isinstance(t, nn.Parameter) else t
            new = torch.empty_like(host, device=self.device)
            new.copy_(host, non_blocking=True)
            _rebind(t, where, new)
            saved.append((t, where, host))
        unit._sdxl_streamed_up = saved

    def _block_down(self, unit: nn.Module) -> None:
        """Point the block back at its host copies; the GPU copies go (in stream order) as nothing holds them."""
        for t, where, host in unit._sdxl_streamed_up:
            _rebind(t, where, host)
        unit._sdxl_streamed_up = None

    def _demote(self, entry: _Entry) -> bool:
        """Move a GPU network to host RAM if it fits there (older host-tier networks make way when that
        is enough), else drop it: it is read from the file when needed again. True if it moved."""
        room = self._free_bytes("cpu") - self.options.reserve_bytes
        if room < entry.nbytes:
            older = []
            for e in self._entries.values():
                if e is entry:
                    break
                if e.tier == "cpu" and not self._in_use(e):
                    older.append(e)
            if room + sum(e.nbytes for e in older) < entry.nbytes:
                log.info("dropping the %s from the GPU: %s of RAM free, %s needed to keep it", entry.label,
                         _gib(room), _gib(entry.nbytes))
                self._drop(entry)
                return False
            for e in older:
                if room >= entry.nbytes:
                    break
                log.info("dropping the %s from RAM to make way for the %s", e.label, entry.label)
                self._drop(e)
                room += e.nbytes
        log.info("moving the %s from the GPU to RAM", entry.label)
        entry.host = self._to_host(entry.module)
        entry.tier = "cpu"
        return True

    def _drop(self, entry: _Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.host is not None:
            entry.host.release()
        entry.module, entry.host = None, None  # freed once the last user (a node mid-run, say) lets go
        self._dropped = True

    def _release(self, tier: str, deficit: int, keep=None) -> tuple[int, list[_Entry]]:
        """Move down (gpu) or drop (cpu) least recently used networks of `tier` until `deficit` bytes are
        freed; networks in use are skipped and not counted. Returns (bytes freed, entries in use)."""
        freed, held, collected = 0, [], False
        self._dropped = False
        for entry in list(self._entries.values()):
            if freed >= deficit:
                break
            if entry.tier != tier or entry.key == keep or self._entries.get(entry.key) is not entry:
                continue
            if self._in_use(entry) and not collected and not entry.loading and not entry.users:
                gc.collect()  # a reference cycle (an old traceback) may be all that holds it
                collected = True
            if self._in_use(entry):
                held.append(entry)
                continue
            if tier == "gpu":
                self._demote(entry)
            else:
                log.info("freeing the %s from RAM", entry.label)
                self._drop(entry)
            freed += entry.nbytes
        if self._dropped:
            gc.collect()  # a moved network's old tensors are gone already; a dropped one may sit in a cycle
        if freed and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return freed, held

    def _make_room(self, tier: str, needed: int, keep, what: str) -> None:
        free = self._free_bytes(tier)
        deficit = needed + self.options.reserve_bytes - free
        if deficit <= 0:
            return
        freed, held = self._release(tier, deficit, keep)
        if freed < deficit:
            place = "GPU memory" if tier == "gpu" else "RAM"
            busy = ", ".join(f"the {e.label} ({_gib(e.nbytes)}{', being read' if e.loading else ''})" for e in held)
            log.warning("the %s needs %s of %s plus %s kept in reserve; %s was free and %s could be freed "
                        "(in use, so kept: %s). Loading it anyway.", what, _gib(needed), place,
                        _gib(self.options.reserve_bytes), _gib(max(free, 0)), _gib(freed), busy or "nothing")

    # -- public freeing --------------------------------------------------------------------------
    def free(self, bytes_needed: int, device: str | torch.device) -> int:
        """Free at least `bytes_needed` bytes on `device`, least recently used first and never a network in
        use: on the compute GPU networks move down to host RAM (or are dropped when RAM is short); on
        "cpu" host-tier networks are dropped. Returns the bytes freed (0 for a device we hold nothing on)."""
        with self._lock:
            tier = self._tier_for(device)
            if tier is None or bytes_needed <= 0:
                return 0
            return self._release(tier, bytes_needed)[0]

    def evict(self, path: str | os.PathLike, part: str) -> None:
        """Forget the `part` of `path` in every tier (a prefetch in progress is discarded when it ends)."""
        with self._lock:
            resolved = str(Path(path).resolve())
            gone = [e for k, e in self._entries.items() if k[0] == resolved and k[3] == part]
            for entry in gone:
                self._drop(entry)
        if gone:
            self._after_drop()

    def unload_all(self) -> None:
        with self._lock:
            for entry in list(self._entries.values()):
                self._drop(entry)
        self._after_drop()

    @staticmethod
    def _after_drop() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def resident(self) -> list[tuple[str, str, str]]:
        """(resolved path, part, tier) of every network held, least recently used first."""
        with self._lock:
            return [(k[0], k[3], e.tier) for k, e in self._entries.items() if not e.loading]


@dataclass(frozen=True, eq=False)
class ModelRef:
    """A handle on one network of one checkpoint: what the SDXL_MODEL/CLIP/VAE sockets carry.

    The module itself lives in the manager, which may free it and load it again later.
    """

    manager: ModelManager
    path: str
    part: str
    config: SDXLConfig
    # LoRAs to apply, in chain order: ((lora.LoraPatches, strength), …); a LoRA node returns a copy
    # of its input handle with one more entry, so the payload never carries weights of its own
    patches: tuple = ()
    # torch.compile backend for this UNet (TorchCompileModel / SDXL Compile UNet); None: the manager's option
    compile: str | None = None

    def load(self) -> nn.Module:
        return self.manager.get(self.path, self.part, self.patches)

    def load_for_sampling(self) -> nn.Module:
        """The network as the sampler calls it: compiled when this handle or the runtime options ask for it."""
        from .accel import compiled, to_channels_last

        module, options = self.load(), self.manager.options
        if options.channels_last and torch.device(options.device).type == "cuda":
            to_channels_last(module)  # idempotent; weights patched or re-read later are NCHW again until here
        return compiled(module, self.compile or options.compile)

    @property
    def kind(self) -> str:
        return self.config.kind
