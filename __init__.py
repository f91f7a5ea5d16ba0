"""sdxl-nodes: SDXL base + refiner as workflow nodes.

This file is the ComfyUI entry point (ComfyUI imports the folder as a module). The node mappings
load lazily so that ``import sdxl_nodes.runtime`` stays free of torch.
"""

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

# Frontend extension served by ComfyUI (and by `sdxl-nodes serve`) at /extensions/<pack>/.
WEB_DIRECTORY = "./web"


def __getattr__(name):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
