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
read from the `embedding_dirs` of the encoders as ComfyUI's `load_embed` finds and reads them: `.safetensors`,
or `.pt`/`.bin` through PyTorch's restricted unpickler (never the unrestricted one). A missing,
unreadable or wrong-width embedding is an error naming the file (ComfyUI skips it with a warning).

Weights follow ComfyUI's `ClipTokenWeightEncoder.encode_token_weights`: when a stream has any
weight ≠ 1, the empty prompt is encoded in the same batch and each weighted token becomes
`(z − z_empty)·w + z_empty`, per stream, in float32, before the concatenation. Pooled is unweighted.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
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
    # per vector, the embedding it came from (named in the error for a vector of the wrong width)
    g_sources: tuple[str, ...] = ()
    l_sources: tuple[str, ...] = ()

    @property
    def num_chunks(self) -> int:
        return len(self.g)


EMBEDDING_ID_BASE = 1 << 24  # token ids at or above this are embedding vectors, never vocabulary ids
# what `embedding:name` tries after `name` itself, best first: ComfyUI's load_embed order
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def _embedding_folders(dirs):
    """The folders searched for an embedding: each of `dirs` in order, then every subfolder of each.

    ComfyUI (`expand_directory_list`) also looks in every subfolder (links followed) but keeps them in
    a set, so its order is undefined; ours is the configured folders first, then their subfolders in
    sorted walk order. A folder reached twice (a link loop) is walked once. Lazy: the walk only
    happens when the top folders do not have the file.
    """
    dirs = [Path(d) for d in dirs]
    yield from dirs
    seen = {os.path.realpath(d) for d in dirs}
    for d in dirs:
        for root, subdirs, _files in os.walk(d, followlinks=True):
            subdirs.sort()
            kept = []
            for s in subdirs:
                real = os.path.realpath(os.path.join(root, s))
                if real not in seen:
                    seen.add(real)
                    kept.append(s)
            subdirs[:] = kept
            if Path(root) != d:
                yield Path(root)


def find_embedding(name: str, dirs) -> Path:
    """The file of `embedding:name`, ComfyUI's lookup: in each folder in turn (`_embedding_folders`),
    `name` as given if it is a file, else `name` + each of EMBEDDING_SUFFIXES in that order.

    Names are case-sensitive where the file system is, and the suffixes are appended in lower case
    (as in ComfyUI). Confined to the folder by `paths.inside`; links are the user's own choice there.
    """
    dirs = tuple(dirs)
    for folder in _embedding_folders(dirs):
        for candidate in (name, *(name + s for s in EMBEDDING_SUFFIXES)):
            p = inside(folder, candidate, resolve_links=False)
            if p is not None and p.is_file():
                return p
    where = ", ".join(str(d) for d in dirs) + " and their subfolders" if dirs else "(no embeddings folder configured)"
    tried = ", ".join(f"'{name}{s}'" for s in ("", *EMBEDDING_SUFFIXES))
    raise ConditioningError(f"embedding:{name} not found: looked for {tried} in {where}. "
                            "Put the file in the models/embeddings folder or fix the name in the prompt.")


