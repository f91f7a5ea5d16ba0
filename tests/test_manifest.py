"""Full-size networks built on `meta` map one-to-one onto the official checkpoints' key manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdxl_nodes.sdxl_core import checkpoint
from sdxl_nodes.sdxl_core.config import BASE, REFINER

# Stability's key manifests of the official files (vendored copies; see tests/data/README.md).
SHARED = Path(__file__).resolve().parent / "data" / "sdxl"


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (SHARED / name).read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


@pytest.mark.parametrize("cfg,manifest", [(BASE, "keys_base.tsv"), (REFINER, "keys_refiner.tsv")])
def test_file_layout_equals_official_manifest(cfg, manifest):
    expected = read_manifest(manifest)
    layout = checkpoint.file_layout(cfg)
    # the writer adds CLIP-L's int64 position_ids beside the module tensors (FACTS.md §1)
    extra = {k for k in expected if k.endswith("embeddings.position_ids")}
    assert set(layout) == set(expected) - extra
    wrong = {k: (layout[k], expected[k]) for k in layout if layout[k] != expected[k]}
    assert wrong == {}


@pytest.mark.parametrize("cfg,manifest", [(BASE, "keys_base.tsv"), (REFINER, "keys_refiner.tsv")])
def test_manifest_passes_the_strict_loader_check_and_detects(cfg, manifest):
    shapes = read_manifest(manifest)
    assert checkpoint.detect(shapes, manifest) is cfg
    checkpoint.check_keys(shapes, cfg, checkpoint.build_modules(cfg), manifest)  # raises on any mismatch


def test_parameter_counts():
    base = checkpoint.build_modules(BASE)
    refiner = checkpoint.build_modules(REFINER)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(base["unet"]) == 2_567_463_684
    assert count(refiner["unet"]) == 2_259_526_660
    assert count(base["vae"]) == 83_653_863
    assert count(base["clip_l"]) == 123_060_480
    # bigG in the file = the transformer + logit_scale (dropped on load, it has no use for text)
    assert count(base["clip_g"]) + 1 == 694_659_841
    layout = checkpoint.file_layout(BASE)
    g = sum(torch.Size(s).numel() for k, s in layout.items() if k.startswith("conditioner.embedders.1."))
    assert g == 694_659_841


def test_full_size_writer_layout_matches_manifest_dtype_free():
    # file_layout is exactly what write_random_checkpoint writes (plus position_ids); check the
    # element count equals the published total (FACTS.md §1: 3,468,837,945 incl. 77 position ids)
    for cfg, total in ((BASE, 3_468_837_945 - 77), (REFINER, 3_037_840_364)):
        assert sum(torch.Size(s).numel() for s in checkpoint.file_layout(cfg).values()) == total
