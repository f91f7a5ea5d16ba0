"""Exception types raised on purpose. Every message says what, expected vs got, where and how to fix.

:class:`UserError` is the root of every error caused by what the user gave us (a file, a widget
value, a wiring, a command-line option): the CLI prints its message alone (no traceback) and exits
with a user-error code, the server reports it without a traceback. Anything else is a bug. The
other layers derive their own user errors from it (``nodes.environment.NodeInputError``,
``runtime.workflow.WorkflowError``, ``runtime.cli.CLIError``), so callers catch by type.

This module imports nothing (``sdxl_core/__init__.py`` is empty), so the torch-free ``runtime``
layer imports it without pulling in torch.
"""

from __future__ import annotations


class UserError(Exception):
    """The input was wrong; the message says what to change. Shown without a traceback."""


class SDXLError(UserError):
    """Base class for every user error sdxl_core raises."""


class CheckpointError(SDXLError):
    """A checkpoint file cannot be used: unreadable, wrong format, wrong model, missing tensors."""


class ConditioningError(SDXLError, ValueError):
    """A prompt or a size/crop/aesthetic value is not usable."""


class SamplingError(SDXLError, ValueError):
    """Bad sampler/scheduler name, step range, cfg or latent."""


class Cancelled(Exception):
    """Sampling was stopped by the caller's cancellation check between two steps (not an error of the input)."""
