"""ComfyUI's prompt and CONDITIONING nodes; the list operations live in sdxl_core.conditioning."""

from __future__ import annotations

import dataclasses

from ...sdxl_core import conditioning as cond
from ..schema import MAX_RESOLUTION, Float, Int, NodeSchema, Output, Socket, String, node
from ..text import encode_text

CONDITIONING_OUT = (Output("CONDITIONING", "CONDITIONING", "A CONDITIONING list ([tokens, options] entries)."),)


def _clip():
    return Socket("clip", "CLIP", "The text encoders from Load Checkpoint (base or refiner).")


def _text(name="text", tooltip="The prompt; (word:1.2) and (word) set emphasis; long prompts are chunked."):
    return String(name, tooltip, default=None, multiline=True, dynamicPrompts=True)  # ComfyUI declares no default


def _size(name, tooltip, default=1024):
    return Int(name, tooltip, default=default, min=0, max=MAX_RESOLUTION, step=None)


PROGRESS = {"progress": "SDXL_PROGRESS"}  # cancel reaches a long prompt's tokenization (nodes/text.py)


def _cond(name, tooltip):
    return Socket(name, "CONDITIONING", tooltip)


@node(NodeSchema(
    id="CLIPTextEncode",
    display_name="CLIP Text Encode (Prompt)",
    category="conditioning",
    description="Encodes a prompt with the checkpoint's text encoders (both CLIP-L and bigG get the same text on "
                "a base). The size conditioning is filled in from the latent when sampling; on the refiner the "
                "aesthetic score is 6.0 for the positive and 2.5 for the negative prompt, as in ComfyUI.",
    inputs=(_text(), _clip()),
    outputs=CONDITIONING_OUT,
    hidden=PROGRESS,
))
class CLIPTextEncode:
    def run(self, text, clip, progress=None):
        return (cond.comfy_conditioning(encode_text(clip, text, None, progress)),)


@node(NodeSchema(
    id="CLIPTextEncodeSDXL",
    display_name="CLIPTextEncodeSDXL",
    category="advanced/conditioning",
    description="SDXL base prompt with its size conditioning: text_g to bigG, text_l to CLIP-L, and the original "
                "size, crop and target size (the same computation as SDXL Dual CLIP Text Encode + SDXL Size/Crop "
                "Conditioning).",
    inputs=(
        _clip(),
        _size("width", "Original width the model should imagine the picture had (pixels)."),
        _size("height", "Original height the model should imagine the picture had (pixels)."),
        _size("crop_w", "Left edge of the crop (pixels); 0 = not cropped.", 0),
        _size("crop_h", "Top edge of the crop (pixels); 0 = not cropped.", 0),
        _size("target_width", "Target width (pixels), normally the generated image's."),
        _size("target_height", "Target height (pixels), normally the generated image's."),
        _text("text_g", "Prompt for OpenCLIP bigG (the main prompt)."),
        _text("text_l", "Prompt for CLIP-L (often the same text)."),
    ),
    outputs=CONDITIONING_OUT,
    hidden=PROGRESS,
))
class CLIPTextEncodeSDXL:
    PYTHON_MODULE = "comfy_extras.nodes_clip_sdxl"

    def run(self, clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l, progress=None):
        emb = encode_text(clip, text_g, text_l, progress)
        return (cond.comfy_conditioning(emb, width=width, height=height, crop_w=crop_w, crop_h=crop_h,
                                        target_width=target_width, target_height=target_height),)


@node(NodeSchema(
    id="CLIPTextEncodeSDXLRefiner",
    display_name="CLIPTextEncodeSDXLRefiner",
    category="advanced/conditioning",
    description="SDXL refiner prompt with its aesthetic score and image size (the same computation as SDXL "
                "Refiner Conditioning). About 6 for the positive, 2.5 for the negative prompt.",
    inputs=(
        Float("ascore", "Aesthetic score the refiner aims for.", default=6.0, min=0.0, max=1000.0, step=0.01),
        _size("width", "Image width (pixels)."),
        _size("height", "Image height (pixels)."),
        _text(),
        _clip(),
    ),
    outputs=CONDITIONING_OUT,
    hidden=PROGRESS,
))
class CLIPTextEncodeSDXLRefiner:
    PYTHON_MODULE = "comfy_extras.nodes_clip_sdxl"

    def run(self, ascore, width, height, text, clip, progress=None):
        emb = encode_text(clip, text, None, progress)
        return (cond.comfy_conditioning(emb, aesthetic_score=ascore, width=width, height=height),)


