"""Encode a prompt pair with SDXL's text encoders, as ComfyUI's CLIPTextEncodeSDXL does (FACTS.md §4, §12).

Base: `text_g` → OpenCLIP bigG (pads with 0), `text_l` → CLIP-L (pads with 49407). Each stream is
cut into 77-token chunks (prompt.py); the stream with fewer chunks gets empty-prompt chunks so both
have k. Every chunk of a stream is encoded in one batch; the output is the penultimate hidden state
with no final LayerNorm (transformers `hidden_states[-2]`), CLIP-L first → [1, 77·k, 768 + 1280].
The pooled vector is bigG's `text_embeds` (final LayerNorm at the first EOS, then the projection)
of the first chunk only. Refiner (no CLIP-L): bigG alone → [1, 77·k, 1280]; `text_l` is ignored.

Weights follow ComfyUI's `ClipTokenWeightEncoder.encode_token_weights`: when a stream has any
weight ≠ 1, the empty prompt is encoded in the same batch and each weighted token becomes
`(z − z_empty)·w + z_empty`, per stream, in float32, before the concatenation. Pooled is unweighted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .config import CLIP_G, CLIP_L, CONTEXT_LENGTH
from .errors import ConditioningError
from .prompt import PromptTooLong, TokenChunk, empty_chunk, tokenize_prompt
from .tokenizer import CLIPBPETokenizer
from .types import TextEmbedding

log = logging.getLogger(__name__)

MAX_CHUNKS = 50  # 50 × 75 = 3750 prompt tokens per stream
PAD_L = CLIP_L.pad_token  # 49407
PAD_G = CLIP_G.pad_token  # 0


@dataclass(frozen=True)
class TextEncoders:
    """What a checkpoint loader returns for the text side (the `SDXL_CLIP` payload).

    clip_l: CLIP ViT-L/14 (`CLIPTextModel`), None for a refiner checkpoint.
    clip_g: OpenCLIP ViT-bigG/14 as `CLIPTextModelWithProjection`.
    tokenizer: the CLIP BPE tokenizer (`tokenizer.load_tokenizer()`), shared by both streams.
    """

    clip_l: CLIPTextModel | None
    clip_g: CLIPTextModelWithProjection
    tokenizer: CLIPBPETokenizer

    @property
    def is_refiner(self) -> bool:
        return self.clip_l is None


@dataclass(frozen=True)
class PromptTokens:
    """Both streams' chunks, the same count k in each. `l` is None for a refiner."""

    g: tuple[TokenChunk, ...]
    l: tuple[TokenChunk, ...] | None

    @property
    def num_chunks(self) -> int:
        return len(self.g)


