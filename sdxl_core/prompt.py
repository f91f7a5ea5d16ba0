"""Prompt weights and 77-token chunks, with ComfyUI's semantics (FACTS.md §12).

Reference: ComfyUI `comfy/sd1_clip.py` — `escape_important`, `parse_parentheses`, `token_weights`
and `SDTokenizer.tokenize_with_weights` (v0.8.0). This is our own implementation of the same
reading, so a prompt typed in ComfyUI gives the same (token, weight) chunks here:

* `(text)` multiplies the enclosing weight by 1.1 (`((x))` = 1.1·1.1); `(text:1.5)` *sets* it to
  `float("1.5")` (anything Python's `float` accepts, whitespace, `1e1`, `inf`, `nan` included); the
  weight is read after the last `:` of the group, and only when that `:` is not its first character.
* `\\(` and `\\)` are literal parentheses; `[ ]` are ordinary text.
* Malformed input is read as ComfyUI reads it, never an error: a stray `)` at the outermost level
  takes the parenthesis count below zero, and until a `(` brings it back to zero, parentheses are
  plain text (`a) (b)` is one unweighted segment); an unclosed `(` makes the rest of its text one
  item, which is a weighted group only if it ends in `)` (`((cat)` → `(cat` at 1.1).
* Each weighted segment is one "word" for chunking (ComfyUI no longer splits on spaces); a segment
  is split only before ` embedding:` / `\\nembedding:`; `embedding:name` is then a word of its own
  (its vectors come from the embeddings folder, text.py) and the text after the name another.
* Chunks: BOS + up to 75 tokens + EOS + padding to 77 with the stream's pad token (weight 1.0 for
  all three). A word of ≥ 8 tokens may be split across chunks; a shorter word that does not fit is
  moved whole to the next chunk. An empty prompt is one chunk [BOS, EOS, pad…].

Unlike ComfyUI, parsing is iterative and linear in the length of the prompt: ComfyUI re-scans
every group at every nesting level and hits Python's recursion limit on deeply nested prompts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Protocol

from .config import BOS_TOKEN, CONTEXT_LENGTH, EOS_TOKEN
from .errors import Cancelled, ConditioningError

log = logging.getLogger(__name__)

PAREN_WEIGHT = 1.1  # one pair of parentheses
MAX_WORD_LENGTH = 8  # a word with at least this many tokens may be split across chunks
EMBEDDING_PREFIX = "embedding:"

# `\)` and `\(` are hidden from the parser behind two control characters, as ComfyUI does.
_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"
_EMBEDDING_SPLIT = re.compile(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class TokenChunk:
    """One encoder input row: `ids` and per-token `weights`, both of length 77."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def has_weights(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def _escape(text: str) -> str:
    return text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)


def _unescape(text: str) -> str:
    return text.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "(")


def _matching_close(s: str) -> dict[int, int]:
    """Index of each '(' → index of the ')' that brings the count opened by it back to zero."""
    match: dict[int, int] = {}
    opened: list[int] = []
    for m in re.finditer(r"[()]", s):
        if m.group() == "(":
            opened.append(m.start())
        elif opened:
            match[opened.pop()] = m.start()
    return match


def _top_level_items(s: str) -> list[tuple[str, int, int]]:
    """Split the whole prompt like ComfyUI's `parse_parentheses`: its count may go below zero here.

    Returns ("text", start, end) and ("group", inner_start, inner_end) items in order.
    """
    items: list[tuple[str, int, int]] = []
    depth, start = 0, 0
    for m in re.finditer(r"[()]", s):
        i = m.start()
        if m.group() == "(":
            if depth == 0:
                if i > start:
                    items.append(("text", start, i))
                start = i
            depth += 1
        else:
            depth -= 1
            if depth == 0:  # only a group opened at depth 0 closes here
                items.append(("group", start + 1, i))
                start = i + 1
    if start < len(s):
        items.append(_unclosed_item(s, start, len(s)))
    return items


