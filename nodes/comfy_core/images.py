"""ComfyUI's VAE and image nodes; VAE and file handling shared with our SDXL nodes (nodes/images.py)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

from ...sdxl_core.resize import CROP_METHODS, IMAGE_METHODS, resize
from ...sdxl_core.vae import decode_tiled_3, encode_tiled_3
from .. import images as ours
from ..environment import NodeInputError, current
from ..schema import MAX_RESOLUTION, Combo, Float, Int, NodeSchema, Output, Socket, String, node

IMAGE_OUT = (Output("IMAGE", "IMAGE", "The image batch, [B, H, W, 3] in 0..1."),)
LATENT_OUT = (Output("LATENT", "LATENT", "The latent."),)


def _vae():
    return Socket("vae", "VAE", "The VAE from Load Checkpoint.")


@node(NodeSchema(
    id="VAEDecode",
    display_name="VAE Decode",
    category="latent",
    description="Latent → image with the VAE (the SDXL VAE Decode computation).",
    inputs=(Socket("samples", "LATENT", "The latent to decode."), _vae()),
    outputs=IMAGE_OUT,
))
class VAEDecode:
    def run(self, samples, vae):
        return ours.VAEDecode().run(vae, samples)


@node(NodeSchema(
    id="VAEEncode",
    display_name="VAE Encode",
    category="latent",
    description="Image → latent with the VAE (the SDXL VAE Encode computation; sides cropped to multiples of 8).",
    inputs=(Socket("pixels", "IMAGE", "The image batch to encode."), _vae()),
    outputs=LATENT_OUT,
))
class VAEEncode:
    def run(self, pixels, vae):
        return ours.VAEEncode().run(vae, pixels)


def _tile_inputs(tile_step):
    return (
        Int("tile_size", "Tile size in pixels.", default=512, min=64, max=4096, step=tile_step),
        Int("overlap", "Overlap of neighbouring tiles in pixels.", default=64, min=0, max=4096, step=32),
        Int("temporal_size", "Video VAEs only; unused for SDXL.", default=64, min=8, max=4096, step=4),
        Int("temporal_overlap", "Video VAEs only; unused for SDXL.", default=8, min=4, max=4096, step=4),
    )


@node(NodeSchema(
    id="VAEDecodeTiled",
    display_name="VAE Decode (Tiled)",
    category="_for_testing",
    description="Latent → image in overlapping tiles (bounded memory for large images).",
    inputs=(Socket("samples", "LATENT", "The latent to decode."), _vae(), *_tile_inputs(32)),
    outputs=IMAGE_OUT,
))
class VAEDecodeTiled:
    def run(self, samples, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        if tile_size < overlap * 4:
            overlap = tile_size // 4  # as ComfyUI's node
        model = vae.load()
        z = samples["samples"].to(next(model.parameters()).device)
        with torch.inference_mode():
            pixels = decode_tiled_3(model, z, tile=tile_size // 8, overlap=overlap // 8)
        return (((pixels.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous(),)


@node(NodeSchema(
    id="VAEEncodeTiled",
    display_name="VAE Encode (Tiled)",
    category="_for_testing",
    description="Image → latent in overlapping tiles (bounded memory for large images).",
    inputs=(Socket("pixels", "IMAGE", "The image batch to encode."), _vae(), *_tile_inputs(64)),
    outputs=LATENT_OUT,
))
class VAEEncodeTiled:
    def run(self, pixels, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        b, h, w, _c = pixels.shape
        y0, x0 = (h % 8) // 2, (w % 8) // 2
        pixels = pixels[:, y0: y0 + h // 8 * 8, x0: x0 + w // 8 * 8, :3]
        model = vae.load()
        x = pixels.permute(0, 3, 1, 2).to(next(model.parameters()).device) * 2 - 1
        if overlap >= tile_size // 2:
            raise NodeInputError(f"overlap {overlap} must be smaller than half of tile_size {tile_size} (one of the "
                                 "three tilings uses tiles half as high); lower the overlap or raise the tile size")
        with torch.inference_mode():
            z = encode_tiled_3(model, x, tile=tile_size, overlap=overlap)
        return ({"samples": z.float().cpu()},)


@node(NodeSchema(
    id="VAEEncodeForInpaint",
    display_name="VAE Encode (for Inpainting)",
    category="latent/inpaint",
    description="Encodes an image for inpainting: the masked pixels are set to grey before encoding and the "
                "mask, grown by grow_mask_by pixels, becomes the latent's noise mask.",
    inputs=(
        Socket("pixels", "IMAGE", "The image to inpaint."), _vae(),
        Socket("mask", "MASK", "1 = repaint, 0 = keep."),
        Int("grow_mask_by", "Grow the noise mask by this many pixels for seamless edges.", default=6, min=0,
            max=64, step=1),
    ),
    outputs=LATENT_OUT,
))
class VAEEncodeForInpaint:
    def run(self, pixels, vae, mask, grow_mask_by):
        h8, w8 = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        if h8 < 8 or w8 < 8:
            raise NodeInputError(f"image is {pixels.shape[2]}×{pixels.shape[1]}; the VAE needs at least 8×8 pixels")
        m = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
                                            size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        pixels = pixels.clone()
        if (pixels.shape[1], pixels.shape[2]) != (h8, w8):
            dy, dx = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
            pixels = pixels[:, dy:dy + h8, dx:dx + w8, :]
            m = m[:, :, dy:dy + h8, dx:dx + w8]
        if grow_mask_by == 0:
            grown = m
        else:
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            grown = torch.clamp(torch.nn.functional.conv2d(m.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)),
                                0, 1)
        keep = (1.0 - m.round()).squeeze(1)
        for channel in range(3):  # masked pixels → 0.5 grey, so the VAE sees nothing of what is repainted
            pixels[:, :, :, channel] -= 0.5
            pixels[:, :, :, channel] *= keep
            pixels[:, :, :, channel] += 0.5
        (latent,) = ours.VAEEncode().run(vae, pixels)
        latent["noise_mask"] = grown[:, :, :h8, :w8].round()
        return (latent,)


def _image_methods():
    return Combo("upscale_method", "How new pixels are computed.", list(IMAGE_METHODS))


@node(NodeSchema(
    id="ImageScale",
    display_name="Upscale Image",
    category="image/upscaling",
    description="Resizes images to width×height; a side of 0 keeps the aspect ratio, both 0 leave them as they are.",
    inputs=(
        Socket("image", "IMAGE", "The images."), _image_methods(),
        Int("width", "Target width (0 = from height).", default=512, min=0, max=MAX_RESOLUTION, step=1),
        Int("height", "Target height (0 = from width).", default=512, min=0, max=MAX_RESOLUTION, step=1),
        Combo("crop", "center: cut to the new aspect ratio first; disabled: stretch.", list(CROP_METHODS)),
    ),
    outputs=IMAGE_OUT,
))
class ImageScale:
    def run(self, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (image,)
        x = image.movedim(-1, 1)
        if width == 0:
            width = max(1, round(x.shape[3] * height / x.shape[2]))
        elif height == 0:
            height = max(1, round(x.shape[2] * width / x.shape[3]))
        return (resize(x, width, height, upscale_method, crop).movedim(1, -1),)


@node(NodeSchema(
    id="ImageScaleBy",
    display_name="Upscale Image By",
    category="image/upscaling",
    description="Resizes images by a factor (each side rounded).",
    inputs=(Socket("image", "IMAGE", "The images."), _image_methods(),
            Float("scale_by", "The factor.", default=1.0, min=0.01, max=8.0, step=0.01)),
    outputs=IMAGE_OUT,
))
class ImageScaleBy:
    def run(self, image, upscale_method, scale_by):
        x = image.movedim(-1, 1)
        return (resize(x, round(x.shape[3] * scale_by), round(x.shape[2] * scale_by), upscale_method).movedim(1, -1),)


def _open(name: str) -> tuple[Image.Image, str]:
    path = current().input_image_path(name)
    try:
        im = Image.open(path)
        im.load()
    except OSError as e:
        raise NodeInputError(f"cannot read image {path}: {e}") from e
    return im, str(path)


def _file_hash(name: str) -> str:
    return hashlib.sha256(current().input_image_path(name).read_bytes()).hexdigest()


def _validate_image(name: str):
    try:
        current().input_image_path(name)
    except NodeInputError as e:
        return str(e)
    return True


def _images():
    return current().input_images()


@node(NodeSchema(
    id="LoadImage",
    display_name="Load Image",
    category="image",
    description="Loads an image from the input folder: the RGB pixels and a mask from its alpha channel "
                "(1 where transparent). Every frame of the same size of an animated file becomes a batch item.",
    inputs=(Combo("image", "An image file in the input folder.", _images, image_upload=True),),
    outputs=(Output("IMAGE", "IMAGE", "The image, [B, H, W, 3] in 0..1."),
             Output("MASK", "MASK", "1 − alpha, [B, H, W] (64×64 zeros when the image has no alpha).")),
))
class LoadImage:
    @classmethod
    def IS_CHANGED(cls, image):  # noqa: N802 - ComfyUI's name
        return _file_hash(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image):  # noqa: N802
        return _validate_image(image)

    def run(self, image):
        im, path = _open(image)
        images, masks, size = [], [], None
        try:
            for frame in ImageSequence.Iterator(im):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode == "I":
                    frame = frame.point(lambda v: v * (1 / 255))
                rgb = frame.convert("RGB")
                size = size or rgb.size
                if rgb.size != size:
                    continue
                images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None])
                if "A" in frame.getbands():
                    alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
                    mask = 1.0 - torch.from_numpy(alpha)
                elif frame.mode == "P" and "transparency" in frame.info:
                    alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
                    mask = 1.0 - torch.from_numpy(alpha)
                else:
                    mask = torch.zeros((64, 64), dtype=torch.float32)
                masks.append(mask[None])
                if im.format == "MPO":
                    break
        except OSError as e:
            raise NodeInputError(f"cannot read image {path}: {e}") from e
        if len(images) == 1:
            return (images[0], masks[0])
        return (torch.cat(images), torch.cat(masks))


@node(NodeSchema(
    id="LoadImageMask",
    display_name="Load Image (as Mask)",
    category="mask",
    description="Loads one channel of an image from the input folder as a mask (alpha is inverted: 1 where "
                "transparent). A missing channel gives a 64×64 zero mask.",
    inputs=(Combo("image", "An image file in the input folder.", _images, image_upload=True),
            Combo("channel", "Which channel becomes the mask.", ["alpha", "red", "green", "blue"])),
    outputs=(Output("MASK", "MASK", "The mask, [1, H, W] in 0..1."),),
))
class LoadImageMask:
    @classmethod
    def IS_CHANGED(cls, image, channel):  # noqa: N802
        return _file_hash(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image):  # noqa: N802
        return _validate_image(image)

    def run(self, image, channel):
        im, _path = _open(image)
        im = ImageOps.exif_transpose(im)
        if im.getbands() != ("R", "G", "B", "A"):
            if im.mode == "I":
                im = im.point(lambda v: v * (1 / 255))
            im = im.convert("RGBA")
        band = channel[0].upper()
        if band in im.getbands():
            mask = torch.from_numpy(np.asarray(im.getchannel(band), dtype=np.float32) / 255.0)
            if band == "A":
                mask = 1.0 - mask
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        return (mask[None],)


@node(NodeSchema(
    id="SaveImage",
    display_name="Save Image",
    category="image",
    description="Saves images as PNG in the output folder with the workflow embedded (the SDXL Save Image code).",
    inputs=(Socket("images", "IMAGE", "The images to save."),
            String("filename_prefix", "File name prefix; may include subfolders and %width%-style variables.",
                   default="ComfyUI")),
    output_node=True,
    hidden=ours.SAVE_HIDDEN,
))
class SaveImage:
    def run(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        return ours.SaveImage().run(images, filename_prefix, prompt=prompt, extra_pnginfo=extra_pnginfo)


@node(NodeSchema(
    id="PreviewImage",
    display_name="Preview Image",
    category="image",
    description="Shows images on the node without keeping them (temp folder).",
    inputs=(Socket("images", "IMAGE", "The images to preview."),),
    output_node=True,
    hidden=ours.SAVE_HIDDEN,
))
class PreviewImage:
    def run(self, images, prompt=None, extra_pnginfo=None):
        return ours.PreviewImage().run(images, prompt=prompt, extra_pnginfo=extra_pnginfo)


NODES = (VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, VAEEncodeForInpaint, ImageScale, ImageScaleBy,
         LoadImage, LoadImageMask, SaveImage, PreviewImage)
