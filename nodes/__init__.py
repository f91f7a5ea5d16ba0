"""The node registry: ComfyUI's NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS for every node."""

from __future__ import annotations

from .compile import TorchCompile
from .images import LoadImage, PreviewImage, SaveImage, VAEDecode, VAEEncode
from .loaders import CheckpointLoader
from .lora import LoraLoader, VAELoader
from .sampling import BaseSampler, EmptyLatent, NoiseAndRefine
from .text import DualCLIPEncode, RefinerConditioning, SizeCropConditioning

NODES = (
    CheckpointLoader,
    LoraLoader,
    VAELoader,
    TorchCompile,
    DualCLIPEncode,
    SizeCropConditioning,
    RefinerConditioning,
    EmptyLatent,
    BaseSampler,
    NoiseAndRefine,
    VAEDecode,
    VAEEncode,
    LoadImage,
    SaveImage,
    PreviewImage,
)

NODE_CLASS_MAPPINGS = {cls.SCHEMA.id: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.SCHEMA.id: cls.SCHEMA.display_name for cls in NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NODES"]
