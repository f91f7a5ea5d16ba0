"""Inside ComfyUI: our networks live under ComfyUI's memory management, and ComfyUI's flags are our options.

Nothing here imports ComfyUI. The ComfyUI adapter (`environment._from_comfyui`) passes ComfyUI's
``comfy.model_management`` module (``mm``) and ``comfy.cli_args.args`` in, so this module is tested with
stand-ins and never touches ComfyUI outside ComfyUI.

What we rely on, read from ComfyUI v0.8.0's ``comfy/model_management.py``:

* every model ComfyUI may unload is an entry of the list ``current_loaded_models``;
  ``free_memory(memory_required, device, keep_loaded)`` takes the entries of that device not in
  ``keep_loaded``, orders them by (offloaded bytes, descending; ``sys.getrefcount`` of ``entry.model``;
  ``entry.model_memory()``; position), and while the device's free memory is below ``memory_required``
  calls ``entry.model_unload(memory_required - free)``; an entry answering True leaves the list;
* ``unload_all_models()`` — what ``POST /free`` (``unload_models``/``free_memory``), an out-of-memory
  error and ``--disable-smart-memory`` call — is ``free_memory(1e30, get_torch_device())``;
* ``load_models_gpu`` asks ``free_memory`` for 1.1 × the weights to load + ``minimum_inference_memory()``
  before it loads, and never for the CPU (on the CPU ComfyUI's models are held by its node cache,
  not by that list, so unloading frees nothing there);
* ``cleanup_models_gc``/``cleanup_models`` read ``entry.is_dead()`` and ``entry.real_model()``;
  ``loaded_models(only_currently_used=True)`` hands ``entry.model`` of entries whose
  ``currently_used`` is true back to ``load_models_gpu`` (ControlNet does this mid-sampling).

How we take part: ONE entry per manager (:class:`ComfyUIEntry`) that answers ComfyUI the way a
``LoadedModel`` does, and whose ``model_unload(n)`` frees `n` bytes of our networks, least recently
used first, through the manager's own API. Why not wrap each network in ComfyUI's ``ModelPatcher``
and load it with ``load_models_gpu`` (the issue's suggestion):

1. a ModelPatcher moves its module between its load and offload devices itself; our manager (GPU →
   CPU RAM → disk) moves the same module too — two owners of one placement disagree (the patcher's
   ``partially_load`` returns early when it believes the module is loaded, after our manager moved it);
2. ComfyUI's "unload" detaches a model to the offload device and never drops it: RAM is released only
   when its node cache lets go of the patcher. Our weights live in our manager, not in that cache, so
   ``POST /free`` would release none of our RAM (and with ``--cpu`` nothing at all);
3. its low-VRAM mode streams only ``comfy.ops`` layers (``comfy_cast_weights``); ours are plain torch
   layers, so only a full load would work and ``--lowvram`` would not reach us through it anyway;
4. ComfyUI orders its unloads by size and reference count, per model; one entry lets our manager
   free its own networks in least-recently-used order, and ComfyUI still chooses between its models
   and ours;
5. the contract of one ``LoadedModel`` entry is ten members; a faithful stand-in of ModelPatcher's
   loading logic for the tests would be hundreds of lines.
Wrapping ``free_memory``/``unload_all_models`` themselves was rejected too: ComfyUI resets functions
of that module that custom nodes replace (``hook_breaker_ac10a0.py``), a clear statement that they
must not.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..sdxl_core import checkpoint
from ..sdxl_core.errors import SDXLError
from ..sdxl_core.memory import BYTES_PER, ModelManager, RuntimeOptions

log = logging.getLogger(__name__)

# ComfyUI's unload_all_models asks for 1e30 bytes; no device holds an exbibyte, so a request that
# large can only mean "every model goes" (POST /free, an out-of-memory error), RAM included.
UNLOAD_EVERYTHING = 1 << 60

# The comfy.cli_args flags that decide our options (ComfyUI's attribute spellings).
UNET_FLAGS = ("fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "fp8_e4m3fn_unet", "fp8_e5m2_unet",
              "fp8_e8m0fnu_unet")
TEXT_FLAGS = ("fp8_e4m3fn_text_enc", "fp8_e5m2_text_enc", "fp16_text_enc", "bf16_text_enc", "fp32_text_enc")
VAE_FLAGS = ("fp16_vae", "bf16_vae", "fp32_vae")
OTHER_FLAGS = ("cpu", "force_fp32", "force_fp16", "cpu_vae")
ALL_FLAGS = UNET_FLAGS + TEXT_FLAGS + VAE_FLAGS + OTHER_FLAGS


# -- 1. ComfyUI's flags → our RuntimeOptions -----------------------------------------------------------
@dataclass(frozen=True)
class ComfyFlags:
    """What of ComfyUI's start-up state decides our options; hashable: the adapter is keyed by it."""

    device: str                  # str(mm.get_torch_device()): 'cuda:0', 'cpu', 'mps'…
    vram_state: str              # mm.vram_state.name: 'NORMAL_VRAM', 'LOW_VRAM', 'NO_VRAM', 'DISABLED'…
    on: frozenset = frozenset()  # the names in ALL_FLAGS that are set on comfy.cli_args.args


