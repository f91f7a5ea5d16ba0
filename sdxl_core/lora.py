"""LoRA / LyCORIS files for SDXL: reading them, finding the weight each key patches, and patching in place.

Semantics follow ComfyUI v0.8 (`comfy/lora.py`, `comfy/weight_adapter/{lora,loha,lokr,base}.py`,
`comfy/model_patcher.py`), re-implemented here:

* Formats, matched by the name in front of the tensor suffix:
  kohya-ss/sd-scripts `lora_unet_*` (SGM or diffusers module names, `.` → `_`), `lora_te1_*` (CLIP-L),
  `lora_te2_*` (bigG; on a refiner `lora_te_*` is bigG), diffusers/PEFT `unet.<diffusers name>`,
  `text_encoder.*`, `text_encoder_2.*` (also the old `.processor.to_q` spelling), ComfyUI's own saved
  form `diffusion_model.<sgm name>` / `text_encoders.clip_{l,g}.transformer.*`, SimpleTuner `lycoris_*`.
  Suffixes: `lora_up/lora_down[/lora_mid]` (LoCon convs incl. the Tucker mid conv), `lora_B/lora_A`,
  `_lora.up/down`, `.lora.up/down`, `lora_linear_layer.up/down`; LyCORIS LoHa `hada_w{1,2}_{a,b}`
  [+ `hada_t{1,2}`], LoKr `lokr_w{1,2}[_a,_b]` [+ `lokr_t2`]; full differences `diff`/`diff_b`,
  `w_norm`/`b_norm`; `alpha` and DoRA's `dora_scale`.
* Scale: LoRA `alpha / rank` (rank = rows of the down matrix), 1 without alpha; LoHa `alpha / rows of
  w1_b`; LoKr `alpha / rows of the last factor matrix that was decomposed`, 1 when both are full.
* Patching: for each patched weight, W32 = W in float32; for every (LoRA, strength) in the order the
  LoRA nodes are chained, W32 += (strength · scale) · ΔW computed in float32; then W = W32 cast back
  to the storage dtype. Strength 0 skips that LoRA for that weight (so strength 0 = no LoRA, bit for bit).

The module keeps no backup of its weights: `PatchState` records which weights were patched, with a
small undo record each (section 5) from which the file's values come back bit for bit, so a strength
change or a removed LoRA neither copies the UNet nor reads the checkpoint again. A LoRA file's tensors
are views of its mapping, whose pages are handed back after each use.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import mmap
import os
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SDXLConfig
from .diffusers_keys import unet_sgm_to_diffusers
from .errors import SDXLError

log = logging.getLogger(__name__)


class LoraError(SDXLError):
    """A LoRA file that cannot be used with this model (wrong family, damaged, unsupported)."""


# ------------------------------------------------------------------------------------------------
# 1. Which LoRA names patch which weight


def _canonical_clip_key(key: str) -> str:
    """A transformers CLIP key with the `text_model.` level, whatever this transformers version uses."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return key
    return "text_model." + key


