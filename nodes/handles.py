"""What the SDXL_MODEL / SDXL_CLIP / SDXL_VAE sockets carry: handles into the model manager."""

from __future__ import annotations

from dataclasses import dataclass

from ..sdxl_core.memory import ModelManager, ModelRef
from ..sdxl_core.text import TextEncoders
from ..sdxl_core.tokenizer import load_tokenizer


@dataclass(frozen=True, eq=False)
class ClipRef:
    """The text encoders of one checkpoint (CLIP-L + bigG for a base, bigG alone for a refiner)."""

    manager: ModelManager
    path: str
    config: object
    layer: int = -2  # hidden layer the prompt is taken from (ComfyUI CLIPSetLastLayer; SDXL's default -2)
    patches: tuple = ()  # LoRAs in chain order: ((lora.LoraPatches, strength), …), as on ModelRef

    @property
    def kind(self) -> str:
        return self.config.kind

    def encoders(self) -> TextEncoders:
        clip_l = None if self.config.is_refiner else self.manager.get(self.path, "clip_l", self.patches)
        clip_g = self.manager.get(self.path, "clip_g", self.patches)
        from .environment import current  # the embeddings folders of the running environment

        return TextEncoders(clip_l=clip_l, clip_g=clip_g, tokenizer=load_tokenizer(),
                            embedding_dirs=tuple(current().model_dirs("embeddings")))


__all__ = ["ClipRef", "ModelRef"]
