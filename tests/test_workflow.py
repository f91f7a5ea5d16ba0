"""Workflow formats and node definitions: recorded frontend samples, conversion rules, PNG metadata."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import stub_nodes
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdxl_nodes.runtime import nodeinfo
from sdxl_nodes.runtime.workflow import (
    WorkflowError,
    detect_format,
    load_workflow,
    load_workflow_data,
    read_png_text,
    ui_to_api,
    widget_layout,
)

# Recorded from the real frontend and ComfyUI (vendored; see tests/data/README.md).
SAMPLES = Path(__file__).resolve().parent / "data" / "frontend_samples"

NODE_FIELDS = ("input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
               "description", "python_module", "category", "output_node")


def _load(name: str):
    return json.loads((SAMPLES / name).read_text())


@pytest.fixture(scope="module")
def object_info():
    """The recorded ``/object_info`` subset (tests that use recorded samples depend on this)."""
    return _load("object_info_subset.json")


def classes_from_object_info(defs: dict) -> dict[str, type]:
    """V1 stub classes whose INPUT_TYPES etc. reproduce recorded ``/object_info`` entries."""
    classes = {}
    for name, d in defs.items():
        attrs = {
            "INPUT_TYPES": classmethod(lambda cls, _d=d: copy.deepcopy(_d["input"])),
            "RETURN_TYPES": tuple(d["output"]),
            "RETURN_NAMES": tuple(d["output_name"]),
            "OUTPUT_IS_LIST": tuple(d["output_is_list"]),
            "FUNCTION": "run",
            "CATEGORY": d["category"],
            "DESCRIPTION": d["description"],
            "OUTPUT_NODE": d["output_node"],
            "DISPLAY_NAME": d["display_name"],
            "PYTHON_MODULE": d["python_module"],
        }
        if d.get("output_tooltips") is not None:
            attrs["OUTPUT_TOOLTIPS"] = tuple(d["output_tooltips"])
        classes[name] = type(name, (), attrs)
    return classes


# --------------------------------------------------------------------------------------------
# Node definitions


def test_node_info_reproduces_recorded_object_info(object_info):
    classes = classes_from_object_info(object_info)
    ours = nodeinfo.object_info(classes, lambda name, cls: cls.PYTHON_MODULE)
    for name, recorded in object_info.items():
        for key in NODE_FIELDS:
            assert ours[name][key] == recorded[key], (name, key)
        assert ours[name]["deprecated"] is False and ours[name]["experimental"] is False
    json.dumps(ours)  # serializable


def test_node_info_of_stub_classes():
    info = nodeinfo.object_info(stub_nodes.NODE_CLASS_MAPPINGS, "custom_nodes.sdxl_nodes")
    add = info["StubNumber"]
    assert add["input"] == {"required": {"value": ["INT", {"default": 1, "min": -1000, "max": 1000, "tooltip": "a number"}]}}
    assert add["input_order"] == {"required": ["value"]}
    assert add["output"] == ["INT"] and add["output_name"] == ["value"] and add["output_tooltips"] == ["the value"]
    assert add["output_is_list"] == [False] and add["output_node"] is False
    assert add["python_module"] == "custom_nodes.sdxl_nodes" and add["category"] == "stub"
    assert add["display_name"] == "StubNumber" and add["description"] == "Outputs its value."
    save = info["StubSaveText"]
    assert save["output_node"] is True and save["output"] == [] and save["input"]["required"]["value"] == ["*", {}]
    assert save["input_order"]["hidden"] == ["prompt", "extra_pnginfo", "unique_id"]
    assert info["StubSink"]["input"]["required"]["value"] == ["*"]
    assert info["StubAdd"]["output_tooltips"] == [None]


def test_widget_layout(object_info):
    assert widget_layout(object_info["LoadImage"]) == [("image", False), ("upload", True)]
    assert widget_layout(object_info["PrimitiveInt"]) == [("value", False), ("control_after_generate", True)]
    assert widget_layout(object_info["ImageAddNoise"]) == [("seed", False), ("control_after_generate", True),
                                                           ("strength", False)]
    ks = [n for n, _ in widget_layout(object_info["KSampler"])]
    assert ks == ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    # forceInput inputs and plain sockets have no widget
    assert "extra_int" not in [n for n, _ in widget_layout(object_info["RT_AllWidgets"])]
    # control_after_generate: False suppresses the automatic seed companion
    d = {"input": {"required": {"seed": ["INT", {"control_after_generate": False}]}}}
    assert widget_layout(d) == [("seed", False)]


# --------------------------------------------------------------------------------------------
# Recorded UI workflow → API prompt pairs


@pytest.mark.parametrize("sample", ["POST_api_prompt_request_allwidgets.json", "POST_api_prompt_request_testgraph.json"])
def test_recorded_workflow_converts_to_recorded_prompt(object_info, sample):
    body = _load(sample)
    prompt = ui_to_api(body["extra_data"]["extra_pnginfo"]["workflow"], object_info)
    assert prompt == body["prompt"]
    assert list(prompt) == list(body["prompt"])
    for node_id, node in prompt.items():  # inputs in the frontend's order too
        assert list(node["inputs"]) == list(body["prompt"][node_id]["inputs"])


@pytest.mark.parametrize("sample", ["POST_api_prompt_request_allwidgets.json", "POST_api_prompt_request_testgraph.json"])
def test_recorded_workflow_converts_with_definitions_from_classes(object_info, sample):
    classes = classes_from_object_info(object_info)
    defs = nodeinfo.object_info(classes, lambda name, cls: cls.PYTHON_MODULE)
    body = _load(sample)
    assert ui_to_api(body["extra_data"]["extra_pnginfo"]["workflow"], defs) == body["prompt"]


def test_wrapped_prompt_body_loads(object_info):
    body = _load("POST_api_prompt_request_testgraph.json")
    loaded = load_workflow_data(body, object_info)
    assert loaded.kind == "api" and loaded.prompt == body["prompt"]
    assert loaded.workflow == body["extra_data"]["extra_pnginfo"]["workflow"]
    assert loaded.default_extra_data()["extra_pnginfo"]["workflow"] is loaded.workflow
    assert detect_format(body) == "api_wrapped" and detect_format(body["prompt"]) == "api"
    assert detect_format(loaded.workflow) == "ui"


# --------------------------------------------------------------------------------------------
# Conversion rules on crafted graphs (stub node definitions)


@pytest.fixture(scope="module")
def stub_info():
    return nodeinfo.object_info(stub_nodes.NODE_CLASS_MAPPINGS, "custom_nodes.sdxl_nodes")


def _node(nid, ntype, *, inputs=(), outputs=(), widgets=None, mode=0, title=None, properties=None):
    node = {"id": nid, "type": ntype, "pos": [0, 0], "size": [100, 50], "flags": {}, "order": nid, "mode": mode,
            "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
            "properties": properties or {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def _wf(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _chain_workflow(middle_mode):
    """1 StubNumber → 2 StubAdd(a) → 3 StubSaveText, with node 2 in the given mode."""
    nodes = [
        _node(1, "StubNumber", outputs=[{"name": "value", "type": "INT", "links": [1, 3]}], widgets=[7]),
        _node(2, "StubAdd", mode=middle_mode,
              inputs=[{"name": "a", "type": "INT", "widget": {"name": "a"}, "link": 1}],
              outputs=[{"name": "INT", "type": "INT", "links": [2]}], widgets=[0, 5]),
        _node(3, "StubSaveText", inputs=[{"name": "value", "type": "*", "link": 2}],
              outputs=[], widgets=["x="]),
        _node(4, "Note", widgets=["just a note"]),
        _node(5, "MarkdownNote", widgets=["# md"]),
    ]
    links = [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"]]
    return _wf(nodes, links)


def test_plain_chain(stub_info):
    prompt = ui_to_api(_chain_workflow(0), stub_info)
    assert prompt == {
        "1": {"inputs": {"value": 7}, "class_type": "StubNumber", "_meta": {"title": "StubNumber"}},
        "2": {"inputs": {"a": ["1", 0], "b": 5}, "class_type": "StubAdd", "_meta": {"title": "StubAdd"}},
        "3": {"inputs": {"prefix": "x=", "value": ["2", 0]}, "class_type": "StubSaveText",
              "_meta": {"title": "StubSaveText"}},
    }


def test_muted_node_dropped_and_its_consumers_input_deleted(stub_info):
    prompt = ui_to_api(_chain_workflow(2), stub_info)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"] == {"prefix": "x="}


def test_bypassed_node_rewired_to_matching_input(stub_info):
    prompt = ui_to_api(_chain_workflow(4), stub_info)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"]["value"] == ["1", 0]


def test_bypass_picks_first_input_of_matching_type(stub_info):
    # StubScale's output is FLOAT; its input 0 is "INT,FLOAT", input 1 the FLOAT factor widget.
    nodes = [
        _node(1, "StubNumber", outputs=[{"name": "value", "type": "INT", "links": [1]}], widgets=[3]),
        _node(6, "StubNumber", outputs=[{"name": "value", "type": "INT", "links": [3]}], widgets=[4]),
        _node(2, "StubScale", mode=4,
              inputs=[{"name": "value", "type": "STRING", "link": 3},
                      {"name": "factor", "type": "FLOAT", "widget": {"name": "factor"}, "link": 1}],
              outputs=[{"name": "FLOAT", "type": "FLOAT", "links": [2]}], widgets=[2.0]),
        _node(3, "StubSaveText", inputs=[{"name": "value", "type": "FLOAT", "link": 2}], widgets=["v="]),
    ]
    links = [[1, 1, 0, 2, 1, "INT"], [2, 2, 0, 3, 0, "FLOAT"], [3, 6, 0, 2, 0, "STRING"]]
    prompt = ui_to_api(_wf(nodes, links), stub_info)
    # The loaded node takes its input types from the definition, not the file (seen in frontend 1.58):
    # slot 0 is "INT,FLOAT" there, which fits the FLOAT output, so the same slot wins.
    assert prompt["3"]["inputs"]["value"] == ["6", 0]


def test_bypass_without_matching_input_leaves_input_unconnected(stub_info):
    # A bypassed StubNumber (INT in, INT out) feeding a STRING input: no input of a fitting type.
    nodes = [
        _node(1, "StubNumber", outputs=[{"name": "value", "type": "INT", "links": [1]}], widgets=[3]),
        _node(2, "StubNumber", mode=4, inputs=[{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 1}],
              outputs=[{"name": "INT", "type": "INT", "links": [2]}], widgets=[0]),
        _node(3, "StubSampler", inputs=[{"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 2}],
              outputs=[{"name": "summary", "type": "STRING", "links": []}],
              widgets=[5, "fixed", "euler", "karras", "kept", True, 0.5]),
    ]
    prompt = ui_to_api(_wf(nodes, [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"]]), stub_info)
    assert prompt["3"]["inputs"]["text"] == "kept"  # the widget literal stays; no link to node 1


def test_reroutes_followed_and_dict_links(stub_info):
    nodes = [
        _node(1, "StubNumber", outputs=[{"name": "value", "type": "INT", "links": [1]}], widgets=[9]),
        _node(10, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
              outputs=[{"name": "", "type": "INT", "links": [2]}]),
        _node(11, "Reroute", inputs=[{"name": "", "type": "*", "link": 2}],
              outputs=[{"name": "", "type": "INT", "links": [3]}]),
        _node(3, "StubSaveText", inputs=[{"name": "value", "type": "*", "link": 3}], widgets=["v="],
              title="Shown", properties={"cnr_id": "sdxl-nodes", "ver": "0.1.0"}),
    ]
    links = [
        {"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 10, "target_slot": 0, "type": "INT"},
        {"id": 2, "origin_id": 10, "origin_slot": 0, "target_id": 11, "target_slot": 0, "type": "INT"},
        {"id": 3, "origin_id": 11, "origin_slot": 0, "target_id": 3, "target_slot": 0, "type": "INT"},
    ]
    prompt = ui_to_api(_wf(nodes, links), stub_info)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"]["value"] == ["1", 0]
    assert prompt["3"]["_meta"] == {"title": "Shown", "cnr_id": "sdxl-nodes", "ver": "0.1.0"}


def test_primitive_node_value_inlined(stub_info):
    nodes = [
        _node(1, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "widget": {"name": "seed"}, "links": [1]}],
              widgets=[1234, "fixed"]),
        _node(2, "StubNumber", outputs=[{"name": "value", "type": "INT", "links": [2]}], widgets=[5]),
        _node(3, "StubSampler",
              inputs=[{"name": "base", "type": "INT", "link": 2},
                      {"name": "extra", "type": "INT", "link": None},
                      {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 1}],
              outputs=[{"name": "summary", "type": "STRING", "links": [3]}],
              widgets=[99, "randomize", "dpmpp_2m", "karras", "a\nb", False, 0.25]),
        _node(4, "StubSaveText", inputs=[{"name": "value", "type": "*", "link": 3}], widgets=["v="]),
    ]
    links = [[1, 1, 0, 3, 2, "INT"], [2, 2, 0, 3, 0, "INT"], [3, 3, 0, 4, 0, "STRING"]]
    prompt = ui_to_api(_wf(nodes, links), stub_info)
    assert set(prompt) == {"2", "3", "4"}
    assert prompt["3"]["inputs"] == {"seed": 1234, "sampler_name": "dpmpp_2m", "scheduler": "karras", "text": "a\nb",
                                     "enabled": False, "strength": 0.25, "base": ["2", 0]}


def test_unknown_node_types_all_reported(stub_info):
    wf = _chain_workflow(0)
    wf["nodes"][1]["type"] = "KSamplerAdvanced"
    wf["nodes"].append(_node(9, "WAS_Image_Blend"))
    wf["nodes"].append(_node(12, "WAS_Image_Blend", mode=2))  # muted: not needed, not reported
    with pytest.raises(WorkflowError) as e:
        ui_to_api(wf, stub_info, source="my.json")
    msg = str(e.value)
    assert "my.json" in msg and "KSamplerAdvanced (node 2)" in msg and "WAS_Image_Blend (node 9)" in msg
    assert "node pack" in msg and "node 12" not in msg


def test_malformed_and_foreign_json(tmp_path, stub_info):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "1": {"class_type": "StubNumber",,}\n}')
    with pytest.raises(WorkflowError, match=r"bad\.json: malformed JSON at line 2 column"):
        load_workflow(bad, stub_info)
    other = tmp_path / "other.json"
    other.write_text('{"name": "x", "version": "1.0"}')
    with pytest.raises(WorkflowError, match=r"other\.json: not a workflow.*top-level keys: name, version"):
        load_workflow(other, stub_info)
    with pytest.raises(WorkflowError, match="cannot read"):
        load_workflow(tmp_path / "missing.json", stub_info)
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps(_chain_workflow(0)))
    with pytest.raises(WorkflowError, match="needs the node definitions"):
        load_workflow(ui, None)
    loaded = load_workflow(ui, stub_info)
    assert loaded.kind == "ui" and set(loaded.prompt) == {"1", "2", "3"}


def test_api_prompt_file_with_int_ids(tmp_path):
    f = tmp_path / "api.json"
    f.write_text(json.dumps({"1": {"class_type": "StubNumber", "inputs": {"value": 1}},
                             "2": {"class_type": "StubSink", "inputs": {"value": [1, 0]}}}))
    loaded = load_workflow(f, None)
    assert loaded.kind == "api" and loaded.workflow is None
    assert loaded.prompt["2"]["inputs"]["value"] == ["1", 0]


# --------------------------------------------------------------------------------------------
# PNG metadata


def test_recorded_png_loads_its_workflow(object_info):
    path = SAMPLES / "SaveImage_output_with_prompt_and_workflow_tEXt.png"
    chunks = read_png_text(path.read_bytes())
    assert set(chunks) >= {"prompt", "workflow"}
    loaded = load_workflow(path, object_info)
    assert loaded.kind == "ui" and loaded.workflow["nodes"]
    embedded = json.loads(chunks["prompt"])
    for node in embedded.values():
        node.pop("is_changed", None)  # ComfyUI writes its own bookkeeping into the saved prompt
    assert loaded.prompt == embedded
    # without node definitions the API prompt chunk is not used: the UI workflow wins, as in the editor
    with pytest.raises(WorkflowError):
        load_workflow(path, None)


def _png(**text) -> bytes:
    info = PngInfo()
    for key, (value, itxt) in text.items():
        if itxt:
            info.add_itxt(key, value, zip=True)
        else:
            info.add_text(key, value)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_png_itxt_and_prompt_only(tmp_path, stub_info):
    prompt = {"1": {"class_type": "StubNumber", "inputs": {"value": 2}}, "2": {"class_type": "StubSink", "inputs": {"value": ["1", 0]}}}
    f = tmp_path / "a.png"
    f.write_bytes(_png(prompt=(json.dumps(prompt), True)))
    assert read_png_text(f.read_bytes())["prompt"] == json.dumps(prompt)
    loaded = load_workflow(f, None)
    assert loaded.kind == "api" and loaded.prompt == prompt
    wf = _chain_workflow(0)
    g = tmp_path / "b.png"
    g.write_bytes(_png(prompt=(json.dumps(prompt), False), workflow=(json.dumps(wf), True)))
    assert load_workflow(g, stub_info).prompt == ui_to_api(wf, stub_info)


def test_png_without_metadata(tmp_path):
    f = tmp_path / "plain.png"
    f.write_bytes(_png())
    with pytest.raises(WorkflowError, match="no embedded workflow"):
        load_workflow(f, None)
    with pytest.raises(WorkflowError, match="not a PNG"):
        read_png_text(b"GIF89a....")


# --------------------------------------------------------------------------------------------
# Layering


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import sdxl_nodes.runtime.workflow, sdxl_nodes.runtime.validate\n"
        "import sdxl_nodes.runtime.executor, sdxl_nodes.runtime.nodeinfo, sdxl_nodes.runtime.cli\n"
        # the one module runtime may take from sdxl_core: the import-free root of the user errors
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')"
        " or m == 'sdxl_nodes.nodes' or m.startswith('sdxl_nodes.nodes.')"
        " or (m.startswith('sdxl_nodes.sdxl_core.') and m != 'sdxl_nodes.sdxl_core.errors'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
