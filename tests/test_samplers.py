"""Samplers, the CFG denoiser and the KSampler-style `sample` (FACTS.md §7-§11), on CPU without a UNet.

References used here:
* An analytic denoiser: data ~ N(MU, S^2) per element gives x0(x, sigma) = (S^2 x + sigma^2 MU) / (S^2 + sigma^2),
  and the probability-flow ODE from sigma_a to sigma_b maps x to MU + (x - MU) sqrt((S^2 + sigma_b^2) / (S^2 + sigma_a^2)).
* diffusers' EulerDiscreteScheduler / DPMSolverMultistepScheduler driven with the same sigmas.
* torch.manual_seed(seed); torch.randn(shape) for the initial noise (ComfyUI comfy/sample.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_nodes.sdxl_core import samplers as K
from sdxl_nodes.sdxl_core import sampling as M
from sdxl_nodes.sdxl_core import schedules as S
from sdxl_nodes.sdxl_core.errors import Cancelled, SamplingError
from sdxl_nodes.sdxl_core.types import Conditioning

MU, S2 = 0.3, 0.25  # data mean and variance of the analytic Gaussian


def gaussian_denoiser(x, sigma, post_cfg=None, **_):
    """Exact x0 for Gaussian data; with post_cfg (CFG++ samplers) it reports itself as cond and uncond."""
    s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2
    x0 = (S2 * x + s2 * MU) / (S2 + s2)
    return x0 if post_cfg is None else post_cfg({"denoised": x0, "uncond_denoised": x0, "cond_denoised": x0})


def pf_ode_solution(x, sigma_a, sigma_b):
    return MU + (x - MU) * math.sqrt((S2 + sigma_b**2) / (S2 + sigma_a**2))


DETERMINISTIC = [
    "euler", "euler_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0", "dpm_2", "lms", "dpm_fast", "dpmpp_2m",
    "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "ddim", "uni_pc", "uni_pc_bh2",
]
ADAPTIVE = ["dpm_adaptive"]  # its step count is its own (rtol/atol), tested separately
STOCHASTIC = [name for name in M.SAMPLERS if name not in DETERMINISTIC + ADAPTIVE]

# Observed global order (error ratio when doubling the steps, log2) on an exponential grid from 14.6 to
# 0.05, measured with (n, 2n) below. heunpp2's slope weights depend on sigma_0 and make it first order;
# iPNDM's fixed Adams-Bashforth weights assume equal steps, so on this geometric grid it is 2nd order;
# lms ramps up to 4th (3.2-3.6 measured); UniPC is 3rd order in the bulk but ComfyUI's lower-order
# final steps (order 1 on the last step, no corrector) cap the global order at 2. iPNDM-v's 3rd/4th
# order terms are exact only on uniform grids (2nd order here); DEIS is 3rd order; gradient estimation
# (slope 2 d_i - d_(i-1)) is first order; dpm_fast's time grid is float32 (ComfyUI's), so it is
# measured at 8 -> 16 evaluations, before round-off.
EXPECTED_ORDER = {
    "euler": (0.8, 1.3, 32), "ddim": (0.8, 1.3, 32), "heunpp2": (0.8, 1.3, 32), "euler_cfg_pp": (0.8, 1.3, 32),
    "heun": (1.7, 2.5, 32), "dpm_2": (1.7, 2.5, 32), "dpmpp_2m": (1.7, 2.5, 32), "ipndm": (1.7, 2.5, 32),
    "res_multistep": (1.7, 2.5, 32), "lms": (3.0, 4.5, 32), "uni_pc": (1.7, 2.6, 64), "uni_pc_bh2": (1.7, 2.6, 64),
    "exp_heun_2_x0": (1.7, 2.5, 32), "dpmpp_2m_cfg_pp": (1.7, 2.5, 32), "res_multistep_cfg_pp": (1.7, 2.5, 32),
    "ipndm_v": (1.7, 2.6, 32), "deis": (2.5, 3.4, 32), "gradient_estimation": (0.6, 1.3, 32),
    "gradient_estimation_cfg_pp": (0.6, 1.3, 32), "dpm_fast": (2.5, 6.0, 8),
}


def test_sampler_table_is_comfyui_order():
    comfy_order = [
        "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
        "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
        "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
        "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
        "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
        "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
    ]
    ours = list(M.SAMPLERS)
    assert ours == [name for name in comfy_order if name in ours]
    for required in ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                     "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "uni_pc"]:
        assert required in ours


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_converges_with_expected_order(name):
    lo, hi, n = EXPECTED_ORDER[name]
    sigma_a, sigma_b = 14.6, 0.05
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64) * math.sqrt(S2 + sigma_a**2) + MU
    errors = []
    for steps in (n, 2 * n):
        sigmas = torch.exp(torch.linspace(math.log(sigma_a), math.log(sigma_b), steps + 1, dtype=torch.float64))
        out = M.SAMPLERS[name](gaussian_denoiser, x, sigmas)
        errors.append((out - pf_ode_solution(x, sigma_a, sigma_b)).abs().max().item())
    order = math.log2(errors[0] / errors[1])
    assert errors[1] < 0.05
    assert lo <= order <= hi, f"{name}: observed order {order:.2f}, errors {errors}"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_full_schedule_lands_on_data_mean_path(name):
    """On the SDXL schedule ending in 0, every sampler reaches the ODE solution at sigma = 0 closely."""
    sigmas = S.get_sigmas("karras", 40, sampler_name=name)
    torch.manual_seed(1)
    x = torch.randn(1, 4, 4, 4) * float(sigmas[0]) + MU
    out = M.SAMPLERS[name](gaussian_denoiser, x, sigmas)
    # first-order methods carry ~5e-2 here (|x| up to ~50 at sigma_max); uni_pc stops at sigma 0.001 as ComfyUI
    first_order = ("euler", "ddim", "heunpp2", "euler_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp")
    tolerance = 0.1 if name in first_order else 0.02
    assert (out - pf_ode_solution(x, float(sigmas[0]), 0.0)).abs().max() < tolerance


def test_euler_matches_diffusers():
    from diffusers import EulerDiscreteScheduler

    sigmas = S.get_sigmas("karras", 20)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="sample")
    sched.set_timesteps(sigmas=sigmas.tolist())
    assert torch.allclose(sched.sigmas, sigmas)
    torch.manual_seed(2)
    x = torch.randn(1, 4, 8, 8) * float(sigmas[0])
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        x0 = gaussian_denoiser(ref, sched.sigmas[i].reshape(1))
        ref = sched.step(x0, t, ref).prev_sample
    ours = K.sample_euler(gaussian_denoiser, x, sigmas)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
def test_dpmpp_2m_matches_diffusers_dpmsolver_plus_plus(scheduler):
    """diffusers runs DPM-Solver++(2M) in the VP scale x / sqrt(1 + sigma^2) with x0 as the model output.

    Its defaults match ComfyUI's: first step 1st order, then 2nd order (midpoint), last step to 0 1st order.
    """
    from diffusers import DPMSolverMultistepScheduler

    steps = 12
    sigmas = S.get_sigmas(scheduler, steps)
    sched = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="sample", final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    sched.sigmas = sigmas.clone()  # drive it with our sigmas; its timesteps only index the steps
    torch.manual_seed(3)
    x = torch.randn(1, 4, 8, 8) * float(sigmas[0])
    x_vp = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    for i, t in enumerate(sched.timesteps):
        sigma = sigmas[i].reshape(1)
        x0 = gaussian_denoiser(x_vp * torch.sqrt(1 + sigma**2), sigma)
        x_vp = sched.step(x0, t, x_vp).prev_sample
    ours = K.sample_dpmpp_2m(gaussian_denoiser, x, sigmas)
    torch.testing.assert_close(ours, x_vp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_are_seeded_and_sample_the_data_distribution(name):
    sigmas = S.get_sigmas("karras", 30, sampler_name=name)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 64, 64, generator=gen) * float(sigmas[0])
    a = M.SAMPLERS[name](gaussian_denoiser, x, sigmas, extra_args={"seed": 42})
    b = M.SAMPLERS[name](gaussian_denoiser, x, sigmas, extra_args={"seed": 42})
    c = M.SAMPLERS[name](gaussian_denoiser, x, sigmas, extra_args={"seed": 43})
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # 16k samples of N(MU, S2): the mean within a few standard errors, and the std within the
    # method's bias at 30 steps: first-order ancestral steps (euler_ancestral, ddpm) undershoot by ~0.05
    # (0.483 at 100 steps, 0.492 at 300). lcm is only right for a consistency model: re-noising x0 =
    # E[data | x] never restores the variance, so its std is not checked.
    # dpmpp_2s_ancestral_cfg_pp keeps ComfyUI's use of the midpoint's uncond x0 in the full step, which
    # shrinks the std even when cond == uncond (see test_dpmpp_2s_ancestral_cfg_pp_uses_midpoint_uncond).
    assert abs(a.mean().item() - MU) < 0.03
    if name not in ("lcm", "dpmpp_2s_ancestral_cfg_pp"):
        tolerance = 0.07 if name in ("euler_ancestral", "euler_ancestral_cfg_pp", "ddpm") else 0.03
        assert abs(a.std().item() - math.sqrt(S2)) < tolerance


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_without_seed_is_an_error(name):
    """No silent unseeded generator: a sampler that needs noise and gets neither seed nor sampler fails."""
    sigmas = S.get_sigmas("karras", 4, sampler_name=name)
    with pytest.raises(SamplingError, match="seed"):
        M.SAMPLERS[name](gaussian_denoiser, torch.randn(1, 4, 4, 4) * float(sigmas[0]), sigmas)


def test_ancestral_noise_is_comfyui_default_noise_sampler():
    """ComfyUI: per-step noise = randn from a CPU generator seeded with seed + 1."""
    x = torch.zeros(1, 4, 8, 8)
    draw = K.default_noise_sampler(x, seed=7)
    gen = torch.Generator().manual_seed(8)
    assert torch.equal(draw(None, None), torch.randn(x.shape, generator=gen))
    assert torch.equal(draw(None, None), torch.randn(x.shape, generator=gen))


def test_euler_ancestral_with_eta_zero_is_euler():
    sigmas = S.normal(10)
    x = torch.randn(1, 4, 8, 8) * float(sigmas[0])
    a = K.sample_euler_ancestral(gaussian_denoiser, x, sigmas, eta=0.0, extra_args={"seed": 1})
    torch.testing.assert_close(a, K.sample_euler(gaussian_denoiser, x, sigmas), rtol=0, atol=1e-6)


def test_brownian_noise_sampler_has_brownian_covariance():
    x = torch.zeros(200_000)
    ns = K.BrownianTreeNoiseSampler(x, 1.0, 5.0, seed=3)
    s_i, s_mid, s_next = torch.tensor(5.0), torch.tensor(2.0), torch.tensor(1.0)
    first = ns(s_i, s_mid)  # (W(2) - W(5)) / sqrt 3
    second = ns(s_i, s_next)  # (W(1) - W(5)) / sqrt 4
    third = ns(s_mid, s_next)  # (W(1) - W(2)), consistent with the same path
    for n in (first, second, third):
        assert abs(n.std().item() - 1) < 0.01
    assert abs((first * second).mean().item() - math.sqrt(3 / 4)) < 0.01
    torch.testing.assert_close(third * 1.0, (second * 2 - first * math.sqrt(3)), rtol=1e-4, atol=1e-4)
    again = K.BrownianTreeNoiseSampler(x, 1.0, 5.0, seed=3)
    assert torch.equal(again(s_i, s_mid), first)


def test_sampler_callback_protocol():
    sigmas = S.normal(6)
    seen = []
    K.sample_heun(gaussian_denoiser, torch.randn(1, 4, 4, 4), sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"i", "x", "denoised", "sigma", "sigma_hat"}
    assert float(seen[0]["sigma"]) == float(sigmas[0])


# ------------------------------------------------------------------------------------------------
# The CFG denoiser and the high-level sample()
# ------------------------------------------------------------------------------------------------


class FakeUNet:
    """A cheap nonlinear eps-predictor that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_in, timesteps, context, y):
        self.calls.append({"x": x_in.clone(), "t": timesteps.clone(), "context": context.clone(), "y": y.clone()})
        ctx = context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (torch.tanh(x_in.float()) * 0.5 + 0.1 * ctx + 0.01 * y.float().mean(1).view(-1, 1, 1, 1)
                + timesteps.view(-1, 1, 1, 1) / 4000).to(x_in.dtype)


