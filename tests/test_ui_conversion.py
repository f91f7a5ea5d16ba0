"""Our UI → API converter against the official frontend's own conversion.

Every ``tests/data/ui_workflows/<name>.json`` was built in the real editor (frontend 1.58.1, see
``tools/record_ui_workflows.py``); ``<name>.frontend_prompt.json`` next to it is what the editor's
``app.graphToPrompt()`` produced for it, and ``support/object_info.json`` the node definitions it had. The
converter must give exactly that prompt. The browser test re-checks this live.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sdxl_nodes.runtime.workflow import WorkflowError, ui_to_api

DATA = Path(__file__).resolve().parent / "data" / "ui_workflows"
NAMES = sorted(p.name[: -len(".frontend_prompt.json")] for p in DATA.glob("*.frontend_prompt.json"))


@pytest.fixture(scope="module")
def object_info():
    # Our server's definitions, plus ComfyUI's own for the core node ids (recorded from ComfyUI v0.8.0;
    # the editor had these registered when recording ``core_*`` workflows).
    info = json.loads((DATA / "support" / "comfyui_core_object_info.json").read_text())
    info.update(json.loads((DATA / "support" / "probe_object_info.json").read_text()))
    info.update(json.loads((DATA / "support" / "object_info.json").read_text()))
    return info


def _load(name: str) -> tuple[dict, dict]:
    return (json.loads((DATA / f"{name}.json").read_text()),
            json.loads((DATA / f"{name}.frontend_prompt.json").read_text()))


def test_enough_recorded_workflows():
    assert len(NAMES) >= 8, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_converts_like_the_frontend(name, object_info):
    workflow, expected = _load(name)
    assert ui_to_api(workflow, object_info, source=name) == expected


def _all_nodes(workflow: dict):
    yield from workflow["nodes"]
    for sub in (workflow.get("definitions") or {}).get("subgraphs") or []:
        yield from sub["nodes"]


def test_recordings_cover_every_case():
    """Each editor feature appears in at least one recorded workflow (so the goldens above test it)."""
    seen = set()
    for name in NAMES:
        workflow, prompt = _load(name)
        types = {n["type"] for n in _all_nodes(workflow)}
        modes = {n.get("mode") for n in _all_nodes(workflow)}
        seen |= types & {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
        seen |= {f"mode{m}" for m in modes if m in (2, 4)}
        if workflow.get("groups"):
            seen.add("group")
        if (workflow.get("extra") or {}).get("reroutes") or workflow.get("reroutes"):
            seen.add("native reroute")
        if any(i.get("widget") and i.get("link") is not None for n in _all_nodes(workflow) for i in n.get("inputs") or []):
            seen.add("converted widget")
        if any(k.count(":") == 1 for k in prompt):
            seen.add("subgraph")
        if any(k.count(":") == 2 for k in prompt):
            seen.add("nested subgraph")
        subgraphs = {s["id"] for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
        if (workflow.get("extra") or {}).get("groupNodes"):
            seen.add("group node")
        if sum(n["type"] in subgraphs for n in workflow["nodes"]) >= 2:
            seen.add("two instances")
    assert seen >= {"Reroute", "PrimitiveNode", "Note", "MarkdownNote", "mode2", "mode4", "group", "native reroute",
                    "converted widget", "subgraph", "nested subgraph", "two instances", "group node"}, seen


# --------------------------------------------------------------------------------------------
# Broken structures: one clear WorkflowError naming the node


def _subgraph_workflow():
    workflow, _ = _load("subgraph_basic")
    return copy.deepcopy(workflow)


def test_subgraph_with_dangling_inner_link(object_info):
    workflow = _subgraph_workflow()
    sub = workflow["definitions"]["subgraphs"][0]
    inner = next(n for n in sub["nodes"] if n["type"] == "SDXLSizeCropConditioning")
    sub["links"] = [lk for lk in sub["links"] if lk["target_id"] != inner["id"]]
    with pytest.raises(WorkflowError) as e:
        ui_to_api(workflow, object_info, source="wf.json")
    msg = str(e.value)
    instance = next(n["id"] for n in workflow["nodes"] if n["type"] == sub["id"])
    assert f"node {instance}:{inner['id']} (SDXLSizeCropConditioning)" in msg
    assert "input 'text'" in msg and "does not exist" in msg and "New Subgraph" in msg


def test_subgraph_link_from_missing_inner_node(object_info):
    workflow = _subgraph_workflow()
    sub = workflow["definitions"]["subgraphs"][0]
    encoder = next(n for n in sub["nodes"] if n["type"] == "SDXLDualCLIPEncode")
    sub["nodes"].remove(encoder)
    with pytest.raises(WorkflowError, match=rf"is linked \(link \d+\) from node {encoder['id']}, which does not exist"):
        ui_to_api(workflow, object_info)


def test_missing_subgraph_definition(object_info):
    workflow = _subgraph_workflow()
    sub_id = workflow["definitions"]["subgraphs"][0]["id"]
    del workflow["definitions"]
    instance = next(n["id"] for n in workflow["nodes"] if n["type"] == sub_id)
    with pytest.raises(WorkflowError, match=rf"node {instance} is a subgraph \({sub_id}\) whose definition is missing"):
        ui_to_api(workflow, object_info)


def test_subgraph_nested_in_itself(object_info):
    workflow = _subgraph_workflow()
    sub = workflow["definitions"]["subgraphs"][0]
    sub["nodes"].append({"id": 99, "type": sub["id"], "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(WorkflowError, match="contains itself"):
        ui_to_api(workflow, object_info)


def test_group_node_definition_missing(object_info):
    workflow, _ = _load("reroute_note_group")
    workflow = copy.deepcopy(workflow)
    workflow["nodes"].append({"id": 77, "type": "workflow>Upscaler", "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(WorkflowError, match=r"node 77 is a group node \(workflow>Upscaler\) whose definition is "
                                            r"missing from the workflow \(extra.groupNodes\)"):
        ui_to_api(workflow, object_info)


def test_primitive_node_feeding_a_missing_link(object_info):
    workflow, _ = _load("primitive_shared")
    workflow = copy.deepcopy(workflow)
    prim = next(n for n in workflow["nodes"] if n["type"] == "PrimitiveNode" and n["outputs"][0]["links"])
    prim["outputs"][0]["links"].append(9999)
    with pytest.raises(WorkflowError, match=rf"PrimitiveNode {prim['id']} feeds link 9999, which does not exist"):
        ui_to_api(workflow, object_info)


def test_primitive_node_without_value(object_info):
    workflow, _ = _load("primitive_shared")
    workflow = copy.deepcopy(workflow)
    prim = next(n for n in workflow["nodes"] if n["type"] == "PrimitiveNode" and n["outputs"][0]["links"])
    prim["widgets_values"] = []
    with pytest.raises(WorkflowError, match=rf"PrimitiveNode {prim['id']} has no value"):
        ui_to_api(workflow, object_info)


def test_group_node_with_unsupported_inner_primitive(object_info):
    workflow, _ = _load("group_nodes_legacy")
    workflow = copy.deepcopy(workflow)
    group = workflow["extra"]["groupNodes"]["Conditioning"]
    group["nodes"].append({"type": "PrimitiveNode", "inputs": [], "outputs": [], "widgets_values": [1], "index": 4})
    with pytest.raises(WorkflowError, match=r"group node 2 \(workflow>Conditioning\): contains a PrimitiveNode"):
        ui_to_api(workflow, object_info)


def test_group_node_with_unknown_inner_type(object_info):
    workflow, _ = _load("group_nodes_legacy")
    workflow = copy.deepcopy(workflow)
    workflow["extra"]["groupNodes"]["Decode and save"]["nodes"][1]["type"] = "ImageUpscaleWithModel"
    with pytest.raises(WorkflowError, match=r"group node 7 .*unknown node type 'ImageUpscaleWithModel'"):
        ui_to_api(workflow, object_info)


def test_text_replacements_as_the_editor_applies_them():
    # Hand-derived from the editor's searchAndReplace.ts / formatUtil.ts / saveImageExtraOutput.ts: a SaveImage
    # prefix expands %Title.widget% (found by "Node name for S&R", else by title; / : * etc. become _) and
    # %date:…% (yyyy MM dd hh mm ss, zero-padded); an unknown pattern stays; our SDXLSaveImage is not expanded.
    # catches: replacements not applied, S&R name not preferred over the title, forbidden characters kept,
    # 1.0 written as "1.0" instead of JavaScript's "1", the date tokens mis-read
    import datetime

    from sdxl_nodes.runtime import workflow as W

    info = {
        "SaveImage": {"display_name": "Save Image", "input": {"required": {"images": ["IMAGE", {}],
                                                                         "filename_prefix": ["STRING", {}]}},
                      "input_order": {"required": ["images", "filename_prefix"]}, "output": []},
        "Seedy": {"display_name": "Seedy", "input": {"required": {"seed": ["INT", {}], "cfg": ["FLOAT", {}],
                                                                 "name": ["STRING", {}]}},
                  "input_order": {"required": ["seed", "cfg", "name"]}, "output": ["IMAGE"],
                  "output_name": ["IMAGE"]},
    }
    wf = {"nodes": [
        {"id": 1, "type": "Seedy", "mode": 0, "title": "Sampler", "inputs": [],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}], "widgets_values": [42, "fixed", 7.0, "a/b:c"]},
        {"id": 2, "type": "Seedy", "mode": 0, "properties": {"Node name for S&R": "Sampler"}, "inputs": [],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}], "widgets_values": [7, "fixed", 1.5, "x"]},
        {"id": 3, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
         "outputs": [], "widgets_values": ["%Sampler.seed%_%Sampler.cfg%_%Seedy.name%_%Nope.x%_%date:yyyy-M-dd%"]},
    ], "links": [[1, 1, 0, 3, 0, "IMAGE"]]}
    now = datetime.datetime.now()
    prefix = W.ui_to_api(wf, info)["3"]["inputs"]["filename_prefix"]
    # "Sampler" is node 2's S&R name (preferred to node 1's title); "Seedy" is node 2's default title (its
    # type's display name; node 1 carries its own title). (A seed widget has a control_after_generate slot.)
    assert prefix.startswith("7_1.5_x_%Nope.x%_"), prefix
    assert prefix.endswith(f"{now.year}-{now.month}-{now.day:02d}"), prefix
    wf["nodes"][1]["properties"] = {}
    wf["nodes"][1]["widgets_values"] = [7, "fixed", 1.0, "x"]
    prefix = W.ui_to_api(wf, info)["3"]["inputs"]["filename_prefix"]
    assert prefix.startswith("42_7_x_"), prefix  # now by title: node 1; 7.0 → "7"
    wf["nodes"][0]["title"] = "Other"
    wf["nodes"][2]["widgets_values"] = ["%Other.name%"]
    assert W.ui_to_api(wf, info)["3"]["inputs"]["filename_prefix"] == "a_b_c"
    assert W._format_date("yy/MM/d hh:mm:ss yyy", datetime.datetime(2026, 3, 4, 5, 6, 7)) == "26/03/4 05:06:07 yyy"
