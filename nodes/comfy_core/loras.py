"""ComfyUI's LoraLoader, LoraLoaderModelOnly and VAELoader on the same handles as our SDXL nodes.

MODEL / CLIP / VAE carry the very objects SDXL_MODEL / SDXL_CLIP / SDXL_VAE carry, so these nodes are
thin calls into `nodes/lora.py` (ids, input names, order, ranges and outputs as ComfyUI v0.8's).
"""

from __future__ import annotations

from ..lora import _lora_names, _vae_names, apply_lora, load_vae
from ..schema import Combo, Float, NodeSchema, Output, Socket, node

_DESCRIPTION = ("LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are "
                "denoised such as applying styles. Multiple LoRA nodes can be linked together.")


def _strength(name: str, tooltip: str):
    return Float(name, tooltip, default=1.0, min=-100.0, max=100.0, step=0.01)


@node(NodeSchema(
    id="LoraLoader",
    display_name="Load LoRA",
    category="loaders",
    description=_DESCRIPTION,
    inputs=(
        Socket("model", "MODEL", "The diffusion model the LoRA will be applied to."),
        Socket("clip", "CLIP", "The CLIP model the LoRA will be applied to."),
        Combo("lora_name", "The name of the LoRA.", _lora_names),
        _strength("strength_model", "How strongly to modify the diffusion model. This value can be negative."),
        _strength("strength_clip", "How strongly to modify the CLIP model. This value can be negative."),
    ),
    outputs=(
        Output("MODEL", "MODEL", "The modified diffusion model."),
        Output("CLIP", "CLIP", "The modified CLIP model."),
    ),
))
class LoraLoader:
    def run(self, model, clip, lora_name, strength_model, strength_clip):
        return apply_lora(model, clip, lora_name, strength_model, strength_clip)


@node(NodeSchema(
    id="LoraLoaderModelOnly",
    display_name="LoraLoaderModelOnly",
    category="loaders",
    description=_DESCRIPTION,
    inputs=(
        Socket("model", "MODEL", "The diffusion model the LoRA will be applied to."),
        Combo("lora_name", "The name of the LoRA.", _lora_names),
        _strength("strength_model", "How strongly to modify the diffusion model. This value can be negative."),
    ),
    outputs=(Output("MODEL", "MODEL", "The modified diffusion model."),),
))
class LoraLoaderModelOnly:
    def run(self, model, lora_name, strength_model):
        return (apply_lora(model, None, lora_name, strength_model, 0.0)[0],)


@node(NodeSchema(
    id="VAELoader",
    display_name="Load VAE",
    category="loaders",
    description="Loads a standalone SDXL VAE file from the vae folder (Stability's or diffusers' key layout).",
    inputs=(Combo("vae_name", "The VAE file, from the vae folder.", _vae_names),),
    outputs=(Output("VAE", "VAE", "The VAE that turns latents into images and back."),),
))
class VAELoader:
    def run(self, vae_name):
        return (load_vae(vae_name),)


NODES = (LoraLoader, LoraLoaderModelOnly, VAELoader)