@functools.lru_cache(maxsize=8)
def _weight_shapes(cfg: SDXLConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    from .checkpoint import build_modules

    return {p: {k: tuple(v.shape) for k, v in m.state_dict().items()} for p, m in build_modules(cfg).items()}


@functools.lru_cache(maxsize=8)
def target_map(cfg: SDXLConfig) -> dict[str, tuple[str, str]]:
    """LoRA base name (the key without its `.lora_up.weight`-style suffix) → (network, module weight key)."""
    from .checkpoint import build_modules

    modules = build_modules(cfg)  # on meta: names only
    out: dict[str, tuple[str, str]] = {}

    # UNet: SGM names (kohya on the SGM UNet, ComfyUI's saved form) and diffusers names
    to_diffusers = unet_sgm_to_diffusers(cfg.unet)
    for k in modules["unet"].state_dict():
        if not k.endswith(".weight"):
            continue
        base = k[: -len(".weight")]
        t = ("unet", k)
        out["lora_unet_" + base.replace(".", "_")] = t
        out["diffusion_model." + base] = t
        d = to_diffusers[k][: -len(".weight")]
        out["lora_unet_" + d.replace(".", "_")] = t
        out["lycoris_" + d.replace(".", "_")] = t
        processor = d.replace(".to_", ".processor.to_")
        if processor.endswith(".to_out.0"):
            processor = processor[:-2]
        for p in ("", "unet."):
            out[p + d] = t
            out[p + processor] = t

    # Text encoders: kohya te1/te2 (te on a refiner), diffusers text_encoder(_2), ComfyUI's text_encoders.*
    if cfg.clip_l is not None:
        streams = {"clip_l": ("lora_te1_", "text_encoder."), "clip_g": ("lora_te2_", "text_encoder_2.")}
        extra = {"clip_l": ("lora_te_",), "clip_g": ()}  # ComfyUI maps SD1-style lora_te_ to CLIP-L too
    else:
        streams = {"clip_g": ("lora_te_", "text_encoder.")}
        extra = {"clip_g": ()}
    for part, (kohya, diffusers) in streams.items():
        for k in modules[part].state_dict():
            if not k.endswith(".weight"):
                continue
            c = _canonical_clip_key(k)[: -len(".weight")]
            t = (part, k)
            for p in (kohya, *extra[part]):
                out[p + c.replace(".", "_")] = t
            out[diffusers + c] = t
            out[f"text_encoders.{part}.transformer." + c] = t
    return out


# ------------------------------------------------------------------------------------------------
# 2. Adapters: one patch of one weight


@dataclass(frozen=True, eq=False)
class Adapter:
    """One weight's patch from one LoRA file. `delta(shape)` is ΔW·scale in float32 (strength not applied)."""

    kind: str  # lora | loha | lokr | diff
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    # -- shapes, checked before anything is patched
    def numel(self) -> int:
        t = self.tensors
        if self.kind == "diff":
            return t["diff"].numel()
        if self.kind == "lora":
            up, down, mid = t["up"], t["down"], t.get("mid")
            n = up.shape[0] * down.shape[1]
            spatial = (mid if mid is not None else down).shape[2:]
            for s in spatial:
                n *= s
            for s in up.shape[2:]:
                n *= s
            return n
        if self.kind == "loha":
            if "t1" in t:
                return t["w1a"].shape[1] * t["w1b"].shape[1] * t["t1"].shape[2] * t["t1"].shape[3]
            return t["w1a"].shape[0] * t["w1b"].shape[1]
        w1, w2 = self._lokr_factor_shapes()
        n = 1
        for s in (*w1, *w2):
            n *= s
        return n

    def _lokr_factor_shapes(self):
        t = self.tensors
        w1 = tuple(t["w1"].shape) if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1])
        if "w2" in t:
            w2 = tuple(t["w2"].shape)
        elif "t2" in t:
            w2 = (t["w2_a"].shape[1], t["w2_b"].shape[1], *t["t2"].shape[2:])
        else:
            w2 = (t["w2_a"].shape[0], t["w2_b"].shape[1])
        return w1, w2

    def out_features(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0]
        if self.kind == "diff":
            return t["diff"].shape[0]
        return None

    # -- the maths (fp32 on `device`)
    def delta(self, shape: torch.Size, device) -> torch.Tensor:
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "diff":
            return t["diff"].reshape(shape)
        if self.kind == "lora":
            up, down = t["up"], t["down"]
            scale = self.alpha / down.shape[0] if self.alpha is not None else 1.0
            if "mid" in t:  # Tucker: down [r, in, 1, 1], mid [r, r, kh, kw] → [r, in, kh, kw]
                mid = t["mid"]
                full = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
                down = down.reshape(full).transpose(0, 1)
            d = torch.mm(up.flatten(1), down.flatten(1)).reshape(shape)  # (out, in·kh·kw) → weight shape
            return d, scale
        if self.kind == "loha":
            scale = self.alpha / t["w1b"].shape[0] if self.alpha is not None else 1.0
            if "t1" in t:
                m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["t1"], t["w1b"], t["w1a"])
                m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2b"], t["w2a"])
            else:
                m1 = t["w1a"] @ t["w1b"]
                m2 = t["w2a"] @ t["w2b"]
            return (m1 * m2).reshape(shape), scale
        # lokr: ΔW = w1 ⊗ w2, each factor full or a product of two matrices
        dim = None
        if "w1" in t:
            w1 = t["w1"]
        else:
            dim = t["w1_b"].shape[0]
            w1 = t["w1_a"] @ t["w1_b"]
        if "w2" in t:
            w2 = t["w2"]
        else:
            dim = t["w2_b"].shape[0]
            if "t2" in t:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2_b"], t["w2_a"])
            else:
                w2 = t["w2_a"] @ t["w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        scale = self.alpha / dim if (self.alpha is not None and dim is not None) else 1.0
        return torch.kron(w1, w2).reshape(shape), scale

    def row_chunkable(self) -> bool:
        """A plain LoRA (no Tucker mid, no DoRA): ΔW's rows r0:r1 need only up[r0:r1]."""
        return self.kind == "lora" and self.dora_scale is None and "mid" not in self.tensors

    def additive(self) -> bool:
        """The patch is `W32 += addend` (every kind but DoRA, whose rescaling depends on W itself)."""
        return self.dora_scale is None

    def raw_rows(self, r0: int, r1: int, shape: torch.Size, device) -> tuple[torch.Tensor, float]:
        """(T, f) such that rows r0:r1 of the addend at `strength` are (strength · f) · T (float32)."""
        up = self.tensors["up"][r0:r1].to(device=device, dtype=torch.float32)
        down = self.tensors["down"].to(device=device, dtype=torch.float32)
        scale = self.alpha / down.shape[0] if self.alpha is not None else 1.0
        return torch.mm(up.flatten(1), down.flatten(1)).reshape(shape), scale

    def raw(self, shape: torch.Size, device) -> tuple[torch.Tensor, float]:
        """(T, f) such that the whole weight's addend at `strength` is (strength · f) · T; additive kinds."""
        if self.kind == "diff":
            return self.delta(shape, device), 1.0
        return self.delta(shape, device)

    def addend(self, strength: float, shape: torch.Size, device) -> torch.Tensor:
        """What `apply` adds to the whole weight (float32); additive kinds only."""
        t, f = self.raw(shape, device)
        return (strength * f) * t

    def apply(self, w32: torch.Tensor, strength: float) -> torch.Tensor:
        """w32 + strength · scale · ΔW (or DoRA's re-normalised weight); w32 is float32, updated in place."""
        if self.additive():  # ComfyUI's order: (strength · scale) · ΔW, added in fp32
            w32 += self.addend(strength, w32.shape, w32.device)
            return w32
        d, scale = self.delta(w32.shape, w32.device)
        # DoRA (ComfyUI base.weight_decompose): rescale W + scale·ΔW to the trained magnitude
        m = self.dora_scale.to(device=w32.device, dtype=torch.float32)
        calc = w32 + scale * d
        if m.shape[0] == calc.shape[0]:
            norm = w32.reshape(w32.shape[0], -1).norm(dim=1, keepdim=True).reshape(w32.shape[0], *[1] * (w32.dim() - 1))
        else:
            norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                    .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
        calc *= m / (norm + torch.finfo(torch.float32).eps)
        if strength != 1.0:
            w32 += strength * (calc - w32)
        else:
            w32.copy_(calc)
        return w32


_LORA_PAIRS = (  # (up suffix, down suffix, mid suffix or None)
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    (".lora_B.weight", ".lora_A.weight", None),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)
_LOHA = {"w1a": ".hada_w1_a", "w1b": ".hada_w1_b", "w2a": ".hada_w2_a", "w2b": ".hada_w2_b", "t1": ".hada_t1", "t2": ".hada_t2"}
_LOKR = {"w1": ".lokr_w1", "w2": ".lokr_w2", "w1_a": ".lokr_w1_a", "w1_b": ".lokr_w1_b", "w2_a": ".lokr_w2_a",
         "w2_b": ".lokr_w2_b", "t2": ".lokr_t2"}


def _take(sd: dict, used: set, key: str):
    v = sd.get(key)
    if v is not None:
        used.add(key)
    return v


def _adapters_for(base: str, sd: dict[str, torch.Tensor], used: set[str]) -> list[tuple[str, Adapter]]:
    """The patches named `base` in the file: [(which weight: 'weight' | 'bias', adapter)]."""
    alpha_t = _take(sd, used, base + ".alpha")
    alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None else None
    dora = _take(sd, used, base + ".dora_scale")
    found: list[tuple[str, Adapter]] = []
    for up_s, down_s, mid_s in _LORA_PAIRS:
        if base + up_s in sd:
            if base + down_s not in sd:
                raise LoraError(f"'{base + up_s}' has no matching '{base + down_s}'")
            t = {"up": _take(sd, used, base + up_s), "down": _take(sd, used, base + down_s)}
            if mid_s and base + mid_s in sd:
                t["mid"] = _take(sd, used, base + mid_s)
            found.append(("weight", Adapter("lora", t, alpha, dora)))
            break
    if base + ".hada_w1_a" in sd:
        t = {k: _take(sd, used, base + s) for k, s in _LOHA.items() if base + s in sd}
        found.append(("weight", Adapter("loha", t, alpha, dora)))
    if any(base + s in sd for s in (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a")):
        t = {k: _take(sd, used, base + s) for k, s in _LOKR.items() if base + s in sd}
        found.append(("weight", Adapter("lokr", t, alpha, dora)))
    for suffix, which in ((".diff", "weight"), (".w_norm", "weight"), (".diff_b", "bias"), (".b_norm", "bias")):
        v = _take(sd, used, base + suffix)
        if v is not None:
            found.append((which, Adapter("diff", {"diff": v})))
    return found


# ------------------------------------------------------------------------------------------------
# 3. A parsed file


@dataclass(frozen=True, eq=False)
class LoraPatches:
    """A LoRA file matched against one SDXL config: per network, weight key → adapter."""

    path: str
    kind: str  # the SDXL kind it was matched against
    patches: dict[str, dict[str, Adapter]]
    unmatched: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)
    file: MappedFile | None = None  # the tensors' memory, when they are views of the mapped file

    def parts(self) -> set[str]:
        return {p for p, d in self.patches.items() if d}

    def release_pages(self) -> None:
        """Return the file's pages this process touched (they stay in the page cache; see MappedFile)."""
        if self.file is not None:
            self.file.release()


_CTX_KEY = re.compile(r"attn2[._]to_k")
_FAMILIES = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL base", 1280: "SDXL refiner"}
_DOWN_SUFFIXES = tuple(pair[1] for pair in _LORA_PAIRS)


def _context_width(sd: dict[str, torch.Tensor]) -> int | None:
    """The text-conditioning width a LoRA was trained with: the input width of a cross-attention to_k."""
    for k, v in sd.items():
        if not _CTX_KEY.search(k) or v.ndim < 2:
            continue
        if any(k.endswith(s) for s in _DOWN_SUFFIXES):
            return int(v.shape[1])
        if k.endswith(".hada_w1_b") or k.endswith(".diff"):
            return int(v.shape[-1])
    return None


def match(sd: dict[str, torch.Tensor], cfg: SDXLConfig, path: str = "<lora>", shapes: dict | None = None) -> LoraPatches:
    """Match a LoRA state dict to the weights of an SDXL `cfg`. Raises LoraError for another model family
    or mis-shaped patches; keys that match no weight are collected in `unmatched` (the caller warns once).

    `shapes`: network → {weight key: shape}; built from `cfg` on the meta device when not given.
    """
    name = os.path.basename(path)
    width = _context_width(sd)
    if width is not None and width != cfg.unet.context_dim:
        family = _FAMILIES.get(width, f"a model with {width}-wide text conditioning")
        other = "refiner" if cfg.is_refiner else "base"
        hint = (f"Load it with the {'base' if cfg.is_refiner else 'refiner'} checkpoint instead."
                if family.startswith("SDXL") else "Use a LoRA made for SDXL.")
        raise LoraError(f"{name}: this LoRA was trained for {family}, but it is applied to the SDXL {other} "
                        f"model (its cross-attention input width says so). {hint}")
    if shapes is None:
        shapes = _weight_shapes(cfg)
    targets = target_map(cfg)
    used: set[str] = set()
    patches: dict[str, dict[str, list[Adapter]]] = {}
    bad: list[str] = []
    for base in _bases(sd):
        if base not in targets:
            continue
        part, wkey = targets[base]
        for which, adapter in _adapters_for(base, sd, used):
            key = wkey if which == "weight" else wkey[: -len("weight")] + "bias"
            target = shapes[part].get(key)
            if target is None:
                bad.append(f"{base}: {part} has no {key}")
                continue
            n = 1
            for s in target:
                n *= s
            out = adapter.out_features()
            if adapter.numel() != n or (out is not None and out != target[0]):
                bad.append(f"{base} → {part}.{key}: patch has {adapter.numel()} values, weight {list(target)}")
                continue
            patches.setdefault(part, {}).setdefault(key, []).append(adapter)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; … {len(bad) - 5} more" if len(bad) > 5 else "")
        raise LoraError(f"{name}: {len(bad)} LoRA patches do not fit the SDXL {cfg.kind} weights ({shown}). "
                        "The LoRA is for another model.")
    unmatched = tuple(sorted(k for k in sd if k not in used))
    flat = {p: {k: tuple(v) for k, v in d.items()} for p, d in patches.items()}
    return LoraPatches(path=str(path), kind=cfg.kind, patches=flat, unmatched=unmatched)


_SUFFIXES = tuple(
    sorted({s for pair in _LORA_PAIRS for s in pair if s} | set(_LOHA.values()) | set(_LOKR.values())
           | {".alpha", ".dora_scale", ".diff", ".diff_b", ".w_norm", ".b_norm"}, key=len, reverse=True)
)


def _bases(sd: dict) -> list[str]:
    """The distinct names in front of a known suffix, in file order."""
    seen: dict[str, None] = {}
    for k in sd:
        for s in _SUFFIXES:
            if k.endswith(s):
                seen.setdefault(k[: -len(s)], None)
                break
    return list(seen)


# ------------------------------------------------------------------------------------------------
# 4. Reading a file


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class MappedFile:
    """A LoRA file mapped copy-on-write (never written to): its tensors are views of the mapping.

    `release()` drops this process's pages of it (MADV_DONTNEED). The data stays in the page cache, so
    the next patch or undo maps it back without a disk read, while between uses the process's resident
    memory holds no copy of the LoRA. `unchanged()` says whether the file on disk is still the one mapped
    (a file rewritten in place must not be touched through the old mapping).
    """

    def __init__(self, path: Path, f):
        self.path = path
        st = os.fstat(f.fileno())
        self.stat = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def release(self) -> None:
        if hasattr(self.map, "madvise"):  # Linux, macOS; elsewhere the pages simply stay
            self.map.madvise(mmap.MADV_DONTNEED)

    def unchanged(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_ino, st.st_size, st.st_mtime_ns) == self.stat


def map_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], MappedFile]:
    """All tensors of a LoRA .safetensors file as views of its mapping (pickles are refused: they can run
    code). The header and every tensor's extent are checked against the file's size first."""
    import json

    from .checkpoint import _check_file
    from .errors import CheckpointError

    p = Path(path)
    try:
        _check_file(p)
    except CheckpointError as e:
        raise LoraError(str(e).replace("checkpoint", "LoRA")) from None
    size = p.stat().st_size
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise LoraError(f"{p}: the safetensors header length ({n}) does not fit the file (truncated download?)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LoraError(f"{p}: the safetensors header is not valid JSON ({e})") from None
        mapped = MappedFile(p, f)
    if not isinstance(header, dict):
        raise LoraError(f"{p}: the safetensors header is not a table of tensors")
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise LoraError(f"{p}: tensor {name} has dtype {info.get('dtype')}, which LoRAs here cannot use")
        start, end = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for dim in shape:
            numel *= dim
        item = torch.empty((), dtype=dtype).element_size()
        if end - start != numel * item or start < 0 or base + end > mapped.stat[1]:
            raise LoraError(f"{p}: tensor {name} does not fit the file (truncated download?)")
        raw = mapped.bytes[base + start : base + end]
        if (base + start) % item:
            raw = raw.clone()  # unaligned in the file: a copy of this tensor only
        out[name] = raw.view(dtype).reshape(shape)
    if not out:
        raise LoraError(f"{p}: the file holds no tensors")
    return out, mapped


def load_lora(path: str | os.PathLike, cfg: SDXLConfig) -> LoraPatches:
    """Read and match a LoRA file; warns once with the count of keys that patch nothing."""
    sd, mapped = map_lora_file(path)
    lp = dataclasses.replace(match(sd, cfg, str(path)), file=mapped)
    lp.release_pages()  # matching read the small tensors (alpha): nothing stays resident until patching
    if lp.unmatched:
        shown = ", ".join(lp.unmatched[:5]) + (", …" if len(lp.unmatched) > 5 else "")
        log.warning("%s: %d LoRA keys match no SDXL %s weight and are ignored: %s",
                    os.path.basename(str(path)), len(lp.unmatched), cfg.kind, shown)
    if not any(lp.patches.values()):
        raise LoraError(f"{path}: no key of this file patches an SDXL {cfg.kind} weight "
                        f"({len(sd)} keys, e.g. {next(iter(sd))}); it is not an SDXL LoRA in a known format")
    return lp


# ------------------------------------------------------------------------------------------------
# 5. Patching a module in place


Stack = tuple[tuple[LoraPatches, float], ...]  # (LoRA, strength) in chain order
Patches = list[tuple[Adapter, float]]  # one weight's (adapter, strength) in chain order
RESTORE_BATCH = 4  # patched tensors re-read from the checkpoint per batch when restoring
ROW_BLOCK_ABOVE = 1 << 20  # weights with more elements are patched in row blocks of about this size
RELEASE_EVERY = 16  # weights patched between returns of the LoRA files' pages


# Exact undo without a copy. Patching rounds W32 + Σ addends to the storage dtype once: p = rd(W + a).
# Going back, g = rd(p − a) is W itself except where p's binade is above g's (there p's rounding step
# is coarser than W's and two or more values round to the same p) or at an exact tie. So the record of
# one weight is: for each element whose exponent field in p exceeds g's (found again, from p and the
# addends alone, when undoing) a 2-bit code W − g ∈ {−1, 0, +1} in ordered-integer steps; every other
# difference (a wider step, a tie, a NaN) listed with its position and value; and a checksum of W's
# bits. Making the record checks it reproduces W bit for bit, so undo is exact as long as the addends
# come out the same — they are recomputed by the same code on the same row blocks, and the checksum
# is compared after undoing (a mismatch, e.g. another BLAS thread count, falls back to the file).
# Size: about 2 bits per element where p and W sit in different binades (~1–5 % of the elements
# for LoRA deltas 1–5 % of the weights), i.e. well under 1 % of the weight's own bytes.

_BITS = {torch.float16: (torch.int16, 10), torch.bfloat16: (torch.int16, 7), torch.float32: (torch.int32, 23)}
_ESCAPE = 3


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude float bits (int16/int32 view) → integers in the floats' order (−0 just below +0)."""
    wide = bits.to(torch.int32 if bits.dtype == torch.int16 else torch.int64)
    mag = wide & (0x7FFF if bits.dtype == torch.int16 else 0x7FFFFFFF)
    return torch.where(wide < 0, -mag - 1, wide)


def _from_ordered(o: torch.Tensor, int_dtype: torch.dtype) -> torch.Tensor:
    sign = -0x8000 if int_dtype == torch.int16 else -0x80000000
    return torch.where(o < 0, (-(o + 1)) | sign, o).to(int_dtype)


def _guess(p: torch.Tensor, addends: list[torch.Tensor]):
    """(g = rd(p − Σ addends) as the storage's integer bits, flat; a flat mask of where p's exponent
    field is above g's). Everything here is whole-block work: kept to a few in-place passes."""
    int_dtype, mant = _BITS[p.dtype]
    # exact differences: fp32 for 16-bit storage, fp64 when the storage is fp32 itself
    x = p.reshape(-1).to(torch.float64 if p.dtype == torch.float32 else torch.float32, copy=True)
    for a in reversed(addends):
        x -= a.reshape(-1)
    gb = x.to(p.dtype).view(int_dtype)
    del x
    magnitude = 0x7FFF if int_dtype == torch.int16 else 0x7FFFFFFF
    ep = p.reshape(-1).view(int_dtype) & magnitude
    ep >>= mant
    eg = gb & magnitude
    eg >>= mant
    return gb, torch.gt(ep, eg)


def _checksum(bits: torch.Tensor) -> int:
    """A checksum of a block's bits: adler32 of its bytes on the CPU, sums of the integers elsewhere."""
    if bits.device.type == "cpu":
        return zlib.adler32(bits.contiguous().reshape(-1).numpy().view("uint8"))
    wide = bits.reshape(-1).to(torch.int64)
    return hash((int(wide.sum()), int((wide * wide).sum())))


@dataclass
class _Undo:
    """How to get one weight's file values back from its patched values (see above)."""

    codes: list[torch.Tensor]  # per block: uint8, four 2-bit codes per byte, one per flagged element
    escapes: list[tuple[torch.Tensor, torch.Tensor]]  # per block: (int32 flat positions, values)
    checksums: list[int]  # per block, of the file's bits

    def nbytes(self) -> int:
        return sum(c.numel() for c in self.codes) + sum(i.numel() * i.element_size() + v.numel() * v.element_size()
                                                          for i, v in self.escapes)


def _record(orig: torch.Tensor, p: torch.Tensor, addends: list[torch.Tensor]):
    """One block's (codes, escapes): what turns g back into `orig`. Kept on the CPU (they are small)."""
    int_dtype = _BITS[p.dtype][0]
    gb, flag = _guess(p, addends)
    ob = orig.reshape(-1).view(int_dtype)
    # one scan for both: the flagged elements, and those where g is not W (rare outside the flagged)
    either = torch.ne(ob, gb)
    either |= flag
    at = either.nonzero().reshape(-1)
    del either
    is_flag = flag[at]
    flagged, wrong = at[is_flag], at[~is_flag]
    off = _ordered(ob[flagged]) - _ordered(gb[flagged])  # W − g in steps, where p's step is coarser
    code = torch.where(off.abs() <= 1, off + 1, torch.full_like(off, _ESCAPE)).to(torch.uint8)
    pos = torch.cat([flagged[off.abs() > 1], wrong])
    del gb, flag
    escapes = (pos.to(device="cpu", dtype=torch.int32), orig.reshape(-1)[pos].cpu())
    pad = (-code.numel()) % 4
    if pad:
        code = torch.cat([code, code.new_zeros(pad)])
    q = code.reshape(-1, 4)
    packed = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
    return packed.cpu(), escapes


def _replay(p: torch.Tensor, addends: list[torch.Tensor], packed: torch.Tensor,
            escapes: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The block's file values from its patched values `p` and its record (`_record`'s inverse)."""
    int_dtype = _BITS[p.dtype][0]
    gb, flag = _guess(p, addends)
    flagged = flag.nonzero().reshape(-1)
    del flag
    packed = packed.to(p.device)
    codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[: flagged.numel()]
    step = torch.where(codes == _ESCAPE, torch.ones_like(codes), codes).to(torch.int64) - 1  # escapes: 0
    gb[flagged] = _from_ordered(_ordered(gb[flagged]) + step, int_dtype)
    out = gb.view(p.dtype)
    pos, values = escapes
    if pos.numel():
        out[pos.to(device=p.device, dtype=torch.int64)] = values.to(p.device)
    return out.reshape(p.shape)


def _blocks(p: torch.Tensor, patches: Patches):
    """The row blocks a weight is patched in: [(r0, r1)], or [None] for the whole weight at once."""
    rows = p.shape[0]
    if p.numel() > ROW_BLOCK_ABOVE and all(a.row_chunkable() for a, _ in patches):
        step = max(1, ROW_BLOCK_ABOVE // (p.numel() // rows))
        return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    return [None]


def _raws(p: torch.Tensor, patches: Patches, block) -> list[tuple[torch.Tensor, float]]:
    if block is None:
        return [a.raw(p.shape, p.device) for a, _ in patches]
    r0, r1 = block
    shape = (r1 - r0, *p.shape[1:])
    return [a.raw_rows(r0, r1, shape, p.device) for a, _ in patches]


def _addends(p: torch.Tensor, patches: Patches, block, raws=None) -> list[torch.Tensor]:
    """Each patch's float32 addend for `block` (computed as `Adapter.addend` does, bit for bit)."""
    raws = raws if raws is not None else _raws(p, patches, block)
    return [(s * f) * t for (t, f), (_, s) in zip(raws, patches)]


def _patch_block(p: torch.Tensor, view: torch.Tensor, addends: list[torch.Tensor]):
    """Patch one block in place; (codes, escapes, checksum) of its record."""
    orig = view.clone()
    w32 = orig.to(torch.float32, copy=True)
    for a in addends:
        w32 += a
    view.copy_(w32)  # rounded once, to the storage dtype
    del w32
    c, e = _record(orig, view, addends)
    return c, e, _checksum(orig.view(_BITS[p.dtype][0]))


def _patch_weight(p: torch.Tensor, patches: Patches) -> _Undo | None:
    """Patch `p` in place (fp32, chain order, rounded once); returns its undo record, or None when it
    cannot have one (DoRA's rescaling, a storage dtype without a record format): the file restores it."""
    exact = p.dtype in _BITS and all(a.additive() for a, _ in patches)
    if not exact:
        w32 = p.detach().to(torch.float32, copy=True)
        for adapter, strength in patches:
            w32 = adapter.apply(w32, strength)
        p.copy_(w32.to(p.dtype))
        return None
    codes, escapes, sums = [], [], []
    for block in _blocks(p, patches):
        view = p if block is None else p[block[0]:block[1]]
        c, e, k = _patch_block(p, view, _addends(p, patches, block))
        codes.append(c)
        escapes.append(e)
        sums.append(k)
    return _Undo(codes, escapes, sums)


def _repatch_weight(p: torch.Tensor, old: Patches, undo: _Undo, new: Patches) -> _Undo | None:
    """Only the strengths changed (the same adapters, in the same order): undo and patch again block by
    block, computing each adapter's product once for both. None when a block's record does not check
    out (the caller then reads the weight from the file and patches it afresh)."""
    codes, escapes, sums = [], [], []
    for i, block in enumerate(_blocks(p, new)):
        view = p if block is None else p[block[0]:block[1]]
        raws = _raws(p, new, block)
        orig = _replay(view, _addends(p, old, block, raws), undo.codes[i], undo.escapes[i])
        if _checksum(orig.view(_BITS[p.dtype][0])) != undo.checksums[i]:
            return None
        view.copy_(orig)
        del orig
        c, e, k = _patch_block(p, view, _addends(p, new, block, raws))
        codes.append(c)
        escapes.append(e)
        sums.append(k)
    return _Undo(codes, escapes, sums)


def _undo_weight(p: torch.Tensor, patches: Patches, undo: _Undo) -> bool:
    """Put the file's values back into `p` from its record; False (p then holds garbage, to be re-read)
    when a block's checksum disagrees."""
    ok = True
    for i, block in enumerate(_blocks(p, patches)):
        view = p if block is None else p[block[0]:block[1]]
        orig = _replay(view, _addends(p, patches, block), undo.codes[i], undo.escapes[i])
        ok = ok and _checksum(orig.view(_BITS[p.dtype][0])) == undo.checksums[i]
        view.copy_(orig)
        del orig
    return ok


@dataclass
class PatchState:
    """What is applied to one module now: the stack, which weights differ from the file, and for each
    of those its patches and undo record (None: restored from the file)."""

    stack: Stack = ()
    patched: frozenset[str] = frozenset()
    applied: dict[str, Patches] = field(default_factory=dict)
    undo: dict[str, _Undo | None] = field(default_factory=dict)

    def signature(self) -> tuple:
        return tuple((id(lp), float(s)) for lp, s in self.stack)

    def undo_nbytes(self) -> int:
        return sum(u.nbytes() for u in self.undo.values() if u is not None)


def stack_signature(stack: Stack) -> tuple:
    return tuple((id(lp), float(s)) for lp, s in stack)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None. Patching frees a block's temporaries (tens of MB) while keeping its
    small record: without trimming, the heap's freed holes between records are never given back and
    the process grows by megabytes per weight (measured: 5 MB per 6.5 M-element weight)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, Windows, musl without the symbol)
        return None


