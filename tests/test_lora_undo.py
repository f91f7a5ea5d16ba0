"""A LoRA comes off bit for bit from small undo records: no copy of the weights, no checkpoint read.

The oracle is the weight as it was before patching (or as a fresh load gives it), compared bit for bit
(integer views, so −0/+0 and NaN payloads count), and the patch formula of the module docstring,
W' = storage(fp32(W) + a₁ + a₂ …), written out here by hand.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from test_lora import UNET_TARGETS, _canon, write_kohya

from sdxl_nodes.sdxl_core import checkpoint, lora
from sdxl_nodes.sdxl_core.lora import Adapter
from sdxl_nodes.sdxl_core.memory import ModelManager, RuntimeOptions

INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT[t.dtype])


def weight(dtype, rows=96, cols=80, seed=0):
    """N(0, 0.02) weights plus the awkward values: ±0, subnormals, binade edges, the largest finite."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    fi = torch.finfo(dtype)
    special = [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4, 2.0**-7, -(2.0**-7), 2.0**-7 * (1 - fi.eps / 2), fi.max / 4]
    w[0, : len(special)] = torch.tensor(special)
    return w.to(dtype)


def stack_for(w, rel, seed=1):
    """A plain LoRA and a full `diff`, with deltas of about `rel` × the weights' spread."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = w.shape
    up, down = torch.randn(rows, 8, generator=g), torch.randn(8, cols, generator=g)
    up *= rel * 0.02 / (up @ down).std()
    diff = torch.randn(rows, cols, generator=g) * rel * 0.02
    return [(Adapter("lora", {"up": up, "down": down}, alpha=4.0), 1.3), (Adapter("diff", {"diff": diff}), -0.7)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rel", [1e-3, 0.05, 3.0])  # small, typical, huge (a strength near ±100)
@pytest.mark.parametrize("blocks", [False, True])
def test_record_gives_back_the_exact_weight(dtype, rel, blocks, monkeypatch):
    """Catches: the escapes dropped, the 2-bit codes ignored (g taken for W, i.e. undo by subtraction),
    a code stream misaligned between row blocks, the patch rounding after each LoRA instead of once."""
    if blocks:
        monkeypatch.setattr(lora, "ROW_BLOCK_ABOVE", 700)  # blocks of 8 rows of the 96
    w = weight(dtype)
    patches = stack_for(w, rel)
    if blocks:
        patches = patches[:1]  # a diff cannot go by rows
    p = w.clone()
    undo = lora._patch_weight(p, patches)
    want = w.float() + lora.Adapter.addend(patches[0][0], patches[0][1], w.shape, "cpu")
    if not blocks:
        want += patches[1][0].addend(patches[1][1], w.shape, "cpu")
        assert torch.equal(bits(p), bits(want.to(dtype)))  # one rounding, after all patches (fp32 sums)
    assert (bits(p) != bits(w)).float().mean() > 0.1  # the patch really changed the weight
    assert len(undo.codes) == (12 if blocks else 1)
    assert lora._undo_weight(p, patches, undo)
    assert torch.equal(bits(p), bits(w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_record_is_small_for_a_usual_lora(dtype):
    """A LoRA of 1 % of the weights: the record is a few bits per element in changed binades, not a
    copy. Catches: keeping a dense backup, escaping every changed element."""
    w = weight(dtype, rows=512, cols=640)
    patches = stack_for(w, 0.01)[:1]
    p = w.clone()
    undo = lora._patch_weight(p, patches)
    assert undo.nbytes() < 0.02 * w.numel() * w.element_size()
    assert lora._undo_weight(p, patches, undo) and torch.equal(bits(p), bits(w))


@pytest.fixture()
def setup(tiny_checkpoints, tmp_path):
    """fp16 storage (the CPU default for the release files), a fresh manager, two kohya LoRAs."""
    m = ModelManager(RuntimeOptions(unet_dtype=torch.float16, text_dtype=torch.float16))
    ckpt = tiny_checkpoints["base"]
    sd = {p: {k: v.clone() for k, v in m.get(ckpt, p).state_dict().items()} for p in ("unet", "clip_l", "clip_g")}
    paths = []
    for seed, alpha in ((21, 4.0), (22, 1.0)):
        path = tmp_path / f"l{seed}.safetensors"
        write_kohya(path, sd["unet"], _canon(sd["clip_l"]), _canon(sd["clip_g"]), seed=seed, alpha=alpha)
        paths.append(path)
    cfg, _ = m.inspect(ckpt)
    return m, ckpt, sd, [m.lora(p, cfg) for p in paths], paths


def _no_checkpoint_reads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the checkpoint was read to undo a patch")

    monkeypatch.setattr(checkpoint, "read_module_tensors", refuse)


def _state(m, ckpt, part, stack=()):
    return {k: bits(v).clone() for k, v in m.get(ckpt, part, stack).state_dict().items()}


def test_strength_changes_and_removal_never_read_the_checkpoint(setup, monkeypatch):
    """The same stack gives the same bits whatever ran before, and removal gives the fresh load's bits,
    with the checkpoint never read. Catches: a strength change applied as W + (s' − s)·ΔW (history
    leaks into the bits), undo by subtraction, a fall-back to the file."""
    m, ckpt, sd, (la, lb), _ = setup
    fresh = ModelManager(RuntimeOptions(unet_dtype=torch.float16, text_dtype=torch.float16))
    want = {p: _state(fresh, ckpt, p, ((la, 0.25), (lb, -2.0))) for p in ("unet", "clip_l", "clip_g")}
    _no_checkpoint_reads(monkeypatch)
    fused = []
    repatch = lora._repatch_weight
    monkeypatch.setattr(lora, "_repatch_weight", lambda *a: fused.append(1) or repatch(*a))
    for part in ("unet", "clip_l", "clip_g"):
        _state(m, ckpt, part, ((la, 1.0), (lb, 0.5)))
        _state(m, ckpt, part, ((la, 7.0),))
        _state(m, ckpt, part, ((la, 3.0), (lb, 1.0)))
        n = len(fused)
        got = _state(m, ckpt, part, ((la, 0.25), (lb, -2.0)))  # only strengths changed: undone and re-patched at once
        assert len(fused) - n == len(m.get(ckpt, part, ((la, 0.25), (lb, -2.0)))._sdxl_patch_state.patched)
        assert all(torch.equal(got[k], want[part][k]) for k in got), part
        back = _state(m, ckpt, part)
        assert all(torch.equal(back[k], bits(sd[part][k])) for k in back), part
    assert m.loads == 3


def test_a_record_that_does_not_check_out_falls_back_to_the_file(setup, monkeypatch, caplog):
    """Weights changed behind the record's back (here: one element) are caught by the checksum and read
    from the file, with a warning. Catches: the checksum not compared."""
    m, ckpt, sd, (la, _), _ = setup
    key = UNET_TARGETS[0] + ".weight"
    unet = m.get(ckpt, "unet", ((la, 1.0),))
    with torch.no_grad():
        unet.state_dict()[key].view(-1)[5] += 0.5
    with caplog.at_level(logging.WARNING):
        back = _state(m, ckpt, "unet")
    assert all(torch.equal(back[k], bits(sd["unet"][k])) for k in back)
    assert [r for r in caplog.records if "undo record" in r.getMessage() and key in r.getMessage()]


def test_strength_change_with_a_record_that_does_not_check_out(setup, caplog):
    """The same for a strength change (undo and re-patch in one pass): the weight is read from the file
    and patched afresh. Catches: the fused path ignoring its checksum, or re-patching garbage."""
    m, ckpt, sd, (la, _), _ = setup
    key = UNET_TARGETS[1] + ".weight"
    unet = m.get(ckpt, "unet", ((la, 1.0),))
    with torch.no_grad():
        unet.state_dict()[key].view(-1)[3] -= 0.25
    with caplog.at_level(logging.WARNING):
        got = _state(m, ckpt, "unet", ((la, 0.5),))
    fresh = ModelManager(RuntimeOptions(unet_dtype=torch.float16, text_dtype=torch.float16))
    want = _state(fresh, ckpt, "unet", ((fresh.lora(la.path, m.inspect(ckpt)[0]), 0.5),))
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert [r for r in caplog.records if "undo record" in r.getMessage() and key in r.getMessage()]


def test_lora_file_rewritten_in_place(setup, monkeypatch):
    """A LoRA file overwritten (shorter) while applied must not be read through the old mapping (a
    crash, SIGBUS) nor give wrong addends: the patched weights come from the checkpoint instead.
    Catches: the file's identity not checked before undoing."""
    m, ckpt, sd, (la, _), paths = setup
    _state(m, ckpt, "unet", ((la, 1.0),))
    with open(paths[0], "r+b") as f:
        f.truncate(16)
    back = _state(m, ckpt, "unet")
    assert all(torch.equal(back[k], bits(sd["unet"][k])) for k in back)


