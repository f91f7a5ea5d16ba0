"""Every sampler k-diffusion has, against k-diffusion itself (crowsonkb/k-diffusion 0.1.1.post1, a test extra).

k-diffusion's ``sampling.py`` is loaded from the installed package without running its ``__init__``
(which imports torchvision, clip, wandb ...): its one project import, ``utils.append_dims``, is given
here as the two-line broadcast it is. Both sides get the same denoiser (a nonlinear function of x and
sigma) and the same noise:

* ancestral samplers: two generators seeded alike, one injected on each side;
* SDE samplers: ComfyUI's seeding recipe on both sides. k-diffusion is handed its own
  ``BrownianTreeNoiseSampler(x, min nonzero sigma, max sigma, seed=seed)``; ours builds its tree from
  ``extra_args["seed"]`` alone, so the test checks our tree's construction (seed, range, placement).

Tolerance 1e-5 (float32; lms is not bit-identical: k-diffusion takes its coefficients from scipy's
adaptive quadrature with epsrel 1e-4, we integrate exactly). Two places where ComfyUI (which we follow)
departs from k-diffusion 0.1.1, bridged here explicitly:

* lms: ComfyUI's last step to sigma = 0 is the plain x0 jump; k-diffusion extrapolates its 4th-order
  polynomial to 0. The golden runs k-diffusion up to the last nonzero sigma, then takes that x0.
* dpmpp_sde: ComfyUI queries the tree at the schedule's sigmas, k-diffusion at exp(-(-log sigma)),
  which can be one float32 ulp off (and torchsde then answers for a slightly different time). The
  golden's noise sampler snaps such queries back to the schedule's sigma.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from sdxl_nodes.sdxl_core import samplers as K
from sdxl_nodes.sdxl_core import schedules as S


def _load_kdiffusion_sampling():
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without importing it
    if spec is None:
        raise ImportError("k-diffusion is not installed: run scripts/setup.sh (it installs k-diffusion --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "sampling.py"
    package = types.ModuleType("_kdiffusion_golden")
    package.__path__ = []
    utils = types.ModuleType("_kdiffusion_golden.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("_kdiffusion_golden", package)
    sys.modules.setdefault("_kdiffusion_golden.utils", utils)
    module_spec = importlib.util.spec_from_file_location("_kdiffusion_golden.sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


KD = _load_kdiffusion_sampling()
# k-diffusion's own tree is queried at sigma_max, where torchsde warns about its rounded t1.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
MU, S2 = 0.3, 0.25
SEED = 1234


def denoiser(x, sigma, **_):
    """Gaussian-data x0 plus a nonlinear term, so every evaluation point matters."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return (S2 * x + s**2 * MU) / (S2 + s**2) + 0.1 * torch.tanh(x) / (1 + s)


def randn_sampler(x, seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, generator=generator)


def kd_brownian(x, sigmas, seed):
    return KD.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)


def snapped(noise_sampler, sigmas):
    """Map a query time within 1e-6 (relative) of a schedule sigma onto that sigma."""
    def snap(t):
        close = torch.isclose(sigmas, torch.as_tensor(t, dtype=sigmas.dtype), rtol=1e-6, atol=0)
        return sigmas[close][0] if close.any() else t
    return lambda a, b: noise_sampler(snap(a), snap(b))


def start(sigmas, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(7)) * float(sigmas[0])


SCHEDULES = {
    "karras10": lambda: S.get_sigmas("karras", 10),
    "normal7": lambda: S.get_sigmas("normal", 7),
    "cut": lambda: S.get_sigmas("karras", 12)[:9],  # a base run stopped early: ends at a nonzero sigma
}

# (ours, k-diffusion's, extra keyword arguments for both)
DETERMINISTIC = [
    ("euler", "sample_euler", {}),
    ("heun", "sample_heun", {}),
    ("dpm_2", "sample_dpm_2", {}),
    ("lms", "sample_lms", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
]
ANCESTRAL = [
    ("euler_ancestral", "sample_euler_ancestral", {}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.8}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 1.1}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.7, "s_noise": 0.9}),
]
SDE = [
    ("dpmpp_sde", "sample_dpmpp_sde", {}),
    ("dpmpp_sde_gpu", "sample_dpmpp_sde", {}),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde_gpu", "sample_dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.6, "s_noise": 1.2}),
    ("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m_sde_heun_gpu", "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde_gpu", "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 0.8}),
]


def ours_kwargs(kwargs):
    return {k: v for k, v in kwargs.items() if k != "solver_type"}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("ours, theirs, kwargs", DETERMINISTIC)