@node(NodeSchema(
    id="CLIPSetLastLayer",
    display_name="CLIP Set Last Layer",
    category="conditioning",
    description="Which text-encoder layer prompts are taken from: -1 the last, -2 the penultimate (SDXL's "
                "default), and so on. Applies to both encoders.",
    inputs=(_clip(), Int("stop_at_clip_layer", "The layer, counted from the end.", default=-1, min=-24, max=-1,
                         step=1)),
    outputs=(Output("CLIP", "CLIP", "The same text encoders, set to that layer."),),
))
class CLIPSetLastLayer:
    def run(self, clip, stop_at_clip_layer):
        return (dataclasses.replace(clip, layer=int(stop_at_clip_layer)),)


@node(NodeSchema(
    id="ConditioningCombine",
    display_name="Conditioning (Combine)",
    category="conditioning",
    description="Both conditionings' entries in one list: each is predicted separately and the predictions "
                "are averaged at every step.",
    inputs=(_cond("conditioning_1", "First conditioning."), _cond("conditioning_2", "Second conditioning.")),
    outputs=CONDITIONING_OUT,
))
class ConditioningCombine:
    def run(self, conditioning_1, conditioning_2):
        return (cond.combine(conditioning_1, conditioning_2),)


@node(NodeSchema(
    id="ConditioningAverage",
    display_name="ConditioningAverage",
    category="conditioning",
    description="Blends two prompts' tokens and pooled outputs: to × strength + from × (1 − strength).",
    inputs=(
        _cond("conditioning_to", "The conditioning that keeps its options."),
        _cond("conditioning_from", "Its first entry is blended in (cut or zero-padded to the same length)."),
        Float("conditioning_to_strength", "Weight of conditioning_to.", default=1.0, min=0.0, max=1.0, step=0.01),
    ),
    outputs=CONDITIONING_OUT,
))
class ConditioningAverage:
    def run(self, conditioning_to, conditioning_from, conditioning_to_strength):
        return (cond.average(conditioning_to, conditioning_from, conditioning_to_strength),)


@node(NodeSchema(
    id="ConditioningConcat",
    display_name="Conditioning (Concat)",
    category="conditioning",
    description="Appends the tokens of conditioning_from's first entry to every entry of conditioning_to.",
    inputs=(_cond("conditioning_to", "Tokens first, options kept."), _cond("conditioning_from", "Tokens appended.")),
    outputs=CONDITIONING_OUT,
))
class ConditioningConcat:
    def run(self, conditioning_to, conditioning_from):
        return (cond.concat(conditioning_to, conditioning_from),)


@node(NodeSchema(
    id="ConditioningZeroOut",
    display_name="ConditioningZeroOut",
    category="advanced/conditioning",
    description="All-zero tokens and pooled output, keeping the options (an 'empty' negative).",
    inputs=(_cond("conditioning", "The conditioning to zero."),),
    outputs=CONDITIONING_OUT,
))
class ConditioningZeroOut:
    def run(self, conditioning):
        return (cond.zero_out(conditioning),)


@node(NodeSchema(
    id="ConditioningSetTimestepRange",
    display_name="ConditioningSetTimestepRange",
    category="advanced/conditioning",
    description="Limits the conditioning to a part of the schedule (0 = the first step, 1 = the end).",
    inputs=(
        _cond("conditioning", "The conditioning to limit."),
        Float("start", "Where it starts, as a fraction of the schedule.", default=0.0, min=0.0, max=1.0, step=0.001),
        Float("end", "Where it ends, as a fraction of the schedule.", default=1.0, min=0.0, max=1.0, step=0.001),
    ),
    outputs=CONDITIONING_OUT,
))
class ConditioningSetTimestepRange:
    def run(self, conditioning, start, end):
        return (cond.set_values(conditioning, start_percent=start, end_percent=end),)


NODES = (CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner, CLIPSetLastLayer, ConditioningCombine,
         ConditioningAverage, ConditioningConcat, ConditioningZeroOut, ConditioningSetTimestepRange)