def _check_text(name: str, value: object, max_chars: int | None = None) -> str:
    if not isinstance(value, str):
        raise ConditioningError(f"{name} must be a string (the prompt text), got {type(value).__name__}: {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (an unpaired \\uD800-\\uDFFF escape in the workflow JSON)
        raise ConditioningError(f"{name} is not valid Unicode: a lone surrogate at character {e.start}; retype "
                                "that character") from None
    if max_chars is not None and len(value) > max_chars:
        raise ConditioningError(f"{name} is {len(value)} characters long; the limit prompt_chars is {max_chars}. "
                                "Shorten the prompt.")
    return value


def _tokenize_stream(name: str, text: str, tokenizer: CLIPBPETokenizer, pad_token: int,
                     should_stop=None) -> list[TokenChunk]:
    limit = f"the limit is {MAX_CHUNKS} chunks ({MAX_CHUNKS * (CONTEXT_LENGTH - 2)} tokens). Shorten the prompt."
    try:  # stops counting at the limit: a 10 MB prompt is refused after its first few thousand tokens
        chunks = tokenize_prompt(text, tokenizer, pad_token, max_tokens=MAX_CHUNKS * (CONTEXT_LENGTH - 2),
                                 should_stop=should_stop)
    except PromptTooLong as e:
        raise ConditioningError(f"{name} is too long: {e}; {limit}") from None
    if len(chunks) > MAX_CHUNKS:
        raise ConditioningError(f"{name} is too long: {len(chunks)} chunks of 75 tokens; {limit}")
    for c in chunks:
        bad = [w for w in c.weights if not math.isfinite(w)]
        if bad:
            raise ConditioningError(
                f"{name}: prompt weight {bad[0]} is not a finite number (from a `(text:{bad[0]})` group); "
                "use a weight such as 1.2"
            )
    return chunks


def tokenize_prompt_pair(
    tokenizer: CLIPBPETokenizer, text_g: str, text_l: str | None = None, *, refiner: bool = False,
    should_stop=None, max_chars: int | None = None,
) -> PromptTokens:
    """Tokenize a prompt pair into equal numbers of 77-token chunks (ComfyUI's CLIPTextEncodeSDXL).

    `text_l=None` uses `text_g` for both (ComfyUI's plain CLIPTextEncode). With `refiner=True` only
    the bigG stream exists and `text_l` is ignored. Raises ConditioningError for a non-string text,
    a stream over MAX_CHUNKS chunks (or over `max_chars` characters), or a weight that is not finite
    (`(x:inf)`, `(x:nan)`); `should_stop()` is polled while tokenizing (:class:`Cancelled`).
    """
    _check_text("text_g", text_g, max_chars)
    if text_l is not None:
        _check_text("text_l", text_l, max_chars)
    g = _tokenize_stream("text_g", text_g, tokenizer, PAD_G, should_stop)
    if refiner:
        if text_l is not None and text_l != text_g:
            log.debug("refiner text encoder has no CLIP-L: text_l ignored")
        return PromptTokens(tuple(g), None)
    l = _tokenize_stream("text_l", text_g if text_l is None else text_l, tokenizer, PAD_L, should_stop)
    k = max(len(g), len(l))
    g += [empty_chunk(PAD_G)] * (k - len(g))
    l += [empty_chunk(PAD_L)] * (k - len(l))
    return PromptTokens(tuple(g), tuple(l))


def _encode_stream(
    model: CLIPTextModel | CLIPTextModelWithProjection, chunks: tuple[TokenChunk, ...], pad_token: int,
    layer: int = -2,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k chunks → (hidden states of `layer` [k, 77, D] float32 weighted, pooled of chunk 0 [1, P] | None).

    layer -2 (SDXL's default) is the penultimate block's output, -1 the last block's, both without
    the final LayerNorm; beyond the encoder's depth, the final (normed) output (ComfyUI CLIPSetLastLayer).
    """
    device = model.get_input_embeddings().weight.device
    weighted = any(c.has_weights for c in chunks)
    rows = [c.ids for c in chunks] + ([empty_chunk(pad_token).ids] if weighted else [])
    ids = torch.tensor(rows, dtype=torch.long, device=device)  # (k [+1], 77)
    out = model(input_ids=ids, output_hidden_states=True)
    if not -len(out.hidden_states) < layer < 0:
        z = out.last_hidden_state.float()
    else:
        z = out.hidden_states[layer].float()  # (k [+1], 77, D): output of that block, no LN
    pooled = out.text_embeds[:1].float() if isinstance(model, CLIPTextModelWithProjection) else None
    if weighted:
        z, z_empty = z[:-1], z[-1:]
        w = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=device)[..., None]  # (k, 77, 1)
        z = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)
    return z, pooled


def encode_tokens(encoders: TextEncoders, tokens: PromptTokens, layer: int = -2) -> TextEmbedding:
    """Run the encoders on tokenized chunks → TextEmbedding (float32, on the encoders' device).

    crossattn [1, 77·k, 768 + 1280] (base) or [1, 77·k, 1280] (refiner); pooled [1, 1280].
    """
    if encoders.is_refiner != (tokens.l is None):
        want = "bigG only" if encoders.is_refiner else "CLIP-L and bigG"
        raise ConditioningError(f"tokens do not match the encoders: these encoders take {want}; "
                                f"tokenize with refiner={encoders.is_refiner}")
    with torch.inference_mode():
        z_g, pooled = _encode_stream(encoders.clip_g, tokens.g, PAD_G, layer)
        if tokens.l is not None:
            z_l, _ = _encode_stream(encoders.clip_l, tokens.l, PAD_L, layer)
            z = torch.cat([z_l, z_g.to(z_l.device)], dim=-1)  # (k, 77, 768 + 1280): CLIP-L first
        else:
            z = z_g
        crossattn = z.reshape(1, -1, z.shape[-1])  # (1, 77·k, D): chunks one after another
    if pooled is None:
        raise ConditioningError(f"clip_g must be a CLIPTextModelWithProjection (bigG with its text projection), "
                                f"got {type(encoders.clip_g).__name__}")
    return TextEmbedding(crossattn=crossattn, pooled=pooled.to(crossattn.device))


def encode_prompt(encoders: TextEncoders, text_g: str, text_l: str | None = None, *, layer: int = -2,
                  should_stop=None, max_chars: int | None = None) -> TextEmbedding:
    """Encode a prompt pair: ComfyUI's CLIPTextEncodeSDXL (base) or CLIPTextEncodeSDXLRefiner (refiner).

    text_g: prompt for OpenCLIP bigG. text_l: prompt for CLIP-L; None means "same as text_g"
    (ComfyUI's plain CLIPTextEncode). A refiner has no CLIP-L, so it ignores `text_l`.
    Returns float32 tensors on the encoders' device: crossattn [1, 77·k, 2048] (base) or
    [1, 77·k, 1280] (refiner) and pooled [1, 1280]. Raises ConditioningError (see
    `tokenize_prompt_pair`).
    """
    tokens = tokenize_prompt_pair(encoders.tokenizer, text_g, text_l, refiner=encoders.is_refiner,
                                  should_stop=should_stop, max_chars=max_chars)
    return encode_tokens(encoders, tokens, layer)
