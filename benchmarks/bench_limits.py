"""How fast oversized input is refused (issue 10 item 3), against the work it used to cost.

    python benchmarks/bench_limits.py

Rows: prompt chunking of one long word by re-slicing the rest at every chunk (the old `chunk_words`,
kept here as the reference) and by our offset walk; a 10 MB prompt refused by `prompt_chars`, and by
the token limit alone (sdxl_core without a character limit, as a library user calls it); a 10 MB
`filename_prefix` refused by SaveImage. No weights needed. Never asserts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from sdxl_nodes.nodes import environment, images
from sdxl_nodes.sdxl_core.config import BOS_TOKEN, EOS_TOKEN
from sdxl_nodes.sdxl_core.errors import ConditioningError
from sdxl_nodes.sdxl_core.prompt import chunk_words
from sdxl_nodes.sdxl_core.text import tokenize_prompt_pair
from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer


def reslicing_chunk_words(words, pad, length=77):
    """The quadratic reference: `group = group[free:]` copies the rest of a long word at every chunk."""
    room, chunks, cur = length - 1, [], [(BOS_TOKEN, 1.0)]
    for group in words:
        splittable = len(group) >= 8
        while group:
            if len(cur) + len(group) <= room:
                cur.extend(group)
                break
            free = room - len(cur)
            if splittable:
                cur.extend(group[:free])
                group = group[free:]
            cur.append((EOS_TOKEN, 1.0))
            cur.extend([(pad, 1.0)] * (length - len(cur)))
            chunks.append(cur)
            cur = [(BOS_TOKEN, 1.0)]
    return chunks


def seconds(fn) -> float:
    t0 = time.perf_counter()
    try:
        fn()
    except (ConditioningError, ValueError):  # the refusals being measured
        pass
    return time.perf_counter() - t0


def main() -> None:
    rows = []
    for n in (75 * 1000, 75 * 4000):
        group = [(1, 1.0)] * n
        ref = seconds(lambda group=group: reslicing_chunk_words([group], 0))
        ours = seconds(lambda group=group: chunk_words([group], 0))
        rows.append((f"chunk one word of {n:,} tokens", ours, ref))
    tok = load_tokenizer()
    text = "a " * 5_000_000  # 10 MB
    rows.append(("10 MB prompt, prompt_chars=200,000", seconds(
        lambda: tokenize_prompt_pair(tok, text, text, max_chars=200_000)), None))
    rows.append(("10 MB prompt, token limit only", seconds(lambda: tokenize_prompt_pair(tok, text, text)), None))
    with tempfile.TemporaryDirectory() as d:
        environment.configure(output_dir=Path(d) / "out", input_dir=Path(d) / "in")
        rows.append(("10 MB filename_prefix", seconds(
            lambda: images.SaveImage().run(torch.rand(1, 8, 8, 3), filename_prefix="x" * 10_000_000)), None))
    print(f"{'case':<40} {'ours (s)':>10} {'reference (s)':>14} {'ratio':>7}")
    for name, ours, ref in rows:
        ratio = f"{ref / ours:.1f}×" if ref else "-"
        print(f"{name:<40} {ours:>10.3f} {ref if ref is not None else float('nan'):>14.3f} {ratio:>7}")


if __name__ == "__main__":
    main()
