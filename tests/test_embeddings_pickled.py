"""Pickled textual-inversion embeddings (`.pt`, `.bin`), read as ComfyUI v0.8.0's `load_embed` does.

Oracle: the same vectors saved as `.safetensors` with the stream's key (`clip_l` / `clip_g`), whose
path test_embeddings.py checks against a hand-built transformers reference (new vocabulary rows).
A pickled file must give the same token ids, weights and hidden states, bit for bit. The file
layouts are those the tools write: A1111 (`string_to_param`), SDXL (`clip_l`/`clip_g`), `emb_params`,
diffusers' `learned_embeds.bin` (`{token: 1-D vector}`), a bare tensor, and a LoRA's bundled
embeddings (`bundle_emb.<name>.string_to_param.*`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_text_encode import _randomize

from sdxl_nodes.sdxl_core.clip import build_text_encoder
from sdxl_nodes.sdxl_core.config import TINY_CLIP_G, TINY_CLIP_L
from sdxl_nodes.sdxl_core.errors import ConditioningError
from sdxl_nodes.sdxl_core.text import (
    TextEncoders,
    _embedding_folders,
    encode_tokens,
    find_embedding,
    tokenize_prompt_pair,
)
from sdxl_nodes.sdxl_core.tokenizer import load_tokenizer

L, G = TINY_CLIP_L.width, TINY_CLIP_G.width  # 32, 64: the tiny encoders' widths


@pytest.fixture(scope="module")
def encoders():
    return TextEncoders(clip_l=_randomize(build_text_encoder(TINY_CLIP_L), 1),
                        clip_g=_randomize(build_text_encoder(TINY_CLIP_G), 2), tokenizer=load_tokenizer())


def _vec(n, width, seed):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


V_L, V_G = _vec(3, L, 10), _vec(2, G, 11)

# name: (file name, what torch.save writes, the oracle's safetensors dict, prompt for text_g, for text_l)
FORMATS = {
    # A1111 writes these keys; 'string_to_token' comes first, so a "first entry" rule alone would fail
    "a1111": ("ti.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": V_L.clone().requires_grad_()},
                        "name": "ti", "step": 3000, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"},
              {"clip_l": V_L}, "a red car", "a (embedding:ti:1.3) car"),
    # clip_g first: the stream's key must win over the first entry
    "sdxl": ("ti.pt", {"clip_g": V_G, "clip_l": V_L}, {"clip_l": V_L, "clip_g": V_G},
             "a (embedding:ti:1.3) car, embedding:ti", "embedding:ti, a (embedding:ti:0.8) car"),
    "emb_params": ("ti.pt", {"emb_params": V_L}, {"clip_l": V_L}, "a red car", "a (embedding:ti:1.3) car"),
    # diffusers' textual_inversion script: one token, a 1-D vector → one [1, width] row
    "diffusers": ("learned_embeds.bin", {"<cat-toy>": V_L[0].clone()}, {"clip_l": V_L[:1]},
                  "a red car", "a (embedding:learned_embeds:1.3) car"),
    "bare_tensor": ("ti.pt", V_G, {"clip_g": V_G}, "a (embedding:ti:1.3) car", "a red car"),
    # a LoRA file with a bundled embedding: a LoRA tensor comes first
    "lora_bundle": ("ti.pt", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _vec(4, L, 12),
                              "bundle_emb.ti.string_to_param.*": V_L}, {"clip_l": V_L},
                    "a red car", "a (embedding:ti:1.3) car"),
}


def _encode(encoders, folder, text_g, text_l):
    tokens = tokenize_prompt_pair(encoders.tokenizer, text_g, text_l, embedding_dirs=(folder,))
    return tokens, encode_tokens(encoders, tokens)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pickled_formats_equal_safetensors(tmp_path, encoders, fmt):
    """Catches (each tried once, see the report): A1111's string_to_param not looked at first (its
    'string_to_token' dict taken → error), the stream's key not preferred (clip_g's vectors put in
    clip_l), a 1-D vector not made one row (each number read as a vector), the bundled LoRA rule
    missing (the LoRA tensor taken), a bare tensor refused, `.bin` not searched."""
    file, saved, oracle, text_g, text_l = FORMATS[fmt]
    pickled, reference = tmp_path / "pickled", tmp_path / "reference"
    pickled.mkdir(), reference.mkdir()
    torch.save(saved, pickled / file)
    save_file(oracle, str(reference / (Path(file).stem + ".safetensors")))

    tokens, got = _encode(encoders, pickled, text_g, text_l)
    want_tokens, want = _encode(encoders, reference, text_g, text_l)
    assert tokens.g == want_tokens.g and tokens.l == want_tokens.l  # ids and weights of every chunk
    for a, b in ((tokens.g_vectors, want_tokens.g_vectors), (tokens.l_vectors, want_tokens.l_vectors)):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(tokens.g_vectors) + len(tokens.l_vectors) > 0
    torch.testing.assert_close(got.crossattn, want.crossattn, rtol=0, atol=0)
    torch.testing.assert_close(got.pooled, want.pooled, rtol=0, atol=0)
    # and the vectors matter: the same prompt with a plain word in their place gives something else
    _, plain = _encode(encoders, pickled, *(t.replace("embedding:", "") for t in (text_g, text_l)))
    assert not torch.allclose(plain.crossattn, got.crossattn, atol=1e-3)


def test_lookup_order_as_comfyui(tmp_path):
    """ComfyUI: per folder, the name as given, then + .safetensors, .pt, .bin; the first folder that has
    any wins; subfolders are searched too. Catches: the suffix order changed (.pt before
    .safetensors), the exact name tried last, candidates tried across all folders before the next
    candidate (a later folder's .safetensors beating an earlier folder's .bin), subfolders not
    searched or searched before the top folder. Also pinned: the suffixes are appended in lower case,
    and a name is kept inside each folder (paths.inside)."""
    one, two = tmp_path / "one", tmp_path / "two"
    (one / "sub" / "deeper").mkdir(parents=True), two.mkdir()
    for name in ("x", "x.safetensors", "x.pt", "x.bin"):
        (one / name).write_bytes(b"")
    for want in ("x", "x.safetensors", "x.pt", "x.bin"):
        assert find_embedding("x", (one, two)) == one / want
        (one / want).unlink()
    (one / "y.bin").write_bytes(b"")
    (two / "y.safetensors").write_bytes(b"")
    assert find_embedding("y", (one, two)) == one / "y.bin"  # the folder comes before the suffix
    assert find_embedding("y", (two, one)) == two / "y.safetensors"
    (one / "sub" / "deeper" / "z.pt").write_bytes(b"")
    assert find_embedding("z", (one,)) == one / "sub" / "deeper" / "z.pt"
    assert find_embedding("sub/deeper/z", (one,)) == one / "sub" / "deeper" / "z.pt"
    (one / "sub" / "y.safetensors").write_bytes(b"")
    assert find_embedding("y", (one,)) == one / "y.bin"  # top folder first
    (one / "Q.PT").write_bytes(b"")
    with pytest.raises(ConditioningError, match=r"embedding:Q not found: looked for 'Q', 'Q.safetensors', 'Q.pt', "
                                                r"'Q.bin' in .*one and their subfolders"):
        find_embedding("Q", (one,))
    assert find_embedding("Q.PT", (one,)) == one / "Q.PT"
    (tmp_path / "outside.pt").write_bytes(b"")
    with pytest.raises(ConditioningError, match="not found"):  # confined to each folder, subfolders included
        find_embedding("../outside", (one / "sub",))


def test_subfolder_walk_follows_links_once(tmp_path):
    """ComfyUI walks subfolders following links; a link back up must not make the walk go round.
    Catches: the seen-set dropped (the loop walked ~40 levels deep, each level listed), links not followed."""
    top, elsewhere = tmp_path / "emb", tmp_path / "elsewhere"
    (top / "b").mkdir(parents=True), (top / "a").mkdir(), elsewhere.mkdir()
    (top / "a" / "up").symlink_to(top)  # a loop
    (top / "linked").symlink_to(elsewhere)
    (elsewhere / "far.pt").write_bytes(b"")
    assert list(_embedding_folders((top,))) == [top, top / "a", top / "b", top / "linked"]
    assert find_embedding("far", (top,)) == top / "linked" / "far.pt"


def test_suffix_decides_the_reader(tmp_path, encoders):
    """ComfyUI reads a name ending in .safetensors (any case) as safetensors, anything else with
    torch.load. Catches: a case-sensitive suffix test (the .SAFETENSORS file sent to torch.load)."""
    save_file({"clip_l": V_L}, str(tmp_path / "up.SAFETENSORS"))
    torch.save({"clip_l": V_L}, tmp_path / "named.ckpt")
    for name in ("up.SAFETENSORS", "named.ckpt"):
        tokens = tokenize_prompt_pair(encoders.tokenizer, "car", f"embedding:{name}", embedding_dirs=(tmp_path,))
        assert len(tokens.l_vectors) == 3 and torch.equal(torch.stack(tokens.l_vectors), V_L)


MARKER_CALLS = []


def _leave_marker(path):
    """Run by an UNrestricted unpickler only: the code a malicious pickle would carry."""
    MARKER_CALLS.append(path)
    Path(path).write_text("code ran")
    return torch.zeros(1, L)


@dataclasses.dataclass
class Sneaky:
    marker: str

    def __reduce__(self):
        return _leave_marker, (self.marker,)


@dataclasses.dataclass
class Custom:
    vectors: list


@pytest.mark.parametrize("kind", ["reduce", "dataclass"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, encoders, kind):
    """Catches: weights_only=False, a fallback to an unrestricted load when the restricted one fails,
    the error not naming the file or not saying how to fix it."""
    marker = tmp_path / "marker"
    obj = Sneaky(str(marker)) if kind == "reduce" else Custom([1.0, 2.0])
    torch.save({"string_to_param": {"*": obj}}, tmp_path / "evil.pt")
    cls = "_leave_marker" if kind == "reduce" else "Custom"
    with pytest.raises(ConditioningError, match=rf"embedding {tmp_path}/evil.pt was not loaded: besides tensors it "
                                                rf"contains other Python objects \(.*{cls}\), and unpickling those can "
                                                r"run code. Convert it to .safetensors"):
        tokenize_prompt_pair(encoders.tokenizer, "a embedding:evil cat", embedding_dirs=(tmp_path,))
    assert not marker.exists() and MARKER_CALLS == []
    if kind == "reduce":  # the marker is real: what unpickling would call does leave it
        fn, args = obj.__reduce__()
        fn(*args)
        assert marker.read_text() == "code ran"
        MARKER_CALLS.clear()


def test_width_mismatch_names_embedding_stream_and_width(tmp_path, encoders):
    """ComfyUI drops an embedding of the wrong width with a warning; we stop with an error naming it.
    An SD 1.x A1111 file (CLIP-L width) is fine in text_l and refused in text_g. Catches: the check
    gone (a shape error from the splice, or a silent drop), the wrong stream or width named."""
    torch.save({"string_to_param": {"*": _vec(2, L, 13)}}, tmp_path / "sd15.pt")
    tokens, _ = _encode(encoders, tmp_path, "a car", "a embedding:sd15 car")
    assert len(tokens.l_vectors) == 2 and tokens.g_vectors == ()
    with pytest.raises(ConditioningError, match=rf"embedding:sd15 \(string_to_param\['\*'\] \[2, {L}\] in "
                                                rf"{tmp_path}/sd15.pt\) has {L}-wide vectors for the clip_g encoder, "
                                                rf"which takes {G}-wide ones: it was made for another model"):
        _encode(encoders, tmp_path, "a embedding:sd15 car", "a car")


@pytest.mark.parametrize(("content", "message"), [
    (b"\x80\x02}q\x00.", r"cannot read it as a PyTorch \(\.pt/\.bin\) file \(RuntimeError: Invalid magic number"),
    (b"just some text", r"cannot read it as a PyTorch \(\.pt/\.bin\) file"),
    (b"", r"cannot read it as a PyTorch \(\.pt/\.bin\) file \(EOFError"),
    ({"emb_params": "not a tensor"}, r"'emb_params' \(taken for clip_l\) is not a float tensor of vectors \(str\)"),
    ({"emb_params": torch.zeros(2, L, dtype=torch.long)}, r"is not a float tensor of vectors \(torch.int64"),
    ({"string_to_param": {}}, r"its 'string_to_param' is dict, not a dict holding a tensor"),
    ({}, r"it holds an empty dict"),
    ([{"clip_l": V_L}], r"it holds a list, not a dict of tensors or a tensor"),
])
def test_unusable_pickles_are_clear_errors(tmp_path, encoders, content, message):
    """Catches: torch's own exception (or a traceback) reaching the user, a non-tensor taken as vectors."""
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ConditioningError, match=rf"embedding {tmp_path}/bad.pt: .*{message}"):
        tokenize_prompt_pair(encoders.tokenizer, "car", "embedding:bad", embedding_dirs=(tmp_path,))

