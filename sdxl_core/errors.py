"""Exception types raised by sdxl_core. Every message says what, expected vs got, where and how to fix."""

from __future__ import annotations


class SDXLError(Exception):
    """Base class for every error sdxl_core raises on purpose."""


class CheckpointError(SDXLError):
    """A checkpoint file cannot be used: unreadable, wrong format, wrong model, missing tensors."""


class ConditioningError(SDXLError, ValueError):
    """A prompt or a size/crop/aesthetic value is not usable."""


class SamplingError(SDXLError, ValueError):
    """Bad sampler/scheduler name, step range, cfg or latent."""


class Cancelled(SDXLError):
    """Sampling was stopped by the caller's cancellation check between two steps."""
