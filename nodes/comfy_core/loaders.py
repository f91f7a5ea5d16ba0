"""CheckpointLoaderSimple: ComfyUI's checkpoint loader, giving the same handles as SDXL Checkpoint Loader."""

from __future__ import annotations

from ..loaders import CheckpointLoader, _checkpoint_names
from ..schema import Combo, NodeSchema, Output, node


@node(NodeSchema(
    id="CheckpointLoaderSimple",
    display_name="Load Checkpoint",
    category="loaders",
    description="Loads an SDXL 1.0 base or refiner checkpoint (ComfyUI's Load Checkpoint on sdxl-nodes; the "
                "same handles as SDXL Checkpoint Loader).",
    inputs=(Combo("ckpt_name", "The checkpoint file, from the checkpoints folder.", _checkpoint_names),),
    outputs=(
        Output("MODEL", "MODEL", "The UNet (base or refiner) that denoises latents."),
        Output("CLIP", "CLIP", "The text encoders: CLIP-L + OpenCLIP bigG (base) or bigG alone (refiner)."),
        Output("VAE", "VAE", "The VAE that turns latents into images and back."),
    ),
))
class CheckpointLoaderSimple:
    DIFFERS_FROM_COMFYUI = ("SDXL 1.0 base and refiner checkpoints only; other model families are refused with a "
                            "clear message.")

    def run(self, ckpt_name):
        return CheckpointLoader().run(ckpt_name)


NODES = (CheckpointLoaderSimple,)
