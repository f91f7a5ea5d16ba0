"""Size, crop and aesthetic-score conditioning: the ADM vector `y` SDXL's UNet receives (FACTS.md §4, §5).

Every scalar is embedded separately with a 256-dim sinusoidal embedding (cos half first, then sin,
max period 10000, no frequency shift, float32: sgm `timestep_embedding`, ComfyUI `Timestep`) and
appended after the pooled bigG vector, in sgm's order:

* base    [pooled | h | w | crop_top | crop_left | target_h | target_w]  → 1280 + 6·256 = 2816
* refiner [pooled | h | w | crop_top | crop_left | aesthetic_score]      → 1280 + 5·256 = 2560

Heights come before widths here, while ComfyUI's nodes take `width, height, crop_w, crop_h,
target_width, target_height`; ComfyUI's `crop_h` is the top offset and `crop_w` the left one. To
keep the two orders from being mixed up, every size argument below is keyword-only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import SIZE_EMBED_DIM
from .errors import ConditioningError
from .types import Conditioning, TextEmbedding

logger = logging.getLogger(__name__)

MAX_PERIOD = 10_000.0


def fourier_embed(values: torch.Tensor | Sequence[float], dim: int = SIZE_EMBED_DIM,
                  max_period: float = MAX_PERIOD) -> torch.Tensor:
    """Scalars [N] → [N, dim] float32: [cos(t·f_0..f_{h−1}), sin(t·f_0..f_{h−1})], f_k = max_period^(−k/h), h = dim/2."""
    if dim % 2:
        raise ValueError(f"fourier_embed: dim must be even, got {dim}")
    t = torch.as_tensor(values).float().reshape(-1)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _check_scalars(**values: float) -> list[float]:
    out = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConditioningError(f"{name} must be a number, got {type(value).__name__}: {value!r:.80}")
        if not math.isfinite(value) or value < 0:
            raise ConditioningError(f"{name} must be a finite number ≥ 0, got {value}")
        out.append(float(value))
    return out


def _vector(pooled: torch.Tensor, scalars: list[float]) -> torch.Tensor:
    if pooled.ndim != 2:
        raise ConditioningError(f"pooled must be [batch, width], got shape {list(pooled.shape)}")
    emb = fourier_embed(torch.tensor(scalars, dtype=torch.float32, device=pooled.device))  # (n, 256)
    emb = emb.reshape(1, -1).expand(pooled.shape[0], -1)  # (B, n·256), same sizes for every row
    return torch.cat([pooled.float(), emb], dim=-1)


def base_vector(pooled: torch.Tensor, *, height: float, width: float, crop_h: float = 0, crop_w: float = 0,
                target_height: float | None = None, target_width: float | None = None) -> torch.Tensor:
    """Base ADM vector [B, P + 6·256] (2816 for SDXL): pooled, then h, w, crop_h (top), crop_w (left), target h, w.

    height/width: the "original size" (ComfyUI `height`, `width`); crop_h/crop_w: the crop's top and left
    offsets; target_*: default to height/width. All in pixels, finite and ≥ 0.
    """
    target_height = height if target_height is None else target_height
    target_width = width if target_width is None else target_width
    scalars = _check_scalars(height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                             target_height=target_height, target_width=target_width)
    return _vector(pooled, scalars)


def refiner_vector(pooled: torch.Tensor, *, height: float, width: float, crop_h: float = 0, crop_w: float = 0,
                   aesthetic_score: float = 6.0) -> torch.Tensor:
    """Refiner ADM vector [B, P + 5·256] (2560 for SDXL): pooled, then h, w, crop_h (top), crop_w (left), score.

    sgm uses aesthetic 6.0 for the positive and 2.5 for the negative prompt (ComfyUI's `ascore`).
    """
    scalars = _check_scalars(height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                             aesthetic_score=aesthetic_score)
    return _vector(pooled, scalars)


def base_conditioning(text: TextEmbedding, *, width: float = 1024, height: float = 1024, crop_w: float = 0,
                      crop_h: float = 0, target_width: float | None = None,
                      target_height: float | None = None) -> Conditioning:
    """ComfyUI CLIPTextEncodeSDXL's sizes (same names) + an encoded prompt → base Conditioning."""
    vector = base_vector(text.pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                         target_height=target_height, target_width=target_width)
    return Conditioning(crossattn=text.crossattn, vector=vector)


def refiner_conditioning(text: TextEmbedding, *, width: float = 1024, height: float = 1024,
                         aesthetic_score: float = 6.0, crop_w: float = 0, crop_h: float = 0) -> Conditioning:
    """ComfyUI CLIPTextEncodeSDXLRefiner (`ascore`, `width`, `height`; crop 0) + a prompt → refiner Conditioning."""
    vector = refiner_vector(text.pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                            aesthetic_score=aesthetic_score)
    return Conditioning(crossattn=text.crossattn, vector=vector)


# ------------------------------------------------------------------------------------------------
# ComfyUI's CONDITIONING: a list of [crossattn, options] entries, resolved at sampling time
# ------------------------------------------------------------------------------------------------
#
# ComfyUI's core nodes pass conditioning as a list of `[tensor [B, T, C], dict]` pairs. The dict may
# hold `pooled_output` [B, 1280], the micro-conditioning sizes (`width`, `height`, `crop_w`,
# `crop_h`, `target_width`, `target_height`) or the refiner's `aesthetic_score`, `strength` (weight
# when several entries are averaged) and `start_percent` / `end_percent` (the part of the schedule
# the entry applies to). Sizes that are missing are filled in when sampling starts: width/height from
# the latent (× 8), targets from width/height, crops 0, and the refiner's score 6.0 for the positive
# and 2.5 for the negative prompt (ComfyUI `encode_model_conds`, `SDXL(Refiner).encode_adm`).
#
# Our SDXL_COND (`Conditioning`, vector already built) is the degenerate case: one entry, strength 1,
# the whole schedule. `resolve_entries` turns either into `CondEntry`s, which is all the sampler sees.

SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


@dataclass(frozen=True)
class CondEntry:
    """One conditioning entry ready for the UNet: context, ADM vector, weight and active sigma range.

    The entry takes part in a step at noise level sigma when ``sigma_end <= sigma <= sigma_start``
    (None = unbounded). ``strength`` weighs its prediction when several entries are averaged.
    """

    crossattn: torch.Tensor
    vector: torch.Tensor
    strength: float = 1.0
    sigma_start: float | None = None
    sigma_end: float | None = None

    def active(self, sigma: float) -> bool:
        if self.sigma_start is not None and sigma > self.sigma_start:
            return False
        return not (self.sigma_end is not None and sigma < self.sigma_end)


def percent_to_sigma(percent: float) -> float:
    """Fraction of the schedule → sigma (ComfyUI ``ModelSamplingDiscrete.percent_to_sigma``).

    0 → "above any sigma", 1 → 0; otherwise sigma at the fractional timestep (1 − percent) · 999.
    """
    from .schedules import timestep_to_sigma

    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(timestep_to_sigma(torch.tensor((1.0 - percent) * 999.0)))


def _is_comfy_list(cond) -> bool:
    return isinstance(cond, list)


def check_comfy_conditioning(cond, where: str) -> None:
    """A CONDITIONING value must be a non-empty list of [tensor [B, T, C], dict] pairs."""
    if not isinstance(cond, list) or not cond:
        raise ConditioningError(f"{where}: expected a CONDITIONING list of [tensor, dict] entries, got "
                                f"{type(cond).__name__}")
    for k, entry in enumerate(cond):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], torch.Tensor)
                or entry[0].ndim != 3 or not isinstance(entry[1], dict)):
            raise ConditioningError(f"{where}: entry {k} is not a [tensor [B, T, C], dict] pair")