def _release(stack: Stack) -> None:
    """Hand back the LoRA files' pages and the heap's free memory (see `_malloc_trim`)."""
    for lp, _ in stack:
        lp.release_pages()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _same_adapters(a: Patches, b: Patches) -> bool:
    return len(a) == len(b) and all(x is y for (x, _), (y, _) in zip(a, b))


def _restore_from_file(params: dict, keys: list[str], restore) -> None:
    for i in range(0, len(keys), RESTORE_BATCH):  # a few tensors at a time: never a copy of them all
        for key, value in restore(keys[i : i + RESTORE_BATCH]).items():
            params[key].copy_(value)


def patch_module(module: torch.nn.Module, part: str, stack: Stack,
                 restore: Callable[[Iterable[str]], dict[str, torch.Tensor]]) -> PatchState:
    """Make `module`'s weights equal the file's plus `stack`, touching only weights that change.

    Weights patched before are first put back from their undo records (no copy of them is kept, and
    the checkpoint is not read); `restore(keys)` returns the file's tensors of those keys, used only
    for weights without a record (DoRA) or whose record no longer checks out. The state is stored on
    the module (`module._sdxl_patch_state`).
    """
    state: PatchState = getattr(module, "_sdxl_patch_state", None) or PatchState()
    if state.signature() == stack_signature(stack):
        return state
    wanted: dict[str, Patches] = {}
    for lp, strength in stack:
        if strength == 0.0:
            continue
        for key, adapters in lp.patches.get(part, {}).items():
            wanted.setdefault(key, []).extend((a, float(strength)) for a in adapters)
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    with torch.no_grad():
        # 1. back to the file's values wherever anything was patched (weights whose adapters stay the
        #    same and only change strength are undone and re-patched together, in step 2)
        from_file = []
        # a LoRA file rewritten since it was mapped can no longer give the addends: the checkpoint can
        usable = all(lp.file is None or lp.file.unchanged() for lp, _ in state.stack)
        if not usable and state.patched:
            log.info("%s: a LoRA file changed on disk since it was applied; its weights are read from the "
                     "checkpoint again", part)
        records = {k: u for k, u in state.undo.items() if usable and u is not None}
        fused = {k for k in wanted if k in records and _same_adapters(state.applied[k], wanted[k])}
        for n, key in enumerate(sorted(state.patched - fused)):
            undo = records.get(key)
            if undo is None or not _undo_weight(params[key], state.applied[key], undo):
                if undo is not None:
                    log.warning("%s: the LoRA undo record of %s did not reproduce the file's values; "
                                "reading them from the file", part, key)
                from_file.append(key)
            if n % RELEASE_EVERY == RELEASE_EVERY - 1:
                _release(state.stack)
        _release(state.stack)
        _restore_from_file(params, from_file, restore)
        module._sdxl_patch_state = PatchState()
        # 2. each weight: fp32, every patch in chain order, back to the storage dtype once; large weights
        #    patched by plain LoRAs go a block of rows at a time, so the fp32 temporaries stay small
        undo: dict[str, _Undo | None] = {}
        for n, (key, patches) in enumerate(wanted.items()):
            undo[key] = None
            if key in fused:
                undo[key] = _repatch_weight(params[key], state.applied[key], records[key], patches)
                if undo[key] is None:
                    log.warning("%s: the LoRA undo record of %s did not reproduce the file's values; "
                                "reading them from the file", part, key)
                    _restore_from_file(params, [key], restore)
            if undo[key] is None:
                undo[key] = _patch_weight(params[key], patches)
            if n % RELEASE_EVERY == RELEASE_EVERY - 1:
                _release(stack)
        _release(stack)
    new = PatchState(stack=tuple(stack), patched=frozenset(wanted), applied=wanted, undo=undo)
    module._sdxl_patch_state = new
    return new
