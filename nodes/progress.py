"""Progress, previews and interruption for a running node, in both hosts.

Our runtime hands nodes a reporter through the hidden input type SDXL_PROGRESS. ComfyUI does not
know that type and passes nothing; there the node reports through ComfyUI's own ProgressBar and
interrupt check instead.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image

from ..sdxl_core.preview import latent_to_rgb

log = logging.getLogger(__name__)

PREVIEW_MAX = 512  # longest side of a live preview, in pixels


def _preview_image(x0: torch.Tensor) -> Image.Image:
    img = Image.fromarray(latent_to_rgb(x0).numpy())
    scale = min(PREVIEW_MAX / max(img.size), 8.0)
    if scale > 1:  # a latent is 1/8 of the image: show it at a readable size
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)
    return img


class StepReporter:
    """The sampler callback: progress + preview per step; raises when the user interrupts."""

    def __init__(self, reporter=None):
        self.reporter = reporter
        self.comfy_bar = None
        if reporter is None:
            try:
                import comfy.utils  # inside ComfyUI

                self.comfy_bar = comfy.utils
            except ImportError:
                pass

    def __call__(self, step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if self.reporter is not None:
            self.reporter.progress(step, total, preview=_preview_image(x0))
            return
        if self.comfy_bar is not None:
            import comfy.model_management

            comfy.model_management.throw_exception_if_processing_interrupted()
            if not hasattr(self, "_bar"):
                self._bar = self.comfy_bar.ProgressBar(total)
            self._bar.update_absolute(step, total, ("JPEG", _preview_image(x0), PREVIEW_MAX))

    def check(self) -> None:
        """Raise the host's interrupt exception if the user pressed cancel."""
        if self.reporter is not None:
            self.reporter.check_interrupted()
        elif self.comfy_bar is not None:
            import comfy.model_management

            comfy.model_management.throw_exception_if_processing_interrupted()
