"""The shipped-BPE tokenizer gives the same ids as transformers' CLIPTokenizer on the same vocabulary.

The reference CLIPTokenizer is built from vocab.json/merges.txt written here straight from the gz file,
without going through sdxl_core's vocabulary code.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

import pytest
from transformers import CLIPTokenizer

from sdxl_nodes.sdxl_core.tokenizer import BPE_FILE, CLIPBPETokenizer, load_tokenizer

CORPUS = [
    "",
    " ",
    "\t\n  \r\n",
    "a photo of a cat",
    "A Photo Of A CAT",
    "MiXeD CaSe WoRdS",
    "don't",
    "I'm sure it's what we've all they'll he'd you're",
    "DON'T WON'T CAN'T",
    "rock'n'roll",
    "café résumé naïve Ångström",
    "Crème brûlée à la façon de Noël",
    "straße Œuvre æsir øre",
    "🐱🐶 cat emoji 👍🏽 family 👨‍👩‍👧",
    "🏳️‍🌈 flag",
    "日本語のテキスト",
    "中文提示词，高质量",
    "한국어 프롬프트",
    "Ελληνικά και русский текст",
    "عربي עברית",
    "हिन्दी",
    "tabs\tbetween\twords",
    "new\nlines\n\nhere",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;",
    "<b>bold</b> <i>html</i>",
    "12345 3.14159 1,000,000 2024-01-07",
    "0",
    "x1y2z3 abc123def",
    "!!!???...,,,;;;",
    "()[]{}<>",
    "---===+++***///\\\\",
    "@#$%^&*_~`|",
    "\"double\" 'single' `back`",
    "a, b. c! d? e; f: g",
    "masterpiece, best quality, ultra-detailed, 8k, (photorealistic:1.4)",
    "<|startoftext|>hello<|endoftext|>",
    "x<|endoftext|>y",
    "<|ENDOFTEXT|>",
    "<|endoftext",
    "   leading and trailing   ",
    "multiple     spaces",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
    "e\u0301 combining accent (NFC)",
    "ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "\x00\x01 control chars \x7f",
    "\ufffd replacement",
    "sooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooo long",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 300,
    " ".join(f"word{i}" for i in range(200)),
    "The quick brown fox jumps over the lazy dog. " * 20,
    "https://example.com/path?query=1&x=y#frag",
    "snake_case and kebab-case and CamelCase",
    "1st 2nd 3rd 4th",
    "½ ¾ ² ³ ° ± × ÷",
    "€100 £50 ¥1000 $5",
    "\\(escaped\\) parens",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """vocab.json/merges.txt rebuilt from the gz file (FACTS.md §3), as in ComfyUI's sd1_tokenizer/."""
    raw = resources.files("sdxl_nodes.sdxl_core").joinpath("data", BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    # GPT-2 byte alphabet, written out independently of sdxl_core.tokenizer.bytes_to_unicode
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    chars = [chr(c) for c in cs]
    words = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    d = tmp_path_factory.mktemp("clip_tokenizer")
    (d / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def reference(vocab_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(vocab_dir))


def test_vocabulary_size_and_special_ids(reference):
    tok = load_tokenizer()
    assert tok.vocab_size == 49408 == len(reference.get_vocab())
    assert (tok.bos_id, tok.eos_id) == (49406, 49407)
    assert reference("")["input_ids"] == [49406, 49407]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_clip_tokenizer(reference, text):
    expected = reference(text)["input_ids"][1:-1]  # as ComfyUI: tokenizer(word)["input_ids"][1:-1]
    assert load_tokenizer().encode(text) == expected
    assert reference(text, add_special_tokens=False)["input_ids"] == expected


def test_batch_equals_single():
    tok = load_tokenizer()
    assert tok.encode_batch(CORPUS) == [tok.encode(t) for t in CORPUS]


def test_load_is_cached():
    assert load_tokenizer() is load_tokenizer()


def test_from_vocab_files_matches(vocab_dir):
    tok = CLIPBPETokenizer.from_vocab_files(vocab_dir / "vocab.json", vocab_dir / "merges.txt")
    for text in CORPUS[:20]:
        assert tok.encode(text) == load_tokenizer().encode(text)


def test_decode_round_trip():
    tok = load_tokenizer()
    assert tok.decode(tok.encode("A photo of a cat, café 🐱")) == "a photo of a cat , café 🐱"


def test_licence_notice_ships_beside_the_vocabulary():
    data = resources.files("sdxl_nodes.sdxl_core").joinpath("data")
    notice = data.joinpath("LICENSE-openai-clip.txt").read_text(encoding="utf-8")
    assert "MIT License" in notice and "OpenAI" in notice and BPE_FILE in notice
