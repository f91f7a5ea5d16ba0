"""Encode a prompt pair with SDXL's text encoders, as ComfyUI's CLIPTextEncodeSDXL does (FACTS.md §4, §12).

Base: `text_g` → OpenCLIP bigG (pads with 0), `text_l` → CLIP-L (pads with 49407). Each stream is
cut into 77-token chunks (prompt.py); the stream with fewer chunks gets empty-prompt chunks so both
have k. Every chunk of a stream is encoded in one batch; the output is the penultimate hidden state
with no final LayerNorm (transformers `hidden_states[-2]`), CLIP-L first → [1, 77·k, 768 + 1280].
The pooled vector is bigG's `text_embeds` (final LayerNorm at the first EOS, then the projection)
of the first chunk only. Refiner (no CLIP-L): bigG alone → [1, 77·k, 1280]; `text_l` is ignored.

Textual-inversion embeddings (`embedding:name`, `(embedding:name:1.2)`): the file's vectors for the
stream (`clip_l` / `clip_g` tensors of an SDXL embedding) take the place of tokens, one per vector, and
are chunked and weighted like a word (ComfyUI `sd1_clip.py` `tokenize_with_weights`, `process_tokens`:
the vectors are spliced into the input embeddings before the position embeddings are added). They are
read from the `embedding_dirs` of the encoders; a missing one is an error naming the folders searched.

Weights follow ComfyUI's `ClipTokenWeightEncoder.encode_token_weights`: when a stream has any
weight ≠ 1, the empty prompt is encoded in the same batch and each weighted token becomes
`(z − z_empty)·w + z_empty`, per stream, in float32, before the concatenation. Pooled is unweighted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..paths import inside
from .accel import sdpa_backends
from .config import CLIP_G, CLIP_L, CONTEXT_LENGTH
from .errors import ConditioningError
from .prompt import EMBEDDING_PREFIX, PromptTooLong, TokenChunk, empty_chunk, tokenize_prompt
from .tokenizer import CLIPBPETokenizer
from .types import TextEmbedding

if TYPE_CHECKING:
    from .clip_model import CLIPTextModel

log = logging.getLogger(__name__)

MAX_CHUNKS = 50  # 50 × 75 = 3750 prompt tokens per stream
PAD_L = CLIP_L.pad_token  # 49407
PAD_G = CLIP_G.pad_token  # 0


@dataclass(frozen=True)
class TextEncoders:
    """What a checkpoint loader returns for the text side (the `SDXL_CLIP` payload).

    clip_l: CLIP ViT-L/14 (`clip_model.CLIPTextModel`), None for a refiner checkpoint.
    clip_g: OpenCLIP ViT-bigG/14 (`clip_model.CLIPTextModel` with its text projection).
    tokenizer: the CLIP BPE tokenizer (`tokenizer.load_tokenizer()`), shared by both streams.
    """

    clip_l: CLIPTextModel | None
    clip_g: CLIPTextModel
    tokenizer: CLIPBPETokenizer
    embedding_dirs: tuple[Path, ...] = ()  # where `embedding:name` files are looked up, in order

    @property
    def is_refiner(self) -> bool:
        return self.clip_l is None


@dataclass(frozen=True)
class PromptTokens:
    """Both streams' chunks, the same count k in each. `l` is None for a refiner."""

    g: tuple[TokenChunk, ...]
    l: tuple[TokenChunk, ...] | None
    # embedding vectors per stream; an id EMBEDDING_ID_BASE + i in a chunk stands for vector i
    g_vectors: tuple[torch.Tensor, ...] = ()
    l_vectors: tuple[torch.Tensor, ...] = ()

    @property
    def num_chunks(self) -> int:
        return len(self.g)


EMBEDDING_ID_BASE = 1 << 24  # token ids at or above this are embedding vectors, never vocabulary ids
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")