def _unclosed_item(s: str, start: int, end: int) -> tuple[str, int, int]:
    """The rest of a range, starting at `start`; a weighted group when it is `(…)` (even if unbalanced)."""
    if s[start] == "(" and end - start >= 2 and s[end - 1] == ")":
        return ("group", start + 1, end - 1)
    return ("text", start, end)


def _inner_items(s: str, lo: int, hi: int, match: dict[int, int]) -> list[tuple[str, int, int]]:
    """Split a group's inside, s[lo:hi]. Inside a group the count never goes below zero, so the
    depth-0 groups are exactly the matched pairs, and the text between them has no parentheses."""
    items: list[tuple[str, int, int]] = []
    cur = lo
    while cur < hi:
        p = s.find("(", cur, hi)
        if p < 0:
            items.append(("text", cur, hi))
            break
        if p > cur:
            items.append(("text", cur, p))
        q = match.get(p, -1)
        if 0 <= q < hi:
            items.append(("group", p + 1, q))
            cur = q + 1
        else:
            items.append(_unclosed_item(s, p, hi))
            break
    return items


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Prompt → [(segment text, weight), …] in order, with ComfyUI's weighting syntax (see module doc).

    Never raises on malformed syntax. Segments keep their spaces; empty segments are omitted;
    `\\(`/`\\)` come back as plain parentheses.
    """
    s = _escape(text)
    match = _matching_close(s)
    out: list[tuple[str, float]] = []
    # Depth-first over (kind, start, end, weight); the stack holds the remaining items reversed.
    stack = [(kind, a, b, 1.0) for kind, a, b in reversed(_top_level_items(s))]
    while stack:
        kind, lo, hi, weight = stack.pop()
        if kind == "text":
            out.append((_unescape(s[lo:hi]), weight))
            continue
        weight *= PAREN_WEIGHT
        items = _inner_items(s, lo, hi, match)
        # `(inner:w)`: the last ':' of the inside. A ':' before any parenthesis leaves text with a
        # parenthesis after it, which float() rejects, so only the last text item needs a look.
        if items and items[-1][0] == "text":
            colon = s.rfind(":", items[-1][1], hi)
            if colon > lo:
                try:
                    weight = float(s[colon + 1 : hi])
                except ValueError:
                    pass
                else:
                    items = _inner_items(s, lo, colon, match)
        stack.extend((k, a, b, weight) for k, a, b in reversed(items))
    return out


def split_words(segment: str) -> list[str]:
    """A weighted segment → the words ComfyUI tokenizes separately (chunking never splits a short word).

    The segment is cut before each ` embedding:`/`\\nembedding:`. An embedding word becomes the word
    `embedding:<name>` (read by text.py's tokenizer as the file's vectors) followed by what came after
    the name, as ComfyUI does.
    """
    pieces = _EMBEDDING_SPLIT.split(segment)
    words = [pieces[0]] + [EMBEDDING_PREFIX + p for p in pieces[1:]]
    out = []
    for word in words:
        if word == "":
            continue
        if word.startswith(EMBEDDING_PREFIX):
            name_and_rest = word[len(EMBEDDING_PREFIX):].strip("\n").split()
            if not name_and_rest:  # ComfyUI fails with IndexError here; we keep the text
                out.append(word)
                continue
            name, leftover = name_and_rest[0], " ".join(name_and_rest[1:])
            stripped = name.strip(",")
            if len(stripped) < len(name):  # ComfyUI retries without commas and keeps this tail
                leftover = f"{name[len(stripped):]} {leftover}"
            out.append(EMBEDDING_PREFIX + stripped)  # its own word: the tokenizer turns it into vectors
            if leftover == "":
                continue
            word = leftover
        out.append(word)
    return out


def empty_chunk(pad_token: int, length: int = CONTEXT_LENGTH) -> TokenChunk:
    """[BOS, EOS, pad…] — the empty prompt, also used to extend the shorter stream and for weighting."""
    ids = (BOS_TOKEN, EOS_TOKEN) + (pad_token,) * (length - 2)
    return TokenChunk(ids, (1.0,) * length)


def chunk_words(
    words: list[list[tuple[int, float]]], pad_token: int, length: int = CONTEXT_LENGTH
) -> list[TokenChunk]:
    """Pack token groups ("words") into chunks of BOS + ≤ length−2 tokens + EOS + padding.

    A group of ≥ MAX_WORD_LENGTH tokens that does not fit fills the chunk and continues in the next
    one; a shorter group that does not fit closes the chunk (EOS, padding) and starts the next.
    Linear in the number of tokens: a long group is walked with an offset, never re-sliced.
    """
    room = length - 1  # everything but the EOS
    chunks: list[list[tuple[int, float]]] = []
    cur: list[tuple[int, float]] = [(BOS_TOKEN, 1.0)]
    for group in words:
        splittable = len(group) >= MAX_WORD_LENGTH
        pos = 0  # tokens of this group already placed
        while pos < len(group):
            if len(cur) + len(group) - pos <= room:
                cur.extend(group[pos:])
                break
            if splittable:
                free = room - len(cur)
                cur.extend(group[pos : pos + free])
                pos += free
            cur.append((EOS_TOKEN, 1.0))
            cur.extend([(pad_token, 1.0)] * (length - len(cur)))
            chunks.append(cur)
            cur = [(BOS_TOKEN, 1.0)]
    cur.append((EOS_TOKEN, 1.0))
    cur.extend([(pad_token, 1.0)] * (length - len(cur)))
    chunks.append(cur)
    return [TokenChunk(tuple(t for t, _ in c), tuple(w for _, w in c)) for c in chunks]


class PromptTooLong(ConditioningError):
    """A prompt with more tokens than the caller's limit; raised as soon as the count passes it."""


