"""Prompt-pair encoding against transformers' CLIP models on the same tiny random weights (FACTS.md §12)."""

from __future__ import annotations

import pytest
import torch

from sdxl_nodes.sdxl_core.clip import build_text_encoder
from sdxl_nodes.sdxl_core.config import TINY_CLIP_G, TINY_CLIP_L
from sdxl_nodes.sdxl_core.errors import ConditioningError
from sdxl_nodes.sdxl_core.prompt import empty_chunk
from sdxl_nodes.sdxl_core.text import (
    MAX_CHUNKS,
    TextEncoders,
    encode_prompt,
    encode_tokens,
    tokenize_prompt_pair,
)
from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

BOS, EOS = 49406, 49407
LONG_L = " ".join(["a photo of a cat"] * 40)  # 160 tokens → 3 chunks


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """normal(0, 0.02) weights and biases, LayerNorm weights 1 + N(0, 0.05²), so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def encoders() -> TextEncoders:
    clip_l = _randomize(build_text_encoder(TINY_CLIP_L), seed=1)
    clip_g = _randomize(build_text_encoder(TINY_CLIP_G), seed=2)
    return TextEncoders(clip_l=clip_l, clip_g=clip_g, tokenizer=load_tokenizer())


@pytest.fixture(scope="module")
def refiner(encoders) -> TextEncoders:
    return TextEncoders(clip_l=None, clip_g=encoders.clip_g, tokenizer=encoders.tokenizer)


def _reference(model, rows: list[tuple[int, ...]]):
    """transformers' own forward on the same ids: (hidden_states[-2], text_embeds or None)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(rows), output_hidden_states=True)
    return out.hidden_states[-2].float(), getattr(out, "text_embeds", None)


def test_shapes_one_chunk(encoders):
    emb = encode_prompt(encoders, "a red car", "a red car, photo")
    assert emb.crossattn.shape == (1, 77, 32 + 64) and emb.pooled.shape == (1, 64)
    assert emb.crossattn.dtype == emb.pooled.dtype == torch.float32