def find_embedding(name: str, dirs) -> Path:
    """The file of `embedding:name`: `name` as given, else `name.safetensors`, in each folder in turn."""
    tried = []
    for d in dirs:
        found = [p for c in (name, name + ".safetensors") if (p := inside(d, c, resolve_links=False)) and p.is_file()]
        pickled = [p for s in PICKLE_SUFFIXES if (p := inside(d, name + s, resolve_links=False)) and p.is_file()]
        if found and found[0].suffix.lower() not in PICKLE_SUFFIXES:
            return found[0]
        if found or pickled:
            raise ConditioningError(f"embedding:{name}: only a pickled version ({(found or pickled)[0]}) was found; "
                                    "pickles can run code when loaded, so only .safetensors embeddings are read. "
                                    "Use a .safetensors version.")
        tried.append(str(d))
    where = ", ".join(tried) or "(no embeddings folder configured)"
    raise ConditioningError(f"embedding:{name} not found: looked for '{name}' and '{name}.safetensors' in {where}. "
                            "Put the file in the models/embeddings folder or fix the name in the prompt.")


def load_embedding(path: Path, stream: str) -> torch.Tensor:
    """The vectors [n, width] of one stream ('clip_l' or 'clip_g') of an embedding file, float32."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors' own parse errors
        raise ConditioningError(f"embedding {path}: cannot read it as safetensors: {e}") from e
    if stream in sd:
        t = sd[stream]
    elif len(sd) == 1 and stream == "clip_l":  # an SD1-style single tensor (emb_params): CLIP-L only
        t = next(iter(sd.values()))
    else:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in list(sd.items())[:4])
        raise ConditioningError(f"embedding {path} has no '{stream}' tensor (it holds {shapes}); an SDXL embedding "
                                "carries 'clip_l' [n, 768] and 'clip_g' [n, 1280] vectors")
    if t.ndim == 0 or not t.is_floating_point():
        raise ConditioningError(f"embedding {path}: '{stream}' is not a float tensor of vectors ({t.dtype}, {list(t.shape)})")
    return t.reshape(-1, t.shape[-1]).float()


class _StreamTokenizer:
    """The CLIP tokenizer for one stream, reading the word `embedding:name` as that file's vectors."""

    def __init__(self, tokenizer: CLIPBPETokenizer, stream: str, dirs):
        self.tokenizer, self.stream, self.dirs = tokenizer, stream, tuple(dirs)
        self.vectors: list[torch.Tensor] = []
        self._files: dict[str, torch.Tensor] = {}

    def encode(self, text: str) -> list[int]:
        if not text.startswith(EMBEDDING_PREFIX) or text == EMBEDDING_PREFIX:
            return self.tokenizer.encode(text)
        name = text[len(EMBEDDING_PREFIX):]
        if name not in self._files:
            self._files[name] = load_embedding(find_embedding(name, self.dirs), self.stream)
        first = EMBEDDING_ID_BASE + len(self.vectors)
        self.vectors.extend(self._files[name])
        return list(range(first, EMBEDDING_ID_BASE + len(self.vectors)))


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


def _tokenize_stream(name: str, text: str, tokenizer, pad_token: int,
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
    should_stop=None, max_chars: int | None = None, embedding_dirs=(),
) -> PromptTokens:
    """Tokenize a prompt pair into equal numbers of 77-token chunks (ComfyUI's CLIPTextEncodeSDXL).

    `text_l=None` uses `text_g` for both (ComfyUI's plain CLIPTextEncode). With `refiner=True` only
    the bigG stream exists and `text_l` is ignored. `embedding_dirs`: folders for `embedding:name`.
    Raises ConditioningError for a non-string text, a stream over MAX_CHUNKS chunks (or over `max_chars`
    characters), a weight that is not finite (`(x:inf)`, `(x:nan)`), or an embedding that is missing or
    has no vectors for a stream; `should_stop()` is polled while tokenizing (:class:`Cancelled`).
    """
    _check_text("text_g", text_g, max_chars)
    if text_l is not None:
        _check_text("text_l", text_l, max_chars)
    tok_g = _StreamTokenizer(tokenizer, "clip_g", embedding_dirs)
    g = _tokenize_stream("text_g", text_g, tok_g, PAD_G, should_stop)
    if refiner:
        if text_l is not None and text_l != text_g:
            log.debug("refiner text encoder has no CLIP-L: text_l ignored")
        return PromptTokens(tuple(g), None, g_vectors=tuple(tok_g.vectors))
    tok_l = _StreamTokenizer(tokenizer, "clip_l", embedding_dirs)
    l = _tokenize_stream("text_l", text_g if text_l is None else text_l, tok_l, PAD_L, should_stop)
    k = max(len(g), len(l))
    g += [empty_chunk(PAD_G)] * (k - len(g))
    l += [empty_chunk(PAD_L)] * (k - len(l))
    return PromptTokens(tuple(g), tuple(l), g_vectors=tuple(tok_g.vectors), l_vectors=tuple(tok_l.vectors))