def conds(batch=1, tokens=(77, 77), dim=16, adm=12):
    g = torch.Generator().manual_seed(11)
    pos = Conditioning(torch.randn(batch, tokens[0], dim, generator=g), torch.randn(batch, adm, generator=g))
    neg = Conditioning(torch.randn(batch, tokens[1], dim, generator=g), torch.randn(batch, adm, generator=g))
    return pos, neg


def run(latent=None, unet=None, **kw):
    pos, neg = conds()
    args = dict(seed=123, steps=25, cfg=8.0, sampler_name="euler", scheduler="normal")
    args.update(kw)
    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    return M.sample(unet or FakeUNet(), pos, neg, latent, **args)


def test_cfg_one_makes_one_call_with_batch_b_else_one_call_with_2b():
    pos, neg = conds(batch=2)
    unet = FakeUNet()
    den = M.CFGDenoiser(unet, pos, neg, 1.0)
    den(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0]))
    assert len(unet.calls) == 1 and unet.calls[0]["x"].shape[0] == 2
    unet = FakeUNet()
    den = M.CFGDenoiser(unet, pos, neg, 7.0)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    out = den(x, sigma)
    call = unet.calls[0]
    assert len(unet.calls) == 1 and call["x"].shape[0] == 4
    torch.testing.assert_close(call["x"][:2], x / math.sqrt(10))
    assert torch.equal(call["t"], S.sigma_to_timestep(torch.tensor([3.0] * 4)))
    assert torch.equal(call["context"][:2], neg.crossattn) and torch.equal(call["context"][2:], pos.crossattn)
    # x0 = x - sigma * eps per branch, then uncond + (cond - uncond) * cfg
    eps = FakeUNet()(call["x"], call["t"], call["context"], call["y"])
    x0 = torch.cat([x, x]) - 3.0 * eps
    torch.testing.assert_close(out, x0[:2] + (x0[2:] - x0[:2]) * 7.0)


