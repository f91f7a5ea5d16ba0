"""torch.compile as a node: SDXL Compile UNet, and ComfyUI's TorchCompileModel twin (nodes/comfy_core)."""

from __future__ import annotations

import dataclasses

from ..sdxl_core.accel import COMPILE_BACKENDS
from .schema import Combo, NodeSchema, Output, Socket, node


def compile_model(model, backend: str):
    """The model handle with a torch.compile backend set: the sampler compiles the UNet on its first step
    (once per image size, cached for the life of the loaded network) and runs the compiled graph after."""
    return dataclasses.replace(model, compile=backend)


@node(NodeSchema(
    id="SDXLTorchCompile",
    display_name="SDXL Compile UNet (torch.compile)",
    category="sdxl/advanced",
    description=(
        "Runs the UNet through torch.compile: the first sampling step of each image size compiles (a minute "
        "or more), every later run of that size in the same session is faster. Worth it on a GPU for many "
        "images; the output equals the uncompiled run up to float rounding."
    ),
    inputs=(
        Socket("model", "SDXL_MODEL", "The UNet from SDXL Checkpoint Loader (or after LoRAs)."),
        Combo("backend", "inductor: generated kernels (the usual choice). cudagraphs: replays the step as one CUDA "
              "graph. max-autotune: inductor with tuned kernels and CUDA graphs (slowest to compile, fastest "
              "to run).", list(COMPILE_BACKENDS), default="inductor"),
    ),
    outputs=(Output("model", "SDXL_MODEL", "The same UNet, compiled when it samples."),),
))
class TorchCompile:
    def run(self, model, backend):
        return (compile_model(model, backend),)
