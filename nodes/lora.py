"""LoRA loader and standalone-VAE loader nodes (shared by the SDXL set and the core-compatible twins)."""

from __future__ import annotations

import dataclasses

from ..sdxl_core.errors import SDXLError
from .environment import NodeInputError, current
from .handles import ClipRef, ModelRef
from .schema import Combo, Float, NodeSchema, Output, Socket, node


def _lora_names() -> list[str]:
    return current().model_names("loras")


def _vae_names() -> list[str]:
    return current().model_names("vae")


def apply_lora(model, clip, lora_name: str, strength_model: float, strength_clip: float):
    """(model, clip) with one more LoRA on their patch stacks; either may be None (model-only)."""
    env = current()
    if strength_model == 0 and (clip is None or strength_clip == 0):
        return model, clip  # ComfyUI's LoraLoader does the same: nothing to read
    path = str(env.model_path("loras", lora_name))
    config = model.config if model is not None else clip.config
    if clip is not None and model is not None and clip.config.kind != model.config.kind:
        raise NodeInputError(f"the model is an SDXL {model.config.kind} but the clip comes from an SDXL "
                             f"{clip.config.kind} checkpoint; wire both from the same checkpoint loader")
    try:
        lp = env.manager.lora(path, config)
    except SDXLError as e:
        raise NodeInputError(f"lora_name '{lora_name}': {e}") from None
    text_parts = {"clip_l", "clip_g"}
    new_model = model
    if model is not None and "unet" in lp.parts():
        new_model = dataclasses.replace(model, patches=model.patches + ((lp, float(strength_model)),))
    new_clip = clip
    if clip is not None and lp.parts() & text_parts:
        new_clip = dataclasses.replace(clip, patches=clip.patches + ((lp, float(strength_clip)),))
    return new_model, new_clip


def _strength(name: str, tooltip: str):
    return Float(name, tooltip, default=1.0, min=-100.0, max=100.0, step=0.01)


@node(NodeSchema(
    id="SDXLLoraLoader",
    display_name="SDXL LoRA Loader",
    category="sdxl/loaders",
    description=(
        "Applies a LoRA (kohya/sd-scripts, diffusers/PEFT, ComfyUI, LyCORIS LoHa/LoKr or full-difference "
        "file) from the loras folder to an SDXL model and its text encoders. Chain several to stack them; "
        "strength 0 leaves that part untouched. Weights are patched in place when the model runs, and "
        "restored exactly when the LoRA is removed."
    ),
    inputs=(
        Socket("model", "SDXL_MODEL", "The UNet to modify (from SDXL Checkpoint Loader or another LoRA loader)."),
        Socket("clip", "SDXL_CLIP", "The text encoders to modify (same checkpoint as the model)."),
        Combo("lora_name", "The LoRA file, from the loras folder (.safetensors).", _lora_names),
        _strength("strength_model", "How strongly the LoRA changes the UNet; negative values invert it."),
        _strength("strength_clip", "How strongly the LoRA changes the text encoders; negative values invert it."),
    ),
    outputs=(
        Output("model", "SDXL_MODEL", "The UNet with this LoRA added."),
        Output("clip", "SDXL_CLIP", "The text encoders with this LoRA added."),
    ),
))
class LoraLoader:
    def run(self, model, clip, lora_name, strength_model, strength_clip):
        return apply_lora(model, clip, lora_name, strength_model, strength_clip)


def load_vae(vae_name: str) -> ModelRef:
    """A handle on a standalone VAE file from the vae folder (SGM or diffusers keys)."""
    env = current()
    path = str(env.model_path("vae", vae_name))
    try:
        config = env.manager.inspect_vae(path)
    except SDXLError as e:
        raise NodeInputError(f"vae_name '{vae_name}': {e}") from None
    return ModelRef(env.manager, path, "vae", config)


@node(NodeSchema(
    id="SDXLVAELoader",
    display_name="SDXL VAE Loader",
    category="sdxl/loaders",
    description=(
        "Loads a standalone SDXL VAE from the vae folder (e.g. sdxl_vae.safetensors or madebyollin's "
        "fp16-fix), in Stability's or diffusers' key layout. The fp16-fix VAE runs in fp16 on a GPU."
    ),
    inputs=(Combo("vae_name", "The VAE file, from the vae folder (.safetensors).", _vae_names),),
    outputs=(Output("vae", "SDXL_VAE", "The VAE that turns latents into images and back."),),
))
class VAELoader:
    def run(self, vae_name):
        return (load_vae(vae_name),)


__all__ = ["ClipRef", "LoraLoader", "ModelRef", "VAELoader", "apply_lora", "load_vae"]