@dataclass(frozen=True)
class ComfyMemory:
    """ComfyUI's memory constants at the time the adapter is built (not part of the key)."""

    total_vram: int          # mm.get_total_memory(device), bytes
    minimum_inference: int   # mm.minimum_inference_memory(), bytes
    weight_ratio: float      # mm.MIN_WEIGHT_MEMORY_RATIO


def read_flags(mm, args) -> ComfyFlags:
    """ComfyUI's device, VRAM state and precision flags, from its modules."""
    state = getattr(mm, "vram_state", None)
    return ComfyFlags(device=str(mm.get_torch_device()),
                      vram_state=getattr(state, "name", "NORMAL_VRAM"),
                      on=frozenset(name for name in ALL_FLAGS if getattr(args, name, False)))


def read_memory(mm, device: str) -> ComfyMemory:
    return ComfyMemory(total_vram=int(mm.get_total_memory(torch.device(device))),
                       minimum_inference=int(mm.minimum_inference_memory()),
                       weight_ratio=float(getattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.4)))


def runtime_kwargs(flags: ComfyFlags, memory: ComfyMemory | None = None) -> tuple[dict, list[str]]:
    """RuntimeOptions keyword arguments for ComfyUI's flags, and a note for each flag only approximated.

    The dtypes follow ComfyUI's own choice (``unet_dtype``, ``text_encoder_dtype``, ``vae_dtype`` in
    comfy/model_management.py): an explicit per-network flag wins; ``--force-fp32`` makes
    ``should_use_fp16``/``should_use_bf16`` false, so every automatic choice falls to fp32; with no flag
    the dtype is left to our device default (None). ComfyUI computes its text encoders in fp32 whatever
    their storage dtype (CLIP's patcher sets an fp32 compute dtype), so fp32 text encoders give its
    numbers under ``--force-fp32``.
    ``vram_limit_bytes``: LOW_VRAM caps our weights on the device at the share ComfyUI's
    ``load_models_gpu`` always grants weights in that state, min(MIN_WEIGHT_MEMORY_RATIO × total,
    total − minimum_inference_memory()); NO_VRAM keeps them in CPU RAM (0 bytes on the device).
    """
    on, notes = flags.on, []
    kw: dict = {"device": "cpu" if "cpu" in on else flags.device}

    unet = None
    if "fp32_unet" in on:
        unet = torch.float32
    elif "fp64_unet" in on:
        unet = torch.float32
        notes.append("--fp64-unet: sdxl-nodes has no fp64 UNet; it runs in fp32")
    elif "bf16_unet" in on:
        unet = torch.bfloat16
    elif "fp16_unet" in on or "force_fp16" in on:  # ComfyUI's cli_args turns --force-fp16 into --fp16-unet
        unet = torch.float16
    elif on & {"fp8_e4m3fn_unet", "fp8_e5m2_unet", "fp8_e8m0fnu_unet"}:
        unet = torch.float16
        notes.append("--fp8-…-unet: sdxl-nodes stores no fp8 weights; its UNet is kept in fp16")
    elif "force_fp32" in on:
        unet = torch.float32

    text = None
    if on & {"fp8_e4m3fn_text_enc", "fp8_e5m2_text_enc"}:
        text = torch.float16
        notes.append("--fp8-…-text-enc: sdxl-nodes stores no fp8 weights; its text encoders are kept in fp16")
    elif "fp16_text_enc" in on:
        text = torch.float16
    elif "bf16_text_enc" in on:
        text = torch.bfloat16
    elif "fp32_text_enc" in on or "force_fp32" in on:
        text = torch.float32

    vae = None
    if "fp16_vae" in on:
        vae = torch.float16
    elif "bf16_vae" in on:
        vae = torch.bfloat16
    elif "fp32_vae" in on or "force_fp32" in on:
        vae = torch.float32
    if "cpu_vae" in on and kw["device"] != "cpu":
        notes.append("--cpu-vae: sdxl-nodes runs all its networks on one device; its VAE stays on "
                     f"{kw['device']}")

    kw.update({k: v for k, v in (("unet_dtype", unet), ("text_dtype", text), ("vae_dtype", vae)) if v is not None})
    if kw["device"] != "cpu":
        if flags.vram_state == "LOW_VRAM":
            if memory is None:
                raise ValueError("runtime_kwargs: LOW_VRAM needs ComfyUI's memory constants (read_memory)")
            total = memory.total_vram
            kw["vram_limit_bytes"] = max(0, int(min(memory.weight_ratio * total, total - memory.minimum_inference)))
        elif flags.vram_state == "NO_VRAM":
            kw["vram_limit_bytes"] = 0
    return kw, notes


