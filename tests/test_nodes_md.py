"""NODES.md is generated from the declarations and every socket and widget explains itself."""

from __future__ import annotations

from pathlib import Path

from sdxl_nodes.nodes import NODE_CLASS_MAPPINGS, NODES
from sdxl_nodes.nodes.docs import render

ROOT = Path(__file__).resolve().parents[1]


def test_nodes_md_is_up_to_date():
    assert (ROOT / "NODES.md").read_text() == render(), "regenerate: python -m sdxl_nodes.nodes.docs > NODES.md"


def test_every_input_and_output_has_a_tooltip_and_ids_are_prefixed():
    assert len(NODES) == 15
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("SDXL")
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("sdxl/")
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                if isinstance(spec, tuple) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert len(spec[1].get("tooltip", "")) > 10, f"{node_id}.{name} has no tooltip"
                else:
                    assert isinstance(spec, str), f"{node_id}.{name} has no options"  # hidden inputs only
        assert all(len(t) > 10 for t in cls.OUTPUT_TOOLTIPS), node_id
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