def test_cfg_mixed_token_lengths_use_lcm_repeat():
    pos, neg = conds(tokens=(154, 77))
    unet = FakeUNet()
    M.CFGDenoiser(unet, pos, neg, 5.0)(torch.randn(1, 4, 8, 8), torch.tensor([2.0]))
    ctx = unet.calls[0]["context"]
    assert ctx.shape == (2, 154, 16)
    assert torch.equal(ctx[0], torch.cat([neg.crossattn[0], neg.crossattn[0]]))
    assert torch.equal(ctx[1], pos.crossattn[0])
    out = run(unet=FakeUNet(), steps=3)  # and through sample()
    assert torch.isfinite(out).all()


def test_dtype_casts_unet_inputs_and_keeps_state_float32():
    unet = FakeUNet()
    out = run(unet=unet, steps=2, dtype=torch.bfloat16)
    call = unet.calls[0]
    assert call["x"].dtype == call["context"].dtype == call["y"].dtype == torch.bfloat16
    assert call["t"].dtype == torch.float32
    assert out.dtype == torch.float32


def test_prepare_noise_is_torch_manual_seed_randn():
    state = torch.get_rng_state()
    try:
        for seed in (0, 721897303308196, 2**63 + 5, 2**64 - 1):
            torch.manual_seed(seed)
            want = torch.randn(2, 4, 16, 16)
            got = M.prepare_noise(torch.zeros(2, 4, 16, 16), seed)
            assert torch.equal(got, want) and got.dtype == torch.float32
            assert torch.equal(M.prepare_noise(torch.zeros(2, 4, 16, 16), seed), got)
    finally:
        torch.set_rng_state(state)


