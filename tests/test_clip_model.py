"""Our CLIP text transformer (sdxl_core/clip_model.py) against transformers' CLIP models, and a run that
never imports transformers.

Reference: transformers' `CLIPTextModel` (CLIP-L) and `CLIPTextModelWithProjection` (bigG), built from the
released configs written out in test_hyperparameters.py (tiny widths), pooling at the first EOS token
(eos_token_id 49407, as ComfyUI's CLIP and transformers ≥ 4.31 with the corrected config do), with the same
random weights copied in by name. Every hidden state, the final output and the pooled output must agree
within 1e-6 relative in fp32 (they come out bit-equal on torch 2.13 CPU; the test prints it).

Mutations tried once each (each fails a test here): CLIP-L's quick_gelu replaced by gelu, bigG's gelu by
quick_gelu; pooling on argmax of the ids instead of the first EOS (only the row without BOS/EOS can tell);
pooling at the last EOS (CLIP-L pads with EOS); the causal mask dropped; the final LayerNorm applied to
every block's output; the position embeddings not added; the text projection applied transposed;
`token_embeds` ignored; transformers imported again on the run path (the subprocess test).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hyperparameters import literal_clip_config
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdxl_nodes.sdxl_core.clip import build_text_encoder
from sdxl_nodes.sdxl_core.config import EOS_TOKEN, TINY_CLIP_G, TINY_CLIP_L

REL_TOL = 1e-6
REPO = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _pair(kind: str, seed: int):
    """(ours, transformers' reference) with the same random weights."""
    hf_cfg = literal_clip_config(kind, tiny=True)
    hf_cfg.eos_token_id = EOS_TOKEN  # the released configs say 2 (argmax pooling); SDXL pools at the first EOS
    ref = (CLIPTextModelWithProjection if kind == "clip_g" else CLIPTextModel)(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large enough that gelu vs quick_gelu and a missing mask show far above 1e-6
        for name, p in ref.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    # transformers 5's plain CLIPTextModel has no `text_model.` level; ours (and the SDXL files) do
    sd = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in sd.items()}
    ours = build_text_encoder(TINY_CLIP_G if kind == "clip_g" else TINY_CLIP_L)
    ours.load_state_dict(sd, strict=True)  # the same names and shapes, both ways
    return ours, ref


def _ids(pad: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, EOS_TOKEN - 1, (4, 77), generator=g)
    ids[:, 0] = 49406
    ids[0, 6], ids[0, 7:] = EOS_TOKEN, pad  # a tokenized prompt: BOS, words, EOS, padding
    ids[1, 40], ids[1, 41:] = EOS_TOKEN, pad
    ids[2, 76] = EOS_TOKEN  # a full chunk
    # row 3: no BOS, no EOS (pooled at position 0, as transformers and ComfyUI do). EOS is the largest id, so
    # only such a row tells pooling at the first EOS from pooling at the largest id
    ids[3, 0] = 7
    return ids


@pytest.mark.parametrize("kind,pad", [("clip_l", EOS_TOKEN), ("clip_g", 0)])
def test_matches_transformers(kind, pad):
    ours, ref = _pair(kind, seed=1 if kind == "clip_l" else 2)
    for ids in (_ids(pad), _ids(pad)[:2, :12]):  # 77 tokens, and a shorter sequence
        with torch.inference_mode():
            a = ours(input_ids=ids, output_hidden_states=True)
            b = ref(input_ids=ids, output_hidden_states=True)
        assert len(a.hidden_states) == len(b.hidden_states) == TINY_CLIP_L.layers + 1
        pairs = [(f"hidden_states[{i}]", x, y) for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states))]
        pairs.append(("last_hidden_state", a.last_hidden_state, b.last_hidden_state))
        if kind == "clip_g":
            pairs.append(("text_embeds", a.text_embeds, b.text_embeds))
        else:
            assert a.text_embeds is None  # no projection in CLIP-L
            pairs.append(("pooler_output", a.pooler_output, b.pooler_output))
        errs = {name: _rel(x, y) for name, x, y in pairs}
        print(kind, tuple(ids.shape), "bit-equal:", all(torch.equal(x, y) for _, x, y in pairs),
              "max rel:", max(errs.values()))
        bad = {k: v for k, v in errs.items() if not v <= REL_TOL}
        assert not bad, f"{kind} {tuple(ids.shape)}: relative errors above {REL_TOL}: {bad}"


def test_token_embeds_replace_the_lookup_and_get_positions():
    """Catches: `token_embeds` used as the final embeddings (positions not added), or ignored."""
    ours, _ = _pair("clip_g", seed=4)
    ids = _ids(0)[:2]
    emb = ours.get_input_embeddings()
    with torch.inference_mode():
        plain = ours(ids, output_hidden_states=True)
        same = ours(ids, output_hidden_states=True, token_embeds=emb(ids))
        other = emb(ids).clone()
        other[0, 3] = emb.weight[5]  # as if row 0's fourth token were id 5
        swapped = ids.clone()
        swapped[0, 3] = 5
        spliced, looked_up = ours(ids, token_embeds=other), ours(swapped)
    assert all(torch.equal(x, y) for x, y in zip(plain.hidden_states, same.hidden_states))
    assert torch.equal(spliced.last_hidden_state, looked_up.last_hidden_state)
    assert not torch.equal(spliced.last_hidden_state, plain.last_hidden_state)


NO_TRANSFORMERS = """
import sys
from sdxl_nodes.runtime.cli import main
code = main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "diffusers"})
print("LOADED", loaded)
sys.exit(code)
"""


def test_a_run_never_imports_transformers(tmp_path, models_dir):
    """`sdxl-nodes run` of the shipped base workflow (tiny checkpoint: load, encode, sample, decode, save) in a
    fresh interpreter leaves transformers (and diffusers, test-only too) unimported.

    Catches: a module on the run path importing transformers (e.g. the old encoders' lazy import in text.py).
    """
    argv = ["run", str(REPO / "workflows" / "sdxl_base.json"), "--models-dir", str(models_dir),
            "--input-dir", str(tmp_path / "input"), "--output-dir", str(tmp_path / "output"),
            "--temp-dir", str(tmp_path / "temp"), "--quiet",
            "--set", "6.width=64", "--set", "6.height=64", "--set", "7.steps=1"]
    proc = subprocess.run([sys.executable, "-c", NO_TRANSFORMERS, *argv], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "output").rglob("*.png")), "the run saved no image"
    assert "LOADED []" in proc.stdout.splitlines(), proc.stdout[-2000:]
