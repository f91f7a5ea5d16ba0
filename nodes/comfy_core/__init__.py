"""ComfyUI's core node ids on sdxl_core: run the SDXL workflows people share, as they are.

Same ids, input names, widget order, defaults, ranges, output types and pixels as ComfyUI v0.8's own
nodes (the recorded ``/object_info`` is the spec; ``tests/test_comfy_core*.py`` hold us to it). The
MODEL / CLIP / VAE payloads are the very objects our SDXL_MODEL / SDXL_CLIP / SDXL_VAE sockets carry;
CONDITIONING is ComfyUI's list of ``[tensor, options]`` entries (``sdxl_core.conditioning``), and
both node sets sample through the same ``sdxl_core.sampling.sample``.

Registered only in standalone mode (``sdxl-nodes run|validate|convert|serve``): inside ComfyUI,
ComfyUI's own nodes stand. Adding a module: import it below and add its ``NODES`` to ``MODULES``.
"""

from __future__ import annotations

from . import conditioning, extras, images, latent, loaders, loras, sampling

MODULES = (loaders, loras, conditioning, latent, sampling, images, extras)

NODES = tuple(cls for module in MODULES for cls in module.NODES)

CORE_NODE_CLASS_MAPPINGS = {cls.SCHEMA.id: cls for cls in NODES}
CORE_NODE_DISPLAY_NAME_MAPPINGS = {cls.SCHEMA.id: cls.SCHEMA.display_name for cls in NODES}
# ComfyUI's python module per node, reported by /object_info (no pack badge for "nodes" / "comfy_extras.*")
for _cls in NODES:
    if not isinstance(getattr(_cls, "PYTHON_MODULE", None), str):
        _cls.PYTHON_MODULE = "nodes"

__all__ = ["CORE_NODE_CLASS_MAPPINGS", "CORE_NODE_DISPLAY_NAME_MAPPINGS", "NODES"]