def _read_embedding_file(path: Path):
    """What the file holds: safetensors by its suffix (any case), anything else through PyTorch's
    restricted unpickler (tensors and plain containers only), as ComfyUI's load_embed does.

    ComfyUI reads a pickle its restricted unpickler refuses by scraping the raw storage bytes out of
    the zip and guessing a 768 or 1024 width (SD 1.x/2.x only; never right for SDXL's 1280-wide bigG).
    We refuse such a file instead, and never unpickle it without the restriction.
    """
    if path.name.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:  # safetensors' own parse errors, unreadable file
            raise ConditioningError(f"embedding {path}: cannot read it as safetensors: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler refused something
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # a class or function: unpickling it would run its code
            raise ConditioningError(
                f"embedding {path} was not loaded: besides tensors it contains other Python objects "
                f"({found.group(1)}), and unpickling those can run code. Convert it to .safetensors (load it "
                "where you trust it and save its tensors with safetensors.torch.save_file) or get a "
                ".safetensors version of it.") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise ConditioningError(f"embedding {path}: cannot read it as a PyTorch (.pt/.bin) file ({reason}); "
                                "re-download or re-export the embedding.") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
        # what torch.load raises for a file that is not a PyTorch save (bad magic number, bad zip, text)
        raise ConditioningError(f"embedding {path}: cannot read it as a PyTorch (.pt/.bin) file "
                                f"({type(e).__name__}: {e}); only names ending in .safetensors are read as "
                                "safetensors. Re-download or re-export the embedding.") from None


def _pick_vectors(data, stream: str) -> tuple[str, object]:
    """(where in the file, value) of the vectors ComfyUI's load_embed takes for `stream` (its `embed_key`).

    In order: A1111's `string_to_param` (its first entry, whatever the stream); the stream's own key
    (`clip_l` / `clip_g` of an SDXL file); the embeddings bundled in a LoRA file (`bundle_emb.*`,
    concatenated); else the file's first entry (`emb_params`, diffusers' `{token: vector}`). A bare
    tensor is taken as it is (ComfyUI v0.8.0 raises on one). A tensor of the wrong width for the
    stream is refused when the prompt is encoded, where the encoder's width is known.
    """
    if isinstance(data, torch.Tensor):
        return "the saved tensor", data
    if not isinstance(data, dict):  # ComfyUI also reads a list of dicts, keeping the tensors of the stream's
        # width; no tool we know writes one, and the width is only known when the prompt is encoded
        raise ConditioningError(f"it holds a {type(data).__name__}, not a dict of tensors or a tensor")
    if not data:
        raise ConditioningError("it holds an empty dict")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise ConditioningError(f"its 'string_to_param' is {type(params).__name__}, not a dict holding a tensor")
        key = next(iter(params))
        return f"string_to_param[{key!r}]", params[key]
    if stream in data:
        return repr(stream), data[stream]
    for tail in (".string_to_param.*", f".{stream}"):  # ComfyUI's bundled_embed
        keys = [k for k in data if isinstance(k, str) and k.startswith("bundle_emb.") and k.endswith(tail)]
        if keys:
            parts = [data[k] for k in keys]
            if not all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in parts) or len(
                    {t.shape[-1] for t in parts}) > 1:
                raise ConditioningError(f"its bundled embeddings {keys[:3]} are not tensors of one width")
            return f"bundle_emb.*{tail}", torch.cat([t.reshape(-1, t.shape[-1]) for t in parts])
    key = next(iter(data))
    return repr(key), data[key]


def load_embedding(path: Path, stream: str) -> tuple[torch.Tensor, str]:
    """The vectors [n, width] float32 of one stream ('clip_l' or 'clip_g') of an embedding file, and
    where they came from (file and entry, for error messages)."""
    data = _read_embedding_file(path)
    try:
        where, t = _pick_vectors(data, stream)
    except ConditioningError as e:
        raise ConditioningError(f"embedding {path}: {e}; an SDXL embedding carries 'clip_l' [n, 768] and "
                                "'clip_g' [n, 1280] tensors") from None
    if not isinstance(t, torch.Tensor) or t.ndim == 0 or not t.is_floating_point() or t.numel() == 0:
        got = f"{t.dtype}, {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConditioningError(f"embedding {path}: {where} (taken for {stream}) is not a float tensor of vectors "
                                f"({got}); an SDXL embedding carries 'clip_l' [n, 768] and 'clip_g' [n, 1280] tensors")
    # a 1-D vector (diffusers' learned_embeds.bin) is one token: [width] → [1, width]
    return t.reshape(-1, t.shape[-1]).float(), f"{where} {list(t.shape)} in {path}"