def test_prepare_noise_does_not_touch_global_rng():
    state = torch.get_rng_state()
    M.prepare_noise(torch.zeros(1, 4, 8, 8), 99)
    assert torch.equal(torch.get_rng_state(), state)


def test_prepare_noise_batch_index():
    gen = torch.Generator().manual_seed(5)
    singles = [torch.randn(1, 4, 8, 8, generator=gen) for _ in range(4)]
    got = M.prepare_noise(torch.zeros(3, 4, 8, 8), 5, batch_index=[3, 1, 3])
    assert torch.equal(got, torch.cat([singles[3], singles[1], singles[3]]))
    # one draw over the batch is not "seed + b"
    whole = M.prepare_noise(torch.zeros(2, 4, 8, 8), 5)
    assert torch.equal(whole[1:], torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))[1:])


def test_initial_noise_scaled_by_sqrt_one_plus_sigma_max_squared():
    seen = []
    run(steps=10, callback=lambda step, total, x, x0: seen.append(x))
    noise = M.prepare_noise(torch.zeros(1, 4, 8, 8), 123)
    ratio = seen[0] / noise
    assert torch.allclose(ratio, torch.full_like(ratio, 14.648812), rtol=1e-6)
    # not at sigma_max (img2img): plain sigma_0 scaling and the latent scaled by 0.13025
    seen.clear()
    latent = torch.ones(1, 4, 8, 8)
    run(latent, steps=10, denoise=0.5, callback=lambda step, total, x, x0: seen.append(x))
    sigma_0 = float(S.get_sigmas("normal", 10, denoise=0.5)[0])
    torch.testing.assert_close(seen[0], noise * sigma_0 + 0.13025, rtol=1e-6, atol=1e-6)


