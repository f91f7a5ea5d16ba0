"""Diffusers-format SDXL folders read as if they were single files in Stability's SGM layout.

A folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/` (base only), `text_encoder_2/`) is shown
to the loader as a set of SGM key names (`model.diffusion_model.*`, `first_stage_model.*`,
`conditioner.embedders.*`) with their shapes, and tensors are read on demand, memory-mapped, from
the component files. The names go through the one table in `diffusers_keys.py`; bigG's q/k/v are
stacked into open_clip's `in_proj` and its projection transposed by `clip.hf_to_openclip`. So the
same strict key/shape check and the same loading code serve both formats.

Per component the fp16 variant (`*.fp16.safetensors`) is preferred when present, as diffusers does
with `variant="fp16"`; sharded files (`*.safetensors.index.json`) are followed. Pickled `.bin`
weights are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from . import clip
from .diffusers_keys import is_vae_attention_matrix, unet_sgm_to_diffusers, vae_sgm_to_diffusers
from .errors import CheckpointError

UNET, VAE, CLIP_L, CLIP_G_BASE, CLIP_G_REFINER = (
    "model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.", "conditioner.embedders.0.model.",
)
UNKNOWN = "<not in the diffusers table>."  # prefix for keys we cannot name; the strict check reports them
COMPONENTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
              "text_encoder": "model", "text_encoder_2": "model"}


def is_diffusers_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "model_index.json").is_file()


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one component: fp16 variant first, then the plain one; shards followed."""
    for variant in (".fp16", ""):
        single = folder / f"{stem}{variant}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing[:3])}")
            return files
    if any(folder.glob(f"{stem}*.bin")):
        raise CheckpointError(f"{folder}: only pickled .bin weights; pickles can run code when loaded, so only "
                              ".safetensors are read. Convert the folder with diffusers (safe_serialization=True).")
    raise CheckpointError(f"{folder}: no {stem}.safetensors (or .fp16 variant / shard index)")


