"""Runtime options and the model manager: which networks are resident, on which device, in which dtype.

The manager is an object the caller creates and passes around (never a module global). It loads one
network of a checkpoint at a time (`unet`, `vae`, `clip_l`, `clip_g`), keeps recently used ones
resident and, before loading another, frees the least recently used until the new one fits in the
memory that is actually available — so SDXL base and refiner both run in 24 GiB of RAM even in fp32,
where holding both UNets at once would not fit.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
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

    device: str = "cpu"
    unet_dtype: torch.dtype | None = None
    text_dtype: torch.dtype | None = None
    vae_dtype: torch.dtype | None = None
    # Leave this many bytes free when deciding whether a network fits (OS, activations).
    reserve_bytes: int = 2 * 1024**3

    def resolved(self) -> RuntimeOptions:
        dev = torch.device(self.device)
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
        )

    def dtype_for(self, part: str) -> torch.dtype | None:
        """Storage dtype of a network ('unet', 'vae', 'clip_l', 'clip_g'); None: as the file stores it."""
        r = self.resolved()
        return {"unet": r.unet_dtype, "vae": r.vae_dtype}.get(part, r.text_dtype)

    def compute_dtype_for(self, part: str) -> torch.dtype:
        """The dtype a network computes in (ops.compute_dtype of its storage dtype on this device)."""
        return ops.compute_dtype(self.resolved().device, self.dtype_for(part))


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _stat(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class ModelManager:
    """Loads networks on demand and frees the least recently used ones when memory runs short."""

    def __init__(self, options: RuntimeOptions | None = None):
        self.options = (options or RuntimeOptions()).resolved()
        self._lock = threading.RLock()
        self._resident: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()  # LRU order: oldest first
        self._inspected: dict[tuple[str, int, int], tuple[SDXLConfig, dict]] = {}
        self.loads = 0  # how many networks were read from disk (tests and stats)
        self._vae_files: dict[str, tuple] = {}  # resolved path → (VAEFile, shapes) of standalone VAEs
        self._loras: OrderedDict[tuple, object] = OrderedDict()  # LoRA files read and matched, LRU order
        self.lora_reads = 0

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

    def _load_vae_file(self, path, key, info, shapes) -> nn.Module:
        dtype = self.vae_dtype(info)
        n = sum(int(torch.Size(s).numel()) for k, s in shapes.items() if not k.startswith("loss."))
        self._make_room(n * BYTES_PER.get(dtype, 4), keep=key)
        return checkpoint.load_vae_file(path, device=self.options.device, dtype=dtype, inspected=(info, shapes))

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
        st = p.stat() if p.exists() else None
        key = (str(p.resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1)
        if key not in self._inspected:
            self._inspected[key] = checkpoint.inspect_checkpoint(p)
        return self._inspected[key]

    # -- networks --------------------------------------------------------------------------------
    def get(self, path: str | os.PathLike, part: str, patches: tuple = ()) -> nn.Module:
        """The network `part` of the checkpoint at `path`, loaded if it is not resident.

        `patches`: the LoRA stack `((LoraPatches, strength), …)` the caller wants applied (lora.py).
        The resident module is patched in place to exactly that stack; weights patched for an earlier
        request are first re-read from the file (only those tensors), so no second copy is kept.
        """
        with self._lock:
            module = self._get(path, part)
            return self._patch(path, part, module, patches)

    def _patch(self, path, part, module: nn.Module, patches: tuple) -> nn.Module:
        from . import lora

        state = getattr(module, "_sdxl_patch_state", None)
        if not patches and (state is None or not state.patched):
            return module
        if state is not None and state.patched and getattr(module, "_sdxl_source_stat", None) != _stat(path):
            log.info("%s changed on disk since its %s was loaded: loading it again", path, part)
            self.evict(str(path), part)
            module = self._get(path, part)
        cfg, shapes = self.inspect(path)
        dtype = self.options.dtype_for(part)

        def restore(keys):
            return checkpoint.read_module_tensors(path, part, keys, device=self.options.device, dtype=dtype,
                                                  inspected=(cfg, shapes))

        lora.patch_module(module, part, tuple(patches), restore)
        return module

    def _get(self, path: str | os.PathLike, part: str) -> nn.Module:
        key = (str(Path(path).resolve()), part)
        with self._lock:
            if key in self._resident:
                self._resident.move_to_end(key)
                return self._resident[key]
            vae_file = self._vae_files.get(key[0])
            if vae_file is not None and part == "vae":
                module = self._load_vae_file(path, key, *vae_file)
            else:
                cfg, shapes = self.inspect(path)
                dtype = self.options.dtype_for(part)
                self._make_room(self._estimate_bytes(cfg, shapes, part, dtype), keep=key)
                module = checkpoint.load_part(
                    path, part, device=self.options.device, dtype=dtype, inspected=(cfg, shapes)
                )
            self.loads += 1
            module._sdxl_source_stat = _stat(path)  # restoring patched weights needs the same file
            self._resident[key] = module
            return module

    def _estimate_bytes(self, cfg, shapes, part, dtype) -> int:
        groups, _ = checkpoint.split_keys(shapes, cfg)
        n = 0
        for k in groups.get(part, []):
            numel = 1
            for s in shapes[k]:
                numel *= s
            n += numel
        return n * BYTES_PER.get(dtype, 4)

    def _make_room(self, needed: int, keep) -> None:
        device = torch.device(self.options.device)
        while self._resident and available_bytes(device) < needed + self.options.reserve_bytes:
            old_key = next(iter(self._resident))
            if old_key == keep:
                break
            log.info("freeing %s of %s to make room for %.1f GiB", old_key[1], old_key[0], needed / 1024**3)
            self.evict(*old_key)

    def evict(self, path: str, part: str) -> None:
        with self._lock:
            module = self._resident.pop((str(Path(path).resolve()), part), None)
            if module is not None:
                del module  # freed once the last user (a node mid-run, say) lets go of it
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def unload_all(self) -> None:
        with self._lock:
            for key in list(self._resident):
                self.evict(*key)

    def resident(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._resident)


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

    def load(self) -> nn.Module:
        return self.manager.get(self.path, self.part, self.patches)

    @property
    def kind(self) -> str:
        return self.config.kind
