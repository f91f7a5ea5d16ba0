"""Weight syntax and 77-token chunking, with ComfyUI's semantics (FACTS.md §12).

Expected segments below were worked out by hand from the rules; a small recursive reading of the
same rules (written for this test) cross-checks the linear parser on random strings.
"""

from __future__ import annotations

import math
import random

import pytest

from sdxl_nodes.sdxl_core.errors import Cancelled
from sdxl_nodes.sdxl_core.prompt import (
    CHECK_EVERY_WORDS,
    PromptTooLong,
    TokenChunk,
    chunk_words,
    empty_chunk,
    parse_weights,
    split_words,
    tokenize_prompt,
)
from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

P = 1.1  # one pair of parentheses

PARSE_TABLE = [
    ("", []),
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", P)]),
    ("((cat))", [("cat", P * P)]),
    ("(((cat)))", [("cat", P * P * P)]),
    ("a (red:1.5) car", [("a ", 1.0), ("red", 1.5), (" car", 1.0)]),
    ("((red:1.5))", [("red", 1.5)]),  # sets, even inside outer parentheses
    ("((red):1.5)", [("red", 1.5 * P)]),  # set on the outer group, ×1.1 inside
    ("(a (b) c)", [("a ", P), ("b", P * P), (" c", P)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 2.0), (" c", 0.5)]),
    ("\\(cat\\)", [("(cat)", 1.0)]),
    ("(\\(cat\\):1.2)", [("(cat)", 1.2)]),
    ("[cat]", [("[cat]", 1.0)]),  # square brackets are text
    ("(cat:abc)", [("cat:abc", P)]),  # not a number: the colon stays in the text
    ("(cat:)", [("cat:", P)]),
    ("(:1.5)", [(":1.5", P)]),  # a colon at the start of the group is not a weight
    ("(a:1.5:2)", [("a:1.5", 2.0)]),  # the last colon counts
    ("(cat: 1.3 )", [("cat", 1.3)]),  # float() accepts surrounding spaces
    ("(cat:1e1)", [("cat", 10.0)]),
    ("(cat:1_0)", [("cat", 10.0)]),  # and underscores between digits
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat", [("(cat", 1.0)]),  # unclosed, not ending in ')': text
    ("cat)", [("cat)", 1.0)]),
    ("a) (b)", [("a) (b)", 1.0)]),  # a stray ')' at the top: the count never returns to 0 from above
    (") (a)", [(") (a)", 1.0)]),
    ("((cat)", [("(cat", P)]),  # unclosed but ending in ')': a group whose inside is "(cat"
    ("(a(b:1.5)", [("a", 1.5), ("(b", 1.5)]),  # inside is "a(b:1.5": the weight parses, "(b" is text
    ("()", []),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),
    ("(a)(b)", [("a", P), ("b", P)]),
    ("a (b:1.2) (c (d):0.8) e", [("a ", 1.0), ("b", 1.2), (" ", 1.0), ("c ", 0.8), ("d", 0.8 * P), (" e", 1.0)]),
    ("(a:1.2)b:3", [("a", 1.2), ("b:3", 1.0)]),
    ("(a\\)b:1.2)", [("a)b", 1.2)]),
    ("a\\b", [("a\\b", 1.0)]),  # a backslash not before a parenthesis stays
    ("(a:(b))", [("a:", P), ("b", P * P)]),  # "(b)" after the colon is not a number
    ("a (red:1.5) car on a ((wet)) road, (blue sky)",  # FACTS.md §12, measured in ComfyUI
     [("a ", 1.0), ("red", 1.5), (" car on a ", 1.0), ("wet", P * P), (" road, ", 1.0), ("blue sky", P)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSE_TABLE)
def test_parse_table(prompt, expected):
    got = parse_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parse_table_is_large_enough():
    assert len(PARSE_TABLE) >= 25


def test_weights_multiply_exactly_like_comfyui():
    # ComfyUI multiplies the float by 1.1 per level: 1.1 * 1.1 != 1.21 in binary.
    assert parse_weights("((x))") == [("x", 1.0 * 1.1 * 1.1)]


def test_non_finite_weights_are_read_not_rejected():
    (text, w), = parse_weights("(x:nan)")
    assert text == "x" and math.isnan(w)
    assert parse_weights("(x:inf)") == [("x", math.inf)]


def test_deep_nesting_no_recursion_error():
    depth = 8000
    got = parse_weights("(" * depth + "x" + ")" * depth)
    assert got[0][0] == "x" and got[0][1] == math.inf  # 1.1**8000 overflows, as in ComfyUI's maths


def _reference_reading(text: str) -> list[tuple[str, float]]:
    """The rules of FACTS.md §12 read literally: split the top level, recurse into `(…)` items."""

    def top_items(s):
        items, cur, depth = [], "", 0
        for ch in s:
            if ch == "(" and depth == 0 and cur:
                items.append(cur)
                cur = ""
            cur += ch
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    items.append(cur)
                    cur = ""
        return items + ([cur] if cur else [])

    def read(s, weight):
        out = []
        for item in top_items(s):
            if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
                inner, w = item[1:-1], weight * 1.1
                colon = inner.rfind(":")
                if colon > 0:
                    try:
                        w, inner = float(inner[colon + 1:]), inner[:colon]
                    except ValueError:
                        pass
                out += read(inner, w)
            else:
                out.append((item, weight))
        return out

    s = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    return [(t.replace("\0\1", ")").replace("\0\2", "("), w) for t, w in read(s, 1.0)]


def test_linear_parser_equals_recursive_reading_on_random_strings():
    rng = random.Random(0)
    alphabet = ["(", ")", "(", ")", ":", "1", ".", "5", "a", "b", " ", "\\", "2"]
    for _ in range(4000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert parse_weights(s) == _reference_reading(s), s
    for prompt, _ in PARSE_TABLE:
        assert parse_weights(prompt) == _reference_reading(prompt), prompt


# ---------------------------------------------------------------------------------------------- words

def test_words_are_whole_segments():
    assert split_words("a red car, on a wet road") == ["a red car, on a wet road"]


def test_embedding_words_are_their_own_words_keeping_the_rest():
    assert split_words("a cat embedding:foo blue sky") == ["a cat", "embedding:foo", "blue sky"]
    assert split_words("embedding:foo") == ["embedding:foo"]
    assert split_words("x\nembedding:foo, bar") == ["x", "embedding:foo", ", bar"]  # ComfyUI's comma retry keeps ", bar"
    assert split_words("x embedding:") == ["x", "embedding:"]  # ComfyUI raises IndexError; kept as text
    assert split_words("xembedding:foo") == ["xembedding:foo"]  # needs a space or newline before it


# ---------------------------------------------------------------------------------------------- chunks

BOS, EOS = 49406, 49407


def _ids(text):
    return load_tokenizer().encode(text)


def test_empty_prompt_is_one_chunk():
    for pad in (0, EOS):
        (chunk,) = tokenize_prompt("", load_tokenizer(), pad)
        assert chunk == empty_chunk(pad)
        assert chunk.ids == (BOS, EOS) + (pad,) * 75 and chunk.weights == (1.0,) * 77
    assert tokenize_prompt("  ", load_tokenizer(), 0) == [empty_chunk(0)]
    assert tokenize_prompt("()", load_tokenizer(), 0) == [empty_chunk(0)]


def test_chunk_layout_and_weights():
    (chunk,) = tokenize_prompt("a (red:1.5) car", load_tokenizer(), 0)
    a, red, car = _ids("a") + _ids("red") + _ids("car")
    assert chunk.ids[:5] == (BOS, a, red, car, EOS) and chunk.ids[5:] == (0,) * 72
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, 1.0, 1.0) and chunk.has_weights


def _boundary(n_b: int, pad: int = EOS) -> list[TokenChunk]:
    """70 'a' tokens (one segment), then a weighted segment of n_b 'b' tokens."""
    return tokenize_prompt("a " * 70 + "(" + "b " * n_b + ":1.2)", load_tokenizer(), pad)


def test_boundary_segment_of_8_tokens_is_split():
    (a,), (b,) = _ids("a"), _ids("b")
    c1, c2 = _boundary(8)
    assert c1.ids == (BOS,) + (a,) * 70 + (b,) * 5 + (EOS,)  # full: 77, no padding
    assert c1.weights == (1.0,) * 71 + (1.2,) * 5 + (1.0,)
    assert c2.ids == (BOS,) + (b,) * 3 + (EOS,) + (EOS,) * 72
    assert c2.weights == (1.0,) + (1.2,) * 3 + (1.0,) * 73


def test_boundary_segment_of_7_tokens_moves_whole():
    (a,), (b,) = _ids("a"), _ids("b")
    c1, c2 = _boundary(7, pad=0)
    assert c1.ids == (BOS,) + (a,) * 70 + (EOS,) + (0,) * 5
    assert c2.ids == (BOS,) + (b,) * 7 + (EOS,) + (0,) * 68
    assert c2.weights == (1.0,) + (1.2,) * 7 + (1.0,) * 69


def test_boundary_exact_fit_is_one_chunk():
    (chunk,) = _boundary(5)
    assert chunk.ids[-2:] == (_ids("b")[0], EOS) and len(chunk.ids) == 77


def test_long_unweighted_prompt_cut_at_75():
    words = " ".join(["a"] * 160)
    chunks = tokenize_prompt(words, load_tokenizer(), 0)
    assert [sum(t == _ids("a")[0] for t in c.ids) for c in chunks] == [75, 75, 10]
    assert all(len(c.ids) == 77 and c.ids[0] == BOS for c in chunks)


def test_chunk_words_groups():
    w = [[(1, 1.0)] * 74, [(2, 1.0)] * 2, [(3, 1.0)] * 9]
    c1, c2 = chunk_words(w, pad_token=0)
    assert c1.ids == (BOS,) + (1,) * 74 + (EOS, 0)  # the 2-token word moves
    assert c2.ids == (BOS, 2, 2) + (3,) * 9 + (EOS,) + (0,) * 64
    assert chunk_words([], pad_token=0) == [empty_chunk(0)]
    assert chunk_words([[(5, 1.0)] * 76], pad_token=0)[0].ids == (BOS,) + (5,) * 75 + (EOS,)


# --- limits and interrupt (issue 10, items 3 and 8) ----------------------------------------------


class _CountingList(list):
    """A token group that counts the elements copied by slicing it (slices stay counting lists)."""

    copied = 0

    def __getitem__(self, index):
        out = list.__getitem__(self, index)
        if isinstance(index, slice):
            _CountingList.copied += len(out)
            return _CountingList(out)
        return out


def test_chunk_words_is_linear_in_a_huge_word():
    # Catches `group = group[free:]` re-slicing the rest of a long word at every chunk: quadratic, which
    # kept a worker 17 minutes on a 10 MB prompt. 400 chunks' worth of tokens copy about 30,000
    # elements at most in the linear walk; the re-slicing version copies about 6 million.
    n = 75 * 400
    group = _CountingList((i % 1000 + 1, 1.0) for i in range(n))
    _CountingList.copied = 0
    chunks = chunk_words([group], pad_token=0)
    assert _CountingList.copied <= 2 * n
    assert len(chunks) == 400
    flat = [t for c in chunks for t in c.ids[1:76]]
    assert flat == [i % 1000 + 1 for i in range(n)]  # every token once, in order, 75 per chunk


class _CountingTokenizer:
    def __init__(self):
        self.calls = self.chars = 0
        self.real = load_tokenizer()

    def encode(self, text):
        self.calls += 1
        self.chars += len(text)
        return self.real.encode(text)


def test_token_limit_stops_tokenizing_early():
    # Catches the limit being applied after the whole text is tokenized: 100,000 one-word groups are
    # 100,000 encode calls; the limit of 3,750 tokens must stop after about 3,751 of them.
    tok = _CountingTokenizer()
    with pytest.raises(PromptTooLong, match="more than 3750 tokens"):
        tokenize_prompt("(cat)" * 100_000, tok, pad_token=0, max_tokens=3750)
    assert tok.calls <= 3751


def test_tokenization_polls_the_interrupt():
    # Catches should_stop never being polled inside tokenization (interrupt only between nodes).
    tok = _CountingTokenizer()
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Cancelled):
        tokenize_prompt("(cat)" * 10_000, tok, pad_token=0, should_stop=should_stop)
    assert len(polls) == 3
    assert tok.calls <= 2 * CHECK_EVERY_WORDS + 1  # polled before words 1, 65 and 129


