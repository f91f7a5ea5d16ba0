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


@pytest.mark.parametrize("name", [name for name in STOCHASTIC if not name.endswith("_gpu")])  # same on CPU
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


# ------------------------------------------------------------------------------------------------
# Samplers k-diffusion lacks: one- and two-step values derived here from the papers' update rules
# (plain float/numpy/scipy arithmetic on the same inputs), float64 throughout.
# ------------------------------------------------------------------------------------------------

MU_C, MU_U = 0.6, -0.2  # cond and uncond data means: two different Gaussian denoisers


def _x0(x, sigma, mu):
    s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2 if torch.is_tensor(sigma) else sigma**2
    return (S2 * x + s2 * mu) / (S2 + s2)


def guided_denoiser(cfg):
    """uncond + (cond - uncond) * cfg, reporting both through the post_cfg hook when asked (CFG++)."""
    def call(x, sigma, post_cfg=None, **_):
        c, u = _x0(x, sigma, MU_C), _x0(x, sigma, MU_U)
        g = u + (c - u) * cfg
        return g if post_cfg is None else post_cfg({"denoised": g, "uncond_denoised": u, "cond_denoised": c})
    return call


def g_u(x, sigma, cfg):  # numpy side: (guided x0, uncond x0)
    c, u = _x0(x, sigma, MU_C), _x0(x, sigma, MU_U)
    return u + (c - u) * cfg, u