class _StreamTokenizer:
    """The CLIP tokenizer for one stream, reading the word `embedding:name` as that file's vectors."""

    def __init__(self, tokenizer: CLIPBPETokenizer, stream: str, dirs):
        self.tokenizer, self.stream, self.dirs = tokenizer, stream, tuple(dirs)
        self.vectors: list[torch.Tensor] = []
        self.sources: list[str] = []  # per vector: which embedding it came from (for the width check)
        self._files: dict[str, tuple[torch.Tensor, str]] = {}

    def encode(self, text: str) -> list[int]:
        if not text.startswith(EMBEDDING_PREFIX) or text == EMBEDDING_PREFIX:
            return self.tokenizer.encode(text)
        name = text[len(EMBEDDING_PREFIX):]
        if name not in self._files:
            self._files[name] = load_embedding(find_embedding(name, self.dirs), self.stream)
        vectors, where = self._files[name]
        first = EMBEDDING_ID_BASE + len(self.vectors)
        self.vectors.extend(vectors)
        self.sources.extend([f"embedding:{name} ({where})"] * len(vectors))
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
    characters), a weight that is not finite (`(x:inf)`, `(x:nan)`), or an embedding that is missing,
    unreadable, refused (a pickle holding more than tensors) or has no vectors for a stream; `should_stop()` is polled while tokenizing (:class:`Cancelled`).
    """
    _check_text("text_g", text_g, max_chars)
    if text_l is not None:
        _check_text("text_l", text_l, max_chars)
    tok_g = _StreamTokenizer(tokenizer, "clip_g", embedding_dirs)
    g = _tokenize_stream("text_g", text_g, tok_g, PAD_G, should_stop)
    if refiner:
        if text_l is not None and text_l != text_g:
            log.debug("refiner text encoder has no CLIP-L: text_l ignored")
        return PromptTokens(tuple(g), None, g_vectors=tuple(tok_g.vectors), g_sources=tuple(tok_g.sources))
    tok_l = _StreamTokenizer(tokenizer, "clip_l", embedding_dirs)
    l = _tokenize_stream("text_l", text_g if text_l is None else text_l, tok_l, PAD_L, should_stop)
    k = max(len(g), len(l))
    g += [empty_chunk(PAD_G)] * (k - len(g))
    l += [empty_chunk(PAD_L)] * (k - len(l))
    return PromptTokens(tuple(g), tuple(l), g_vectors=tuple(tok_g.vectors), l_vectors=tuple(tok_l.vectors),
                        g_sources=tuple(tok_g.sources), l_sources=tuple(tok_l.sources))


def _encode_stream(
    model: CLIPTextModel, chunks: tuple[TokenChunk, ...], pad_token: int,
    layer: int = -2,
    vectors: tuple[torch.Tensor, ...] = (), sources: tuple[str, ...] = (), stream: str = "",
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
        bad = [i for i, v in enumerate(vectors) if v.shape[-1] != width]
        if bad:  # ComfyUI drops such an embedding with a warning; we say so and stop
            what = sources[bad[0]] if bad[0] < len(sources) else "an embedding in the prompt"
            raise ConditioningError(
                f"{what} has {vectors[bad[0]].shape[-1]}-wide vectors for the {stream or 'text'} encoder, which "
                f"takes {width}-wide ones: it was made for another model (SDXL embeddings carry 'clip_l' [n, 768] "
                "and 'clip_g' [n, 1280]; an SD 1.x one is 768 wide, CLIP-L only). Use an embedding made for "
                "this model.")
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
        z_g, pooled = _encode_stream(encoders.clip_g, tokens.g, PAD_G, layer, tokens.g_vectors, tokens.g_sources,
                                      "clip_g")
        if tokens.l is not None:
            z_l, _ = _encode_stream(encoders.clip_l, tokens.l, PAD_L, layer, tokens.l_vectors, tokens.l_sources,
                                   "clip_l")
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