class DiffusersFolder:
    """SGM key → shape and tensor, for a diffusers folder. Use as a context manager (`get_tensor`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        problems = []
        self.files: dict[str, list[Path]] = {}
        for comp, stem in COMPONENTS.items():
            folder = self.path / comp
            if not folder.is_dir():
                if comp != "text_encoder":  # a refiner has no CLIP-L
                    problems.append(f"no {comp}/ folder")
                continue
            try:
                self.files[comp] = _weight_files(folder, stem)
            except CheckpointError as e:
                problems.append(str(e))
        if problems:
            raise CheckpointError(f"{self.path}: not a complete SDXL diffusers folder: " + "; ".join(problems))
        # diffusers key → (file, component); then SGM key → (component, [diffusers keys], how)
        self._where: dict[tuple[str, str], Path] = {}
        raw: dict[str, dict[str, tuple[int, ...]]] = {}
        for comp, files in self.files.items():
            raw[comp] = {}
            for f in files:
                try:
                    with safe_open(str(f), framework="pt", device="cpu") as h:
                        for k in h.keys():
                            raw[comp][k] = tuple(h.get_slice(k).get_shape())
                            self._where[(comp, k)] = f
                except Exception as e:  # safetensors' own parse errors
                    raise CheckpointError(f"{f}: cannot read it as safetensors: {e}") from e
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._recipe: dict[str, tuple[str, tuple[str, ...], str]] = {}
        self._map_unet(raw["unet"])
        self._map_vae(raw["vae"])
        refiner = "text_encoder" not in raw
        if not refiner:
            for k, s in raw["text_encoder"].items():
                if k.endswith("position_ids"):
                    continue
                self._add(CLIP_L + (k if k.startswith("text_model.") else "text_model." + k), s, "text_encoder", (k,), "copy")
        self._map_bigg(raw["text_encoder_2"], CLIP_G_REFINER if refiner else CLIP_G_BASE)
        self._handles: dict[Path, object] = {}

    # -- name mapping ------------------------------------------------------------------------------
    def _add(self, sgm: str, shape, comp: str, keys: tuple[str, ...], how: str) -> None:
        self.shapes[sgm] = tuple(shape)
        self._recipe[sgm] = (comp, keys, how)

    def _map_unet(self, raw: dict) -> None:
        cfg = _unet_config_for(raw)
        to_sgm = {d: s for s, d in unet_sgm_to_diffusers(cfg).items()} if cfg else {}
        for k, s in raw.items():
            self._add(UNET + to_sgm[k] if k in to_sgm else UNKNOWN + "unet." + k, s, "unet", (k,), "copy")

    def _map_vae(self, raw: dict) -> None:
        from .checkpoint import KNOWN_VAES

        conv_in = raw.get("encoder.conv_in.weight")
        cfg = next((c for c in KNOWN_VAES if conv_in == (c.ch, c.in_channels, 3, 3)), KNOWN_VAES[0])
        to_sgm = {d: s for s, d in vae_sgm_to_diffusers(cfg).items()}
        for k, s in raw.items():
            for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")):
                k2 = k.replace(old, new)
                if k2 != k:
                    break
            sgm = to_sgm.get(k2)
            if sgm is None:
                self._add(UNKNOWN + "vae." + k, s, "vae", (k,), "copy")
            elif is_vae_attention_matrix(sgm) and len(s) == 2:
                self._add(VAE + sgm, (*s, 1, 1), "vae", (k,), "conv1x1")
            else:
                self._add(VAE + sgm, s, "vae", (k,), "copy")

    def _map_bigg(self, raw: dict, prefix: str) -> None:
        """transformers bigG keys → open_clip keys, through clip.py's one table (q/k/v stacked, projection ᵀ)."""
        top = {"text_model." + v: k for k, v in clip._TOP_NAMES.items()}
        res = {v: k for k, v in clip._RESBLOCK_NAMES.items()}
        qkv: dict[tuple[str, str], dict[str, tuple[str, tuple]]] = {}
        for k, s in raw.items():
            c = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
            if c.endswith("position_ids"):
                continue
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", c)
            if c == "text_projection.weight":
                self._add(prefix + "text_projection", (s[1], s[0]), "text_encoder_2", (k,), "t")
            elif c in top:
                self._add(prefix + top[c], s, "text_encoder_2", (k,), "copy")
            elif m and m.group(2) in res:
                self._add(f"{prefix}transformer.resblocks.{m.group(1)}.{res[m.group(2)]}", s, "text_encoder_2", (k,), "copy")
            elif m and (pm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m.group(2))):
                qkv.setdefault((m.group(1), pm.group(2)), {})[pm.group(1)] = (k, s)
            else:
                self._add(UNKNOWN + "text_encoder_2." + k, s, "text_encoder_2", (k,), "copy")
        for (layer, kind), parts in qkv.items():
            if set(parts) != {"q", "k", "v"}:
                for k, s in parts.values():  # an incomplete triple: reported by name
                    self._add(UNKNOWN + "text_encoder_2." + k, s, "text_encoder_2", (k,), "copy")
                continue
            shape = (sum(parts[q][1][0] for q in "qkv"), *parts["q"][1][1:])
            self._add(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}", shape, "text_encoder_2",
                      tuple(parts[q][0] for q in "qkv"), "cat")

    # -- reading -----------------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def _read(self, comp: str, key: str) -> torch.Tensor:
        f = self._where[(comp, key)]
        if f not in self._handles:
            h = safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = h.__enter__()
        return self._handles[f].get_tensor(key)

    def keys(self):
        return self.shapes.keys()

    def get_tensor(self, sgm_key: str) -> torch.Tensor:
        comp, keys, how = self._recipe[sgm_key]
        parts = [self._read(comp, k) for k in keys]
        if how == "cat":
            return torch.cat(parts)
        if how == "t":
            return parts[0].t().contiguous()
        if how == "conv1x1":
            return parts[0][:, :, None, None]
        return parts[0]


def _unet_config_for(raw: dict):
    from .checkpoint import KNOWN_CONFIGS

    conv_in = raw.get("conv_in.weight")
    add = raw.get("add_embedding.linear_1.weight")
    for cfg in KNOWN_CONFIGS:
        u = cfg.unet
        if conv_in == (u.model_channels, u.in_channels, 3, 3) and add == (u.time_embed_dim, u.adm_in_channels):
            return u
    return None
