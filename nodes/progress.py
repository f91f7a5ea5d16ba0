"""Progress, previews and interruption for a running node, in both hosts.

Our runtime hands nodes a reporter through the hidden input type SDXL_PROGRESS. ComfyUI does not
know that type and passes nothing; there the node reports through ComfyUI's own ProgressBar and
interrupt check instead.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from PIL import Image

from ..sdxl_core.errors import Cancelled
from ..sdxl_core.preview import latent_to_rgb

log = logging.getLogger(__name__)

PREVIEW_MAX = 512  # longest side of a live preview, in pixels


def _preview_image(x0: torch.Tensor) -> Image.Image:
    img = Image.fromarray(latent_to_rgb(x0).numpy())
    scale = min(PREVIEW_MAX / max(img.size), 8.0)
    if scale > 1:  # a latent is 1/8 of the image: show it at a readable size
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)
    return img


def _comfy_previews_enabled() -> bool:
    """ComfyUI's rule (latent_preview.get_previewer): no previews when its preview method is "none", which is
    the --preview-method default and what a prompt's extra_data "preview_method" may set for one run."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:  # an old or stripped ComfyUI: keep its progress bar, send no previews
        return False
    return args.preview_method != LatentPreviewMethod.NoPreviews


class StepReporter:
    """The sampler callback: progress + preview per step; raises when the user interrupts.

    Also the interrupt check for long work inside one node (tokenization, VAE tiles): `stopping()`
    polls the host without raising, and `cancellable()` turns sdxl_core's :class:`Cancelled` into the
    host's own interrupt exception so the run ends as "interrupted", not as an error.
    """

    def __init__(self, reporter=None):
        self.reporter = reporter
        self.comfy_bar = None
        if reporter is None:
            try:
                import comfy.utils  # inside ComfyUI

                self.comfy_bar = comfy.utils
            except ImportError:
                pass

    def previews_enabled(self) -> bool:
        if self.reporter is not None:  # our runtime: the prompt's extra_data "preview_method" (the editor's setting)
            return getattr(self.reporter, "preview_method", "default") != "none"
        return self.comfy_bar is not None and _comfy_previews_enabled()

    def __call__(self, step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if self.reporter is not None:
            self.reporter.progress(step, total, preview=_preview_image(x0) if self.previews_enabled() else None)
            return
        if self.comfy_bar is not None:
            import comfy.model_management

            comfy.model_management.throw_exception_if_processing_interrupted()
            if not hasattr(self, "_bar"):
                self._bar = self.comfy_bar.ProgressBar(total)
            preview = ("JPEG", _preview_image(x0), PREVIEW_MAX) if self.previews_enabled() else None
            self._bar.update_absolute(step, total, preview)

    def check(self) -> None:
        """Raise the host's interrupt exception if the user pressed cancel."""
        if self.reporter is not None:
            self.reporter.check_interrupted()
        elif self.comfy_bar is not None:
            import comfy.model_management

            comfy.model_management.throw_exception_if_processing_interrupted()

    def stopping(self) -> bool:
        """Whether the user pressed cancel (sdxl_core's `should_stop`)."""
        if self.reporter is not None:
            return bool(self.reporter.interrupted)
        if self.comfy_bar is not None:
            import comfy.model_management as mm

            polled = getattr(mm, "processing_interrupted", None)
            if polled is None:  # a ComfyUI without the poll: its own check raises its interrupt exception
                mm.throw_exception_if_processing_interrupted()
                return False
            return bool(polled())
        return False

    @contextmanager
    def cancellable(self):
        """`with steps.cancellable() as should_stop:` run sdxl_core work that polls `should_stop`."""
        try:
            yield self.stopping
        except Cancelled:
            self.check()  # the host's exception (an interrupt, not an error)
            raise
