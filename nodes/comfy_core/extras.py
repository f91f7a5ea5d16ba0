"""ComfyUI's TorchCompileModel (comfy_extras) on our model handle."""

from __future__ import annotations

from ..compile import compile_model
from ..schema import Input, NodeSchema, Output, Socket, node

_BACKENDS = ["inductor", "cudagraphs"]  # ComfyUI v0.8's choices


@node(NodeSchema(
    id="TorchCompileModel",
    display_name="TorchCompileModel",
    category="_for_testing",
    description="Compiles the diffusion model with torch.compile when it first samples (once per image size).",
    inputs=(
        Socket("model", "MODEL", "The diffusion model to compile."),
        # a V3 combo, as ComfyUI declares this node: ["COMBO", {"options": [...], "multiselect": false}]
        Input("backend", "COMBO", "torch.compile backend.", extra={"multiselect": False, "options": _BACKENDS}),
    ),
    outputs=(Output("MODEL", "MODEL", "The same model, compiled when it samples."),),
))
class TorchCompileModel:
    PYTHON_MODULE = "comfy_extras.nodes_torch_compile"
    EXPERIMENTAL = True

    def run(self, model, backend):
        return (compile_model(model, backend),)


NODES = (TorchCompileModel,)
