"""The CLIP byte-pair tokenizer shared by both SDXL text encoders, built from a file shipped in the package.

Single-file checkpoints carry no tokenizer and nothing may be downloaded at run time, so the package
ships OpenAI's `bpe_simple_vocab_16e6.txt.gz` (taken unchanged from the open_clip_torch 3.3.0 wheel;
MIT, © OpenAI, notice in `data/LICENSE-openai-clip.txt`). FACTS.md §3: the vocabulary is the 256
byte characters, the same 256 with `</w>`, the first 48,894 merges of the file in order, then
`<|startoftext|>` (49406) and `<|endoftext|>` (49407) — 49,408 ids, identical to ComfyUI's
`sd1_tokenizer/vocab.json`.

The text pipeline (NFC, whitespace runs → one space, lower case, CLIP's split pattern, byte-level
mapping, BPE with the `</w>` end-of-word suffix) is the one transformers' `CLIPTokenizer` builds
on the `tokenizers` library, so ids are equal to `CLIPTokenizer`'s; tests/test_tokenizer.py checks
that on a corpus of awkward strings.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .config import BOS_TOKEN, EOS_TOKEN, VOCAB_SIZE

log = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48_894  # the file holds more; CLIP uses the first 49152 - 256 - 2 (open_clip SimpleTokenizer)
BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"

# CLIP's pre-tokenization pattern (open_clip `SimpleTokenizer.pat`, transformers `CLIPTokenizer`):
# the special tokens, English contractions, letter runs, single digits, other non-space runs.
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character map (the 256-symbol base alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 bytes to U+0100 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping  # insertion order = vocabulary order: printable bytes first, then the rest


def vocab_from_bpe(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, merges) from the lines of `bpe_simple_vocab_16e6.txt` (first line is a header)."""
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"BPE file: expected {N_MERGES} two-part merge lines after the header, got {len(merges)}")
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS_TEXT, EOS_TEXT]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[BOS_TEXT] != BOS_TOKEN or vocab[EOS_TEXT] != EOS_TOKEN:
        raise ValueError(f"BPE file: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE} with BOS 49406, EOS 49407")
    return vocab, merges  # type: ignore[return-value]


class CLIPBPETokenizer:
    """Text → CLIP token ids (no BOS/EOS: prompt chunking adds them). Thread-safe, immutable in use."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        model = BPE(
            vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
            fuse_unk=False, unk_token=EOS_TEXT,  # transformers' default unk; unreachable (byte-level alphabet)
        )
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # Like CLIPTokenizer: "<|startoftext|>"/"<|endoftext|>" typed in a prompt are the special ids.
        tok.add_special_tokens([AddedToken(BOS_TEXT, special=True), AddedToken(EOS_TEXT, special=True)])
        self._tok = tok
        self.vocab_size = len(vocab)
        self.bos_id = vocab[BOS_TEXT]
        self.eos_id = vocab[EOS_TEXT]

    @classmethod
    def from_vocab_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> CLIPBPETokenizer:
        """From a diffusers/transformers folder's `vocab.json` + `merges.txt` (e.g. `tokenizer_2/`)."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges)  # type: ignore[arg-type]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many strings at once (the `tokenizers` library may use several threads)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Best-effort text of `ids` (for logs and debugging): `</w>` becomes a space."""
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        data = bytearray()
        for i in ids:
            piece = self._tok.id_to_token(i) or ""
            if piece in (BOS_TEXT, EOS_TEXT):
                continue
            word_end = piece.endswith("</w>")
            data.extend(byte_of[c] for c in piece.removesuffix("</w>"))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> CLIPBPETokenizer:
    """The tokenizer built from the shipped BPE file; built once per process (≈0.2 s), then cached."""
    data = resources.files(__package__).joinpath("data", BPE_FILE)
    with data.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    vocab, merges = vocab_from_bpe(lines)
    log.debug("CLIP tokenizer: %d tokens, %d merges from %s", len(vocab), len(merges), BPE_FILE)
    return CLIPBPETokenizer(vocab, merges)
