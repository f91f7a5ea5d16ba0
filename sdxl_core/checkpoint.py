"""Reading and writing SDXL single-file checkpoints (Stability's SGM key layout).

Loading is strict and lean: the networks are built on the `meta` device, each tensor is read from
the memory-mapped safetensors file straight into its target dtype and device, and the modules take
the tensors with `load_state_dict(assign=True)`, so peak memory is the weights plus one tensor.
Every key is checked both ways; a file that does not fit gets one `CheckpointError` naming the file
and listing missing, unexpected and mis-shaped keys. Pickled `.ckpt` files are refused (unpickling
runs code). Key layout: ../shared/sdxl/keys_{base,refiner}.tsv; FACTS.md §1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import clip, ops
from .config import BASE, REFINER, TINY_BASE, TINY_REFINER, SDXLConfig, VAEConfig
from .errors import CheckpointError
from .unet import UNetModel
from .vae import AutoencoderKL

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."


def clip_g_prefix(cfg: SDXLConfig) -> str:
    return "conditioner.embedders.0.model." if cfg.is_refiner else "conditioner.embedders.1.model."


# Keys that community files add beside the official tensors and that carry nothing we use:
# LDM's diffusion-schedule buffers (the schedule is fixed for SDXL: FACTS.md §7), SGM's denoiser
# table, EMA bookkeeping. Keys that would change the maths (v_pred, ztsnr, edm_vpred.*) are not here:
# such a file is refused rather than sampled wrongly.
IGNORED_EXTRA_KEYS = frozenset(
    [
        "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "posterior_variance", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "denoiser.sigmas",
        "model_ema.decay", "model_ema.num_updates",
    ]
)
UNSUPPORTED_KEYS = {
    "v_pred": "a v-prediction model",
    "ztsnr": "a zero-terminal-SNR model",
    "edm_vpred.sigma_max": "an EDM v-prediction model",
    "edm_mean": "an EDM model",
}

KNOWN_CONFIGS = (BASE, REFINER, TINY_BASE, TINY_REFINER)
KNOWN_VAES = (VAEConfig(), TINY_BASE.vae)  # SDXL's, and the tests' tiny one


@dataclass
class SDXLCheckpoint:
    """The networks of one SDXL checkpoint, ready to run."""

    config: SDXLConfig
    unet: UNetModel
    vae: AutoencoderKL
    clip_l: nn.Module | None  # transformers CLIPTextModel; None for the refiner
    clip_g: nn.Module  # transformers CLIPTextModelWithProjection
    path: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.kind


# ------------------------------------------------------------------------------------------------
# 1. Opening a file


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder without model_index.json; expected a single .safetensors "
                              "checkpoint file or a diffusers-format folder")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) >= 9 and head[8:9] == b"{" and header_len > 1:
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: truncated: the header says {header_len} header bytes but the file has {size} bytes "
                "in all. Download the file again."
            )
        return
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise CheckpointError(
            f"{path}: this is a pickled PyTorch checkpoint (.ckpt/.pt); pickles can run arbitrary code "
            "when loaded, so sdxl-nodes refuses them. Use the .safetensors release of the model "
            "(sd_xl_base_1.0.safetensors / sd_xl_refiner_1.0.safetensors) or convert it in a trusted environment."
        )
    if size < 9:
        raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file (truncated download?)")
    raise CheckpointError(f"{path}: not a safetensors file (its first bytes are not a safetensors header)")


# safetensors dtype names (the format's spec) → torch
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorFile:
    """A safetensors file read with plain reads into fresh (anonymous) memory, one tensor at a time.

    Tensors from a memory map (safetensors' `safe_open`) live in the file's pages: a network kept in
    the file's dtype would stay in file-backed memory, counted in the process's RSS on top of the copy
    a conversion makes, and pinned for as long as any tensor is alive. Reading into tensors of our own
    leaves nothing mapped. `drop_cache(keys)` tells the kernel the pages of those tensors are not needed
    again (posix_fadvise DONTNEED), for when the page cache competes with the networks for memory.
    The header was checked by `read_shapes` (safetensors itself); offsets are checked again here.
    """

    anonymous = True  # get_tensor never returns a view of a shared buffer

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()/__exit__
        try:
            n = int.from_bytes(self._fh.read(8), "little")
            self._header = json.loads(self._fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            self._fh.close()
            raise CheckpointError(f"{self.path}: cannot read its safetensors header: {e}") from e
        self._header.pop("__metadata__", None)
        self._base = 8 + n
        self._size = os.fstat(self._fh.fileno()).st_size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._fh.close()

    def keys(self):
        return self._header.keys()

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._header[key]["dtype"]]

    def _span(self, key: str) -> tuple[int, int]:
        begin, end = self._header[key]["data_offsets"]
        return self._base + begin, self._base + end

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self._header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has dtype {info['dtype']}, which sdxl-nodes cannot read")
        t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        begin, end = self._span(key)
        if end - begin != t.numel() * t.element_size() or end > self._size:
            raise CheckpointError(f"{self.path}: tensor {key}: its data offsets [{begin}, {end}) do not fit its "
                                  f"shape {info['shape']} or the file ({self._size} bytes); the file is damaged")
        if t.numel():
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # (nbytes,) over t's own memory
            self._fh.seek(begin)
            while view.nbytes:
                got = self._fh.readinto(view)  # Linux reads at most ~2 GiB per call: loop
                if not got:
                    raise CheckpointError(f"{self.path}: ends inside tensor {key} (truncated file)")
                view = view[got:]
        return t

    def drop_cache(self, keys) -> None:
        """Drop the page cache of these tensors' bytes (POSIX only; elsewhere nothing happens)."""
        spans = [self._span(k) for k in keys]
        if spans and hasattr(os, "posix_fadvise"):
            lo, hi = min(b for b, _ in spans), max(e for _, e in spans)
            os.posix_fadvise(self._fh.fileno(), lo, hi - lo, os.POSIX_FADV_DONTNEED)


def open_weights(path: str | os.PathLike):
    """A context manager with `keys()` and `get_tensor(key)` in SGM names: a safetensors file read into
    fresh memory (`TensorFile`), or a diffusers-format folder seen through diffusers_folder.py."""
    from .diffusers_folder import DiffusersFolder, is_diffusers_folder

    if is_diffusers_folder(path):
        return DiffusersFolder(path)
    return TensorFile(path)


def storage_dtype(file_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is kept in: `dtype`, or the file's own when `dtype` is None (never rounded
    down silently); integer tensors (CLIP's position_ids) always keep theirs."""
    if dtype is None or not file_dtype.is_floating_point:
        return file_dtype
    return dtype


def _as_stored(f, key: str, device, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor of an open file in its storage dtype on `device`, in memory of its own."""
    t = f.get_tensor(key)
    target = storage_dtype(t.dtype, dtype)
    if getattr(f, "anonymous", False):
        return t.to(device=device, dtype=target)  # the same tensor when nothing changes: already ours
    return t.to(device=device, dtype=target, copy=True)  # never keep a view of a memory map


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, read from the header alone (a diffusers folder: in SGM names)."""
    from .diffusers_folder import DiffusersFolder, is_diffusers_folder

    path = Path(path)
    if is_diffusers_folder(path):
        return dict(DiffusersFolder(path).shapes)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own parse errors (bad JSON, offsets past the end, ...)
        msg = str(e)
        hint = " The file looks truncated: download it again." if "incomplete" in msg or "past" in msg else ""
        raise CheckpointError(f"{path}: cannot read it as safetensors: {msg}.{hint}") from e


# ------------------------------------------------------------------------------------------------
# 2. Telling what a file is


def detect(shapes: dict[str, tuple[int, ...]], path: str = "<state dict>") -> SDXLConfig:
    """The architecture of a checkpoint, from two or three tensor shapes."""
    for key, what in UNSUPPORTED_KEYS.items():
        if key in shapes:
            raise CheckpointError(f"{path}: key '{key}' marks {what}; sdxl-nodes runs SDXL 1.0 eps-prediction checkpoints only")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    label = shapes.get(UNET_PREFIX + "label_emb.0.0.weight")
    if conv_in is None:
        if any(k.startswith("model.diffusion_model.") for k in shapes) or not shapes:
            raise CheckpointError(f"{path}: no UNet input conv ('{UNET_PREFIX}input_blocks.0.0.weight'); the file is incomplete")
        sample = ", ".join(sorted(shapes)[:3])
        raise CheckpointError(
            f"{path}: not an SDXL checkpoint in Stability's single-file layout (no '{UNET_PREFIX}*' keys; "
            f"first keys: {sample}). A LoRA, VAE-only or UNet-only file needs another loader."
        )
    if label is None:
        to_k = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        ctx = to_k[1] if to_k else None
        family = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(ctx, "a non-SDXL model")
        raise CheckpointError(
            f"{path}: this is {family} checkpoint (UNet context width {ctx}, no SDXL size conditioning); "
            "sdxl-nodes loads SDXL base and refiner checkpoints only"
        )
    for cfg in KNOWN_CONFIGS:
        u = cfg.unet
        if conv_in == (u.model_channels, u.in_channels, 3, 3) and label == (u.time_embed_dim, u.adm_in_channels):
            return cfg
    raise CheckpointError(
        f"{path}: unknown SDXL-like UNet (input conv {list(conv_in)}, label embedding {list(label)}); expected "
        f"base [320, 4, 3, 3] with [1280, 2816] or refiner [384, 4, 3, 3] with [1536, 2560]"
    )


# ------------------------------------------------------------------------------------------------
# 3. Building the networks and mapping file keys to module keys


def build_modules(cfg: SDXLConfig, device: str | torch.device = "meta") -> dict[str, nn.Module]:
    with torch.device(device):
        mods = {"unet": UNetModel(cfg.unet).eval().requires_grad_(False), "vae": AutoencoderKL(cfg.vae).eval().requires_grad_(False)}
        if cfg.clip_l is not None:
            mods["clip_l"] = clip.build_text_encoder(cfg.clip_l)
        mods["clip_g"] = clip.build_text_encoder(cfg.clip_g)
    return mods


def _prefixes(cfg: SDXLConfig) -> dict[str, str]:
    p = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip_g": clip_g_prefix(cfg)}
    if cfg.clip_l is not None:
        p["clip_l"] = CLIP_L_PREFIX
    return p


def split_keys(file_keys, cfg: SDXLConfig) -> tuple[dict[str, list[str]], list[str]]:
    """File keys grouped by network (ignored extras dropped); the keys no network claims."""
    groups: dict[str, list[str]] = {name: [] for name in _prefixes(cfg)}
    unclaimed = []
    for key in file_keys:
        for name, prefix in _prefixes(cfg).items():
            if key.startswith(prefix):
                groups[name].append(key)
                break
        else:
            if key not in IGNORED_EXTRA_KEYS and not key.startswith("model_ema."):
                unclaimed.append(key)
    return groups, unclaimed


def _to_module_keys(name: str, rel: dict, module: nn.Module) -> dict:
    """File-relative key → value, renamed to the module's keys (values may be shapes or tensors)."""
    if name == "clip_l":
        return clip.clip_l_to_hf(rel, module)
    if name == "clip_g":
        return clip.openclip_to_hf(rel, module)
    return rel


def check_keys(shapes: dict[str, tuple[int, ...]], cfg: SDXLConfig, modules: dict[str, nn.Module], path: str) -> None:
    """Strict two-way check of a file's keys and shapes against the modules; one error for all problems."""
    groups, unclaimed = split_keys(shapes, cfg)
    missing, unexpected, misshaped = [], [f"{k}" for k in unclaimed], []
    for name, module in modules.items():
        prefix = _prefixes(cfg)[name]
        rel = {k[len(prefix):]: torch.empty(shapes[k], device="meta") for k in groups[name]}
        try:
            converted = _to_module_keys(name, rel, module)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing += [f"{name}: {k}" for k in expected if k not in converted]
        unexpected += [f"{name}: {k}" for k in converted if k not in expected]
        misshaped += [
            f"{name}: {k} {list(converted[k].shape)} (expected {list(expected[k])})"
            for k in expected
            if k in converted and tuple(converted[k].shape) != expected[k]
        ]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = "; ".join(items[:5]) + (f"; … {len(items) - 5} more" if len(items) > 5 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise CheckpointError(
            f"{path}: does not match the SDXL {cfg.kind} layout: " + " | ".join(parts)
            + ". The file may be damaged or a different model; re-download the official release."
        )


# ------------------------------------------------------------------------------------------------
# 4. Loading


def _materialize_buffers(module: nn.Module, device) -> None:
    """Recreate the non-persistent buffers still on `meta` after assign-loading (CLIP's position_ids)."""
    for mod_name, mod in module.named_modules():
        for buf_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type != "meta":
                continue
            if buf_name == "position_ids":
                mod.register_buffer(buf_name, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)
            else:
                raise CheckpointError(f"internal: buffer {mod_name}.{buf_name} was not loaded")


def inspect_checkpoint(path: str | os.PathLike) -> tuple[SDXLConfig, dict[str, tuple[int, ...]]]:
    """Read the header, tell base from refiner and check every key and shape; loads no tensor."""
    shapes = read_shapes(path)
    cfg = detect(shapes, str(path))
    check_keys(shapes, cfg, build_modules(cfg), str(path))
    return cfg, shapes


PARTS = ("unet", "vae", "clip_l", "clip_g")


def load_part(
    path: str | os.PathLike,
    part: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    compute_dtype: torch.dtype | None = None,
    inspected: tuple[SDXLConfig, dict] | None = None,
    drop_cache: bool | None = None,
) -> nn.Module:
    """Load one network ('unet', 'vae', 'clip_l' or 'clip_g') of a checkpoint, strictly checked.

    dtype: the storage dtype of its floating-point tensors; None keeps each as the file stores it.
    compute_dtype: what it computes in (default `ops.compute_dtype(device, dtype)`: fp32 on the CPU
    unless bf16 was asked for). A network holding tensors narrower than that computes through
    `ops.manual_cast` layers, which gives the same bits as storing it in `compute_dtype`.
    drop_cache: drop the file's page cache for this network's bytes once it is read (None: only when
    memory is short, see `_cache_competes`).
    """
    cfg, shapes = inspected or inspect_checkpoint(path)
    if part not in _prefixes(cfg):
        raise CheckpointError(f"{path}: an SDXL {cfg.kind} checkpoint has no {part}")
    compute = compute_dtype or ops.compute_dtype(device, dtype)
    module = build_modules(cfg)[part]
    prefix = _prefixes(cfg)[part]
    groups, _ = split_keys(shapes, cfg)
    rel = {}
    uploader = None
    if torch.device(device).type == "cuda":
        from .accel import PinnedUploader

        uploader = PinnedUploader(device)  # through pinned staging buffers: full bus speed, overlapped
    with open_weights(path) as f:
        for key in groups[part]:
            if uploader is not None:
                t = f.get_tensor(key)
                target = storage_dtype(t.dtype, dtype) if t.is_floating_point() else None
                rel[key[len(prefix):]] = uploader.upload(t, target)
            else:
                rel[key[len(prefix):]] = _as_stored(f, key, device, dtype)  # one tensor at a time
        nbytes = sum(t.numel() * t.element_size() for t in rel.values())
        if hasattr(f, "drop_cache") and (drop_cache or (drop_cache is None and _cache_competes(nbytes))):
            f.drop_cache(groups[part])
    if uploader is not None:
        uploader.finish()
    module.load_state_dict(_to_module_keys(part, rel, module), strict=True, assign=True)
    _materialize_buffers(module, device)
    return ops.for_compute(module, compute)


def _cache_competes(nbytes: int) -> bool:
    """True when memory is short: less than twice `nbytes` available (free plus reclaimable cache). The
    file's cached pages of a network now held in memory of its own are then a duplicate standing in
    the way of the next load, so dropping them helps. Otherwise the cache is kept: reading a network
    again (the next run, a re-load after eviction) is then about twice as fast as from disk."""
    try:
        import psutil

        return psutil.virtual_memory().available < 2 * nbytes
    except ImportError:  # pragma: no cover - psutil is a dependency
        return False


def part_nbytes(
    path: str | os.PathLike, part: str, dtype: torch.dtype | None, inspected: tuple[SDXLConfig, dict] | None = None,
) -> int:
    """Bytes the network `part` takes once loaded with storage `dtype` (None: as the file stores each
    tensor; dtypes from the header; a diffusers folder, whose dtypes are not read here, counts fp32)."""
    from .diffusers_folder import is_diffusers_folder

    cfg, shapes = inspected or inspect_checkpoint(path)
    keys = split_keys(shapes, cfg)[0].get(part, [])
    if is_diffusers_folder(path):
        file_dtypes = dict.fromkeys(keys, torch.float32)
    else:
        with TensorFile(path) as f:
            file_dtypes = {k: f.dtype(k) for k in keys}
    if not keys:  # a part this checkpoint lacks (a refiner's clip_l): loading it raises the clear error
        return 0
    # through the key conversion on `meta`: what the module holds, not what the file holds (bigG's
    # logit_scale and CLIP-L's position_ids are read by no module)
    prefix = _prefixes(cfg)[part]
    rel = {k[len(prefix):]: torch.empty(shapes[k], dtype=storage_dtype(file_dtypes[k], dtype), device="meta")
           for k in keys}
    return sum(t.numel() * t.element_size() for t in _to_module_keys(part, rel, _meta_module(cfg, part)).values())


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    unet_dtype: torch.dtype = torch.float32,
    text_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> SDXLCheckpoint:
    """Load an SDXL base or refiner single-file checkpoint; each network in its own dtype."""
    t0 = time.perf_counter()
    inspected = inspect_checkpoint(path)
    cfg = inspected[0]
    dtypes = {"unet": unet_dtype, "vae": vae_dtype, "clip_l": text_dtype, "clip_g": text_dtype}
    parts = {
        part: load_part(path, part, device=device, dtype=dtypes[part], inspected=inspected)
        for part in PARTS
        if part in _prefixes(cfg)
    }
    ckpt = SDXLCheckpoint(config=cfg, path=str(path), clip_l=parts.pop("clip_l", None), **parts)
    ckpt.stats["load_seconds"] = time.perf_counter() - t0
    log.info("loaded %s (%s) in %.1f s", path, cfg.kind, ckpt.stats["load_seconds"])
    return ckpt


# ------------------------------------------------------------------------------------------------
# 5. Writing random checkpoints in the official layout (tests, `sdxl-nodes demo`, benchmarks)


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Small random values with sane activations; norm weights jittered around 1 (FACTS.md §13)."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(s in name for s in ("norm", "ln_", "layer_norm", "in_layers.0.", "out_layers.0.", ".out.0."))
    if is_norm and leaf == "weight" and len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=gen, device=gen.device)
    if leaf == "logit_scale":
        return torch.tensor(4.6052)
    if len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=gen, device=gen.device)
    if "embedding" in name:
        return 0.02 * torch.randn(shape, generator=gen, device=gen.device)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=gen, device=gen.device) / fan_in**0.5


def file_layout(cfg: SDXLConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of an official-layout file for this config (without position_ids)."""
    layout: dict[str, tuple[int, ...]] = {}
    for name, module in build_modules(cfg).items():
        sd = module.state_dict()  # meta tensors: the conversions below only touch shapes
        if name == "clip_l":
            hp = clip.hf_prefix(module)
            sd = {"text_model." + k[len(hp):]: v for k, v in sd.items()}
        elif name == "clip_g":
            sd = clip.hf_to_openclip(sd, module)
            sd["logit_scale"] = torch.empty((), device="meta")
        layout.update({_prefixes(cfg)[name] + k: tuple(v.shape) for k, v in sd.items()})
    return layout


def write_random_checkpoint(
    path: str | os.PathLike, cfg: SDXLConfig, *, seed: int = 0, dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a random-weight checkpoint with the official key names, deterministic from `seed` (and the
    device whose generator draws them: a GPU writes full-size files in seconds, with other values).

    Written to a temporary name and renamed, so a crash never leaves half a file behind.
    """
    path = Path(path)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for key, shape in file_layout(cfg).items():
        tensors[key] = _init_tensor(key, shape, gen).to(dtype).contiguous().cpu()
    if cfg.clip_l is not None:  # transformers 4.x wrote this int64 buffer into the released file
        tensors[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(cfg.clip_l.max_length)[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", "sdxl_nodes.random": f"{cfg.kind} seed={seed}"})
    os.replace(tmp, path)
    return path


def write_tiny_checkpoints(folder: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """A tiny base + refiner pair (a few MB each) named like the official files."""
    folder = Path(folder)
    return {
        "base": write_random_checkpoint(folder / "sd_xl_base_1.0.safetensors", TINY_BASE, seed=seed, dtype=dtype),
        "refiner": write_random_checkpoint(folder / "sd_xl_refiner_1.0.safetensors", TINY_REFINER, seed=seed + 1, dtype=dtype),
    }


# ------------------------------------------------------------------------------------------------
# 6. Re-reading single tensors (undoing LoRA patches without a backup copy in memory)


@functools.lru_cache(maxsize=16)
def _meta_module(cfg: SDXLConfig, part: str) -> nn.Module:
    """One network on `meta` (names and shapes only), built once per config: key conversions need it."""
    return build_modules(cfg)[part]


@functools.lru_cache(maxsize=16)
def _module_to_file_keys(cfg: SDXLConfig, part: str) -> dict[str, str]:
    """Module key → the file key it comes from (bigG's q/k/v all come from one in_proj)."""
    module = _meta_module(cfg, part)
    prefix = _prefixes(cfg)[part]
    out = {}
    for fk, shape in file_layout(cfg).items():
        if not fk.startswith(prefix):
            continue
        for mk in _to_module_keys(part, {fk[len(prefix):]: torch.empty(shape, device="meta")}, module):
            out[mk] = fk
    return out


def file_keys_for(part: str, module_keys, cfg: SDXLConfig) -> list[str]:
    """The file keys whose tensors make up these module keys, in file-layout order."""
    index = _module_to_file_keys(cfg, part)
    return list(dict.fromkeys(index[k] for k in module_keys))


def read_module_tensors(
    path: str | os.PathLike,
    part: str,
    module_keys,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    inspected: tuple[SDXLConfig, dict] | None = None,
) -> dict[str, torch.Tensor]:
    """These module tensors exactly as `load_part` makes them (same dtype conversion), read one by one
    from the memory-mapped file: restoring them undoes a patch bit for bit."""
    cfg, shapes = inspected or inspect_checkpoint(path)
    module = _meta_module(cfg, part)
    prefix = _prefixes(cfg)[part]
    wanted = set(module_keys)
    out: dict[str, torch.Tensor] = {}
    with open_weights(path) as f:
        for fk in file_keys_for(part, wanted, cfg):
            t = _as_stored(f, fk, device, dtype)
            for k, v in _to_module_keys(part, {fk[len(prefix):]: t}, module).items():
                if k in wanted:
                    out[k] = v
    missing = wanted - set(out)
    if missing:
        raise CheckpointError(f"{path}: cannot re-read {len(missing)} tensors of the {part} (e.g. {sorted(missing)[0]})")
    return out


# ------------------------------------------------------------------------------------------------
# 7. Standalone VAE files (models/vae/): SGM or diffusers keys

_OLD_DIFFUSERS_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_FP16_FIX_NAME = re.compile(r"fp16[-_ .]?fix", re.IGNORECASE)


@dataclass(frozen=True)
class VAEFile:
    """What a standalone VAE file holds: SDXL's VAE, in which key layout, and whether it is the fp16-fix."""

    vae: VAEConfig
    layout: str  # "sgm" | "diffusers"
    prefix: str  # stripped from every key ("" or "first_stage_model.")
    fp16_fix: bool
    kind: str = "vae"
    is_refiner: bool = False


def _is_fp16_fix(path: Path) -> bool:
    """madebyollin's SDXL-VAE-FP16-Fix: its diffusers config says `force_upcast: false`; a single file is
    recognised by its name (…fp16-fix…, …fp16_fix…). Anything else is treated as the original VAE,
    which must not run in fp16 (it overflows to NaN)."""
    if _FP16_FIX_NAME.search(path.name) or _FP16_FIX_NAME.search(path.parent.name):
        return True
    cfg_file = path.parent / "config.json"
    if cfg_file.is_file():
        try:
            return json.loads(cfg_file.read_text(encoding="utf-8")).get("force_upcast") is False
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read %s (%s); treating the VAE as the original SDXL VAE", path, cfg_file, e)
    return False


def _vae_file_to_sgm(rel: dict, layout: str, cfg: VAEConfig) -> dict:
    """VAE file keys (prefix stripped) → SGM module keys; values converted for diffusers' Linear attention."""
    if layout == "sgm":
        return dict(rel)
    from .diffusers_keys import vae_sgm_to_diffusers, vae_to_sgm_tensor

    to_sgm = {d: s for s, d in vae_sgm_to_diffusers(cfg).items()}
    out = {}
    for k, v in rel.items():
        for old, new in _OLD_DIFFUSERS_ATTN.items():
            k = k.replace(old, new)
        s = to_sgm.get(k)
        if s is None:
            out[k] = v  # reported as unexpected by the strict check
            continue
        out[s] = vae_to_sgm_tensor(s, v) if isinstance(v, torch.Tensor) else v
    return out


def inspect_vae(path: str | os.PathLike) -> tuple[VAEFile, dict[str, tuple[int, ...]]]:
    """Tell a standalone VAE's layout and check every key and shape against SDXL's VAE; loads no tensor."""
    path = Path(path)
    shapes = read_shapes(path)
    if any(k.startswith(UNET_PREFIX) for k in shapes):
        raise CheckpointError(f"{path}: this is a full checkpoint (it has a UNet), not a VAE file; load it with "
                              "the checkpoint loader, whose vae output is its VAE")
    keys = [k for k in shapes if not k.startswith("loss.")]  # training leftovers in some releases
    prefix = VAE_PREFIX if keys and all(k.startswith(VAE_PREFIX) for k in keys) else ""
    rel = {k[len(prefix):]: shapes[k] for k in keys}
    if any(".down_blocks." in k or ".up_blocks." in k for k in rel):
        layout = "diffusers"
    elif any(k.startswith(("encoder.down.", "decoder.up.")) for k in rel):
        layout = "sgm"
    else:
        sample = ", ".join(sorted(rel)[:3])
        raise CheckpointError(f"{path}: not a VAE file (no encoder/decoder keys in Stability's or diffusers' "
                              f"layout; first keys: {sample})")
    conv_in = rel.get("encoder.conv_in.weight")
    cfg = next((c for c in KNOWN_VAES if conv_in == (c.ch, c.in_channels, 3, 3)), KNOWN_VAES[0])
    converted = _vae_file_to_sgm({k: torch.empty(s, device="meta") for k, s in rel.items()}, layout, cfg)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoencoderKL(cfg).state_dict().items()}
    problems = []
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    misshaped = [f"{k} {list(converted[k].shape)} (expected {list(expected[k])})"
                 for k in expected if k in converted and tuple(converted[k].shape) != expected[k]]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            problems.append(f"{len(items)} {label}: " + "; ".join(items[:5]) + (f"; … {len(items) - 5} more" if len(items) > 5 else ""))
    if problems:
        raise CheckpointError(f"{path}: does not match the SDXL VAE ({layout} layout): " + " | ".join(problems)
                              + ". It may be a VAE for another model (SD3/Flux VAEs have 16 latent channels).")
    return VAEFile(vae=cfg, layout=layout, prefix=prefix, fp16_fix=_is_fp16_fix(path)), shapes


def load_vae_file(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    compute_dtype: torch.dtype | None = None,
    inspected: tuple[VAEFile, dict] | None = None,
) -> AutoencoderKL:
    """Load a standalone VAE file (either layout), strictly checked; dtypes as in `load_part`."""
    info, shapes = inspected or inspect_vae(path)
    compute = compute_dtype or ops.compute_dtype(device, dtype)
    with torch.device("meta"):
        module = AutoencoderKL(info.vae).eval().requires_grad_(False)
    rel = {}
    with TensorFile(path) as f:
        for key in shapes:
            if not key.startswith("loss."):
                rel[key[len(info.prefix):]] = _as_stored(f, key, device, dtype)
    module.load_state_dict(_vae_file_to_sgm(rel, info.layout, info.vae), strict=True, assign=True)
    return ops.for_compute(module, compute)
