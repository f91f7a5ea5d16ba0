"""Regenerate the shipped workflows (workflows/*.json, the editor's UI format).

Each workflow is described once below as nodes (widget values by name), links (by socket name) and
columns; this script lays it out as the ComfyUI frontend saves it (widgets_values in widget order, with
the seed's control_after_generate companion and the image upload companion), sized and placed so it opens
readable and overlap-free in the editor at 1400×900.

It writes no expected API prompts: those (tests/data/<name>.api.json) are captured from the real frontend
by tests/test_browser_e2e.py, so they are independent of these tables and of our converter.

    python tools/make_workflows.py
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from sdxl_nodes.runtime.nodeinfo import object_info
from sdxl_nodes.runtime.workflow import widget_layout

ROOT = Path(__file__).resolve().parents[1]
INFO = object_info(NODE_CLASS_MAPPINGS, "custom_nodes.sdxl-nodes", display_names=NODE_DISPLAY_NAME_MAPPINGS)

POSITIVE = "evening sunset scenery blue sky nature, glass bottle with a galaxy in it"
NEGATIVE = "text, watermark"
SEED = 721897303308196  # the official ComfyUI SDXL example's seed


def base_loader(i):
    return (i, "SDXLCheckpointLoader", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, "Load SDXL base")


def refiner_loader(i):
    return (i, "SDXLCheckpointLoader", {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}, "Load SDXL refiner")


def encode(i, text, title):
    return (i, "SDXLDualCLIPEncode", {"text_g": text, "text_l": text}, title)


def sizecrop(i, title):
    return (i, "SDXLSizeCropConditioning", {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                                                     "target_width": 1024, "target_height": 1024}, title)


def refcond(i, ascore, title):
    return (i, "SDXLRefinerConditioning", {"ascore": ascore, "width": 1024, "height": 1024}, title)


def note(i, text):
    return (i, "Note", {"text": text}, "About this workflow")


BASE_TEXT_NODES = [encode(2, POSITIVE, "Positive prompt (base)"),
                   encode(3, NEGATIVE, "Negative prompt (base)"),
                   sizecrop(4, "Positive size/crop"), sizecrop(5, "Negative size/crop")]
BASE_TEXT_LINKS = [(1, "clip", 2, "clip"), (1, "clip", 3, "clip"), (2, "text", 4, "text"), (3, "text", 5, "text")]
REFINER_TEXT_NODES = [encode(11, POSITIVE, "Positive prompt (refiner)"),
                      encode(12, NEGATIVE, "Negative prompt (refiner)"),
                      refcond(13, 6.0, "Positive aesthetic (refiner)"),
                      refcond(14, 2.5, "Negative aesthetic (refiner)")]
REFINER_TEXT_LINKS = [(10, "clip", 11, "clip"), (10, "clip", 12, "clip"), (11, "text", 13, "text"),
                      (12, "text", 14, "text")]

WORKFLOWS = {
    "sdxl_base": dict(
        title='SDXL base: text to image', description='The SDXL 1.0 base model alone: a prompt to a 1024×1024 image in 25 euler steps (cfg 8).',
        columns=[[1, 20], [2, 3], [4, 5, 6], [7], [8, 9]],
        nodes=[base_loader(1), *BASE_TEXT_NODES,
               (6, "SDXLEmptyLatent", {"width": 1024, "height": 1024, "batch_size": 1}, None),
               (7, "SDXLBaseSampler", {"seed": SEED, "steps": 25, "cfg": 8.0, "sampler_name": "euler",
                                                     "scheduler": "normal", "denoise_end": 1.0}, None),
               (8, "SDXLVAEDecode", {}, None),
               (9, "SDXLSaveImage", {"filename_prefix": "sdxl_base"}, None),
               note(20, "SDXL base text-to-image.\n\nPut sd_xl_base_1.0.safetensors in the checkpoints "
                    "folder. The prompt goes to both text encoders (text_g → bigG, text_l → CLIP-L); size/crop "
                    "conditioning 1024/0/1024 gives centred, uncropped images. 25 steps, cfg 8, euler/normal.")],
        links=[*BASE_TEXT_LINKS, (1, "model", 7, "model"), (4, "conditioning", 7, "positive"),
               (5, "conditioning", 7, "negative"), (6, "LATENT", 7, "latent"), (7, "LATENT", 8, "samples"),
               (1, "vae", 8, "vae"), (8, "IMAGE", 9, "images")],
    ),
    "sdxl_base_refiner": dict(
        title='SDXL base + refiner', description='The official two-stage SDXL 1.0 pipeline: the base runs the first 80 % of the steps and the refiner finishes the still-noisy latent.',
        columns=[[1, 10, 20], [2, 3, 11, 12], [4, 5, 13, 14, 6], [7, 15], [8, 9]],
        nodes=[base_loader(1), *BASE_TEXT_NODES,
               (6, "SDXLEmptyLatent", {"width": 1024, "height": 1024, "batch_size": 1}, None),
               (7, "SDXLBaseSampler", {"seed": SEED, "steps": 25, "cfg": 8.0, "sampler_name": "euler",
                                                     "scheduler": "normal", "denoise_end": 0.8}, "Base: steps 0–20"),
               refiner_loader(10), *REFINER_TEXT_NODES,
               (15, "SDXLNoiseAndRefine", {"seed": 0, "cfg": 8.0, "sampler_name": "euler",
                                                         "mode": "continue", "steps": 25, "scheduler": "normal",
                                                         "strength": 0.3, "continue_from_step": 0}, "Refiner: steps 20–25"),
               (8, "SDXLVAEDecode", {}, None),
               (9, "SDXLSaveImage", {"filename_prefix": "sdxl_refined"}, None),
               note(20, "SDXL base + refiner, the official split (ComfyUI's KSamplerAdvanced pair).\n\n"
                    "The base runs the first 80 % of a 25-step schedule (denoise_end 0.8) and hands its still-noisy "
                    "latent to the refiner, which finishes steps 20–25 without adding noise ('continue'). The "
                    "refiner has its own prompt encoders (bigG only) and aesthetic scores: 6.0 positive, 2.5 "
                    "negative. Decoding uses the refiner's VAE.")],
        links=[*BASE_TEXT_LINKS, (1, "model", 7, "model"), (4, "conditioning", 7, "positive"),
               (5, "conditioning", 7, "negative"), (6, "LATENT", 7, "latent"), *REFINER_TEXT_LINKS,
               (10, "model", 15, "model"), (13, "conditioning", 15, "positive"), (14, "conditioning", 15, "negative"),
               (7, "LATENT", 15, "latent"), (15, "LATENT", 8, "samples"), (10, "vae", 8, "vae"),
               (8, "IMAGE", 9, "images")],
    ),
    "sdxl_refine_image": dict(
        title='SDXL refine an image', description='Sharpen an existing image with the SDXL refiner: light noise (strength 0.3), then denoise.',
        columns=[[1, 10, 20], [11, 12, 2], [13, 14], [15, 8], [9]],
        nodes=[(1, "SDXLLoadImage", {"image": "example.png", "upload": "image"}, None),
               refiner_loader(10), *REFINER_TEXT_NODES,
               (2, "SDXLVAEEncode", {}, None),
               (15, "SDXLNoiseAndRefine", {"seed": 42, "cfg": 8.0, "sampler_name": "euler",
                                                         "mode": "renoise", "steps": 20, "scheduler": "normal",
                                                         "strength": 0.3, "continue_from_step": 0}, "Refine: renoise 30 %"),
               (8, "SDXLVAEDecode", {}, None),
               (9, "SDXLSaveImage", {"filename_prefix": "sdxl_refined_image"}, None),
               note(20, "Refine an existing image with the SDXL refiner (SDEdit).\n\nLoad an image (upload "
                    "one with the button), encode it with the VAE, add seeded noise at 'strength' (0.3 keeps the "
                    "composition and sharpens detail) and denoise it with the refiner.")],
        links=[*REFINER_TEXT_LINKS, (1, "IMAGE", 2, "pixels"), (10, "vae", 2, "vae"), (10, "model", 15, "model"),
               (13, "conditioning", 15, "positive"), (14, "conditioning", 15, "negative"),
               (2, "LATENT", 15, "latent"), (15, "LATENT", 8, "samples"), (10, "vae", 8, "vae"),
               (8, "IMAGE", 9, "images")],
    ),
    "sdxl_img2img": dict(
        title='SDXL image to image', description='Redraw an uploaded image with the SDXL base and a prompt; strength 0.6 sets how much changes.',
        columns=[[1, 10, 20], [11, 12, 2], [13, 14], [15, 8], [9, 16]],
        nodes=[base_loader(10), (1, "SDXLLoadImage", {"image": "example.png", "upload": "image"},
                                          None),
               encode(11, POSITIVE, "Positive prompt"), encode(12, NEGATIVE, "Negative prompt"),
               sizecrop(13, "Positive size/crop"), sizecrop(14, "Negative size/crop"),
               (2, "SDXLVAEEncode", {}, None),
               (15, "SDXLNoiseAndRefine", {"seed": 7, "cfg": 7.0, "sampler_name": "dpmpp_2m",
                                                         "mode": "renoise", "steps": 25, "scheduler": "karras",
                                                         "strength": 0.6, "continue_from_step": 0}, "img2img: renoise 60 %"),
               (8, "SDXLVAEDecode", {}, None),
               (9, "SDXLPreviewImage", {}, None),
               (16, "SDXLSaveImage", {"filename_prefix": "sdxl_img2img"}, None),
               note(20, "Image-to-image with the SDXL base.\n\nThe loaded image is encoded, noised to 60 % "
                    "(strength) and redrawn by the base model following the prompt (dpmpp_2m, karras). Lower "
                    "strength keeps more of the original.")],
        links=[(10, "clip", 11, "clip"), (10, "clip", 12, "clip"), (11, "text", 13, "text"), (12, "text", 14, "text"),
               (1, "IMAGE", 2, "pixels"), (10, "vae", 2, "vae"), (10, "model", 15, "model"),
               (13, "conditioning", 15, "positive"), (14, "conditioning", 15, "negative"),
               (2, "LATENT", 15, "latent"), (15, "LATENT", 8, "samples"), (10, "vae", 8, "vae"),
               (8, "IMAGE", 9, "images"), (8, "IMAGE", 16, "images")],
    ),
}

# Node sizes [width, height of the body below the title bar]. Each height is at least what the frontend
# (comfyui-frontend-package 1.58) computes for the node's widgets with LGraphNode.computeSize(): loader 98,
# dual encode 142, size/crop 178, refiner conditioning and empty latent 106, base sampler 262, noise & refine
# 286, VAE decode/encode 46, save 58. A node that shows an image grows by the frontend's preview widget (220):
# Load Image once an image is chosen or uploaded, the samplers with their live previews, the save and preview
# nodes with their results; their sizes include it so no node grows over a neighbour after an upload or a run.
# tests/test_browser_e2e.py checks these against the real frontend (no overlap, nothing grows).
SIZES = {"SDXLCheckpointLoader": (280, 100), "SDXLDualCLIPEncode": (340, 180), "SDXLSizeCropConditioning": (280, 180),
         "SDXLRefinerConditioning": (280, 110), "SDXLEmptyLatent": (280, 110), "SDXLBaseSampler": (280, 490),
         "SDXLNoiseAndRefine": (280, 510), "SDXLVAEDecode": (280, 50), "SDXLVAEEncode": (280, 50),
         "SDXLSaveImage": (280, 280), "SDXLPreviewImage": (280, 260), "SDXLLoadImage": (280, 310), "Note": (280, 230)}
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above node.pos
GAP = 30  # between nodes, vertically; COLUMN_GAP between columns
COLUMN_GAP = 40

# The view a workflow opens with, for the editor at 1400×900: the frontend draws nodes as blank boxes below
# its low-quality zoom threshold (LGraphCanvas: min font size for LOD 8 px / NODE_TEXT_SIZE 14 = 0.571 at
# device pixel ratio 1), so open at 0.7. The graph starts right of the sidebar (56 px) and below the tab and
# run bars (~90 px), and must stay clear of the minimap (bottom right, x >= 1139, y >= 638 at 1400×900).
VIEW_SCALE = 0.7
VIEW_ORIGIN = (72, 104)  # screen position of the graph's top-left corner
SCREEN, MINIMAP = (1400, 900), (1139, 638)


def layout(spec: dict) -> dict[int, tuple[list[int], list[int]]]:
    """{node id: (pos, size)}: columns left to right, each stacked top to bottom, none overlapping."""
    types = {n[0]: n[1] for n in spec["nodes"]}
    placed, x = {}, 0
    for column in spec["columns"]:
        width, y = max(SIZES[types[i]][0] for i in column), 0
        for i in column:
            w, h = SIZES[types[i]]
            placed[i] = ([x, y + TITLE_HEIGHT], [width, h])
            y += TITLE_HEIGHT + h + GAP
        x += width + COLUMN_GAP
    assert sorted(placed) == sorted(types), "every node is in exactly one column"
    for i, ((px, py), (w, h)) in placed.items():  # on screen at VIEW_SCALE, clear of the minimap
        left, top = VIEW_ORIGIN[0] + px * VIEW_SCALE, VIEW_ORIGIN[1] + (py - TITLE_HEIGHT) * VIEW_SCALE
        right, bottom = left + w * VIEW_SCALE, top + (h + TITLE_HEIGHT) * VIEW_SCALE
        if right > SCREEN[0] - 8 or bottom > SCREEN[1] - 16 or (right > MINIMAP[0] and bottom > MINIMAP[1]):
            raise SystemExit(f"node {i} does not fit the 1400×900 view: {left:.0f},{top:.0f}–{right:.0f},{bottom:.0f}")
    return placed


def build(name: str, spec: dict) -> dict:
    nodes = {n[0]: n for n in spec["nodes"]}
    ui_nodes, links = [], []
    out_links: dict[tuple[int, str], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for link_id, (src, src_out, dst, dst_in) in enumerate(spec["links"], start=1):
        src_type = INFO[nodes[src][1]]
        slot = src_type["output_name"].index(src_out)
        dst_def = INFO[nodes[dst][1]]
        dst_sockets = [n for n, (t, _o) in _sockets(dst_def)]
        links.append([link_id, src, slot, dst, dst_sockets.index(dst_in), src_type["output"][slot]])
        out_links.setdefault((src, src_out), []).append(link_id)
        in_links[(dst, dst_in)] = link_id
    order = 0
    placed = layout(spec)
    for node_id, type_, values, title in spec["nodes"]:
        pos, size = placed[node_id]
        entry = {"id": node_id, "type": type_, "pos": pos, "size": size, "flags": {}, "order": order, "mode": 0}
        order += 1
        if type_ == "Note":
            entry.update(inputs=[], outputs=[], properties={}, widgets_values=[values["text"]],
                         color="#432", bgcolor="#653")
            entry["title"] = title
            ui_nodes.append(entry)
            continue
        d = INFO[type_]
        entry["inputs"] = [{"name": n, "type": t, "link": in_links.get((node_id, n))} for n, (t, _o) in _sockets(d)]
        entry["outputs"] = [{"name": on, "type": ot, "links": out_links.get((node_id, on), [])}
                            for on, ot in zip(d["output_name"], d["output"])]
        if title:
            entry["title"] = title
        entry["properties"] = {"Node name for S&R": type_, "cnr_id": "sdxl-nodes"}
        widgets = []
        for wname, _companion in widget_layout(d):
            if wname == "control_after_generate":
                widgets.append("fixed")
            else:
                widgets.append(values[wname])
        entry["widgets_values"] = widgets
        ui_nodes.append(entry)
    workflow = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdxl-nodes/{name}")),
        "revision": 0,
        "last_node_id": max(nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": VIEW_SCALE, "offset": [round(VIEW_ORIGIN[0] / VIEW_SCALE, 2),
                                                          round(VIEW_ORIGIN[1] / VIEW_SCALE, 2)]},
                  # the Templates dialog's card text (served by `sdxl-nodes serve` in /templates/index.json)
                  "sdxl_nodes": {"title": spec["title"], "description": spec["description"]}},
        "version": 0.4,
    }
    return workflow


def _sockets(node_def: dict):
    """Non-widget inputs in the frontend's order (these are the node's input slots)."""
    widget_names = {n for n, _c in widget_layout(node_def)}
    order = node_def.get("input_order", {})
    for cat in ("required", "optional"):
        for n in order.get(cat, []):
            spec = node_def["input"][cat][n]
            if n not in widget_names:
                yield n, (spec[0], spec[1] if len(spec) > 1 else {})


def main() -> None:
    for name, spec in WORKFLOWS.items():
        workflow = build(name, spec)
        (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        print(f"wrote workflows/{name}.json")


if __name__ == "__main__":
    main()