def _encode_stream(
    model: CLIPTextModel, chunks: tuple[TokenChunk, ...], pad_token: int,
    layer: int = -2,
    vectors: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k chunks → (hidden states of `layer` [k, 77, D] float32 weighted, pooled of chunk 0 [1, P] | None).

    layer -2 (SDXL's default) is the penultimate block's output, -1 the last block's, both without
    the final LayerNorm; beyond the encoder's depth, the final (normed) output (ComfyUI CLIPSetLastLayer).
    `vectors`: embedding vectors that take the place of the ids at or above EMBEDDING_ID_BASE.
    """
    embed = model.get_input_embeddings()
    device = embed.weight.device
    weighted = any(c.has_weights for c in chunks)
    rows = [c.ids for c in chunks] + ([empty_chunk(pad_token).ids] if weighted else [])
    ids = torch.tensor(rows, dtype=torch.long, device=device)  # (k [+1], 77)
    token_embeds = None
    if vectors:
        width = embed.weight.shape[1]
        bad = [v.shape[-1] for v in vectors if v.shape[-1] != width]
        if bad:
            raise ConditioningError(f"an embedding in the prompt has {bad[0]}-wide vectors but this text encoder "
                                    f"takes {width}: it was made for another model")
        is_vec = ids >= EMBEDDING_ID_BASE
        slots = (ids - EMBEDDING_ID_BASE)[is_vec]
        table = torch.stack(vectors).to(device)
        # any vocabulary id in the vectors' places (never EOS): their rows are replaced
        token_embeds = embed(torch.where(is_vec, torch.zeros_like(ids), ids))  # (k [+1], 77, D)
        token_embeds[is_vec] = table[slots].to(token_embeds.dtype)  # before the positions are added
    out = model(ids, output_hidden_states=True, token_embeds=token_embeds)
    if not -len(out.hidden_states) < layer < 0:
        z = out.last_hidden_state.float()
    else:
        z = out.hidden_states[layer].float()  # (k [+1], 77, D): output of that block, no LN
    pooled = None if out.text_embeds is None else out.text_embeds[:1].float()
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
    device = next(encoders.clip_g.parameters()).device
    with torch.inference_mode(), sdpa_backends(device):
        z_g, pooled = _encode_stream(encoders.clip_g, tokens.g, PAD_G, layer, tokens.g_vectors)
        if tokens.l is not None:
            z_l, _ = _encode_stream(encoders.clip_l, tokens.l, PAD_L, layer, tokens.l_vectors)
            z = torch.cat([z_l, z_g.to(z_l.device)], dim=-1)  # (k, 77, 768 + 1280): CLIP-L first
        else:
            z = z_g
        crossattn = z.reshape(1, -1, z.shape[-1])  # (1, 77·k, D): chunks one after another
    if pooled is None:
        raise ConditioningError("clip_g must be bigG with its text projection (it gives the pooled vector); "
                                "this text encoder has none")
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
                                  should_stop=should_stop, max_chars=max_chars,
                                  embedding_dirs=encoders.embedding_dirs)
    return encode_tokens(encoders, tokens, layer)
