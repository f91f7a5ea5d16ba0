"""Checkpoint loader node."""

from __future__ import annotations

from .environment import current
from .handles import ClipRef, ModelRef
from .schema import Combo, NodeSchema, Output, node


def _checkpoint_names() -> list[str]:
    return current().checkpoint_names()


@node(NodeSchema(
    id="SDXLCheckpointLoader",
    display_name="SDXL Checkpoint Loader",
    category="sdxl/loaders",
    description=(
        "Loads an SDXL 1.0 base or refiner checkpoint (single .safetensors file, Stability's layout) and "
        "gives its UNet, text encoders and VAE. Base or refiner is detected from the tensor shapes; networks "
        "are loaded on first use and freed when memory runs short."
    ),
    inputs=(
        Combo("ckpt_name", "The checkpoint file, from the checkpoints folder (e.g. sd_xl_base_1.0.safetensors "
              "or sd_xl_refiner_1.0.safetensors).", _checkpoint_names),
    ),
    outputs=(
        Output("model", "SDXL_MODEL", "The UNet (base or refiner) that denoises latents."),
        Output("clip", "SDXL_CLIP", "The text encoders: CLIP-L + OpenCLIP bigG (base) or bigG alone (refiner)."),
        Output("vae", "SDXL_VAE", "The VAE that turns latents into images and back."),
    ),
))
class CheckpointLoader:
    @classmethod
    def EXPLAIN_CHOICE(cls, input_name, value):  # noqa: N802 - read by our validator; ComfyUI ignores it
        """Where a checkpoint name that is not in the list was looked for (the validator's hint)."""
        return current().explain_checkpoint(str(value)) if input_name == "ckpt_name" else None

    def run(self, ckpt_name):
        env = current()
        path = str(env.checkpoint_path(ckpt_name))
        config, _shapes = env.manager.inspect(path)  # strict key/shape check; loads no weights yet
        if env.manager.prefetch_unet_wanted(path):
            # read the UNet while the prompts are encoded (and, on CUDA, while the other UNet samples); only
            # when RAM has room (the manager decides), and never twice (get() waits for this read)
            env.manager.prefetch(path, "unet")
        return (
            ModelRef(env.manager, path, "unet", config),
            ClipRef(env.manager, path, config),
            ModelRef(env.manager, path, "vae", config),
        )