def runtime_options(kwargs: dict) -> tuple[RuntimeOptions, dict]:
    """RuntimeOptions from `runtime_kwargs`; the arguments this version of RuntimeOptions has no field for
    are returned (the intent recorded, never dropped silently: the caller logs them)."""
    fields = {f.name for f in dataclasses.fields(RuntimeOptions)}
    base = {k: v for k, v in kwargs.items() if k in ("device", "unet_dtype", "text_dtype", "vae_dtype")}
    options = RuntimeOptions(**base)
    extra = {k: v for k, v in kwargs.items() if k not in base and k in fields}
    if extra:
        options = dataclasses.replace(options, **extra)
    unsupported = {k: v for k, v in kwargs.items() if k not in fields}
    return options, unsupported


# -- 2. our manager under ComfyUI's memory management ---------------------------------------------------
def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def has_memory_api(mm) -> bool:
    """Whether ComfyUI's model_management has what ComfyUIEntry takes part in (an old or stripped one may not)."""
    return (isinstance(getattr(mm, "current_loaded_models", None), list)
            and all(callable(getattr(mm, n, None)) for n in ("free_memory", "minimum_inference_memory")))


class ComfyUIModelManager(ModelManager):
    """Our model manager inside ComfyUI: ComfyUI can make it give memory back, and it asks ComfyUI for memory.

    * After each load its :class:`ComfyUIEntry` is in ``mm.current_loaded_models``, so ComfyUI's
      ``free_memory`` (its own loads, its memory pressure) and ``unload_all_models`` (``POST /free``)
      reach our networks.
    * Before a network not already on the device loads, ComfyUI is asked to free what it needs, as
      its ``load_models_gpu`` would for a model of that size (not on the CPU, where ComfyUI never does).
    """

    def __init__(self, options: RuntimeOptions, mm, *, requested: dict | None = None):
        super().__init__(options)
        self._mm = mm
        self._sizes: dict[tuple[str, str], int] = {}  # (resolved path, part) → bytes, measured at load
        self._comfy_lock = threading.RLock()
        self.requested = dict(requested or {})  # what ComfyUI's flags asked for (runtime_kwargs)
        self.cooperates = has_memory_api(mm)
        if not self.cooperates:
            log.warning("sdxl-nodes: this ComfyUI's comfy.model_management has no current_loaded_models/"
                        "free_memory: ComfyUI's Free model memory and its memory pressure will not unload "
                        "sdxl-nodes networks (they are still freed by sdxl-nodes' own manager)")
        self.entry = ComfyUIEntry(self, torch.device(self.options.device))

    def prefetch_unet_wanted(self, path) -> bool:
        """Only when asked: by default ComfyUI's memory management decides what is read when (no background
        read it does not know of, also on the CPU where our own runner prefetches)."""
        return bool(self.options.prefetch_unet)

    # ComfyUI logs `entry.model.model.__class__.__name__` when it unloads an entry, and compares
    # `entry.model.model` with its patchers' modules (is_clone): give it an object of ours with a clear name
    @property
    def model(self) -> ComfyUIEntry:
        return self.entry

    # -- loading -------------------------------------------------------------------------------------
    def get(self, path: str | os.PathLike, part: str, patches: tuple = (), *args, **kwargs) -> nn.Module:
        key = (str(Path(path).resolve()), part)
        with self._comfy_lock:
            if self.cooperates and not self._on_device(key):
                self._ask_comfyui_for(path, part)
            module = super().get(path, part, patches, *args, **kwargs)
            self._sizes[key] = module_bytes(module)
            if self.cooperates:
                self._register()
            return module

    def _on_device(self, key) -> bool:
        """Whether (path, part) is resident on our device (a tier name, where the manager reports one)."""
        for item in self.resident():
            if (str(Path(item[0]).resolve()), item[1]) == key:
                if len(item) < 3:
                    return True
                dev = self.entry.device
                return str(item[2]).lower() in {"gpu", "device", dev.type, str(dev)}
        return False

    def _ask_comfyui_for(self, path, part) -> None:
        device = self.entry.device
        if device.type == "cpu":
            return  # ComfyUI's load_models_gpu never frees for the CPU either
        needed = self._estimate_bytes_of(path, part)
        required = needed * 1.1 + self._mm.minimum_inference_memory()
        log.debug("sdxl-nodes: asking ComfyUI for %.1f MiB on %s before loading %s of %s",
                  required / 2**20, device, part, path)
        self._mm.free_memory(required, device, keep_loaded=[self.entry])  # ours: our own LRU decides

    def _estimate_bytes_of(self, path, part) -> int:
        key = (str(Path(path).resolve()), part)
        if key in self._sizes:
            return self._sizes[key]
        dtype = self.options.dtype_for(part)
        try:
            cfg, shapes = self.inspect(path)
        except SDXLError:  # a standalone VAE file, say: its size on disk in the target dtype
            try:
                return os.stat(path).st_size * BYTES_PER.get(dtype, 4) // 2
            except OSError:
                return 0
        return checkpoint.part_nbytes(path, part, dtype, (cfg, shapes))

    def _register(self) -> None:
        models = self._mm.current_loaded_models
        if not any(e is self.entry for e in models):
            models.insert(0, self.entry)  # where load_models_gpu puts a model it just loaded

    def deregister(self) -> None:
        models = getattr(self._mm, "current_loaded_models", None)
        if isinstance(models, list):
            models[:] = [e for e in models if e is not self.entry]

    # -- giving memory back ----------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes of our networks on ComfyUI's device (a tiered manager's host-RAM copies are not there)."""
        on_device = [k for k in self.resident() if len(k) < 3 or k[2] != "cpu" or self.entry.device.type == "cpu"]
        return sum(self._sizes.get((str(Path(k[0]).resolve()), k[1]), 0) for k in on_device)

    def release_for_comfyui(self, memory_to_free: float | None) -> bool:
        """Free `memory_to_free` bytes of our networks (None: all on the device; UNLOAD_EVERYTHING or more:
        all of them); True when nothing of ours is left, which is when ComfyUI drops our entry."""
        with self._comfy_lock:
            if memory_to_free is not None and memory_to_free >= UNLOAD_EVERYTHING:
                log.info("sdxl-nodes: ComfyUI unloads all models: unloading %d sdxl-nodes network(s)",
                         len(self.resident()))
                self.unload_all()
            else:
                self._give_back_bytes(float("inf") if memory_to_free is None else memory_to_free)
            return not self.resident()

    def _give_back_bytes(self, n: float) -> int:
        free = getattr(self, "free", None)  # a manager with tiers: ModelManager.free(bytes, device) → bytes freed
        if callable(free):
            return free(int(min(n, UNLOAD_EVERYTHING)), self.entry.device)
        freed = 0
        for item in self.resident():  # least recently used first
            if freed >= n:
                break
            size = self._sizes.get((str(Path(item[0]).resolve()), item[1]), 0)
            log.info("sdxl-nodes: ComfyUI needs memory: unloading %s of %s (%.1f MiB)", item[1], item[0], size / 2**20)
            self.evict(item[0], item[1])
            freed += size
        return freed