def test_deterministic_samplers_equal_kdiffusion(ours, theirs, kwargs, schedule):
    sigmas = SCHEDULES[schedule]()
    x = start(sigmas)
    if ours == "lms" and sigmas[-1] == 0:  # ComfyUI: the last step is the x0 jump (module docstring)
        want = KD.sample_lms(denoiser, x, sigmas[:-1], disable=True, **kwargs)
        want = denoiser(want, sigmas[-2] * want.new_ones([want.shape[0]]))
    else:
        want = getattr(KD, theirs)(denoiser, x, sigmas, disable=True, **kwargs)
    got = K.SAMPLERS[ours](denoiser, x, sigmas, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("ours, theirs, kwargs", ANCESTRAL)
def test_ancestral_samplers_equal_kdiffusion_with_the_same_noise(ours, theirs, kwargs, schedule):
    sigmas = SCHEDULES[schedule]()
    x = start(sigmas)
    want = getattr(KD, theirs)(denoiser, x, sigmas, disable=True, noise_sampler=randn_sampler(x, SEED), **kwargs)
    got = K.SAMPLERS[ours](denoiser, x, sigmas, noise_sampler=randn_sampler(x, SEED), **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("ours, theirs, kwargs", SDE)
def test_sde_samplers_equal_kdiffusion_on_comfyui_seeded_brownian_tree(ours, theirs, kwargs, schedule):
    """Ours seeds its own tree from extra_args["seed"]; k-diffusion gets ComfyUI's recipe injected."""
    sigmas = SCHEDULES[schedule]()
    x = start(sigmas)
    want = getattr(KD, theirs)(denoiser, x, sigmas, disable=True, noise_sampler=snapped(kd_brownian(x, sigmas, SEED), sigmas), **kwargs)
    got = K.SAMPLERS[ours](denoiser, x, sigmas, extra_args={"seed": SEED}, **ours_kwargs(kwargs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    other = K.SAMPLERS[ours](denoiser, x, sigmas, extra_args={"seed": SEED + 1}, **ours_kwargs(kwargs))
    assert (other - want).abs().max() > 1e-3  # the seed matters


def test_brownian_noise_sampler_equals_kdiffusion_increments_for_any_query_order():
    sigmas = S.get_sigmas("karras", 6)
    x = torch.zeros(1, 4, 8, 8)
    ours = K.brownian_noise_sampler(x, sigmas, 2**64 - 1)  # the largest ComfyUI seed
    theirs = kd_brownian(x, sigmas, 2**64 - 1)
    queries = [(sigmas[3], sigmas[4]), (sigmas[0], sigmas[1]), (sigmas[1], sigmas[0]), (sigmas[2], torch.tensor(1.5))]
    for a, b in queries:
        torch.testing.assert_close(ours(a, b), theirs(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 9, 10])
def test_dpm_fast_equals_kdiffusion(steps):
    """ComfyUI runs dpm_fast between sigmas[0] and the last nonzero sigma with len(sigmas) - 1 evaluations."""
    sigmas = S.get_sigmas("karras", steps)
    x = start(sigmas)
    sigma_min = sigmas[-2] if steps > 1 else sigmas[0]
    if steps == 1:  # one step: the range collapses to a point
        sigmas = torch.tensor([float(sigmas[0]), 0.5, 0.0])
        sigma_min = sigmas[1]
    want = KD.sample_dpm_fast(denoiser, x, sigma_min, sigmas[0], len(sigmas) - 1, disable=True)
    got = K.sample_dpm_fast(denoiser, x, sigmas)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"rtol": 0.01, "atol": 0.002}, {"order": 2}, {"pcoeff": 0.3, "icoeff": 0.9, "dcoeff": 0.1}])
def test_dpm_adaptive_equals_kdiffusion_including_step_size_control(kwargs):
    sigmas = S.get_sigmas("karras", 10)
    x = start(sigmas)
    evaluations = {"ours": 0, "theirs": 0}

    def counting(who):
        def call(x, sigma, **extra):
            evaluations[who] += 1
            return denoiser(x, sigma)
        return call

    want, info = KD.sample_dpm_adaptive(counting("theirs"), x, sigmas[-2], sigmas[0], disable=True, return_info=True, **kwargs)
    got = K.sample_dpm_adaptive(counting("ours"), x, sigmas, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert evaluations["ours"] == evaluations["theirs"] == info["nfe"]
    assert info["n_reject"] > 0 or kwargs.get("rtol", 0.05) >= 0.01  # the controller is exercised
