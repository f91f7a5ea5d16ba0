"""Live previews follow ComfyUI's --preview-method and the prompt's own preview_method (issue 11 item 5)."""

from __future__ import annotations

import enum
import sys
import types

import pytest
import torch

from sdxl_nodes.nodes.progress import StepReporter
from sdxl_nodes.runtime.executor import Executor


class _Reporter:
    def __init__(self, method):
        self.preview_method = method
        self.previews = []
        self.interrupted = False

    def progress(self, value, total, preview=None):
        self.previews.append(preview)


@pytest.mark.parametrize(("method", "sent"), [("default", True), ("auto", True), ("latent2rgb", True),
                                              ("none", False)])
def test_our_runtime_honours_the_prompts_preview_method(method, sent):
    rep = _Reporter(method)
    StepReporter(rep)(1, 2, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    assert (rep.previews[0] is not None) is sent


def test_reporter_reads_preview_method_from_extra_data():
    from stub_nodes import NODE_CLASS_MAPPINGS

    seen = []

    class Probe:
        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {}, "hidden": {"progress": "SDXL_PROGRESS"}}

        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        def run(self, progress=None):
            seen.append(progress.preview_method)
            return {}

    for extra in ({"preview_method": "none"}, {}):  # a fresh executor each: the second run is not cached
        Executor({**NODE_CLASS_MAPPINGS, "Probe": Probe}).execute({"1": {"class_type": "Probe", "inputs": {}}}, "p",
                                                                  extra_data=extra)
    assert seen == ["none", "default"]


@pytest.fixture
def fake_comfy(monkeypatch):
    """The three ComfyUI modules StepReporter talks to, with ComfyUI's names."""

    class LatentPreviewMethod(enum.Enum):
        NoPreviews = "none"
        Auto = "auto"

    updates = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append(preview)

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.processing_interrupted = lambda: False
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.LatentPreviewMethod = LatentPreviewMethod
    cli_args.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews)  # ComfyUI's default
    comfy.utils, comfy.model_management, comfy.cli_args = utils, mm, cli_args
    for name, mod in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm),
                      ("comfy.cli_args", cli_args)):
        monkeypatch.setitem(sys.modules, name, mod)
    return cli_args, updates


def test_inside_comfyui_no_previews_with_preview_method_none(fake_comfy):
    cli_args, updates = fake_comfy
    steps = StepReporter(None)
    steps(1, 2, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    cli_args.args.preview_method = cli_args.LatentPreviewMethod.Auto  # what a prompt's setting switches to
    steps(2, 2, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    assert updates[0] is None
    assert updates[1][0] == "JPEG" and updates[1][1].size == (64, 64)