def test_dora_weights_come_from_the_file(setup, tmp_path):
    """DoRA rescales by W's own norm (no exact elementwise undo): only its weights are re-read, exactly.
    Catches: a record made for DoRA (wrong values back), the whole network re-read."""
    m, ckpt, sd, (la, _), _ = setup
    key = "input_blocks.4.1.proj_in.weight"
    g = torch.Generator().manual_seed(3)
    name = "lora_unet_input_blocks_4_1_proj_in"
    path = tmp_path / "dora.safetensors"
    save_file({f"{name}.lora_up.weight": torch.randn(64, 2, generator=g) * 0.1,
               f"{name}.lora_down.weight": torch.randn(2, 64, generator=g) * 0.1,
               f"{name}.dora_scale": 0.5 + torch.rand(64, 1, generator=g)}, str(path))
    cfg, _ = m.inspect(ckpt)
    dora = m.lora(path, cfg)
    read = []
    original = checkpoint.read_module_tensors

    def counting(path, part, keys, **kw):
        keys = list(keys)
        read.extend(keys)
        return original(path, part, keys, **kw)

    _state(m, ckpt, "unet", ((dora, 0.8), (la, 1.0)))
    checkpoint.read_module_tensors = counting
    try:
        back = _state(m, ckpt, "unet")
    finally:
        checkpoint.read_module_tensors = original
    assert read == [key]
    assert all(torch.equal(back[k], bits(sd["unet"][k])) for k in back)
