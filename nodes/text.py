"""Prompt encoding and conditioning nodes."""

from __future__ import annotations

import dataclasses

from ..sdxl_core import conditioning as cond
from ..sdxl_core.text import encode_prompt
from .environment import NodeInputError, current
from .progress import StepReporter
from .schema import MAX_RESOLUTION, Float, Int, NodeSchema, Output, Socket, String, node


def _check_kind(value, expected: str, what: str, fix: str) -> None:
    if value.kind and value.kind != expected:
        raise NodeInputError(f"{what} comes from an SDXL {value.kind} checkpoint, but this node needs the "
                             f"{expected}'s. {fix}")


@node(NodeSchema(
    id="SDXLDualCLIPEncode",
    display_name="SDXL Dual CLIP Text Encode",
    category="sdxl/conditioning",
    description=(
        "Encodes a prompt with SDXL's two text encoders, as ComfyUI's CLIPTextEncodeSDXL does: text_g goes "
        "to OpenCLIP bigG, text_l to CLIP-L. Long prompts are split into 77-token chunks; (word:1.2) and "
        "(word) set emphasis."
    ),
    inputs=(
        Socket("clip", "SDXL_CLIP", "Text encoders from SDXL Checkpoint Loader (base or refiner)."),
        String("text_g", "Prompt for OpenCLIP bigG (the main prompt). With a refiner checkpoint this is the "
               "only prompt used.", multiline=True, dynamicPrompts=True),
        String("text_l", "Prompt for CLIP-L (often the same text, or style words). Ignored by a refiner "
               "checkpoint, which has no CLIP-L.", multiline=True, dynamicPrompts=True),
    ),
    outputs=(Output("text", "SDXL_TEXT", "The encoded prompt: token embeddings and the pooled embedding."),),
    hidden={"progress": "SDXL_PROGRESS"},
))
class DualCLIPEncode:
    def run(self, clip, text_g, text_l, progress=None):
        return (dataclasses.replace(encode_text(clip, text_g, text_l, progress), kind=clip.kind),)


def encode_text(clip, text_g, text_l, progress=None):
    """`encode_prompt` for a node: the prompt_chars limit, and cancel polled while a long prompt is tokenized
    (word by word). Our SDXL nodes and the core text-encode nodes all encode through here."""
    steps = StepReporter(progress)
    with steps.cancellable() as should_stop:
        return encode_prompt(clip.encoders(), text_g, text_l, layer=clip.layer, should_stop=should_stop,
                             max_chars=current().limits.prompt_chars)


def _size(name, tooltip, default=1024):
    return Int(name, tooltip, default=default, min=0, max=MAX_RESOLUTION, step=8)


@node(NodeSchema(
    id="SDXLSizeCropConditioning",
    display_name="SDXL Size/Crop Conditioning",
    category="sdxl/conditioning",
    description=(
        "Adds SDXL base's micro-conditioning to an encoded prompt: the original image size, the crop's top-"
        "left corner and the target size (ComfyUI's CLIPTextEncodeSDXL widgets). 1024/0/1024 gives the usual "
        "centred, uncropped look."
    ),
    inputs=(
        Socket("text", "SDXL_TEXT", "An encoded prompt from SDXL Dual CLIP Text Encode (base checkpoint)."),
        _size("width", "Original width the model should imagine the picture had (pixels)."),
        _size("height", "Original height the model should imagine the picture had (pixels)."),
        Int("crop_w", "Left edge of the crop (pixels). 0 = not cropped; larger values look cut off.", default=0,
            min=0, max=MAX_RESOLUTION, step=8),
        Int("crop_h", "Top edge of the crop (pixels). 0 = not cropped.", default=0, min=0, max=MAX_RESOLUTION,
            step=8),
        _size("target_width", "Target width (pixels); normally the width of the image you generate."),
        _size("target_height", "Target height (pixels); normally the height of the image you generate."),
    ),
    outputs=(Output("conditioning", "SDXL_COND", "Conditioning for the SDXL base UNet."),),
))
class SizeCropConditioning:
    def run(self, text, width, height, crop_w, crop_h, target_width, target_height):
        _check_kind(text, "base", "The prompt", "Encode it with the base checkpoint's clip, or use SDXL Refiner "
                    "Conditioning for the refiner.")
        c = cond.base_conditioning(text, width=width, height=height, crop_w=crop_w, crop_h=crop_h,
                                   target_width=target_width, target_height=target_height)
        return (dataclasses.replace(c, kind="base"),)


@node(NodeSchema(
    id="SDXLRefinerConditioning",
    display_name="SDXL Refiner Conditioning",
    category="sdxl/conditioning",
    description=(
        "Adds the refiner's conditioning to an encoded prompt: an aesthetic score and the image size "
        "(ComfyUI's CLIPTextEncodeSDXLRefiner). Use about 6 for the positive and 2.5 for the negative prompt."
    ),
    inputs=(
        Socket("text", "SDXL_TEXT", "An encoded prompt from SDXL Dual CLIP Text Encode (refiner checkpoint)."),
        Float("ascore", "Aesthetic score the refiner aims for: 6.0 for the positive prompt, 2.5 for the "
              "negative.", default=6.0, min=0.0, max=1000.0, step=0.01),
        _size("width", "Image width (pixels)."),
        _size("height", "Image height (pixels)."),
    ),
    outputs=(Output("conditioning", "SDXL_COND", "Conditioning for the SDXL refiner UNet."),),
))
class RefinerConditioning:
    def run(self, text, ascore, width, height):
        _check_kind(text, "refiner", "The prompt", "Encode it with the refiner checkpoint's clip, or use SDXL "
                    "Size/Crop Conditioning for the base.")
        c = cond.refiner_conditioning(text, width=width, height=height, aesthetic_score=ascore)
        return (dataclasses.replace(c, kind="refiner"),)
