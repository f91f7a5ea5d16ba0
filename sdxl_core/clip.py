"""The two SDXL text encoders (`clip_model.CLIPTextModel`), and the one rename table they need.

CLIP ViT-L/14 is stored in the checkpoint in transformers' layout
(`conditioner.embedders.0.transformer.text_model.*`), which is our module's own, so it loads as is.
OpenCLIP ViT-bigG/14 is stored in open_clip's layout (`conditioner.embedders.{1|0}.model.*`);
`openclip_to_hf` maps it with a strict table: q/k/v are the row blocks of `attn.in_proj_*`, and
`text_projection` is used as `x @ P`, so the Linear weight is Pᵀ (FACTS.md §3; ComfyUI
`comfy/utils.py` `clip_text_transformers_convert`).
"""

from __future__ import annotations

import re

import torch

from .clip_model import CLIPTextModel
from .config import TextEncoderConfig
from .errors import CheckpointError

# open_clip keys that carry no weight the text path uses; present in the official files.
OPENCLIP_IGNORED = ("logit_scale",)


def build_text_encoder(cfg: TextEncoderConfig) -> CLIPTextModel:
    """An uninitialised encoder (build it under `torch.device("meta")` and fill it with the loader)."""
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def hf_prefix(model: torch.nn.Module) -> str:
    """'text_model.' when the module nests the transformer under that name (ours always do; transformers
    5's plain CLIPTextModel does not)."""
    return "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""


def clip_l_to_hf(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """File keys `text_model.*` (relative to `...transformer.`) → the module's keys."""
    prefix = hf_prefix(model)
    out = {}
    for key, value in sd.items():
        if key == "text_model.embeddings.position_ids":
            continue  # int64 arange(77) written by transformers 4.x; our model has no such buffer
        if not key.startswith("text_model."):
            out[key] = value  # reported as unexpected by the strict check
            continue
        out[prefix + key[len("text_model."):]] = value
    return out


_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_RESBLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}


def openclip_to_hf(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """open_clip bigG keys (relative to `...model.`) → the module's (transformers-named) keys.

    Unknown keys are passed through unchanged so the strict check reports them by name.
    """
    prefix = hf_prefix(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in OPENCLIP_IGNORED:
            continue
        if key in _TOP_NAMES:
            out[prefix + _TOP_NAMES[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t()  # x @ P  ==  Linear with weight Pᵀ
        elif m := _RESBLOCK.fullmatch(key):
            layer, rest = m.groups()
            base = f"{prefix}encoder.layers.{layer}."
            if rest in _RESBLOCK_NAMES:
                out[base + _RESBLOCK_NAMES[rest]] = value
            elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                if value.shape[0] % 3:
                    raise CheckpointError(f"bigG {key}: first dim {value.shape[0]} is not 3×width (q, k, v stacked)")
                q, k, v = value.chunk(3, dim=0)  # rows are q, k, v in that order
                out[base + f"self_attn.q_proj.{kind}"] = q
                out[base + f"self_attn.k_proj.{kind}"] = k
                out[base + f"self_attn.v_proj.{kind}"] = v
            else:
                out[key] = value
        else:
            out[key] = value
    return out


def hf_to_openclip(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_to_hf` (used by the checkpoint writer); adds no logit_scale."""
    prefix = hf_prefix(model)
    top = {v: k for k, v in _TOP_NAMES.items()}
    res = {v: k for k, v in _RESBLOCK_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        rel = key[len(prefix):] if key.startswith(prefix) else key
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif rel in top:
            out[top[rel]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rel):
            layer, rest = m.groups()
            if rest in res:
                out[f"transformer.resblocks.{layer}.{res[rest]}"] = value
            elif pm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, pm.group(2)), {})[pm.group(1)] = value
            else:
                raise KeyError(key)
        else:
            raise KeyError(key)
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