def ancestral(s_from, s_to):  # Karras/k-diffusion ancestral split at eta = 1
    up = min(s_to, math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    return math.sqrt(s_to**2 - up**2), up


SIG3 = [9.0, 3.0, 1.2]  # two steps, ending at a nonzero sigma (no final x0 jump)


def _start(n=16):
    return torch.randn(1, 1, 4, n, generator=torch.Generator().manual_seed(21), dtype=torch.float64) * SIG3[0]


def _fixed_noise(x, draws):
    """An injected noise sampler returning the given draws in order (recording the queried sigmas)."""
    calls = []

    def sample(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return draws[len(calls) - 1]
    sample.calls = calls
    return sample


def test_euler_cfg_pp_two_steps_by_hand():
    """CFG++ DDIM (Chung et al. 2024, Alg. 1) in the VE scale: x_next = x0_guided + sigma_next * eps_uncond."""
    cfg, x = 5.0, _start()
    got = K.sample_euler_cfg_pp(guided_denoiser(cfg), x, torch.tensor(SIG3, dtype=torch.float64))
    want = x.numpy()
    for s, s_next in zip(SIG3, SIG3[1:]):
        g, u = g_u(want, s, cfg)
        want = g + s_next * (want - u) / s
    torch.testing.assert_close(got.numpy(), want, rtol=1e-10, atol=1e-10)
    plain = K.sample_euler(guided_denoiser(cfg), x, torch.tensor(SIG3, dtype=torch.float64))
    assert (plain - got).abs().max() > 0.1  # the uncond direction matters at cfg 5


def test_euler_ancestral_cfg_pp_one_step_by_hand():
    cfg, x = 4.0, _start()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = K.sample_euler_ancestral_cfg_pp(guided_denoiser(cfg), x, torch.tensor(SIG3[:2], dtype=torch.float64),
                                          noise_sampler=_fixed_noise(x, [z]))
    down, up = ancestral(SIG3[0], SIG3[1])
    g, u = g_u(x.numpy(), SIG3[0], cfg)
    want = g + down * (x.numpy() - u) / SIG3[0] + up * z.numpy()
    torch.testing.assert_close(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_dpmpp_2m_cfg_pp_two_steps_by_hand():
    """First step CFG++ DDIM; then x_{i+1} = G_i + (s_{i+1}/s_i)(x_i - U_i) + (1 - s_{i+1}/s_i)/(2 r)(G_i - U_{i-1}),
    r = h_{i-1}/h_i in lambda = -log sigma."""
    cfg, x = 3.0, _start()
    got = K.sample_dpmpp_2m_cfg_pp(guided_denoiser(cfg), x, torch.tensor(SIG3, dtype=torch.float64))
    s0, s1, s2 = SIG3
    g0, u0 = g_u(x.numpy(), s0, cfg)
    x1 = g0 + s1 / s0 * (x.numpy() - u0)
    g1, u1 = g_u(x1, s1, cfg)
    r = math.log(s0 / s1) / math.log(s1 / s2)
    want = g1 + s2 / s1 * (x1 - u1) + (1 - s2 / s1) / (2 * r) * (g1 - u0)
    torch.testing.assert_close(got.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg_pp, plain", [
    ("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m"), ("res_multistep_cfg_pp", "res_multistep"),
    ("gradient_estimation_cfg_pp", "gradient_estimation"), ("euler_ancestral_cfg_pp", "euler_ancestral"),
    ("res_multistep_ancestral_cfg_pp", "res_multistep_ancestral"),
])
def test_cfg_pp_equals_its_plain_sampler_when_uncond_equals_cond(cfg_pp, plain):
    """CFG++ only changes which x0 the noise direction comes from: with one model they coincide."""
    sigmas = S.get_sigmas("karras", 8).double()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * float(sigmas[0])
    a = K.SAMPLERS[cfg_pp](gaussian_denoiser, x, sigmas, extra_args={"seed": 9})
    b = K.SAMPLERS[plain](gaussian_denoiser, x, sigmas, extra_args={"seed": 9})
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dpmpp_2s_ancestral_cfg_pp_uses_midpoint_uncond():
    """As ComfyUI: the full step restarts from x + (G(x) - U(x_mid)), the uncond x0 of the midpoint call."""
    cfg, x = 3.0, _start()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = K.sample_dpmpp_2s_ancestral_cfg_pp(guided_denoiser(cfg), x, torch.tensor(SIG3[:2], dtype=torch.float64),
                                             noise_sampler=_fixed_noise(x, [z]))
    s0 = SIG3[0]
    down, up = ancestral(s0, SIG3[1])
    s_mid = math.sqrt(s0 * down)  # the midpoint in log sigma
    g0, u0 = g_u(x.numpy(), s0, cfg)
    x_mid = s_mid / s0 * (x.numpy() + g0 - u0) + (1 - s_mid / s0) * g0
    g_mid, u_mid = g_u(x_mid, s_mid, cfg)
    want = down / s0 * (x.numpy() + g0 - u_mid) + (1 - down / s0) * g_mid + up * z.numpy()
    torch.testing.assert_close(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_gradient_estimation_two_steps_by_hand():
    """Permenter & Yuan 2024, Alg. 2: step along d_bar = gamma d_i + (1 - gamma) d_(i-1), gamma = 2."""
    x = _start()
    got = K.sample_gradient_estimation(gaussian_denoiser, x, torch.tensor(SIG3, dtype=torch.float64))
    s0, s1, s2 = SIG3
    d0 = (x.numpy() - _x0(x.numpy(), s0, MU)) / s0
    x1 = x.numpy() + (s1 - s0) * d0
    d1 = (x1 - _x0(x1, s1, MU)) / s1
    want = x1 + (s2 - s1) * (2 * d1 - d0)
    torch.testing.assert_close(got.numpy(), want, rtol=1e-10, atol=1e-10)


def _exp_weights(s0, s1, nodes):
    """sigma_1 * int_{l0}^{l1} e^l L_j(l) dl, lambda = -log sigma, L_j the Lagrange basis on ``nodes``
    (the exponential integrator for x0 in lambda time, Lu et al. 2022b eq. 9), by quadrature."""
    from scipy.integrate import quad

    l0, l1 = -math.log(s0), -math.log(s1)

    def basis(j, lam):
        out = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                out *= (lam - node) / (nodes[j] - node)
        return out
    return [s1 * quad(lambda lam, j=j: math.exp(lam) * basis(j, lam), l0, l1, epsabs=1e-13, epsrel=1e-13)[0]
            for j in range(len(nodes))]


def test_exp_heun_2_x0_one_step_by_hand():
    """Exponential Heun: predict with exponential Euler, then integrate the x0 line between both ends."""
    x = _start()
    s0, s1 = SIG3[:2]
    got = K.sample_exp_heun_2_x0(gaussian_denoiser, x, torch.tensor([s0, s1], dtype=torch.float64))
    d0 = _x0(x.numpy(), s0, MU)
    x_pred = s1 / s0 * x.numpy() + (1 - s1 / s0) * d0
    d1 = _x0(x_pred, s1, MU)
    w0, w1 = _exp_weights(s0, s1, [-math.log(s0), -math.log(s1)])
    want = s1 / s0 * x.numpy() + w0 * d0 + w1 * d1
    torch.testing.assert_close(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_seeds_2_without_noise_is_dpm_solver_pp_2s():
    """SEEDS-2 at eta = 0 (midpoint r = 1/2, phi_1 combination) is DPM-Solver++(2S), k-diffusion-verified."""
    sigmas = S.get_sigmas("karras", 10).double()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * float(sigmas[0])
    a = K.sample_seeds_2(gaussian_denoiser, x, sigmas, eta=0.0)
    b = K.sample_dpmpp_2s_ancestral(gaussian_denoiser, x, sigmas, eta=0.0, extra_args={"seed": 0})
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, lo, hi", [("seeds_3", 2.5, 3.6), ("seeds_2", 1.7, 2.5), ("exp_heun_2_x0_sde", 1.7, 2.5)])
def test_seeds_without_noise_converge_with_expected_order(name, lo, hi):
    sigma_a, sigma_b = 14.6, 0.05
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(S2 + sigma_a**2) + MU
    errors = []
    for steps in (16, 32):
        sigmas = torch.exp(torch.linspace(math.log(sigma_a), math.log(sigma_b), steps + 1, dtype=torch.float64))
        out = K.SAMPLERS[name](gaussian_denoiser, x, sigmas, eta=0.0)
        errors.append((out - pf_ode_solution(x, sigma_a, sigma_b)).abs().max().item())
    assert lo <= math.log2(errors[0] / errors[1]) <= hi, errors


@pytest.mark.parametrize("name", ["seeds_2", "seeds_3", "exp_heun_2_x0_sde", "er_sde", "sa_solver"])
def test_sde_noise_of_one_step_has_the_papers_variance(name):
    """x = 0 and x0 = 0 everywhere: one step sigma_0 -> sigma_1 leaves only the injected noise, whose std
    is sigma_1 sqrt(1 - e^(-2 h)) (h = log(sigma_0 / sigma_1); SEEDS / SA-Solver with eta = tau = 1, the
    sub-steps' noises chained into one path) or sqrt(sigma_1^2 - sigma_0^2 r^2), r = psi(sigma_1)/psi(sigma_0)
    with psi(l) = l (e^(l^0.3) + 10) (ER-SDE eq. 21)."""
    s0, s1 = 6.0, 2.0
    x = torch.zeros(1, 1, 400, 500, dtype=torch.float64)
    kwargs = {"tau_func": lambda sigma: 1.0} if name == "sa_solver" else {}
    out = K.SAMPLERS[name](lambda x, sigma, **_: torch.zeros_like(x), x, torch.tensor([s0, s1], dtype=torch.float64),
                           extra_args={"seed": 1}, **kwargs)
    if name == "er_sde":
        psi = lambda lam: lam * (math.exp(lam**0.3) + 10)  # noqa: E731
        want = math.sqrt(s1**2 - s0**2 * (psi(s1) / psi(s0)) ** 2)
    else:
        want = s1 * math.sqrt(1 - (s1 / s0) ** 2)
    assert abs(out.std().item() / want - 1) < 0.01  # 200k samples: std error 0.16 %
    assert abs(out.mean().item()) < 0.01 * want


def test_er_sde_two_steps_by_hand():
    """ER-SDE-Solver (Cui et al. 2023, VE form, lambda = sigma): x_t/psi_t = x_s/psi_s + int x0 d(1/psi).
    With x0 linear in lambda: x_t = r x_s + (1 - r) D_s + D' (dt + psi_t int_t^s dl / psi) + sqrt(t^2 - s^2 r^2) z."""
    from scipy.integrate import quad

    x = _start(64)
    z = [torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in (1, 2)]
    got = K.sample_er_sde(gaussian_denoiser, x, torch.tensor(SIG3, dtype=torch.float64), noise_sampler=_fixed_noise(x, z))
    psi = lambda lam: lam * (math.exp(lam**0.3) + 10)  # noqa: E731
    s0, s1, s2 = SIG3
    d0 = _x0(x.numpy(), s0, MU)
    r = psi(s1) / psi(s0)
    x1 = r * x.numpy() + (1 - r) * d0 + math.sqrt(s1**2 - s0**2 * r**2) * z[0].numpy()
    d1 = _x0(x1, s1, MU)
    r = psi(s2) / psi(s1)
    slope = (d1 - d0) / (s1 - s0)
    second = (s2 - s1) + psi(s2) * quad(lambda lam: 1 / psi(lam), s2, s1, epsrel=1e-12)[0]
    want = r * x1 + (1 - r) * d1 + slope * second + math.sqrt(s2**2 - s1**2 * r**2) * z[1].numpy()
    # the solver takes the stage-2 integral as a 200-point sum (as ComfyUI): ~1e-3 of a small term
    torch.testing.assert_close(got.numpy(), want, rtol=1e-4, atol=1e-4)
    plain = r * x1 + (1 - r) * d1 + math.sqrt(s2**2 - s1**2 * r**2) * z[1].numpy()
    assert abs(got.numpy() - plain).max() > 1e-3  # and the stage-2 term is really there


def _sa_weights(s_from, s_to, nodes, tau):
    """SA-Solver data-prediction weights (Xue et al. 2023, eq. 15): for the step lambda_s -> lambda_t,
    b_j = alpha_t (1 + tau^2) int e^((1 + tau^2)(l - l_t)) L_j(l) dl, alpha_t = 1 here (VE)."""
    from scipy.integrate import quad

    ls, lt, c = -math.log(s_from), -math.log(s_to), 1 + tau**2

    def basis(j, lam):
        out = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                out *= (lam - node) / (nodes[j] - node)
        return out
    return [c * quad(lambda lam, j=j: math.exp(c * (lam - lt)) * basis(j, lam), ls, lt, epsabs=1e-13, epsrel=1e-13)[0]
            for j in range(len(nodes))]


@pytest.mark.parametrize("pece", [False, True])
def test_sa_solver_two_steps_by_hand(pece):
    """Predictor (order 1, then 2) and corrector (order 2) with the same noise, tau = 0.7."""
    tau, x = 0.7, _start()
    z = [torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in (3, 4)]
    name = "sa_solver_pece" if pece else "sa_solver"
    got = K.SAMPLERS[name](gaussian_denoiser, x, torch.tensor(SIG3, dtype=torch.float64), tau_func=lambda s: tau,
                           noise_sampler=_fixed_noise(x, z))
    s0, s1, s2 = SIG3
    lam = [-math.log(s) for s in SIG3]
    spread = lambda a, b: b * math.sqrt(1 - math.exp(-2 * tau**2 * math.log(a / b)))  # noqa: E731
    decay = lambda a, b: b / a * math.exp(-(tau**2) * math.log(a / b))  # noqa: E731
    d0 = _x0(x.numpy(), s0, MU)
    noise0 = spread(s0, s1) * z[0].numpy()
    x1_pred = decay(s0, s1) * x.numpy() + _sa_weights(s0, s1, [lam[0]], tau)[0] * d0 + noise0
    d1 = _x0(x1_pred, s1, MU)
    b = _sa_weights(s0, s1, [lam[0], lam[1]], tau)
    x1 = decay(s0, s1) * x.numpy() + b[0] * d0 + b[1] * d1 + noise0
    if pece:
        d1 = _x0(x1, s1, MU)
    b = _sa_weights(s1, s2, [lam[0], lam[1]], tau)
    want = decay(s1, s2) * x1 + b[0] * d0 + b[1] * d1 + spread(s1, s2) * z[1].numpy()
    torch.testing.assert_close(got.numpy(), want, rtol=1e-8, atol=1e-8)


def test_ipndm_v_two_steps_by_hand():
    """Euler, then Adams-Bashforth 2 on the true (unequal) steps: the integral over [s_1, s_2] of the line
    through the slopes at s_0 and s_1 (Zhou et al. 2024's iPNDM-v)."""
    x = _start()
    got = K.sample_ipndm_v(gaussian_denoiser, x, torch.tensor(SIG3, dtype=torch.float64))
    s0, s1, s2 = SIG3
    d0 = (x.numpy() - _x0(x.numpy(), s0, MU)) / s0
    x1 = x.numpy() + (s1 - s0) * d0
    d1 = (x1 - _x0(x1, s1, MU)) / s1
    # int_{s1}^{s2} [d1 + (s - s1)(d1 - d0)/(s1 - s0)] ds
    want = x1 + (s2 - s1) * d1 + 0.5 * (s2 - s1) ** 2 * (d1 - d0) / (s1 - s0)
    torch.testing.assert_close(got.numpy(), want, rtol=1e-10, atol=1e-10)
    fixed = K.sample_ipndm(gaussian_denoiser, x, torch.tensor(SIG3, dtype=torch.float64))
    assert (fixed - got).abs().max() > 1e-3  # iPNDM's fixed weights differ on unequal steps


def test_deis_two_steps_by_hand():
    """DEIS-tAB (Zhang & Chen 2023): in the VP time t(sigma) of a linear-beta VP-SDE fitted to EDM's
    sigma in [0.002, 80] over t in [1e-3, 1], x_(i+1) = x_i + sum_j C_j eps_j with C_j the integral over
    [t_i, t_(i+1)] of dsigma/dt L_j(t). Tolerance: ComfyUI's (and our) 10,000-point sum, ~1e-4 relative."""
    from scipy.integrate import quad

    x = _start()
    got = K.sample_deis(gaussian_denoiser, x, torch.tensor(SIG3, dtype=torch.float64))
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(smin**2 + 1) / eps_s - math.log(smax**2 + 1)) / (eps_s - 1)
    beta_min = math.log(smax**2 + 1) - 0.5 * beta_d
    t_of = lambda s: (math.sqrt(beta_min**2 + 2 * beta_d * math.log(s**2 + 1)) - beta_min) / beta_d  # noqa: E731
    sigma_of = lambda t: math.sqrt(math.exp(beta_min * t + 0.5 * beta_d * t**2) - 1)  # noqa: E731
    dsigma = lambda t: (beta_min + beta_d * t) * (sigma_of(t) ** 2 + 1) / (2 * sigma_of(t))  # noqa: E731
    s0, s1, s2 = SIG3
    t0, t1, t2 = t_of(s0), t_of(s1), t_of(s2)
    d0 = (x.numpy() - _x0(x.numpy(), s0, MU)) / s0
    x1 = x.numpy() + (s1 - s0) * d0
    d1 = (x1 - _x0(x1, s1, MU)) / s1
    c_cur = quad(lambda t: dsigma(t) * (t - t0) / (t1 - t0), t1, t2)[0]
    c_prev = quad(lambda t: dsigma(t) * (t - t1) / (t0 - t1), t1, t2)[0]
    want = x1 + c_cur * d1 + c_prev * d0
    torch.testing.assert_close(got.numpy(), want, rtol=1e-3, atol=1e-3)
    assert abs(c_cur + c_prev - (s2 - s1)) < 1e-9  # the weights integrate dsigma/dt: consistent with Euler


def test_dpm_adaptive_step_size_control_follows_the_tolerance():
    """Tighter rtol/atol: more evaluations and a smaller error against the exact ODE solution at the end."""
    sigmas = S.get_sigmas("karras", 10).double()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * float(sigmas[0])
    results = []
    for rtol, atol in ((0.05, 0.0078), (1e-4, 1e-5)):
        calls = []
        out = K.sample_dpm_adaptive(lambda x, s, calls=calls, **_: calls.append(1) or gaussian_denoiser(x, s), x, sigmas,
                                    rtol=rtol, atol=atol)
        error = (out - pf_ode_solution(x, float(sigmas[0]), float(sigmas[-2]))).abs().max().item()
        results.append((len(calls), error))
    (n_loose, e_loose), (n_tight, e_tight) = results
    assert n_tight > 2 * n_loose and e_tight < e_loose / 10, results


def test_dpm_fast_ignores_inner_sigmas_and_stops_at_last_nonzero_sigma():
    sigmas = S.get_sigmas("karras", 30).double()
    other = sigmas.clone()
    other[1:-2] = other[1:-2] * 0.9  # same ends, same count
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * float(sigmas[0])
    a = K.sample_dpm_fast(gaussian_denoiser, x, sigmas)
    torch.testing.assert_close(a, K.sample_dpm_fast(gaussian_denoiser, x, other))
    to_last = (a - pf_ode_solution(x, float(sigmas[0]), float(sigmas[-2]))).abs().max()
    to_zero = (a - pf_ode_solution(x, float(sigmas[0]), 0.0)).abs().max()
    assert to_last < 2e-3 < to_zero, (to_last, to_zero)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_determinism_through_sample(name):
    """The node path: same seed twice -> the same latent; another seed -> another latent."""
    a = run(steps=4, sampler_name=name, scheduler="karras", seed=77)
    b = run(steps=4, sampler_name=name, scheduler="karras", seed=77)
    assert torch.equal(a, b)
    # the initial noise is the same for both (add_noise=False): only the sampler's own noise can differ
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    c = run(start, steps=4, sampler_name=name, scheduler="karras", seed=77, add_noise=False)
    d = run(start, steps=4, sampler_name=name, scheduler="karras", seed=78, add_noise=False)
    assert not torch.equal(c, d)


def test_cfg_pp_sampler_evaluates_uncond_even_at_cfg_one():
    """ComfyUI's CFG++ samplers set disable_cfg1_optimization: the UNet sees [uncond, cond] at cfg 1 too."""
    unet = FakeUNet()
    run(unet=unet, steps=3, cfg=1.0, sampler_name="euler_cfg_pp")
    assert all(call["x"].shape[0] == 2 for call in unet.calls)
    unet = FakeUNet()
    run(unet=unet, steps=3, cfg=1.0, sampler_name="euler")
    assert all(call["x"].shape[0] == 1 for call in unet.calls)


def test_cfg_denoiser_post_cfg_hook_reports_uncond_and_cond():
    pos, neg = conds()
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    seen = {}

    def hook(args):
        seen.update(args)
        return args["denoised"]
    out = M.CFGDenoiser(FakeUNet(), pos, neg, 6.0)(x, sigma, post_cfg=hook)
    torch.testing.assert_close(out, seen["uncond_denoised"] + (seen["cond_denoised"] - seen["uncond_denoised"]) * 6.0)
    only_cond = M.CFGDenoiser(FakeUNet(), pos, neg, 1.0)(x, sigma)
    torch.testing.assert_close(seen["cond_denoised"], only_cond)
    only_uncond = M.CFGDenoiser(FakeUNet(), neg, None, 1.0)(x, sigma)
    torch.testing.assert_close(seen["uncond_denoised"], only_uncond)
    with pytest.raises(SamplingError, match="CFG\\+\\+"):  # a model that ignores the hook
        K.sample_euler_cfg_pp(lambda x, sigma, **_: x * 0, x, S.normal(2))


def test_a_huge_batch_step_runs_in_slices_and_stops_between_them():
    # catches: the interrupt polled only between steps (issue 10: one 46 s batch step could not be stopped)
    unet = FakeUNet()
    polls = []

    def should_stop():
        polls.append(len(unet.calls))
        return len(unet.calls) >= 1  # true once the first slice of the first step has run

    with pytest.raises(Cancelled, match="inside a step"):
        run(latent=torch.zeros(8, 4, 8, 8), unet=unet, steps=3, should_stop=should_stop)
    # CFG doubles the batch of 8 to 16 images: slices of UNET_MAX_BATCH = 8, and it stopped after the first
    assert [c["x"].shape[0] for c in unet.calls] == [M.UNET_MAX_BATCH]
    assert polls == [0, 1]  # once before step 1, once between the slices


def test_sliced_unet_calls_give_the_same_prediction_as_one_call():
    # catches: slices reassembled in the wrong order, or with the wrong timesteps/context rows
    pos, neg = conds(batch=5)
    x, sigma = torch.randn(5, 4, 8, 8), torch.linspace(1.0, 9.0, 5)
    whole = M.CFGDenoiser(FakeUNet(), pos, neg, 6.0, max_batch=1000)(x, sigma)
    sliced_unet = FakeUNet()
    sliced = M.CFGDenoiser(sliced_unet, pos, neg, 6.0, max_batch=3)(x, sigma)
    assert [c["x"].shape[0] for c in sliced_unet.calls] == [3, 3, 3, 1]
    assert torch.equal(whole, sliced)
