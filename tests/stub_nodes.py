"""Stub node classes (ComfyUI V1 contract, no torch) for the runtime tests.

``CALLS`` records every node function call as ``(class_type, node_id or None)`` so tests can
count executions; ``SEEN`` keeps the last hidden inputs each node received. Call :func:`reset`
between tests.
"""

from __future__ import annotations

import time

CALLS: list[str] = []
SEEN: dict[str, dict] = {}


def reset() -> None:
    CALLS.clear()
    SEEN.clear()


class StubNumber:
    """A number source."""

    CATEGORY = "stub"
    DESCRIPTION = "Outputs its value."
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("value",)
    OUTPUT_TOOLTIPS = ("the value",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": -1000, "max": 1000, "tooltip": "a number"})}}

    def run(self, value):
        CALLS.append("StubNumber")
        SEEN.setdefault("StubNumber", {})["value_type"] = type(value)
        return (value,)


class StubAdd:
    """a + b."""

    CATEGORY = "stub/math"
    FUNCTION = "add"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "a": ("INT", {"default": 0, "min": -1000, "max": 1000}),
                "b": ("INT", {"default": 0, "min": -1000, "max": 1000}),
            }
        }

    def add(self, a, b):
        CALLS.append("StubAdd")
        return (a + b,)


class StubScale:
    """value * factor (FLOAT)."""

    CATEGORY = "stub/math"
    FUNCTION = "scale"
    RETURN_TYPES = ("FLOAT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "value": ("INT,FLOAT", {"forceInput": True}),
                "factor": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1}),
            }
        }

    def scale(self, value, factor):
        CALLS.append("StubScale")
        SEEN["StubScale"] = {"factor_type": type(factor)}
        return (value * factor,)


class StubSampler:
    """A node with seed + combos + multiline + boolean + optional inputs, like a sampler."""

    CATEGORY = "stub/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("summary", "seed")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base": ("INT", {"forceInput": True, "tooltip": "the input number"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "sampler_name": (["euler", "dpmpp_2m"], {"default": "euler"}),
                "scheduler": ("COMBO", {"options": ["normal", "karras"], "default": "normal"}),
                "text": ("STRING", {"multiline": True, "default": ""}),
                "enabled": ("BOOLEAN", {"default": True}),
            },
            "optional": {
                "extra": ("INT", {"forceInput": True}),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
        }

    def sample(self, base, seed, sampler_name, scheduler, text, enabled, extra=None, strength=0.5):
        CALLS.append("StubSampler")
        return (f"{base}:{seed}:{sampler_name}:{scheduler}:{text}:{enabled}:{extra}:{strength}", seed)


class StubSlow:
    """Reports progress for ``steps`` steps of ``delay`` seconds; checks interrupt each step."""

    CATEGORY = "stub"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "value": ("INT", {"forceInput": True}),
                "steps": ("INT", {"default": 3, "min": 1, "max": 1000}),
                "delay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "preview": ("BOOLEAN", {"default": False}),
            },
            "hidden": {"progress": "SDXL_PROGRESS", "unknown": "SOMETHING_ELSE"},
        }

    def run(self, value, steps, delay, preview, progress=None, **kwargs):
        CALLS.append("StubSlow")
        SEEN["StubSlow"] = {"kwargs": sorted(kwargs), "steps_done": 0}
        for i in range(steps):
            progress.check_interrupted()
            time.sleep(delay)
            image = None
            if preview:
                from PIL import Image

                image = Image.new("RGB", (8, 8), (i * 40 % 256, 0, 0))
            SEEN["StubSlow"]["steps_done"] = i + 1
            progress.progress(i + 1, steps, preview=image)
        return (value + steps,)


class StubSaveText:
    """Output node: shows its value as text; receives every hidden input."""

    CATEGORY = "stub/output"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"value": ("*", {})},
            "optional": {"prefix": ("STRING", {"default": "v="})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    def save(self, value, prefix="v=", prompt=None, extra_pnginfo=None, unique_id=None):
        CALLS.append("StubSaveText")
        SEEN[f"StubSaveText#{unique_id}"] = {"prompt": prompt, "extra_pnginfo": extra_pnginfo, "unique_id": unique_id}
        return {"ui": {"text": [f"{prefix}{value}"]}, "result": ()}


class StubSink:
    """Output node without UI output."""

    CATEGORY = "stub/output"
    FUNCTION = "sink"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    def sink(self, value):
        CALLS.append("StubSink")
        return ()


class StubFail:
    """Always raises."""

    CATEGORY = "stub"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    def run(self, value):
        CALLS.append("StubFail")
        raise RuntimeError(f"boom on {value}")


class StubEven:
    """Custom validation: ``value`` must be even."""

    CATEGORY = "stub"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        if value % 2:
            return f"{value} is odd"
        return True

    def run(self, value):
        CALLS.append("StubEven")
        return (value,)


class StubBrokenValidate:
    """VALIDATE_INPUTS raises."""

    CATEGORY = "stub"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        raise ValueError("validator exploded")

    def run(self, value):
        return (value,)


class StubVolatile:
    """IS_CHANGED returns NaN: runs every time."""

    CATEGORY = "stub"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    @classmethod
    def IS_CHANGED(cls, value):
        return float("nan")

    def run(self, value):
        CALLS.append("StubVolatile")
        return (value,)


class StubBadReturn:
    """Returns a bare value instead of a tuple."""

    CATEGORY = "stub"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return 5


NODE_CLASS_MAPPINGS = {
    "StubNumber": StubNumber,
    "StubAdd": StubAdd,
    "StubScale": StubScale,
    "StubSampler": StubSampler,
    "StubSlow": StubSlow,
    "StubSaveText": StubSaveText,
    "StubSink": StubSink,
    "StubFail": StubFail,
    "StubEven": StubEven,
    "StubBrokenValidate": StubBrokenValidate,
    "StubVolatile": StubVolatile,
    "StubBadReturn": StubBadReturn,
}