def _scalar(options: dict, key: str, default: float, where: str) -> float:
    value = options.get(key, default)
    (out,) = _check_scalars(**{f"{where} {key}": value})
    return out


def _entry_vector(pooled: torch.Tensor, options: dict, *, refiner: bool, latent_hw: tuple[int, int],
                  negative: bool, where: str) -> torch.Tensor:
    height = _scalar(options, "height", latent_hw[0] * 8, where)
    width = _scalar(options, "width", latent_hw[1] * 8, where)
    crop_h = _scalar(options, "crop_h", 0, where)
    crop_w = _scalar(options, "crop_w", 0, where)
    if refiner:
        score = _scalar(options, "aesthetic_score", 2.5 if negative else 6.0, where)
        return refiner_vector(pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w, aesthetic_score=score)
    return base_vector(pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                       target_height=_scalar(options, "target_height", height, where),
                       target_width=_scalar(options, "target_width", width, where))


def resolve_entries(cond, *, refiner: bool, latent_hw: tuple[int, int], negative: bool,
                    where: str = "conditioning") -> list[CondEntry]:
    """Our `Conditioning` or ComfyUI's CONDITIONING list → the entries the sampler runs.

    refiner: build the refiner's 2560-wide vector (else the base's 2816); latent_hw: the latent's
    (h, w), the default size (× 8); negative: the entry is the uncond side (refiner score 2.5).
    """
    if isinstance(cond, Conditioning):
        return [CondEntry(cond.crossattn, cond.vector)]
    check_comfy_conditioning(cond, where)
    out = []
    for k, (crossattn, options) in enumerate(cond):
        here = f"{where} entry {k}"
        pooled = options.get("pooled_output")
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2:
            raise ConditioningError(f"{here} has no pooled_output [B, 1280]; SDXL needs it. Encode the prompt "
                                    "with an SDXL checkpoint's CLIP (CLIPTextEncode or CLIPTextEncodeSDXL).")
        vector = _entry_vector(pooled, options, refiner=refiner, latent_hw=latent_hw, negative=negative, where=here)
        start = options.get("start_percent")
        end = options.get("end_percent")
        out.append(CondEntry(
            crossattn, vector, strength=float(options.get("strength", 1.0)),
            sigma_start=None if start is None else percent_to_sigma(float(start)),
            sigma_end=None if end is None else percent_to_sigma(float(end)),
        ))
    return out


