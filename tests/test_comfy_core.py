"""The core-compatible nodes compute what ComfyUI's do, through the same sdxl_core path as our SDXL nodes.

* The same graph built from our SDXL nodes and from ComfyUI's core node ids gives identical tensors
  (base, base + refiner split with KSamplerAdvanced, img2img), on tiny random checkpoints.
* ComfyUI's official SDXL example graph (tests/data/sdxl_simple_example.{prompt,workflow}.json: two
  CheckpointLoaderSimple, four CLIPTextEncode, KSamplerAdvanced 0–20 of 25 with leftover noise, the
  refiner 20–25, a PrimitiveNode driving both samplers' steps, Notes) runs headless, and its saved PNG
  runs again to the same pixels.
* The semantics that decide pixels, each against a hand derivation with a stub UNet: several
  conditionings in one list (Combine, strengths), timestep ranges, Average, Concat, the refiner's
  default aesthetic scores, noise_mask, denoise < 1, batch_index, the save/load hand-over.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_nodes.nodes import environment
from sdxl_nodes.nodes.sampling import CONTINUE_KEY
from sdxl_nodes.runtime import cli
from sdxl_nodes.sdxl_core import conditioning as C
from sdxl_nodes.sdxl_core.config import LATENT_SCALE
from sdxl_nodes.sdxl_core.sampling import CFGDenoiser, prepare_noise, sample
from sdxl_nodes.sdxl_core.schedules import get_sigmas, sigma_to_timestep

DATA = Path(__file__).resolve().parent / "data"
BASE, REFINER = "sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"
POS, NEG = "a glass bottle with a galaxy in it, (sunset:1.2)", "text, watermark"
CLASSES, _NAMES = cli.node_pack(standalone=True)


@pytest.fixture
def dirs(tmp_path, models_dir, monkeypatch):
    d = {"models": models_dir, "input": tmp_path / "input", "output": tmp_path / "output", "temp": tmp_path / "temp"}
    d["input"].mkdir()
    environment.configure(models_dir=models_dir, input_dir=d["input"], output_dir=d["output"], temp_dir=d["temp"])
    return d


def evaluate(prompt: dict, want: str):
    """Run an API prompt's node `want` (and what it needs) by calling the node classes: its outputs."""
    done: dict[str, tuple] = {}

    def out(node_id):
        if node_id not in done:
            node = prompt[node_id]
            kwargs = {k: (out(str(v[0]))[v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
            result = CLASSES[node["class_type"]]().run(**kwargs)
            done[node_id] = result["result"] if isinstance(result, dict) else result
        return done[node_id]

    return out(want)


def ours_graph(size=64, steps=4, split=3, img2img=None):
    """The official base + refiner split in our SDXL nodes (img2img: LoadImage → encode → renoise)."""
    p = {
        "1": {"class_type": "SDXLCheckpointLoader", "inputs": {"ckpt_name": BASE}},
        "2": {"class_type": "SDXLCheckpointLoader", "inputs": {"ckpt_name": REFINER}},
        "3": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["1", 1], "text_g": POS, "text_l": POS}},
        "4": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["1", 1], "text_g": NEG, "text_l": NEG}},
        "5": {"class_type": "SDXLSizeCropConditioning", "inputs": {"text": ["3", 0], "width": size, "height": size,
              "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size}},
        "6": {"class_type": "SDXLSizeCropConditioning", "inputs": {"text": ["4", 0], "width": size, "height": size,
              "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size}},
        "7": {"class_type": "SDXLEmptyLatent", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "8": {"class_type": "SDXLBaseSampler", "inputs": {"model": ["1", 0], "positive": ["5", 0],
              "negative": ["6", 0], "latent": ["7", 0], "seed": 42, "steps": steps, "cfg": 7.0,
              "sampler_name": "euler", "scheduler": "normal", "denoise_end": split / steps}},
        "9": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["2", 1], "text_g": POS, "text_l": ""}},
        "10": {"class_type": "SDXLDualCLIPEncode", "inputs": {"clip": ["2", 1], "text_g": NEG, "text_l": ""}},
        "11": {"class_type": "SDXLRefinerConditioning", "inputs": {"text": ["9", 0], "ascore": 6.0, "width": size,
               "height": size}},
        "12": {"class_type": "SDXLRefinerConditioning", "inputs": {"text": ["10", 0], "ascore": 2.5, "width": size,
               "height": size}},
        "13": {"class_type": "SDXLNoiseAndRefine", "inputs": {"model": ["2", 0], "positive": ["11", 0],
               "negative": ["12", 0], "latent": ["8", 0], "seed": 0, "cfg": 7.0, "sampler_name": "euler",
               "mode": "continue", "steps": 20, "scheduler": "normal", "strength": 0.3, "continue_from_step": 0}},
        "14": {"class_type": "SDXLVAEDecode", "inputs": {"vae": ["2", 2], "samples": ["13", 0]}},
    }
    if img2img:
        p["20"] = {"class_type": "SDXLLoadImage", "inputs": {"image": img2img}}
        p["21"] = {"class_type": "SDXLVAEEncode", "inputs": {"vae": ["1", 2], "pixels": ["20", 0]}}
        p["22"] = {"class_type": "SDXLNoiseAndRefine", "inputs": {"model": ["1", 0], "positive": ["5", 0],
                   "negative": ["6", 0], "latent": ["21", 0], "seed": 7, "cfg": 6.0, "sampler_name": "dpmpp_2m",
                   "mode": "renoise", "steps": steps, "scheduler": "karras", "strength": 0.6,
                   "continue_from_step": 0}}
        p["23"] = {"class_type": "SDXLVAEDecode", "inputs": {"vae": ["1", 2], "samples": ["22", 0]}}
    return p


def core_graph(size=64, steps=4, split=3, img2img=None):
    """The same graphs in ComfyUI's core nodes, as the official example builds them."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": REFINER}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": POS}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEG}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["1", 0], "add_noise": "enable",
              "noise_seed": 42, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["7", 0], "start_at_step": 0,
              "end_at_step": split, "return_with_leftover_noise": "enable"}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": POS}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": NEG}},
        "13": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["2", 0], "add_noise": "disable",
               "noise_seed": 0, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
               "positive": ["9", 0], "negative": ["10", 0], "latent_image": ["8", 0], "start_at_step": split,
               "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "14": {"class_type": "VAEDecode", "inputs": {"vae": ["2", 2], "samples": ["13", 0]}},
    }
    if img2img:
        p["5"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {"clip": ["1", 1], "width": size, "height": size,
                  "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size, "text_g": POS,
                  "text_l": POS}}
        p["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {"clip": ["1", 1], "width": size, "height": size,
                  "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size, "text_g": NEG,
                  "text_l": NEG}}
        p["20"] = {"class_type": "LoadImage", "inputs": {"image": img2img}}
        p["21"] = {"class_type": "VAEEncode", "inputs": {"vae": ["1", 2], "pixels": ["20", 0]}}
        p["22"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": steps, "cfg": 6.0,
                   "sampler_name": "dpmpp_2m", "scheduler": "karras", "positive": ["5", 0], "negative": ["6", 0],
                   "latent_image": ["21", 0], "denoise": 0.6}}
        p["23"] = {"class_type": "VAEDecode", "inputs": {"vae": ["1", 2], "samples": ["22", 0]}}
    return p


# ------------------------------------------------------------------------------------------------
# 1. Same graph, two node sets, identical tensors


def test_base_and_split_identical_in_both_node_sets(dirs):
    # catches: plain CLIPTextEncode's sizes not defaulting from the latent, the refiner's 6.0/2.5 defaults
    # swapped, KSamplerAdvanced's step cut or leftover noise differing from SDXL Base Sampler / Noise & Refine
    ours, core = ours_graph(), core_graph()
    a, b = evaluate(ours, "8")[0], evaluate(core, "8")[0]
    assert torch.equal(a["samples"], b["samples"])
    assert a[CONTINUE_KEY] == b[CONTINUE_KEY] == {"steps": 4, "start_step": 3, "scheduler": "normal"}
    latent_ours, latent_core = evaluate(ours, "13")[0]["samples"], evaluate(core, "13")[0]["samples"]
    assert torch.equal(latent_ours, latent_core)
    assert not torch.equal(latent_core, b["samples"])  # the refiner really ran
    assert torch.equal(evaluate(ours, "14")[0], evaluate(core, "14")[0])


def test_img2img_identical_in_both_node_sets(dirs):
    # catches: KSampler's denoise schedule differing from renoise's strength, VAEEncode cropping differently
    arr = np.random.default_rng(3).integers(0, 256, size=(72, 68, 3), dtype=np.uint8)  # not multiples of 8
    Image.fromarray(arr).save(dirs["input"] / "photo.png")
    ours, core = ours_graph(img2img="photo.png"), core_graph(img2img="photo.png")
    a, b = evaluate(ours, "22")[0]["samples"], evaluate(core, "22")[0]["samples"]
    assert a.shape == (1, 4, 9, 8) and torch.equal(a, b)
    assert torch.equal(evaluate(ours, "23")[0], evaluate(core, "23")[0])


def test_core_conditioning_resolves_to_our_conditioning(dirs):
    # CLIPTextEncodeSDXL's sizes and CLIPTextEncodeSDXLRefiner's score equal our conditioning nodes' vectors
    (_m, clip, _v) = CLASSES["CheckpointLoaderSimple"]().run(BASE)
    (core,) = CLASSES["CLIPTextEncodeSDXL"]().run(clip, 1152, 896, 16, 24, 1024, 768, POS, "style")
    (text,) = CLASSES["SDXLDualCLIPEncode"]().run(clip, POS, "style")
    (ours,) = CLASSES["SDXLSizeCropConditioning"]().run(text, 1152, 896, 16, 24, 1024, 768)
    (entry,) = C.resolve_entries(core, refiner=False, latent_hw=(8, 8), negative=False)
    assert torch.equal(entry.crossattn, ours.crossattn) and torch.equal(entry.vector, ours.vector)


# ------------------------------------------------------------------------------------------------
# 2. The official SDXL example: headless, and round-tripped through its PNG


def tiny_example(ui: dict) -> dict:
    """The official example at 64×64 and 4 steps (base 0–3, refiner 3–4); nothing else changed."""
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [64, 64]
        if node["type"] == "PrimitiveNode":
            node["widgets_values"][0] = 4
        if node["type"] == "KSamplerAdvanced":
            node["widgets_values"][3] = 4
            if node["widgets_values"][0] == "enable":
                node["widgets_values"][8] = 3
            else:
                node["widgets_values"][7] = 3
    return ui


def cli_args(d) -> list[str]:
    return ["--models-dir", str(d["models"]), "--input-dir", str(d["input"]), "--output-dir", str(d["output"]),
            "--temp-dir", str(d["temp"])]


def test_official_example_runs_headless_and_from_its_png(dirs, tmp_path, capsys):
    ui = tiny_example(json.loads((DATA / "sdxl_simple_example.workflow.json").read_text()))
    path = tmp_path / "sdxl_simple_example.json"
    path.write_text(json.dumps(ui))
    assert cli.main(["validate", str(path), *cli_args(dirs)]) == 0
    assert "valid (11 nodes, 1 output node(s), all supported: 11 ComfyUI core-compatible, 0 sdxl-nodes)" in capsys.readouterr().out
    assert cli.main(["run", str(path), *cli_args(dirs)]) == 0
    first = dirs["output"] / "ComfyUI_00001_.png"
    with Image.open(first) as im:
        pixels, embedded = np.asarray(im).copy(), dict(im.text)
    assert pixels.shape == (64, 64, 3)
    assert json.loads(embedded["workflow"])["nodes"] and json.loads(embedded["prompt"])["10"]["inputs"]["steps"] == 4

    # the API form of the same example gives the same pixels
    api = json.loads((DATA / "sdxl_simple_example.prompt.json").read_text())
    api["5"]["inputs"].update(width=64, height=64)
    api["10"]["inputs"].update(steps=4, end_at_step=3)
    api["11"]["inputs"].update(steps=4, start_at_step=3)
    (tmp_path / "example.api.json").write_text(json.dumps(api))
    assert cli.main(["run", str(tmp_path / "example.api.json"), *cli_args(dirs)]) == 0
    with Image.open(dirs["output"] / "ComfyUI_00002_.png") as im:
        assert np.array_equal(np.asarray(im), pixels)

    # drop the saved PNG back in: it runs to the same pixels
    png = tmp_path / "again.png"
    shutil.copyfile(first, png)
    assert cli.main(["run", str(png), *cli_args(dirs)]) == 0
    with Image.open(dirs["output"] / "ComfyUI_00003_.png") as im:
        assert np.array_equal(np.asarray(im), pixels)


# ------------------------------------------------------------------------------------------------
# 3. Hand derivations with a stub UNet


class StubUNet(torch.nn.Module):
    """eps = mean(context) + mean(y) / 10 per batch row, broadcast over the latent; records its timesteps."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.timesteps = []

    def forward(self, x, t, context, y):
        self.timesteps.append(t.clone())
        v = context.float().mean(dim=(1, 2)) + y.float().mean(dim=1) / 10
        return v.view(-1, 1, 1, 1).expand_as(x).clone()


def eps_of(entry: C.CondEntry) -> float:
    return float(entry.crossattn.mean() + entry.vector.mean() / 10)


def entry(value: float, tokens=77, strength=1.0, start=None, end=None) -> C.CondEntry:
    return C.CondEntry(torch.full((1, tokens, 8), value), torch.full((1, 16), 0.0), strength=strength,
                       sigma_start=start, sigma_end=end)


def test_combined_entries_are_averaged_by_strength_then_cfg():
    # catches: only the first entry used, predictions summed instead of averaged, strength ignored
    x, sigma = torch.randn(1, 4, 2, 2), torch.tensor([3.0])
    a, b, n = entry(0.5, strength=2.0), entry(-1.0, tokens=154), entry(0.25)
    out = CFGDenoiser(StubUNet(), [a, b], [n], cfg=5.0)(x, sigma)
    x0 = lambda e: x - 3.0 * eps_of(e)  # noqa: E731 - x0 = x - sigma * eps
    cond = (2.0 * x0(a) + 1.0 * x0(b)) / 3.0
    want = x0(n) + (cond - x0(n)) * 5.0
    assert torch.allclose(out, want, atol=1e-5)


def percent_sigma_by_hand(percent: float) -> float:
    """sigma at timestep (1 - percent) * 999 of SDXL's scaled-linear schedule, log-interpolated."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    log_sigmas = (((1 - alphas) / alphas) ** 0.5).log()
    t = (1 - percent) * 999
    lo, w = math.floor(t), t - math.floor(t)
    return math.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[min(lo + 1, 999)])


def test_timestep_ranges_switch_entries_on_and_off():
    # catches: start/end swapped, percent counted from the other end of the schedule, ranges ignored
    assert C.percent_to_sigma(0.3) == pytest.approx(percent_sigma_by_hand(0.3), rel=1e-5)
    assert C.percent_to_sigma(0.0) > 1e8 and C.percent_to_sigma(1.0) == 0.0
    cond = [[torch.full((1, 77, 8), 1.0), {"pooled_output": torch.zeros(1, 4), "start_percent": 0.0,
                                            "end_percent": 0.3}],
            [torch.full((1, 77, 8), -1.0), {"pooled_output": torch.zeros(1, 4), "start_percent": 0.3,
                                             "end_percent": 1.0}]]
    early, late = C.resolve_entries(cond, refiner=False, latent_hw=(2, 2), negative=False)
    boundary = percent_sigma_by_hand(0.3)
    x = torch.zeros(1, 4, 2, 2)
    for sigma, active in ((boundary * 1.5, early), (boundary / 1.5, late)):
        got = CFGDenoiser(StubUNet(), [early, late], None, cfg=1.0)(x, torch.tensor([sigma]))
        assert torch.allclose(got, x - sigma * eps_of(active), atol=1e-4), sigma


def test_average_and_concat_by_hand():
    # catches: strength applied to the wrong side, no zero padding, concat on the wrong axis
    to = [[torch.ones(1, 4, 3), {"pooled_output": torch.full((1, 2), 2.0), "width": 5}]]
    fr = [[torch.full((1, 2, 3), 3.0), {"pooled_output": torch.full((1, 2), 4.0)}]]
    (mixed, opts), = C.average(to, fr, 0.25)
    want = torch.tensor([[[0.25 + 2.25] * 3] * 2 + [[0.25] * 3] * 2])  # 1·0.25 + (3 | 0)·0.75
    assert torch.allclose(mixed, want) and opts["width"] == 5
    assert torch.allclose(opts["pooled_output"], torch.full((1, 2), 2.0 * 0.25 + 4.0 * 0.75))
    (cat, opts), = C.concat(to, fr)
    assert cat.shape == (1, 6, 3) and torch.equal(cat[:, 4:], fr[0][0]) and opts["width"] == 5
    (zero, opts), = C.zero_out(to)
    assert not zero.any() and not opts["pooled_output"].any()


def test_refiner_defaults_sizes_from_latent_and_scores_by_side():
    # catches: fixed 1024 sizes instead of the latent's, 6.0 used for the negative too
    pooled = torch.randn(1, 8)
    cond = [[torch.zeros(1, 77, 8), {"pooled_output": pooled}]]
    for negative, score in ((False, 6.0), (True, 2.5)):
        (e,) = C.resolve_entries(cond, refiner=True, latent_hw=(12, 20), negative=negative)
        assert torch.equal(e.vector, C.refiner_vector(pooled, height=96, width=160, aesthetic_score=score))
    (e,) = C.resolve_entries(cond, refiner=False, latent_hw=(12, 20), negative=True)
    assert torch.equal(e.vector, C.base_vector(pooled, height=96, width=160, target_height=96, target_width=160))


def conds():
    return C.Conditioning(torch.full((1, 77, 8), 0.1), torch.zeros(1, 16)), \
        C.Conditioning(torch.full((1, 77, 8), -0.1), torch.zeros(1, 16))


def test_noise_mask_keeps_the_unmasked_area():
    # catches: the mask ignored (issue 11: the latent moved by up to 47 with an all-zero mask), mask inverted
    latent = torch.randn(1, 4, 8, 8) * 5
    pos, neg = conds()
    kw = dict(seed=1, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=0.7)
    free = sample(StubUNet(), pos, neg, latent, **kw)
    kept = sample(StubUNet(), pos, neg, latent, noise_mask=torch.zeros(1, 8, 8), **kw)
    assert torch.allclose(kept, latent, atol=1e-5)
    assert torch.equal(sample(StubUNet(), pos, neg, latent, noise_mask=torch.ones(8, 8), **kw), free)
    half = torch.zeros(1, 64, 64)
    half[:, :, 32:] = 1  # pixel-size mask: resized to the latent
    got = sample(StubUNet(), pos, neg, latent, noise_mask=half, **kw)
    assert torch.allclose(got[..., :4], latent[..., :4], atol=1e-5)
    assert torch.allclose(got[..., 4:], free[..., 4:], atol=1e-5) and not torch.allclose(free, latent)


def test_denoise_runs_the_tail_of_a_longer_schedule():
    # catches: denoise applied by scaling sigmas or by cutting the steps instead of lengthening the schedule
    unet, (pos, neg) = StubUNet(), conds()
    sample(unet, pos, neg, torch.randn(1, 4, 2, 2), seed=0, steps=4, cfg=1.0, sampler_name="euler",
           scheduler="karras", denoise=0.5)
    full = get_sigmas("karras", 8)  # 4 / 0.5 = 8 steps; the last 4 are run
    seen = torch.stack([t[0] for t in unet.timesteps])
    assert torch.equal(seen, sigma_to_timestep(full[-5:-1]))


def test_batch_index_noise_and_latent_from_batch():
    # catches: batch_index ignored (every picked latent gets the first draw), draws not in index order
    latent = torch.zeros(2, 4, 3, 3)
    gen = torch.Generator().manual_seed(99)
    draws = [torch.randn(1, 4, 3, 3, generator=gen) for _ in range(4)]
    assert torch.equal(prepare_noise(latent, 99, [3, 1]), torch.cat([draws[3], draws[1]]))
    (picked,) = CLASSES["LatentFromBatch"]().run({"samples": torch.zeros(4, 4, 3, 3)}, 1, 2)
    assert picked["batch_index"] == [1, 2] and picked["samples"].shape[0] == 2
    (repeated,) = CLASSES["RepeatLatentBatch"]().run(picked, 2)
    assert repeated["batch_index"] == [1, 2, 3, 4]


def test_sdxl_sampler_honours_noise_mask_and_continue_survives_save_load(dirs):
    # issue 11 items 2 and 6, through our own nodes on the tiny checkpoints
    ours = ours_graph()
    (model, _c, _v) = CLASSES["SDXLCheckpointLoader"]().run(REFINER)
    (rpos,), (rneg,) = evaluate(ours, "11"), evaluate(ours, "12")
    (finished,) = evaluate(ours, "13")
    (masked,) = CLASSES["SetLatentNoiseMask"]().run(finished, torch.zeros(1, 64, 64))
    (out,) = CLASSES["SDXLNoiseAndRefine"]().run(model, rpos, rneg, masked, 5, 7.0, "euler", "renoise", 4, "normal",
                                                  0.5)
    assert torch.allclose(out["samples"], finished["samples"], atol=1e-4)

    (stopped,) = evaluate(ours, "8")
    CLASSES["SaveLatent"]().run(stopped, "latents/handover")
    saved = dirs["output"] / "latents" / "handover_00001_.latent"
    shutil.copyfile(saved, dirs["input"] / "handover.latent")
    (loaded,) = CLASSES["LoadLatent"]().run("handover.latent")
    assert torch.equal(loaded["samples"], stopped["samples"]) and loaded[CONTINUE_KEY] == stopped[CONTINUE_KEY]
    refine = CLASSES["SDXLNoiseAndRefine"]()
    args = (model, rpos, rneg)
    want = refine.run(*args, stopped, 0, 7.0, "euler", "continue", 20, "normal", 0.3)[0]["samples"]
    assert torch.equal(refine.run(*args, loaded, 0, 7.0, "euler", "continue", 20, "normal", 0.3)[0]["samples"], want)
    bare = {"samples": loaded["samples"]}  # a latent with no record: told the step explicitly
    told = refine.run(*args, bare, 0, 7.0, "euler", "continue", 4, "normal", 0.3, continue_from_step=3)
    assert torch.equal(told[0]["samples"], want)
    with pytest.raises(ValueError, match="continue_from_step"):
        refine.run(*args, bare, 0, 7.0, "euler", "continue", 4, "normal", 0.3)


def test_latent_scale_constant_is_sdxl():
    assert LATENT_SCALE == pytest.approx(0.13025)


def test_bislerp_and_center_crop_by_hand():
    # catches: bislerp as a plain lerp (middle vector shorter), crop taken from a corner
    from sdxl_nodes.sdxl_core.resize import resize

    x = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, C=2, H=1, W=2]: vectors (1,0) and (0,1)
    out = resize(x, 3, 1, "bislerp")
    assert torch.allclose(out[0, :, 0, 1], torch.tensor([0.5**0.5, 0.5**0.5]), atol=1e-6)
    assert torch.allclose(out[0, :, 0, 0], x[0, :, 0, 0]) and torch.allclose(out[0, :, 0, 2], x[0, :, 0, 1])
    wide = torch.arange(16.0).reshape(1, 1, 1, 16).expand(1, 1, 8, 16)
    (up,) = CLASSES["LatentUpscale"]().run({"samples": wide}, "nearest-exact", 64, 64, "center")
    assert torch.equal(up["samples"][0, 0, 0], torch.arange(4.0, 12.0))  # the centre 8 columns


class FakeVAE:
    """A 'VAE' whose encode keeps every 8th pixel: lets the inpainting encode be checked by hand."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x, should_stop=None):
            return x[:, :, ::8, ::8]

    def __init__(self):
        self.net = self.Net()

    def load(self):
        return self.net


def test_vae_encode_for_inpaint_greys_masked_pixels_and_grows_the_mask():
    # catches: the mask not grown (or grown off-centre), masked pixels not neutralised to grey
    pixels = torch.rand(1, 32, 32, 3)
    mask = torch.zeros(1, 32, 32)
    mask[0, 16, 16] = 1.0
    (latent,) = CLASSES["VAEEncodeForInpaint"]().run(pixels, FakeVAE(), mask, 6)
    grown = latent["noise_mask"][0, 0]
    want = torch.zeros(32, 32)
    want[14:20, 14:20] = 1  # a 6×6 box, padding 3: rows/cols i with i-3 <= 16 <= i+2
    assert torch.equal(grown, want)
    assert torch.equal(latent["samples"][0, :, 2, 2], torch.zeros(3))  # pixel (16,16) → grey 0.5 → 0 in [-1, 1]
    assert torch.allclose(latent["samples"][0, :, 1, 1], pixels[0, 8, 8] * 2 - 1)


def test_clip_set_last_layer_takes_that_layer(dirs):
    # catches: the layer setting ignored (always penultimate), counted from the wrong end
    from sdxl_nodes.sdxl_core.text import tokenize_prompt_pair

    (_m, clip, _v) = CLASSES["CheckpointLoaderSimple"]().run(REFINER)  # bigG only: one stream to check
    (last,) = CLASSES["CLIPSetLastLayer"]().run(clip, -1)
    enc = clip.encoders()
    ids = torch.tensor([tokenize_prompt_pair(enc.tokenizer, "a red cube", refiner=True).g[0].ids])
    with torch.inference_mode():
        hidden = enc.clip_g(input_ids=ids, output_hidden_states=True).hidden_states
    for c, want in ((clip, hidden[-2]), (last, hidden[-1])):
        (cond,) = CLASSES["CLIPTextEncode"]().run("a red cube", c)
        assert torch.allclose(cond[0][0], want.float(), atol=1e-6)


@pytest.mark.parametrize("node_id", ["CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner"])
def test_core_text_encode_stops_inside_a_long_prompt(dirs, node_id):
    # catches: the core text-encode nodes not polling the interrupt while tokenizing (ours do, issue 10)
    class Stopped(Exception):
        pass

    class Reporter:  # the executor's reporter, with the user's cancel already pressed
        interrupted = True

        def check_interrupted(self):
            raise Stopped

    ckpt = "sd_xl_refiner_1.0.safetensors" if node_id.endswith("Refiner") else "sd_xl_base_1.0.safetensors"
    _model, clip, _vae = CLASSES["CheckpointLoaderSimple"]().run(ckpt)
    text = "a cat " * 2000
    sizes = dict(width=1024, height=1024)
    kwargs = {"CLIPTextEncode": dict(text=text, clip=clip),
              "CLIPTextEncodeSDXL": dict(clip=clip, crop_w=0, crop_h=0, target_width=1024, target_height=1024,
                                         text_g=text, text_l=text, **sizes),
              "CLIPTextEncodeSDXLRefiner": dict(ascore=6.0, text=text, clip=clip, **sizes)}[node_id]
    with pytest.raises(Stopped):
        CLASSES[node_id]().run(**kwargs, progress=Reporter())
