"""Prompt validation: every error type, all at once, in the recorded ComfyUI response shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stub_nodes import NODE_CLASS_MAPPINGS as CLASSES

from sdxl_nodes.runtime.validate import coerce_literal, types_compatible, validate_prompt

SAMPLES = Path(__file__).resolve().parent / "data" / "frontend_samples"  # vendored recordings


def _recorded(name):
    return json.loads((SAMPLES / name).read_text())


def n(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def good_prompt():
    return {
        "1": n("StubNumber", value=3),
        "2": n("StubAdd", a=["1", 0], b=4),
        "3": n("StubSaveText", value=["2", 0]),
    }


def test_valid_prompt():
    assert validate_prompt(good_prompt(), CLASSES) == (True, None, {}, ["3"])


def test_no_outputs_matches_recording():
    recorded = _recorded("POST_api_prompt_response_400_no_outputs.json")
    ok, error, node_errors, outputs = validate_prompt({"1": n("StubNumber", value=1)}, CLASSES)
    assert not ok and outputs == []
    assert {"error": error, "node_errors": node_errors} == recorded
    assert validate_prompt({}, CLASSES)[1]["type"] == "prompt_no_outputs"


def test_invalid_prompt_and_missing_node_types():
    ok, error, _, _ = validate_prompt({"1": {"inputs": {}}}, CLASSES)
    assert not ok and error["type"] == "invalid_prompt" and error["details"] == "Node ID '#1'"
    assert validate_prompt([1, 2], CLASSES)[1]["type"] == "invalid_prompt"
    prompt = good_prompt()
    prompt["4"] = n("KSamplerAdvanced")
    prompt["5"] = n("WAS_Blend")
    ok, error, node_errors, outputs = validate_prompt(prompt, CLASSES)
    assert not ok and outputs == [] and error["type"] == "missing_node_type"
    assert "KSamplerAdvanced" in error["message"] and "WAS_Blend" in error["message"]
    assert set(node_errors) == {"4", "5"}
    assert node_errors["4"]["errors"][0]["type"] == "missing_node_type"
    assert node_errors["4"]["class_type"] == "KSamplerAdvanced"


def every_error_prompt():
    """One prompt that contains every per-input error type."""
    return {
        "1": n("StubNumber", value=3),
        # required_input_missing (b) + value_bigger_than_max (a)
        "2": n("StubAdd", a=5000),
        # bad_linked_input: wrong length, missing node, output index out of range
        "3": n("StubSampler", base=["1", 0, 1], seed=["99", 0], sampler_name="euler", scheduler="normal",
               text="t", enabled=True, extra=["1", 3]),
        # return_type_mismatch (STRING output into an INT input) + value_not_in_list (list combo and COMBO)
        "4": n("StubSampler", base=["3", 0], seed=1, sampler_name="heun", scheduler="exponential",
               text="t", enabled=True),
        # invalid_input_type + value_smaller_than_min
        "5": n("StubScale", value=["1", 0], factor="abc"),
        "6": n("StubNumber", value=-5000),
        # custom_validation_failed
        "7": n("StubEven", value=3),
        # exception_during_validation
        "8": n("StubBrokenValidate", value=1),
        # dependency_cycle: 9 -> 10 -> 9
        "9": n("StubAdd", a=["10", 0], b=1),
        "10": n("StubAdd", a=["9", 0], b=1),
        "20": n("StubSaveText", value=["2", 0]),
        "21": n("StubSaveText", value=["3", 0]),
        "22": n("StubSaveText", value=["4", 1]),
        "23": n("StubSaveText", value=["5", 0]),
        "24": n("StubSaveText", value=["6", 0]),
        "25": n("StubSaveText", value=["7", 0]),
        "26": n("StubSaveText", value=["8", 0]),
        "27": n("StubSaveText", value=["10", 0]),
    }


def test_every_error_type_reported_at_once():
    ok, error, node_errors, outputs = validate_prompt(every_error_prompt(), CLASSES)
    assert not ok and outputs == []
    assert error == {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                     "details": "", "extra_info": {}}
    types = {nid: [e["type"] for e in entry["errors"]] for nid, entry in node_errors.items()}
    assert types == {
        "2": ["value_bigger_than_max", "required_input_missing"],  # in declaration order: a, b
        "3": ["bad_linked_input", "bad_linked_input", "bad_linked_input"],
        "4": ["return_type_mismatch", "value_not_in_list", "value_not_in_list"],
        "5": ["invalid_input_type"],
        "6": ["value_smaller_than_min"],
        "7": ["custom_validation_failed"],
        "8": ["exception_during_validation"],
        "9": ["dependency_cycle"],
        "10": ["dependency_cycle"],
    }
    assert node_errors["3"]["dependent_outputs"] == ["21", "22"]  # 4 consumes 3 as well
    assert node_errors["9"]["dependent_outputs"] == ["27"]
    # nodes downstream of an error carry no errors of their own
    assert "21" not in node_errors and "1" not in node_errors
    json.dumps(node_errors)

    by_type = {e["type"]: e for entry in node_errors.values() for e in entry["errors"]}
    assert by_type["required_input_missing"] == {"type": "required_input_missing", "message": "Required input is missing",
                                                 "details": "b", "extra_info": {"input_name": "b"}}
    big = by_type["value_bigger_than_max"]
    assert big["message"] == "Value 5000 bigger than max of 1000" and big["details"] == "a"
    assert big["extra_info"] == {"input_name": "a", "input_config": ["INT", {"default": 0, "min": -1000, "max": 1000}],
                                 "received_value": 5000}
    combo = next(e for e in node_errors["4"]["errors"] if e["type"] == "value_not_in_list")
    assert combo["details"] == "sampler_name: 'heun' not in ['euler', 'dpmpp_2m']"
    assert combo["extra_info"]["received_value"] == "heun"
    mismatch = node_errors["4"]["errors"][0]
    assert mismatch["details"] == "base, received_type(STRING) mismatch input_type(INT)"
    assert mismatch["extra_info"]["input_name"] == "base"
    custom = by_type["custom_validation_failed"]
    assert custom["details"] == "value - 3 is odd" and custom["extra_info"] == {"input_name": "value"}
    assert by_type["exception_during_validation"]["details"] == "validator exploded"
    assert by_type["invalid_input_type"]["extra_info"]["received_value"] == "abc"
    cycle = node_errors["9"]["errors"][0]
    assert cycle["extra_info"]["input_name"] == "a" and "#10" in cycle["details"]


def test_error_shape_matches_recorded_400():
    recorded = _recorded("POST_api_prompt_response_400_node_errors.json")
    prompt = {"1": n("StubSampler", base=1, seed=1, sampler_name="nope", scheduler="normal", text="", enabled=True),
              "2": n("StubSaveText", value=["1", 0])}
    prompt["1"]["inputs"]["base"] = ["3", 0]
    prompt["3"] = n("StubNumber", value=1)
    ok, error, node_errors, _ = validate_prompt(prompt, CLASSES)
    assert not ok
    ours = {"error": error, "node_errors": node_errors}

    def shape(x):
        if isinstance(x, dict):
            return {k: shape(v) for k, v in x.items()}
        if isinstance(x, list):
            return [shape(x[0])] if x and isinstance(x[0], dict) else "list"
        return type(x).__name__

    rec_entry = next(iter(recorded["node_errors"].values()))
    our_entry = next(iter(ours["node_errors"].values()))
    assert shape(ours["error"]) == shape(recorded["error"])
    assert set(our_entry) == set(rec_entry)
    assert shape(our_entry["errors"][0]) == shape(rec_entry["errors"][0]) | {"extra_info": shape(our_entry["errors"][0]["extra_info"])}
    assert set(our_entry["errors"][0]["extra_info"]) == set(rec_entry["errors"][0]["extra_info"])
    assert our_entry["errors"][0]["message"] == "Value not in list" and our_entry["dependent_outputs"] == ["2"]


def test_some_outputs_valid():
    prompt = good_prompt()
    prompt["4"] = n("StubNumber", value=5000)
    prompt["5"] = n("StubSaveText", value=["4", 0])
    ok, error, node_errors, outputs = validate_prompt(prompt, CLASSES)
    assert ok and error is None and outputs == ["3"]
    assert list(node_errors) == ["4"] and node_errors["4"]["dependent_outputs"] == ["5"]


def test_partial_execution_targets():
    prompt = good_prompt()
    prompt["4"] = n("StubNumber", value=5000)
    prompt["5"] = n("StubSaveText", value=["4", 0])
    assert validate_prompt(prompt, CLASSES, ["3"]) == (True, None, {}, ["3"])
    assert validate_prompt(prompt, CLASSES, ["1"])[1]["type"] == "prompt_no_outputs"


def test_literal_coercion_and_types():
    prompt = {"1": n("StubNumber", value="5"), "2": n("StubScale", value=["1", 0], factor="2.5"),
              "3": n("StubSaveText", value=["2", 0], prefix=7)}
    assert validate_prompt(prompt, CLASSES)[0]
    assert coerce_literal("INT", "5") == 5 and coerce_literal("INT", 5.0) == 5
    assert coerce_literal("FLOAT", 2) == 2.0 and isinstance(coerce_literal("FLOAT", 2), float)
    assert coerce_literal("BOOLEAN", "false") is False and coerce_literal("STRING", 3) == "3"
    assert coerce_literal("INT", {"__value__": 4}) == 4
    with pytest.raises(ValueError):
        coerce_literal("INT", "five")
    with pytest.raises(ValueError):
        coerce_literal("BOOLEAN", "maybe")
    assert types_compatible("INT", "INT,FLOAT") and types_compatible("FLOAT,STRING", "INT,FLOAT")
    assert types_compatible("IMAGE", "*") and types_compatible("*", "LATENT")
    assert not types_compatible("IMAGE", "LATENT") and not types_compatible("STRING", "INT,FLOAT")


def test_validation_does_not_mutate_prompt():
    prompt = {"1": n("StubNumber", value="5"), "2": n("StubSaveText", value=["1", 0])}
    before = json.dumps(prompt)
    validate_prompt(prompt, CLASSES)
    assert json.dumps(prompt) == before


# ------------------------------------------------------------------------------------------------
# Our own nodes under ComfyUI's VALIDATE_INPUTS rule (issue 11 item 1)


def _comfyui_skips_builtin_checks_for(cls) -> set[str]:
    """ComfyUI v0.8.0 execution.validate_inputs: min/max and combo checks are skipped for every input
    named in VALIDATE_INPUTS's signature (all of them if it takes **kwargs)."""
    import inspect

    from sdxl_nodes.runtime.nodeinfo import iter_input_specs

    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return set()
    spec = inspect.getfullargspec(fn)
    names = {name for _c, name, _t, _o in iter_input_specs(cls.INPUT_TYPES())}
    return names if spec.varkw is not None else names & set(spec.args)