def test_base_then_refiner_split_equals_single_run():
    single = run(steps=25)
    base = run(steps=25, end_step=20, return_with_leftover_noise=True)
    refined = run(base, steps=25, start_step=20, add_noise=False, seed=0)
    torch.testing.assert_close(refined, single, rtol=1e-6, atol=1e-6 * single.abs().max().item())


def test_split_restarts_multistep_history_and_ancestral_noise_as_comfyui():
    """Only memoryless deterministic samplers split exactly. As in ComfyUI, the second stage is a new
    sampler call: dpmpp_2m's first step there is first order again, and an ancestral sampler's noise
    generator restarts from the second stage's seed."""
    for sampler in ("dpmpp_2m", "euler_ancestral"):
        single = run(steps=12, sampler_name=sampler)
        base = run(steps=12, end_step=8, return_with_leftover_noise=True, sampler_name=sampler)
        refined = run(base, steps=12, start_step=8, add_noise=False, sampler_name=sampler)
        assert torch.isfinite(refined).all()
        assert not torch.equal(single, refined)


def test_end_step_without_leftover_noise_finishes_clean():
    seen = []
    out = run(steps=25, end_step=20, callback=lambda step, total, x, x0: seen.append((step, total, x0)))
    assert [s for s, _, _ in seen] == list(range(1, 21)) and seen[0][1] == 20
    # the last kept sigma became 0, so Euler's last step lands exactly on that step's x0
    torch.testing.assert_close(out * 0.13025, seen[-1][2], rtol=1e-6, atol=1e-6)


def test_start_past_the_end_returns_input_and_denoise_zero_is_identity():
    latent = torch.randn(1, 4, 8, 8)
    unet = FakeUNet()
    assert torch.equal(run(latent, unet=unet, steps=10, start_step=10), latent)
    assert torch.equal(run(latent, unet=unet, steps=10, start_step=30), latent)
    assert torch.equal(run(latent, unet=unet, steps=10, denoise=0.0), latent)
    assert unet.calls == []


def test_add_noise_off_starts_from_scaled_latent():
    seen = []
    latent = torch.randn(1, 4, 8, 8)
    run(latent, steps=10, add_noise=False, callback=lambda step, total, x, x0: seen.append(x))
    assert torch.equal(seen[0], latent * 0.13025)


def test_should_stop_cancels_within_one_step():
    unet = FakeUNet()
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        run(unet=unet, steps=25, sampler_name="heun", should_stop=should_stop)
    assert len(unet.calls) <= 2 * 4  # heun: <= 2 evaluations per step, stopped during step 4
    with pytest.raises(Cancelled):
        run(steps=5, should_stop=lambda: True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler_name": "nope"}, "euler, euler_cfg_pp, euler_ancestral"),
        ({"scheduler": "nope"}, "simple, sgm_uniform"),
        ({"steps": 0}, "steps"),
        ({"cfg": float("nan")}, "cfg"),
        ({"cfg": float("inf")}, "cfg"),
        ({"start_step": 20, "end_step": 20}, "start_step"),
        ({"start_step": 21, "end_step": 20}, "start_step"),
        ({"denoise": 1.5}, "denoise"),
        ({"denoise": -0.1}, "denoise"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        run(**kwargs)


def test_nan_latent_is_an_error():
    latent = torch.zeros(1, 4, 8, 8)
    latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(SamplingError, match="NaN"):
        run(latent)


@pytest.mark.parametrize("name", list(M.SAMPLERS))
def test_every_sampler_runs_through_sample(name):
    out = run(steps=4, sampler_name=name, scheduler="karras")
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