# -- the CONDITIONING list operations of ComfyUI's core nodes -----------------------------------------


def comfy_conditioning(text: TextEmbedding, **options) -> list:
    """An encoded prompt → a one-entry CONDITIONING list with its pooled output and the given options."""
    return [[text.crossattn, {"pooled_output": text.pooled, **options}]]


def combine(a: list, b: list) -> list:
    """ConditioningCombine: both lists' entries; each is predicted and the predictions averaged."""
    return a + b


def concat(to: list, from_: list) -> list:
    """ConditioningConcat: every `to` entry's tokens followed by the first `from_` entry's tokens."""
    if len(from_) > 1:
        logger.warning("ConditioningConcat: conditioning_from has %d entries; only the first is used", len(from_))
    src = from_[0][0]
    out = []
    for t, options in to:
        if t.shape[0] != src.shape[0] or t.shape[2] != src.shape[2]:
            raise ConditioningError(f"ConditioningConcat: cannot append tokens of shape {list(src.shape)} to "
                                    f"{list(t.shape)}; both must come from the same checkpoint's CLIP")
        out.append([torch.cat((t, src.to(t)), dim=1), dict(options)])
    return out


def average(to: list, from_: list, to_strength: float) -> list:
    """ConditioningAverage: `to`·s + `from`·(1 − s) per entry; `from` cut or zero-padded to `to`'s tokens.

    The pooled output is averaged the same way (or taken from `from` when `to` has none).
    """
    if len(from_) > 1:
        logger.warning("ConditioningAverage: conditioning_from has %d entries; only the first is used", len(from_))
    src, pooled_from = from_[0][0], from_[0][1].get("pooled_output")
    out = []
    for t, options in to:
        if t.shape[2] != src.shape[2]:
            raise ConditioningError(f"ConditioningAverage: token width {src.shape[2]} of conditioning_from does not "
                                    f"match {t.shape[2]} of conditioning_to; use the same checkpoint's CLIP")
        s = src[:, : t.shape[1]].to(t)
        if s.shape[1] < t.shape[1]:
            s = torch.cat([s, torch.zeros((1, t.shape[1] - s.shape[1], t.shape[2]), dtype=t.dtype, device=t.device)],
                          dim=1)
        mixed = t * to_strength + s * (1.0 - to_strength)
        new = dict(options)
        pooled_to = options.get("pooled_output", pooled_from)
        if pooled_from is not None and pooled_to is not None:
            new["pooled_output"] = pooled_to * to_strength + pooled_from.to(pooled_to) * (1.0 - to_strength)
        elif pooled_from is not None:
            new["pooled_output"] = pooled_from
        out.append([mixed, new])
    return out


def zero_out(cond: list) -> list:
    """ConditioningZeroOut: zero tokens and pooled output (the options otherwise kept)."""
    out = []
    for t, options in cond:
        new = dict(options)
        if isinstance(new.get("pooled_output"), torch.Tensor):
            new["pooled_output"] = torch.zeros_like(new["pooled_output"])
        out.append([torch.zeros_like(t), new])
    return out


def set_values(cond: list, **values) -> list:
    """Every entry with `values` added to its options (ComfyUI node_helpers.conditioning_set_values)."""
    return [[t, {**options, **values}] for t, options in cond]
