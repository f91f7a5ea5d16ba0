"""ComfyUI's core node ids on sdxl_core (the full package comes from the core-node set's branch)."""
