"""Regenerate the shipped workflows (workflows/*.json, the editor's UI format) and their expected API prompts.

Each workflow is described once below as nodes (widget values by name) and links (by socket name);
this script lays it out as the ComfyUI frontend saves it (widgets_values in widget order, with the
seed's control_after_generate companion and the image upload companion) and writes the API prompt the
frontend would queue, derived straight from the description (tests/data/<name>.api.json), which the
tests compare against our UI → API converter.

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


def base_loader(i, x, y):
    return (i, "SDXLCheckpointLoader", (x, y), {"ckpt_name": "sd_xl_base_1.0.safetensors"}, "Load SDXL base")


def refiner_loader(i, x, y):
    return (i, "SDXLCheckpointLoader", (x, y), {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}, "Load SDXL refiner")


def encode(i, x, y, text, title):
    return (i, "SDXLDualCLIPEncode", (x, y), {"text_g": text, "text_l": text}, title)


def sizecrop(i, x, y, title):
    return (i, "SDXLSizeCropConditioning", (x, y), {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                                                     "target_width": 1024, "target_height": 1024}, title)


def refcond(i, x, y, ascore, title):
    return (i, "SDXLRefinerConditioning", (x, y), {"ascore": ascore, "width": 1024, "height": 1024}, title)


def note(i, x, y, text):
    return (i, "Note", (x, y), {"text": text}, "About this workflow")


BASE_TEXT_NODES = [encode(2, 420, 40, POSITIVE, "Positive prompt (base)"),
                   encode(3, 420, 420, NEGATIVE, "Negative prompt (base)"),
                   sizecrop(4, 860, 40, "Positive size/crop"), sizecrop(5, 860, 360, "Negative size/crop")]
BASE_TEXT_LINKS = [(1, "clip", 2, "clip"), (1, "clip", 3, "clip"), (2, "text", 4, "text"), (3, "text", 5, "text")]
REFINER_TEXT_NODES = [encode(11, 420, 900, POSITIVE, "Positive prompt (refiner)"),
                      encode(12, 420, 1280, NEGATIVE, "Negative prompt (refiner)"),
                      refcond(13, 860, 900, 6.0, "Positive aesthetic (refiner)"),
                      refcond(14, 860, 1100, 2.5, "Negative aesthetic (refiner)")]
REFINER_TEXT_LINKS = [(10, "clip", 11, "clip"), (10, "clip", 12, "clip"), (11, "text", 13, "text"),
                      (12, "text", 14, "text")]

WORKFLOWS = {
    "sdxl_base": dict(
        nodes=[base_loader(1, 40, 120), *BASE_TEXT_NODES,
               (6, "SDXLEmptyLatent", (860, 680), {"width": 1024, "height": 1024, "batch_size": 1}, None),
               (7, "SDXLBaseSampler", (1280, 120), {"seed": SEED, "steps": 25, "cfg": 8.0, "sampler_name": "euler",
                                                     "scheduler": "normal", "denoise_end": 1.0}, None),
               (8, "SDXLVAEDecode", (1700, 120), {}, None),
               (9, "SDXLSaveImage", (1940, 120), {"filename_prefix": "sdxl_base"}, None),
               note(20, 40, 420, "SDXL base text-to-image.\n\nPut sd_xl_base_1.0.safetensors in the checkpoints "
                    "folder. The prompt goes to both text encoders (text_g → bigG, text_l → CLIP-L); size/crop "
                    "conditioning 1024/0/1024 gives centred, uncropped images. 25 steps, cfg 8, euler/normal.")],
        links=[*BASE_TEXT_LINKS, (1, "model", 7, "model"), (4, "conditioning", 7, "positive"),
               (5, "conditioning", 7, "negative"), (6, "LATENT", 7, "latent"), (7, "LATENT", 8, "samples"),
               (1, "vae", 8, "vae"), (8, "IMAGE", 9, "images")],
    ),
    "sdxl_base_refiner": dict(
        nodes=[base_loader(1, 40, 120), *BASE_TEXT_NODES,
               (6, "SDXLEmptyLatent", (860, 680), {"width": 1024, "height": 1024, "batch_size": 1}, None),
               (7, "SDXLBaseSampler", (1280, 120), {"seed": SEED, "steps": 25, "cfg": 8.0, "sampler_name": "euler",
                                                     "scheduler": "normal", "denoise_end": 0.8}, "Base: steps 0–20"),
               refiner_loader(10, 40, 1000), *REFINER_TEXT_NODES,
               (15, "SDXLNoiseAndRefine", (1280, 900), {"seed": 0, "cfg": 8.0, "sampler_name": "euler",
                                                         "mode": "continue", "steps": 25, "scheduler": "normal",
                                                         "strength": 0.3, "continue_from_step": 0}, "Refiner: steps 20–25"),
               (8, "SDXLVAEDecode", (1700, 900), {}, None),
               (9, "SDXLSaveImage", (1940, 900), {"filename_prefix": "sdxl_refined"}, None),
               note(20, 40, 420, "SDXL base + refiner, the official split (ComfyUI's KSamplerAdvanced pair).\n\n"
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
        nodes=[(1, "SDXLLoadImage", (40, 120), {"image": "example.png", "upload": "image"}, None),
               refiner_loader(10, 40, 1000), *REFINER_TEXT_NODES,
               (2, "SDXLVAEEncode", (420, 120), {}, None),
               (15, "SDXLNoiseAndRefine", (1280, 900), {"seed": 42, "cfg": 8.0, "sampler_name": "euler",
                                                         "mode": "renoise", "steps": 20, "scheduler": "normal",
                                                         "strength": 0.3, "continue_from_step": 0}, "Refine: renoise 30 %"),
               (8, "SDXLVAEDecode", (1700, 900), {}, None),
               (9, "SDXLSaveImage", (1940, 900), {"filename_prefix": "sdxl_refined_image"}, None),
               note(20, 40, 420, "Refine an existing image with the SDXL refiner (SDEdit).\n\nLoad an image (upload "
                    "one with the button), encode it with the VAE, add seeded noise at 'strength' (0.3 keeps the "
                    "composition and sharpens detail) and denoise it with the refiner.")],
        links=[*REFINER_TEXT_LINKS, (1, "IMAGE", 2, "pixels"), (10, "vae", 2, "vae"), (10, "model", 15, "model"),
               (13, "conditioning", 15, "positive"), (14, "conditioning", 15, "negative"),
               (2, "LATENT", 15, "latent"), (15, "LATENT", 8, "samples"), (10, "vae", 8, "vae"),
               (8, "IMAGE", 9, "images")],
    ),
    "sdxl_img2img": dict(
        nodes=[base_loader(10, 40, 1000), (1, "SDXLLoadImage", (40, 120), {"image": "example.png", "upload": "image"},
                                          None),
               encode(11, 420, 900, POSITIVE, "Positive prompt"), encode(12, 420, 1280, NEGATIVE, "Negative prompt"),
               sizecrop(13, 860, 900, "Positive size/crop"), sizecrop(14, 860, 1220, "Negative size/crop"),
               (2, "SDXLVAEEncode", (420, 120), {}, None),
               (15, "SDXLNoiseAndRefine", (1280, 900), {"seed": 7, "cfg": 7.0, "sampler_name": "dpmpp_2m",
                                                         "mode": "renoise", "steps": 25, "scheduler": "karras",
                                                         "strength": 0.6, "continue_from_step": 0}, "img2img: renoise 60 %"),
               (8, "SDXLVAEDecode", (1700, 900), {}, None),
               (9, "SDXLPreviewImage", (1940, 400), {}, None),
               (16, "SDXLSaveImage", (1940, 900), {"filename_prefix": "sdxl_img2img"}, None),
               note(20, 40, 420, "Image-to-image with the SDXL base.\n\nThe loaded image is encoded, noised to 60 % "
                    "(strength) and redrawn by the base model following the prompt (dpmpp_2m, karras). Lower "
                    "strength keeps more of the original.")],
        links=[(10, "clip", 11, "clip"), (10, "clip", 12, "clip"), (11, "text", 13, "text"), (12, "text", 14, "text"),
               (1, "IMAGE", 2, "pixels"), (10, "vae", 2, "vae"), (10, "model", 15, "model"),
               (13, "conditioning", 15, "positive"), (14, "conditioning", 15, "negative"),
               (2, "LATENT", 15, "latent"), (15, "LATENT", 8, "samples"), (10, "vae", 8, "vae"),
               (8, "IMAGE", 9, "images"), (8, "IMAGE", 16, "images")],
    ),
}

SIZES = {"SDXLDualCLIPEncode": (400, 340), "SDXLSizeCropConditioning": (320, 280), "Note": (340, 220)}


def build(name: str, spec: dict) -> tuple[dict, dict]:
    nodes = {n[0]: n for n in spec["nodes"]}
    ui_nodes, links, api = [], [], {}
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
    for node_id, type_, pos, values, title in spec["nodes"]:
        entry = {"id": node_id, "type": type_, "pos": list(pos), "size": list(SIZES.get(type_, (320, 180))),
                 "flags": {}, "order": order, "mode": 0}
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
        inputs = {k: v for k, v in values.items() if k != "upload"}
        for (dst, dst_in), link_id in in_links.items():
            if dst == node_id:
                src = next(lk for lk in links if lk[0] == link_id)
                inputs[dst_in] = [str(src[1]), src[2]]
        api[str(node_id)] = {"inputs": inputs, "class_type": type_,
                             "_meta": {"title": title or d["display_name"], "cnr_id": "sdxl-nodes"}}
    workflow = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdxl-nodes/{name}")),
        "revision": 0,
        "last_node_id": max(nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}},
        "version": 0.4,
    }
    api = {k: api[k] for k in sorted(api, key=int)}
    return workflow, api


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
        workflow, api = build(name, spec)
        (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        (ROOT / "tests" / "data" / f"{name}.api.json").write_text(json.dumps(api, indent=1) + "\n")
        print(f"wrote workflows/{name}.json and tests/data/{name}.api.json")


if __name__ == "__main__":
    main()