class ComfyUIEntry:
    """What ``mm.current_loaded_models`` holds for one of our managers: answers as a ComfyUI ``LoadedModel``.

    Members are those ComfyUI's model_management reads from an entry (see the module docstring).
    ``currently_used`` stays False, so ``loaded_models(only_currently_used=True)`` never hands this entry
    to ``load_models_gpu`` as if it were one of ComfyUI's patchers.
    """

    def __init__(self, manager: ComfyUIModelManager, device: torch.device):
        self._manager = weakref.ref(manager)
        self.real_model = self._manager  # cleanup_models drops the entry once the manager is gone
        self.device = device
        self.currently_used = False

    @property
    def model(self):
        return self._manager()

    def model_memory(self) -> int:
        m = self._manager()
        return m.held_bytes() if m is not None else 0

    def model_loaded_memory(self) -> int:
        return self.model_memory()

    def model_offloaded_memory(self) -> int:
        return 0

    def model_memory_required(self, device) -> int:
        return 0 if device == self.device else self.model_memory()

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        m = self._manager()
        return True if m is None else m.release_for_comfyui(memory_to_free)

    def model_use_more_vram(self, extra_memory, force_patch_weights=False) -> int:
        return 0  # our manager loads whole networks when they are used

    def is_dead(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<sdxl-nodes networks on {self.device}: {self.model_memory() / 2**20:.1f} MiB>"