def test_encode_prompt_refuses_over_prompt_chars_before_tokenizing():
    from sdxl_nodes.sdxl_core.errors import ConditioningError
    from sdxl_nodes.sdxl_core.text import tokenize_prompt_pair

    tok = _CountingTokenizer()
    with pytest.raises(ConditioningError, match="prompt_chars is 1000"):
        tokenize_prompt_pair(tok, "a" * 1001, "b", max_chars=1000)
    assert tok.calls == 0
    with pytest.raises(ConditioningError, match="lone surrogate at character 4"):
        tokenize_prompt_pair(tok, "cat \ud800", "b")


def test_a_long_word_is_tokenized_in_pieces_with_the_same_tokens():
    # Catches a piece cut that changes tokens (a cut inside a run of letters) or a piece that is the
    # whole 10 MB word (tokenized whole before the limit could apply: 58 s).
    from sdxl_nodes.sdxl_core.prompt import PIECE_CHARS

    tok = load_tokenizer()
    rng = random.Random(5)
    vocab = ["photo", "of", "a", "cat", "it's", "<|endoftext|>", "Ünïcode", "12,5", "!!", "\n", "  ", "\t", "x" * 3000]
    text = " ".join(rng.choice(vocab) for _ in range(4000))
    assert len(text) > 5 * PIECE_CHARS
    chunks = tokenize_prompt(text, tok, pad_token=49407)  # BOS, EOS and padding are all ≥ 49406
    assert [t for c in chunks for t in c.ids if t < 49406] == [t for t in tok.encode(text) if t < 49406]
    counting = _CountingTokenizer()
    with pytest.raises(PromptTooLong):
        tokenize_prompt("cat " * 2_500_000, counting, pad_token=0, max_tokens=3750)  # one 10 MB word
    assert counting.chars <= 3750 * 4 + 2 * PIECE_CHARS  # "cat " is one token per 4 characters