def test_comfyui_keeps_the_min_max_checks_of_every_node_of_ours():
    """Catches a VALIDATE_INPUTS that names a ranged input (SDXLEmptyLatent's width/height/batch_size
    were accepted at 0, 16392 and -8 inside ComfyUI). (SDXLLoadImage's VALIDATE_INPUTS(image) takes
    over its file combo on purpose, as ComfyUI's own LoadImage does, so just-uploaded files pass.)"""
    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS
    from sdxl_nodes.runtime.nodeinfo import iter_input_specs

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        checked = {name for _c, name, _t, options in iter_input_specs(cls.INPUT_TYPES())
                   if "min" in options or "max" in options}
        assert not (checked & _comfyui_skips_builtin_checks_for(cls)), node_id


@pytest.mark.parametrize("inputs,expected", [
    ({"width": 0}, [("width", "value_smaller_than_min")]),
    ({"width": 16392}, [("width", "value_bigger_than_max")]),
    ({"width": -8}, [("width", "value_smaller_than_min")]),
    ({"batch_size": 0}, [("batch_size", "value_smaller_than_min")]),
    ({"height": 1004}, [("height", "value_not_multiple")]),
    ({"width": 1001, "height": 1002}, [("width", "value_not_multiple"), ("height", "value_not_multiple")]),
])
def test_empty_latent_errors_name_only_the_offending_input(inputs, expected):
    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS

    values = {"width": 1024, "height": 1024, "batch_size": 1, **inputs}
    prompt = {"1": n("SDXLEmptyLatent", **values), "2": n("StubSink", value=["1", 0])}
    classes = {**CLASSES, "SDXLEmptyLatent": NODE_CLASS_MAPPINGS["SDXLEmptyLatent"]}
    ok, _error, node_errors, _ = validate_prompt(prompt, classes)
    assert not ok
    assert [(e["extra_info"]["input_name"], e["type"]) for e in node_errors["1"]["errors"]] == expected


