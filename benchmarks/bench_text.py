"""Prompt encoding speed with full-size random text encoders (bf16, CPU), against transformers' plain forward.

    python benchmarks/bench_text.py [--repeats 3] [--threads N]

Rows: a 1-chunk and a 4-chunk prompt pair (plain and with weights) through `encode_prompt`
(tokenize + both encoders + weighting + concatenation), and the same ids through transformers' CLIP-L
and bigG plain `model(input_ids)` forward on copies of the same weights; then the tokenizer's throughput on 1,000
prompts. Weights are random (meta → to_empty → normal_), so no checkpoint is needed. Never asserts.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from bench_gpu import transformers_text_encoder  # this folder is on sys.path when the script runs

from sdxl_nodes.sdxl_core.clip import build_text_encoder
from sdxl_nodes.sdxl_core.config import CLIP_G, CLIP_L, CONTEXT_LENGTH
from sdxl_nodes.sdxl_core.text import TextEncoders, encode_prompt, tokenize_prompt_pair
from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

WORDS = ("a photo of a red car on a wet road at night, neon lights, cinematic, highly detailed, "
         "masterpiece, best quality, portrait of an old man, oil painting, sunset over mountains, "
         "café, 8k, bokeh, volumetric fog, dramatic lighting").replace(",", " ,").split()


def random_encoder(cfg, seed: int, dtype=torch.bfloat16):
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():  # to_empty leaves buffers uninitialised
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return model.eval()


def prompt(n_tokens: int, rng: random.Random, weighted: bool = False) -> str:
    """Random words until the prompt has n_tokens tokens (so 4 chunks really is 4: 226–300)."""
    words: list[str] = []
    while len(load_tokenizer().encode(" ".join(words))) < n_tokens:
        words.append(rng.choice(WORDS))
    if weighted:
        words[1] = f"({words[1]}:1.3)"
        words[-2] = f"(({words[-2]}))"
    return " ".join(words)


def timed(fns, repeats: int) -> list[float]:
    """Best time of each function over `repeats` interleaved rounds, after one warm-up round.

    The minimum, not the median: on a shared CPU other processes only ever add time.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    load_tokenizer.cache_clear()
    tokenizer = load_tokenizer()
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc = TextEncoders(random_encoder(CLIP_L, 1), random_encoder(CLIP_G, 2), tokenizer)
    # transformers' models with copies of the same weights: the plain forward we are compared with
    ref_l, ref_g = (transformers_text_encoder(m, "cpu", torch.bfloat16) for m in (enc.clip_l, enc.clip_g))
    print(f"built full-size random CLIP-L + bigG (bf16), ours and transformers', in {time.perf_counter() - t0:.1f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rng = random.Random(0)
    cases = [
        ("1 chunk", prompt(30, rng), prompt(40, rng)),
        ("4 chunks", prompt(250, rng), prompt(280, rng)),
        ("4 chunks, weighted (+1 empty row)", prompt(250, rng, True), prompt(280, rng, True)),
    ]
    print("\n| prompt pair | k | encode_prompt (s) | plain forward (s) | ratio |\n|---|---|---|---|---|")
    for label, text_g, text_l in cases:
        tokens = tokenize_prompt_pair(tokenizer, text_g, text_l)
        ids_g = torch.tensor([c.ids for c in tokens.g])
        ids_l = torch.tensor([c.ids for c in tokens.l])

        def plain(ids_l=ids_l, ids_g=ids_g):
            with torch.inference_mode():
                ref_l(input_ids=ids_l)
                ref_g(input_ids=ids_g)

        t_ours, t_plain = timed([lambda g=text_g, l=text_l: encode_prompt(enc, g, l), plain], args.repeats)
        print(f"| {label} | {tokens.num_chunks} | {t_ours:.3f} | {t_plain:.3f} | {t_ours / t_plain:.2f} |")

    prompts = [prompt(rng.randint(10, 120), rng, weighted=rng.random() < 0.5) for _ in range(1000)]
    t_raw, t_pair = timed([lambda: [tokenizer.encode(p) for p in prompts],
                           lambda: [tokenize_prompt_pair(tokenizer, p, p) for p in prompts]], 5)
    n_tok = sum(len(tokenizer.encode(p)) for p in prompts)
    print("\n| tokenizer, 1,000 prompts | time (ms) | prompts/s |\n|---|---|---|")
    print(f"| first load of the shipped BPE (cold) | {t_load * 1e3:.0f} | – |")
    print(f"| CLIPBPETokenizer.encode (raw ids, {n_tok} tokens) | {t_raw * 1e3:.1f} | {1000 / t_raw:,.0f} |")
    print(f"| tokenize_prompt_pair (weights + words + chunks, both streams) | {t_pair * 1e3:.1f} | "
          f"{1000 / t_pair:,.0f} |")
    print(f"\n(chunks of {CONTEXT_LENGTH} tokens; best of {args.repeats} interleaved runs after one warm-up)")


if __name__ == "__main__":
    main()