CHECK_EVERY_WORDS = 64  # how often tokenization polls `should_stop`


def tokenize_prompt(
    text: str,
    tokenizer: Tokenizer,
    pad_token: int,
    *,
    max_tokens: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[TokenChunk]:
    """One stream's prompt → its 77-token chunks with per-token weights (ComfyUI's rule, module doc).

    `pad_token`: 49407 (EOS) for CLIP-L, 0 for bigG. Words are tokenized one at a time (a long one in
    pieces, `_pieces`), so the work stops early: :class:`PromptTooLong` as soon as more than
    `max_tokens` tokens are counted (the rest of the text is never tokenized), and :class:`Cancelled`
    when `should_stop()` (polled every CHECK_EVERY_WORDS pieces) says so.
    """
    words: list[list[tuple[int, float]]] = []
    count = 0
    polls = 0
    for segment, weight in parse_weights(text):
        for word in split_words(segment):
            ids: list[int] = []
            for piece in _pieces(word):
                if should_stop is not None and polls % CHECK_EVERY_WORDS == 0 and should_stop():
                    raise Cancelled(f"tokenization stopped by the caller after {count} tokens")
                polls += 1
                piece_ids = tokenizer.encode(piece)
                ids += piece_ids
                count += len(piece_ids)
                if max_tokens is not None and count > max_tokens:
                    raise PromptTooLong(f"more than {max_tokens} tokens (stopped counting at {count})")
            words.append([(t, weight) for t in ids])
    return chunk_words(words, pad_token)


PIECE_CHARS = 2048  # a long word is tokenized in pieces of about this size, cut at spaces


def _pieces(word: str):
    """A word in pieces cut just after an ASCII space, tab or newline (CLIP drops whitespace before BPE,
    so the pieces' tokens, joined, are the word's tokens); a piece has no cut point inside only when
    PIECE_CHARS characters hold no whitespace."""
    start = 0
    while len(word) - start > PIECE_CHARS:
        cut = max(word.rfind(c, start, start + PIECE_CHARS) for c in " \n\t")
        if cut < 0:  # no whitespace in the window: cut at the next one, or not at all
            found = [i for i in (word.find(c, start + PIECE_CHARS) for c in " \n\t") if i >= 0]
            if not found:
                break
            cut = min(found)
        yield word[start : cut + 1]
        start = cut + 1
    yield word[start:]
