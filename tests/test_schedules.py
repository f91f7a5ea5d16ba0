"""Schedules against values derived here by hand from the formulas (numpy/math only), and FACTS.md §7-§8.

The expected values never call sdxl_core.schedules: each test re-derives the SDXL table and the
scheduler formula (ComfyUI comfy/samplers.py, k-diffusion get_sigmas_*) independently.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from sdxl_nodes.sdxl_core import schedules as S
from sdxl_nodes.sdxl_core.errors import SamplingError

STEPS = (1, 2, 10, 25)

# ---- the table, by hand: scaled-linear betas in float64, sigma = sqrt((1 - acp) / acp) -------------
_BETAS = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
_ACP = np.cumprod(1.0 - _BETAS)
SIG64 = np.sqrt((1.0 - _ACP) / _ACP)
SIG32 = SIG64.astype(np.float32)
LOG32 = np.log(SIG64).astype(np.float32)  # ComfyUI keeps float32(log(float64 sigma))
SMIN, SMAX = float(SIG32[0]), float(SIG32[-1])


def sigma_at(t: float) -> float:
    """sigma(t): linear interpolation of the log table between floor(t) and ceil(t)."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * float(LOG32[lo]) + w * float(LOG32[hi]))


def expected(name: str, n: int) -> list[float]:
    if name == "simple":
        return [float(SIG32[-(1 + int(i * 1000 / n))]) for i in range(n)] + [0.0]
    if name == "normal":
        return [sigma_at(t) for t in np.linspace(999, 0, n)] + [0.0]
    if name == "sgm_uniform":
        return [sigma_at(t) for t in np.linspace(999, 0, n + 1)[:-1]] + [0.0]
    if name == "karras":
        ramp = np.linspace(0, 1, n)
        return list((SMAX ** (1 / 7) + ramp * (SMIN ** (1 / 7) - SMAX ** (1 / 7))) ** 7) + [0.0]
    if name == "exponential":
        return list(np.exp(np.linspace(math.log(SMAX), math.log(SMIN), n))) + [0.0]
    if name == "ddim_uniform":
        return [float(v) for v in SIG32[1::1000 // n][::-1]] + [0.0]
    if name == "beta":
        idx = np.rint(scipy.stats.beta.ppf(1 - np.arange(n) / n, 0.6, 0.6) * 999).astype(int)
        idx = [t for i, t in enumerate(idx) if i == 0 or t != idx[i - 1]]
        return [float(SIG32[t]) for t in idx] + [0.0]
    if name == "linear_quadratic":
        if n == 1:
            return [SMAX, 0.0]
        m = n // 2  # linear part: i * 0.025 / m; then a quadratic that is continuous at m and hits 1 at n
        i = np.arange(n + 1, dtype=np.float64)
        a = (m - 0.025 * n) / (m * (n - m) ** 2)
        b = 0.025 / m - 2 * (m - 0.025 * n) / (n - m) ** 2
        f = np.where(i < m, i * 0.025 / m, a * i**2 + b * i + a * m**2)
        f[-1] = 1.0
        return list((1 - f) * SMAX)
    if name == "kl_optimal":
        frac = np.arange(n) / max(n - 1, 1)
        return list(np.tan(frac * math.atan(SMIN) + (1 - frac) * math.atan(SMAX))) + [0.0]
    raise KeyError(name)


def test_table_matches_hand_derivation_and_facts():
    table = S.sigma_table()
    assert table.dtype == torch.float32 and table.shape == (1000,)
    np.testing.assert_allclose(table.numpy(), SIG32, rtol=1e-6)
    np.testing.assert_allclose(S.log_sigma_table().numpy(), LOG32, rtol=1e-6, atol=1e-7)
    assert S.sigma_min() == pytest.approx(0.0291671585, rel=1e-7)
    assert S.sigma_max() == pytest.approx(14.6146412, rel=1e-7)
    assert float(table[499]) == pytest.approx(1.61289, rel=1e-5)


def test_scheduler_table_order_is_comfyui():
    assert list(S.SCHEDULERS) == [
        "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal",
    ]


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
@pytest.mark.parametrize("steps", STEPS)
def test_scheduler_against_formula(name, steps):
    got = S.SCHEDULERS[name](steps)
    want = expected(name, steps)
    assert got.dtype == torch.float32
    assert got.shape == (len(want),)
    assert float(got[-1]) == 0.0
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=2e-6, atol=1e-7)
    if name not in ("beta", "ddim_uniform"):  # those two may differ in length, as in ComfyUI
        assert len(got) == steps + 1


def test_ddim_uniform_and_beta_lengths_follow_comfyui():
    assert len(S.ddim_uniform(7)) == 9  # stride 142: t = 1, 143, ..., 995 -> 8 sigmas + 0
    np.testing.assert_allclose(S.ddim_uniform(7).numpy(), expected("ddim_uniform", 7), rtol=1e-7)
    for n in (40, 100, 300):  # duplicate indices dropped near the ends
        np.testing.assert_allclose(S.beta(n).numpy(), expected("beta", n), rtol=1e-7)


def test_beta_ppf_matches_scipy():
    qs = np.concatenate([1 - np.linspace(0, 1, n, endpoint=False) for n in (3, 7, 10, 25, 64)])
    got = np.array([S._beta_ppf(float(q), 0.6, 0.6) for q in qs])
    np.testing.assert_allclose(got, scipy.stats.beta.ppf(qs, 0.6, 0.6), rtol=0, atol=1e-13)


def test_facts_ten_step_values():
    normal = [14.61464, 7.839883, 4.609174, 2.918307, 1.950161, 1.344928, 0.932358, 0.624977, 0.368658, 0.029167, 0]
    karras = [14.614643, 9.102929, 5.478392, 3.168605, 1.749418, 0.914073, 0.446918, 0.201398, 0.08191, 0.029167, 0]
    np.testing.assert_allclose(S.normal(10).numpy(), normal, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(S.karras(10).numpy(), karras, rtol=2e-6, atol=1e-6)
    ts = S.sigma_to_timestep(S.normal(10)[:-1])
    assert ts.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert S.normal(2).tolist() == pytest.approx([14.61464, 0.0291672, 0.0], rel=2e-6)


def test_schedule_precision_is_exp_of_float32_log():
    """FACTS §7: the schedule's first value is exp(float32 log sigma_max), one ulp below the table's."""
    first = float(S.normal(25)[0])
    assert first == 14.614640235900879
    assert S.sigma_max() == 14.614641189575195
    assert first != S.sigma_max() and math.isclose(first, S.sigma_max(), rel_tol=1e-5)


def test_timestep_sigma_conversions():
    table = S.sigma_table()
    assert torch.equal(S.sigma_to_timestep(table), torch.arange(1000, dtype=torch.float32))
    assert S.sigma_to_timestep(torch.tensor(S.sigma_max())).ndim == 0
    np.testing.assert_allclose(S.timestep_to_sigma(torch.arange(1000)).numpy(), SIG32, rtol=1e-6)
    t = torch.tensor([0.25, 499.5, 998.75])
    np.testing.assert_allclose(S.timestep_to_sigma(t).numpy(), [sigma_at(float(v)) for v in t], rtol=1e-6)
    assert float(S.timestep_to_sigma(torch.tensor(5000.0))) == pytest.approx(S.sigma_max(), rel=1e-6)  # clamped


def test_get_sigmas_discards_penultimate_for_dpm2_and_unipc():
    for sampler in ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"):
        full = S.normal(11)
        got = S.get_sigmas("normal", 10, sampler_name=sampler)
        assert got.shape == (11,)
        assert torch.equal(got, torch.cat([full[:-2], full[-1:]]))
    assert torch.equal(S.get_sigmas("normal", 10, sampler_name="euler"), S.normal(10))


def test_get_sigmas_denoise():
    got = S.get_sigmas("karras", 10, denoise=0.4)  # int(10 / 0.4) = 25 steps, keep the last 11
    assert torch.equal(got, S.karras(25)[-11:])
    got = S.get_sigmas("normal", 7, denoise=0.3)  # int(23.33) = 23
    assert torch.equal(got, S.normal(23)[-8:])
    assert S.get_sigmas("normal", 10, denoise=0.0).numel() == 0
    assert torch.equal(S.get_sigmas("normal", 10, denoise=0.99995), S.normal(10))  # > 0.9999 counts as 1


def test_get_sigmas_errors():
    with pytest.raises(SamplingError, match="simple, sgm_uniform, karras"):
        S.get_sigmas("nope", 10)
    with pytest.raises(SamplingError, match="steps"):
        S.get_sigmas("normal", 0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SamplingError, match="denoise"):
            S.get_sigmas("normal", 10, denoise=bad)