def test_empty_latent_refuses_a_non_multiple_of_8_when_run_inside_comfyui():
    """ComfyUI does not read `multiple_of`; the node itself then says what is wrong."""
    from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS
    from sdxl_nodes.nodes.environment import NodeInputError

    with pytest.raises(NodeInputError, match="^width 1004 not a multiple of 8; SDXL latents are 1/8"):
        NODE_CLASS_MAPPINGS["SDXLEmptyLatent"]().run(1004, 64, 1)


def test_null_literal_is_invalid_not_the_string_none():
    """Catches str(None) == 'None' passing as a STRING (issue 9: `--set 2.text_g=null` validated)."""
    prompt = good_prompt()
    prompt["3"] = n("StubSampler", base=["2", 0], seed=1, sampler_name="euler", scheduler="karras", text=None,
                    enabled=True)
    prompt["4"] = n("StubSaveText", value=["3", 0])
    ok, _, node_errors, _ = validate_prompt(prompt, CLASSES)
    assert not ok
    (err,) = node_errors["3"]["errors"]
    assert err["type"] == "invalid_input_type" and err["extra_info"]["input_name"] == "text"


def test_unknown_combo_value_suggests_the_closest_choice():
    prompt = good_prompt()
    prompt["3"] = n("StubSampler", base=["2", 0], seed=1, sampler_name="eulr", scheduler="karras", text="x",
                    enabled=True)
    prompt["4"] = n("StubSaveText", value=["3", 0])
    ok, _, node_errors, _ = validate_prompt(prompt, CLASSES)
    err = next(e for e in node_errors["3"]["errors"] if e["type"] == "value_not_in_list")
    assert err["details"].endswith("; did you mean 'euler'?"), err["details"]
