"""The SDXL noise table and ComfyUI's schedulers, as short pure functions.

Sources (formulas and constants only; see ../shared/sdxl/FACTS.md §7-§8):

* The table: 1000 "scaled linear" betas, ``beta = linspace(sqrt(0.00085), sqrt(0.012), 1000)**2`` in
  float64, ``alphas_cumprod = cumprod(1 - beta)``, ``sigma = sqrt((1 - acp) / acp)`` stored as float32,
  log sigma taken in float64 and stored as float32 (ComfyUI ``comfy/model_sampling.py``
  ``ModelSamplingDiscrete``; Stability ``sgm`` ``LegacyDDPMDiscretization``).
* The schedulers: ComfyUI ``comfy/samplers.py`` (``simple_scheduler``, ``normal_scheduler``,
  ``ddim_scheduler``, ``beta_scheduler`` [Lee et al. 2024, arXiv:2407.12173],
  ``linear_quadratic_schedule`` [Genmo Mochi], ``kl_optimal_scheduler`` [AYS, arXiv:2404.14507]) and
  ``comfy/k_diffusion/sampling.py`` (``get_sigmas_karras`` [Karras et al. 2022, eq. 5],
  ``get_sigmas_exponential``), and the step adjustments of ComfyUI's ``KSampler`` class.

Every value is computed with the same float32/float64 operations ComfyUI uses, so schedules are
bit-equal to ComfyUI's: e.g. "normal" starts at ``exp(float32 log sigma_max) = 14.614640235900879``,
one ulp below the table's ``sigma_max = 14.614641189575195`` (which is why the "starting at sigma_max"
test in :mod:`.sampling` is a relative ``isclose``).

Each scheduler takes ``steps`` and returns a float32 tensor of ``steps + 1`` sigmas ending in 0, with
two exceptions inherited from ComfyUI: ``ddim_uniform`` returns more values when 1000 is not a
multiple of ``steps`` (e.g. 8 non-zero sigmas for 7 steps), and ``beta`` returns fewer when two steps
round to the same table index. Nothing here runs at import time beyond defining functions; the
table is built on first use and cached (read-only).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch

from .errors import SamplingError

NUM_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


# ------------------------------------------------------------------------------------------------
# The discrete sigma table
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _table() -> tuple[torch.Tensor, torch.Tensor]:
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float64
    return sigmas.float(), sigmas.log().float()  # ComfyUI: log of the float64 values, then float32


def sigma_table() -> torch.Tensor:
    """The 1000 SDXL sigmas (float32, ascending: index 0 = sigma_min 0.0291672, 999 = sigma_max 14.61464)."""
    return _table()[0].clone()


def log_sigma_table() -> torch.Tensor:
    """float32 log of the float64 sigmas (not the log of the float32 sigmas; ComfyUI keeps this one)."""
    return _table()[1].clone()


def sigma_min() -> float:
    return float(_table()[0][0])


def sigma_max() -> float:
    return float(_table()[0][-1])


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The table index nearest to each sigma in log space, as float (ComfyUI ``ModelSamplingDiscrete.timestep``).

    This is the integer the UNet receives as its timestep (FACTS.md §7).
    """
    sigma = torch.as_tensor(sigma)
    log_sigmas = _table()[1].to(sigma.device)
    dists = sigma.log().reshape(1, -1) - log_sigmas[:, None]  # (1000, N)
    return dists.abs().argmin(dim=0).view(sigma.shape).float()


def timestep_to_sigma(timestep: torch.Tensor) -> torch.Tensor:
    """sigma(t) for fractional t in [0, 999]: linear interpolation of the float32 log sigmas, then exp."""
    timestep = torch.as_tensor(timestep)
    log_sigmas = _table()[1].to(timestep.device)
    t = torch.clamp(timestep.float(), min=0, max=NUM_TIMESTEPS - 1)
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def percent_to_sigma(percent: float) -> float:
    """The sigma a fraction ``percent`` of the way through the timesteps (0 = pure noise side, 1 = clean),
    as ComfyUI ``ModelSamplingDiscrete.percent_to_sigma``: ``timestep_to_sigma((1 - percent) * 999)``."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(timestep_to_sigma(torch.tensor((1.0 - percent) * 999.0)))


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# ------------------------------------------------------------------------------------------------
# Schedulers (ComfyUI names; each returns float32 sigmas ending in 0)
# ------------------------------------------------------------------------------------------------


def simple(steps: int) -> torch.Tensor:
    """Every (1000/steps)-th table entry from the top: sigma_i = table[-(1 + int(i * 1000 / steps))]."""
    table = _table()[0]
    stride = NUM_TIMESTEPS / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0], dtype=torch.float32)


def _uniform_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    sigmas = [float(timestep_to_sigma(t)) for t in timesteps]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def normal(steps: int) -> torch.Tensor:
    """sigma(t) at t = linspace(999, 0, steps) (log-linear interpolation), then 0; ends at sigma_min."""
    return _uniform_timesteps(torch.linspace(NUM_TIMESTEPS - 1, 0, steps))


def sgm_uniform(steps: int) -> torch.Tensor:
    """Like ``normal`` but t = linspace(999, 0, steps + 1)[:-1], so the last non-zero sigma is above sigma_min."""
    return _uniform_timesteps(torch.linspace(NUM_TIMESTEPS - 1, 0, steps + 1)[:-1])


def karras(steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: interpolate sigma^(1/rho) linearly from sigma_max to sigma_min."""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min() ** (1 / rho), sigma_max() ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(steps: int) -> torch.Tensor:
    """Uniform in log sigma: exp(linspace(ln sigma_max, ln sigma_min, steps))."""
    return _append_zero(torch.linspace(math.log(sigma_max()), math.log(sigma_min()), steps).exp())


