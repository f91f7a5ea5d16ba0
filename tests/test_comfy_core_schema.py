"""The core-compatible nodes declare exactly what ComfyUI v0.8.0's own nodes declare.

The reference is ComfyUI's recorded ``/object_info`` (``tests/data/object_info_core_v0.8.0.json``,
copied entry for entry from a ComfyUI v0.8.0 server), never our own declarations. Tooltips and
descriptions are ours (not compared); everything the editor and a saved workflow depend on is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS
from sdxl_nodes.nodes.comfy_core import CORE_NODE_CLASS_MAPPINGS, CORE_NODE_DISPLAY_NAME_MAPPINGS
from sdxl_nodes.runtime.cli import node_pack
from sdxl_nodes.runtime.nodeinfo import object_info

RECORDED = json.loads((Path(__file__).parent / "data" / "object_info_core_v0.8.0.json").read_text())
# the ids issue 12 asks for; VAELoader comes with the LoRA/VAE loader module
REQUIRED = """CheckpointLoaderSimple CLIPTextEncode CLIPTextEncodeSDXL CLIPTextEncodeSDXLRefiner CLIPSetLastLayer
ConditioningCombine ConditioningConcat ConditioningAverage ConditioningZeroOut ConditioningSetTimestepRange
EmptyLatentImage KSampler KSamplerAdvanced VAEDecode VAEEncode VAEDecodeTiled VAEEncodeTiled VAEEncodeForInpaint
SetLatentNoiseMask LatentUpscale LatentUpscaleBy RepeatLatentBatch LatentFromBatch ImageScale ImageScaleBy LoadImage
LoadImageMask SaveImage PreviewImage SaveLatent LoadLatent""".split()
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("LoadImageMask", "image"),
               ("LoadLatent", "latent"), ("LoraLoader", "lora_name"), ("LoraLoaderModelOnly", "lora_name"),
               # ComfyUI also offers "pixel_space" (for pixel-space models, none of them SDXL) beside the files
               ("VAELoader", "vae_name")}


@pytest.fixture(scope="module")
def ours():
    classes, names = node_pack(standalone=True)
    return object_info(classes, "custom_nodes.sdxl-nodes", display_names=names)


def test_every_required_core_node_is_there():
    assert set(REQUIRED) <= set(CORE_NODE_CLASS_MAPPINGS), sorted(set(REQUIRED) - set(CORE_NODE_CLASS_MAPPINGS))
    assert set(CORE_NODE_CLASS_MAPPINGS) <= set(RECORDED)


def _without_tooltip(options: dict) -> dict:
    return {k: v for k, v in options.items() if k != "tooltip"}


@pytest.mark.parametrize("node_id", sorted(CORE_NODE_CLASS_MAPPINGS))
def test_schema_matches_comfyui(ours, node_id):
    want, got = RECORDED[node_id], ours[node_id]
    assert got["category"] == want["category"]
    assert got["display_name"] == (want["display_name"] or node_id)
    assert got["python_module"] == want["python_module"]  # "nodes" / "comfy_extras…": no pack badge
    for key in ("output", "output_name", "output_is_list", "output_node"):
        assert got[key] == want[key], key
    for section in ("required", "optional"):
        assert got["input_order"].get(section, []) == want["input_order"].get(section, []), section
        for name in want["input_order"].get(section, []):
            w, g = want["input"][section][name], got["input"][section][name]
            w_opts = _without_tooltip(w[1] if len(w) > 1 else {})
            g_opts = _without_tooltip(g[1] if len(g) > 1 else {})
            assert g_opts == w_opts, f"{node_id}.{name}"
            if isinstance(w[0], list):
                assert isinstance(g[0], list), f"{node_id}.{name} must be a combo"
                if (node_id, name) in FILE_COMBOS:
                    continue  # the files in the folder
                assert g[0] == w[0], f"{node_id}.{name}"  # sampler_name too: all 44, in ComfyUI's order
            else:
                assert g[0] == w[0], f"{node_id}.{name}"
    # ComfyUI's hidden inputs are all there (ours may add the progress reporter and node id)
    for name in want["input_order"].get("hidden", []):
        assert got["input"]["hidden"][name] == want["input"]["hidden"][name]


def test_core_nodes_are_standalone_only_and_never_shadow_ours():
    ours_only, _ = node_pack(standalone=False)
    assert ours_only is NODE_CLASS_MAPPINGS or ours_only == NODE_CLASS_MAPPINGS
    assert not set(ours_only) & set(RECORDED)  # none of our ids is a ComfyUI core id
    both, names = node_pack(standalone=True)
    assert set(both) == set(NODE_CLASS_MAPPINGS) | set(CORE_NODE_CLASS_MAPPINGS)
    assert names["KSamplerAdvanced"] == CORE_NODE_DISPLAY_NAME_MAPPINGS["KSamplerAdvanced"] == "KSampler (Advanced)"


def test_int_and_float_options_are_keyword_only():
    from sdxl_nodes.nodes.schema import Float, Int

    with pytest.raises(TypeError):
        Int("steps", "tooltip", 20, 1, 10000)  # a row of bare numbers no longer reads as a schema
    with pytest.raises(TypeError):
        Float("cfg", "tooltip", 8.0, 0.0, 100.0)
    assert Int("steps", "t", default=20, min=1, max=10000, step=None).spec() == (
        "INT", {"tooltip": "t", "default": 20, "min": 1, "max": 10000})


def test_node_decorator_checks_run_covers_the_declared_inputs():
    from sdxl_nodes.nodes.schema import Int, NodeSchema, SchemaError, Socket, node

    def schema(*inputs, hidden=None):
        return NodeSchema(id="X", display_name="X", category="x", description="x", inputs=inputs,
                          hidden=hidden or {})

    seed = Int("seed", "t", default=0, min=0, max=1)
    with pytest.raises(SchemaError, match="does not take declared input"):
        @node(schema(seed, Socket("model", "MODEL", "t")))
        class Missing:
            def run(self, seed):
                return ()
    with pytest.raises(SchemaError, match="needs undeclared"):
        @node(schema(seed))
        class Extra:
            def run(self, seed, steps):
                return ()
    with pytest.raises(SchemaError, match="needs a default"):
        @node(schema(seed, hidden={"prompt": "PROMPT"}))
        class HiddenWithoutDefault:
            def run(self, seed, prompt):
                return ()

    @node(schema(seed, Socket("mask", "MASK", "t", optional=True), hidden={"prompt": "PROMPT"}))
    class Fine:
        def run(self, seed, mask=None, prompt=None):
            return ()

    assert Fine.INPUT_TYPES()["optional"] == {"mask": ("MASK", {"tooltip": "t"})}
