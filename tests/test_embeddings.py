"""Textual-inversion embeddings in prompts, against a hand-built reference.

The reference is the classic way to add an embedding to CLIP: new vocabulary rows holding the vectors
(what diffusers' `load_textual_inversion` does), then transformers' own forward on ids that name those
rows. Weights follow ComfyUI: (z − z_empty)·w + z_empty at the weighted positions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from test_text_encode import _randomize

from sdxl_nodes.sdxl_core.clip import build_text_encoder
from sdxl_nodes.sdxl_core.config import TINY_CLIP_G, TINY_CLIP_L
from sdxl_nodes.sdxl_core.errors import ConditioningError
from sdxl_nodes.sdxl_core.prompt import empty_chunk
from sdxl_nodes.sdxl_core.text import EMBEDDING_ID_BASE, TextEncoders, encode_tokens, tokenize_prompt_pair
from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(3)
    return {"clip_l": torch.randn(2, 32, generator=g) * 0.5, "clip_g": torch.randn(2, 64, generator=g) * 0.5}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, vectors):
    d = tmp_path_factory.mktemp("embeddings")
    save_file(vectors, str(d / "style.safetensors"))
    g = torch.Generator().manual_seed(4)
    save_file({"clip_l": torch.randn(9, 32, generator=g), "clip_g": torch.randn(9, 64, generator=g)}, str(d / "long.safetensors"))
    save_file({"emb_params": torch.randn(1, 768)}, str(d / "sd15.safetensors"))
    return TextEncoders(clip_l=_randomize(build_text_encoder(TINY_CLIP_L), 1), clip_g=_randomize(build_text_encoder(TINY_CLIP_G), 2),
                        tokenizer=load_tokenizer(), embedding_dirs=(d,))


def _with_new_tokens(model, rows: torch.Tensor):
    """A copy of `model` whose vocabulary has `rows` appended (ids 49408, 49409, …)."""
    m = copy.deepcopy(model)
    old = m.get_input_embeddings()
    new = torch.nn.Embedding(old.num_embeddings + rows.shape[0], old.embedding_dim)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        new.weight[old.num_embeddings:] = rows
    m.set_input_embeddings(new)
    return m


def _hidden(model, rows):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(rows), output_hidden_states=True)
    return out.hidden_states[-2], getattr(out, "text_embeds", None)


def test_ids_and_weighted_hidden_states(encoders, vectors):
    """Catches: vectors put at the wrong position, the stream's tensor swapped (clip_l ↔ clip_g), the
    weight not applied to the embedding, positions added twice, pooled taken at the wrong EOS."""
    tok = encoders.tokenizer
    text = "a photo of (embedding:style:1.2) cat"
    tokens = tokenize_prompt_pair(tok, text, "embedding:style.safetensors, cat", embedding_dirs=encoders.embedding_dirs)
    a_photo_of, cat, comma_cat = tok.encode("a photo of "), tok.encode(" cat"), tok.encode(", cat")
    n = len(a_photo_of)
    want_g = (BOS, *a_photo_of, EMBEDDING_ID_BASE, EMBEDDING_ID_BASE + 1, *cat, EOS)
    assert tokens.g[0].ids[: len(want_g)] == want_g and set(tokens.g[0].ids[len(want_g):]) == {0}
    assert tokens.g[0].weights[: len(want_g)] == (1.0,) * (1 + n) + (1.2, 1.2) + (1.0,) * (len(cat) + 1)
    want_l = (BOS, EMBEDDING_ID_BASE, EMBEDDING_ID_BASE + 1, *comma_cat, EOS)
    assert tokens.l[0].ids[: len(want_l)] == want_l and not tokens.l[0].has_weights

    emb = encode_tokens(encoders, tokens)
    # reference: vectors as vocabulary rows 49408, 49409
    ref_g = _with_new_tokens(encoders.clip_g, vectors["clip_g"])
    ref_l = _with_new_tokens(encoders.clip_l, vectors["clip_l"])
    ids_g = [49408 if i == EMBEDDING_ID_BASE else 49409 if i == EMBEDDING_ID_BASE + 1 else i for i in tokens.g[0].ids]
    ids_l = [49408 if i == EMBEDDING_ID_BASE else 49409 if i == EMBEDDING_ID_BASE + 1 else i for i in tokens.l[0].ids]
    z_g, pooled = _hidden(ref_g, [ids_g, list(empty_chunk(0).ids)])
    z_l, _ = _hidden(ref_l, [ids_l])
    w = torch.tensor(tokens.g[0].weights)[:, None]
    want_zg = torch.where(w != 1.0, (z_g[0] - z_g[1]) * w + z_g[1], z_g[0])
    torch.testing.assert_close(emb.crossattn[0, :, 32:], want_zg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.crossattn[0, :, :32], z_l[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.pooled, pooled[:1], rtol=1e-5, atol=1e-6)
    # and the embedding really matters: a plain word there gives something else
    plain = encode_tokens(encoders, tokenize_prompt_pair(tok, "a photo of (style:1.2) cat", "style, cat"))
    assert not torch.allclose(plain.crossattn[0, n + 1], emb.crossattn[0, n + 1], atol=1e-3)


def test_chunking_of_embedding_vectors(encoders):
    """ComfyUI's rule: a group of < 8 vectors that does not fit moves whole to the next chunk; ≥ 8 splits."""
    tok = encoders.tokenizer
    filler = "x " * 74  # 74 tokens
    t = tokenize_prompt_pair(tok, filler + "embedding:style", filler + "embedding:long", embedding_dirs=encoders.embedding_dirs)
    assert t.num_chunks == 2
    g0, g1 = t.g
    assert EMBEDDING_ID_BASE not in g0.ids and g1.ids[1:3] == (EMBEDDING_ID_BASE, EMBEDDING_ID_BASE + 1)
    l0, l1 = t.l  # 9 vectors: one fills chunk 0 (position 75), eight go on
    assert l0.ids[75] == EMBEDDING_ID_BASE and l1.ids[1:9] == tuple(EMBEDDING_ID_BASE + i for i in range(1, 9))


def test_missing_embedding_names_the_file_and_folder(encoders):
    folder = str(encoders.embedding_dirs[0])
    with pytest.raises(ConditioningError, match=f"embedding:nope not found: looked for 'nope', 'nope.safetensors', 'nope.pt', 'nope.bin' in {folder}"):
        tokenize_prompt_pair(encoders.tokenizer, "a embedding:nope cat", embedding_dirs=encoders.embedding_dirs)
    with pytest.raises(ConditioningError, match=r"no embeddings folder configured"):
        tokenize_prompt_pair(encoders.tokenizer, "embedding:style")
    with pytest.raises(ConditioningError, match=r"embedding:sd15 \('emb_params' \[1, 768\] in .*\) has 768-wide vectors "
                                                r"for the clip_g encoder, which takes 64-wide"):  # ComfyUI: its only tensor
        encode_tokens(encoders, tokenize_prompt_pair(encoders.tokenizer, "embedding:sd15", embedding_dirs=encoders.embedding_dirs))
    with pytest.raises(ConditioningError, match=r"embedding:\.\./\.\./etc/passwd not found"):  # never outside the folder
        tokenize_prompt_pair(encoders.tokenizer, "a photo embedding:../../etc/passwd", embedding_dirs=encoders.embedding_dirs)