def test_three_chunk_l_pads_g_with_empty_chunks(encoders):
    tokens = tokenize_prompt_pair(encoders.tokenizer, "a red car", LONG_L)
    assert tokens.num_chunks == 3 and len(tokens.l) == 3
    assert tokens.g[1:] == (empty_chunk(0), empty_chunk(0))  # g got two empty chunks (pad 0)
    emb = encode_tokens(encoders, tokens)
    assert emb.crossattn.shape == (1, 231, 96)
    # the g half of chunks 2 and 3 is bigG's encoding of [BOS, EOS, 0…]
    z_empty, _ = _reference(encoders.clip_g, [empty_chunk(0).ids])
    torch.testing.assert_close(emb.crossattn[0, 77:154, 32:], z_empty[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.crossattn[0, 154:, 32:], z_empty[0], rtol=1e-5, atol=1e-6)


def test_empty_prompts(encoders):
    tokens = tokenize_prompt_pair(encoders.tokenizer, "", "")
    assert tokens.g == (empty_chunk(0),) and tokens.l == (empty_chunk(EOS),)
    assert tokens.l[0].ids == (BOS, EOS) + (EOS,) * 75 and tokens.g[0].ids == (BOS, EOS) + (0,) * 75
    assert encode_prompt(encoders, "", "").crossattn.shape == (1, 77, 96)


def test_text_path_equals_transformers(encoders):
    tokens = tokenize_prompt_pair(encoders.tokenizer, "a red car on a wet road", LONG_L)
    emb = encode_tokens(encoders, tokens)
    z_l, _ = _reference(encoders.clip_l, [c.ids for c in tokens.l])
    z_g, pooled = _reference(encoders.clip_g, [c.ids for c in tokens.g])
    expected = torch.cat([z_l, z_g], dim=-1).reshape(1, -1, 96)  # CLIP-L first, chunks in order
    torch.testing.assert_close(emb.crossattn, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.pooled, pooled[:1], rtol=1e-5, atol=1e-6)  # first chunk only


def test_pooled_uses_first_eos_and_penultimate_has_no_final_ln(encoders):
    tokens = tokenize_prompt_pair(encoders.tokenizer, "a cat", "a cat")
    g = encoders.clip_g
    ids = torch.tensor([tokens.g[0].ids])
    with torch.no_grad():
        out = g(input_ids=ids, output_hidden_states=True)
        eos = tokens.g[0].ids.index(EOS)
        by_hand = g.text_projection(g.text_model.final_layer_norm(out.hidden_states[-1])[0, eos])
    emb = encode_tokens(encoders, tokens)
    torch.testing.assert_close(emb.pooled[0], by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(emb.crossattn[0, :, 32:], out.last_hidden_state[0], atol=1e-3)


def test_weights_applied_against_the_empty_prompt(encoders):
    tokens = tokenize_prompt_pair(encoders.tokenizer, "a (red:1.5) car", "a ((blue)) car")
    emb = encode_tokens(encoders, tokens)
    # transformers on the same batch that ComfyUI builds: the chunk, then the empty prompt
    z_g, _ = _reference(encoders.clip_g, [tokens.g[0].ids, empty_chunk(0).ids])
    z_l, _ = _reference(encoders.clip_l, [tokens.l[0].ids, empty_chunk(EOS).ids])
    g, l = emb.crossattn[0, :, 32:], emb.crossattn[0, :, :32]
    # g: "red" at position 2 weighted 1.5; l: "blue" at position 2 weighted 1.1·1.1
    torch.testing.assert_close(g[2], (z_g[0, 2] - z_g[1, 2]) * 1.5 + z_g[1, 2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l[2], (z_l[0, 2] - z_l[1, 2]) * (1.1 * 1.1) + z_l[1, 2], rtol=1e-5, atol=1e-6)
    for j in (0, 1, 3, 4, 40):  # unweighted positions are the plain encoding
        torch.testing.assert_close(g[j], z_g[0, j], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l[j], z_l[0, j], rtol=1e-5, atol=1e-6)
    plain = encode_prompt(encoders, "a red car", "a blue car")
    assert not torch.allclose(emb.crossattn[0, 2], plain.crossattn[0, 2], atol=1e-4)
    torch.testing.assert_close(emb.pooled, plain.pooled)  # pooled is not weighted (same ids)


def test_text_l_none_means_same_text(encoders):
    a = encode_prompt(encoders, "a (red) car")
    b = encode_prompt(encoders, "a (red) car", "a (red) car")
    torch.testing.assert_close(a.crossattn, b.crossattn)


def test_refiner_is_bigg_only_and_ignores_text_l(refiner, encoders):
    emb = encode_prompt(refiner, "a red car", "something else entirely")
    assert emb.crossattn.shape == (1, 77, 64) and emb.pooled.shape == (1, 64)
    torch.testing.assert_close(emb.crossattn, encode_prompt(refiner, "a red car").crossattn)
    base = encode_prompt(encoders, "a red car", "x")
    torch.testing.assert_close(emb.crossattn, base.crossattn[..., 32:])
    long = encode_prompt(refiner, LONG_L)
    assert long.crossattn.shape == (1, 231, 64)


def test_bf16_encoders_return_float32(encoders):
    bf = TextEncoders(
        clip_l=_randomize(build_text_encoder(TINY_CLIP_L), 1).to(torch.bfloat16),
        clip_g=_randomize(build_text_encoder(TINY_CLIP_G), 2).to(torch.bfloat16),
        tokenizer=encoders.tokenizer,
    )
    emb = encode_prompt(bf, "a (red:1.2) car")
    assert emb.crossattn.dtype == emb.pooled.dtype == torch.float32
    ref = encode_prompt(encoders, "a (red:1.2) car")
    torch.testing.assert_close(emb.crossattn, ref.crossattn, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [None, 3, 1.5, ["a cat"], b"a cat"])
def test_non_string_text_g(encoders, bad):
    with pytest.raises(ConditioningError, match=f"text_g must be a string .*got {type(bad).__name__}"):
        encode_prompt(encoders, bad, "x")


@pytest.mark.parametrize("bad", [3, ["a cat"], b"a cat", {"text": "x"}])
def test_non_string_text_l(encoders, bad):  # None is allowed: "same as text_g"
    with pytest.raises(ConditioningError, match=f"text_l must be a string .*got {type(bad).__name__}"):
        encode_prompt(encoders, "x", bad)


def test_refiner_still_checks_text_l_type(refiner):
    with pytest.raises(ConditioningError, match="text_l must be a string .*got int: 5"):
        encode_prompt(refiner, "x", 5)


def test_too_many_chunks(encoders):
    text = "a " * (75 * MAX_CHUNKS + 1)  # one token over 50 chunks
    with pytest.raises(ConditioningError, match=r"text_l is too long: more than 3750 tokens.*limit is 50 chunks \(3750 tokens\)"):
        encode_prompt(encoders, "x", text)
    tokens = tokenize_prompt_pair(encoders.tokenizer, "a " * (75 * MAX_CHUNKS), "x")  # exactly at the limit
    assert tokens.num_chunks == MAX_CHUNKS


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_weight(encoders, weight):
    with pytest.raises(ConditioningError, match="text_g: prompt weight .* is not a finite number"):
        encode_prompt(encoders, f"a (cat:{weight})", "x")


def test_tokens_must_match_encoders(encoders, refiner):
    with pytest.raises(ConditioningError, match="refiner=True"):
        encode_tokens(refiner, tokenize_prompt_pair(encoders.tokenizer, "x", "y"))