def ddim_uniform(steps: int) -> torch.Tensor:
    """Table entries t = 1, 1 + s, 1 + 2s, ... < 1000 with s = 1000 // steps, reversed, then 0."""
    table = _table()[0]
    stride = max(NUM_TIMESTEPS // steps, 1)
    values = [float(table[t]) for t in range(1, NUM_TIMESTEPS, stride)]
    return torch.tensor(values[::-1] + [0.0], dtype=torch.float32)


def beta(steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Lee et al. (2024): t_i = rint(BetaPPF(1 - i/steps; 0.6, 0.6) * 999), repeated indices dropped."""
    table = _table()[0]
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)  # numpy, as ComfyUI, for identical float64 values
    indices = [round(_beta_ppf(float(q), alpha, beta_) * (NUM_TIMESTEPS - 1)) for q in quantiles]
    kept = [t for i, t in enumerate(indices) if i == 0 or t != indices[i - 1]]
    return torch.tensor([float(table[t]) for t in kept] + [0.0], dtype=torch.float32)


def linear_quadratic(steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> torch.Tensor:
    """Genmo Mochi: 1 - (linear ramp to threshold_noise, then a quadratic to 1), scaled by sigma_max."""
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        n_lin = steps // 2 if linear_steps is None else linear_steps
        n_quad = steps - n_lin
        step_diff = n_lin - threshold_noise * steps
        quad_coef = step_diff / (n_lin * n_quad**2)
        lin_coef = threshold_noise / n_lin - 2 * step_diff / n_quad**2
        const = quad_coef * n_lin**2
        ramp = [i * threshold_noise / n_lin for i in range(n_lin)]
        ramp += [quad_coef * i**2 + lin_coef * i + const for i in range(n_lin, steps)]
        fractions = [1.0 - f for f in ramp + [1.0]]
    return torch.tensor(fractions, dtype=torch.float32) * _table()[0][-1]


def kl_optimal(steps: int) -> torch.Tensor:
    """tan of a linear interpolation from atan(sigma_max) to atan(sigma_min).

    Deviation: ComfyUI divides by steps - 1, which gives NaN for steps == 1; here one step is [sigma_max, 0].
    """
    frac = torch.arange(steps, dtype=torch.float).div_(max(steps - 1, 1))
    return _append_zero((frac * math.atan(sigma_min()) + (1 - frac) * math.atan(sigma_max())).tan_())


# Name -> function, in ComfyUI's combo-box order (the first entry is the node default).
SCHEDULERS: dict[str, Callable[[int], torch.Tensor]] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}

# Samplers that ComfyUI gives steps + 1 sigmas with the penultimate one removed (KSampler class).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def get_sigmas(scheduler: str, steps: int, *, sampler_name: str | None = None, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler runs for (scheduler, steps, sampler, denoise).

    * ``dpm_2``, ``dpm_2_ancestral``, ``uni_pc``, ``uni_pc_bh2``: compute steps + 1, drop the penultimate sigma.
    * ``denoise`` < 1 (img2img strength): compute ``int(steps / denoise)`` steps and keep the last steps + 1;
      ``denoise`` <= 0 gives an empty tensor (nothing to sample). ``denoise`` > 0.9999 counts as 1.
    """
    fn = SCHEDULERS.get(scheduler)
    if fn is None:
        raise SamplingError(f"unknown scheduler {scheduler!r}; expected one of: {', '.join(SCHEDULERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise SamplingError(f"steps must be an integer >= 1, got {steps!r}")
    if not math.isfinite(denoise) or denoise > 1.0 or denoise < 0.0:
        raise SamplingError(f"denoise must be in [0, 1], got {denoise!r}")

    def compute(n: int) -> torch.Tensor:
        if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = fn(n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return fn(n)

    if denoise > 0.9999:
        return compute(steps)
    if denoise <= 0.0:
        return torch.zeros([0], dtype=torch.float32)
    return compute(int(steps / denoise))[-(steps + 1):]


# ------------------------------------------------------------------------------------------------
# Beta distribution quantile (no scipy): safeguarded Newton on the regularized incomplete beta
# ------------------------------------------------------------------------------------------------


def _betainc(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b), continued fraction (modified Lentz; Numerical Recipes §6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean; use symmetry
        return 1.0 - _betainc(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) in x, to ~1e-15 (scipy.stats.beta.ppf agrees to that; only rint(ppf*999) is used)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:
        return 0.5  # exact by symmetry; keeps rint(499.5) on the side ComfyUI/scipy land (500)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi, x = 0.0, 1.0, q
    for _ in range(200):
        err = _betainc(x, a, b) - q
        if err == 0.0:
            return x
        if err > 0:
            hi = x
        else:
            lo = x
        pdf = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)
        step = x - err / pdf
        new = step if lo < step < hi else 0.5 * (lo + hi)  # Newton, or bisection when it leaves the bracket
        if abs(new - x) <= 1e-16 * x or hi - lo <= 1e-16:
            return new
        x = new
    return x
