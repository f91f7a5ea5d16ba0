"""The solvers: k-diffusion's samplers and ComfyUI's additions, one function each, with no SDXL knowledge.

Contract (crowsonkb/k-diffusion ``sampling.py``; ComfyUI ``comfy/k_diffusion/sampling.py``):
``sample_<name>(model, x, sigmas, *, extra_args, callback, disable, noise_sampler, ...)`` where
``model(x, sigma_batch, **extra_args)`` returns the denoised x0, ``sigmas`` ends in 0 and randness
comes from an injected noise sampler (else one seeded with ``extra_args["seed"]``, which is mandatory
for the stochastic samplers). ``disable`` is accepted for k-diffusion compatibility (there is no
progress bar here; progress goes through ``callback``). The arithmetic follows ComfyUI's operation for
operation on float32 tensors, so the deterministic samplers and the plain-``randn`` ancestral ones give
ComfyUI's numbers bit for bit (on CPU).
Papers: Karras et al. 2022 (Euler, Heun; arXiv:2206.00364), Lu et al. 2022 (DPM-Solver /
DPM-Solver++; arXiv:2206.00927, 2211.01095), Zhao et al. 2023 (UniPC; arXiv:2302.04867), Zhang &
Chen 2022 (iPNDM; arXiv:2204.13902), Zhang et al. 2023 (RES; arXiv:2308.02157), Luo et al. 2023 (LCM).

Known differences from ComfyUI (the only ones):

* ``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_2m_sde_heun`` and ``dpmpp_3m_sde`` take their noise in
  ComfyUI from torchsde's ``BrownianTree``. torchsde is not a dependency here; :class:`BrownianNoiseSampler`
  samples the same Brownian motion (same law, increments over overlapping intervals correlated the same
  way) from a seeded generator, but not the same random numbers, so these four samplers give different
  (equally valid) images for a seed than ComfyUI does.
* ``lms`` integrates its Lagrange coefficients exactly in float64; ComfyUI calls ``scipy.integrate.quad``
  on float32 numpy values, so results agree to ~1e-6, not bit for bit.
* ``heunpp2`` in ComfyUI draws (and discards) one ``randn_like`` from the global RNG per step; not here.
* The ancestral noise sampler's seed is ``seed + 1`` on CPU, as in ComfyUI; for ``seed = 2**64 - 1``
  ComfyUI's ``manual_seed`` overflows, here it wraps to 0.
* ``uni_pc``/``uni_pc_bh2`` with a single step: ComfyUI runs order 0 and returns its input rescaled;
  here the step is a first-order update. Callbacks report every sampler's state in the k-diffusion
  scale (ComfyUI's UniPC reports its internal x / sqrt(1 + sigma^2), its iPNDM the initial x).

Verified (outside this repository's tests, which must not import ComfyUI) by running ComfyUI's own
``comfy/k_diffusion/sampling.py`` and ``comfy/extra_samplers/uni_pc.py`` on the same inputs: every
sampler here except ``lms`` gives bit-identical float32 output for normal/karras/exponential/simple
schedules of 1-25 steps (SDE samplers with an injected shared noise sampler).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

import numpy as np
import torch

from .errors import SamplingError

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Denoiser = Callable[..., torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Noise samplers
# ------------------------------------------------------------------------------------------------


def _seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    if seed is None:  # never an unseeded generator: the same workflow must give the same image
        raise SamplingError("a stochastic sampler needs a seed: pass extra_args['seed'] (the node seed) or a noise_sampler")
    return torch.Generator(device=device).manual_seed(int(seed) % 2**64)


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh ``randn`` like x per call, from a generator seeded with the node's seed.

    As ComfyUI's ``default_noise_sampler``: on CPU the generator is seeded with ``seed + 1`` (so the
    per-step noise differs from the initial noise), on other devices with ``seed``.
    """
    if seed is not None and x.device.type == "cpu":
        seed = seed + 1
    generator = _seeded_generator(x.device, seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


class BrownianNoiseSampler:
    """Normalized Brownian increments ``(W(s_next) - W(s)) / sqrt|s_next - s|`` of one seeded path W(sigma).

    Stands in for ComfyUI's torchsde ``BrownianTree`` noise sampler (used by the SDE samplers): W is
    sampled lazily, new points beyond the known ones by independent increments and points between
    known ones from the Brownian bridge, so queries over overlapping intervals (``dpmpp_sde`` asks for
    (sigma_i, sigma_mid) and then (sigma_i, sigma_next)) are correlated exactly as for a Brownian motion.
    Deterministic for a seed and a query order, but not the same numbers as torchsde.
    """

    def __init__(self, x: torch.Tensor, seed: int | None = None):
        self._generator = _seeded_generator(x.device, seed)
        self._like = x
        self._times: list[float] = [0.0]
        self._values: list[torch.Tensor] = [torch.zeros_like(x)]

    def _randn(self) -> torch.Tensor:
        x = self._like
        return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=self._generator)

    def _w(self, t: float) -> torch.Tensor:
        k = bisect.bisect_left(self._times, t)
        if k < len(self._times) and self._times[k] == t:
            return self._values[k]
        a, w_a = self._times[k - 1], self._values[k - 1]
        if k == len(self._times):  # beyond every known point: an independent increment
            w = w_a + math.sqrt(t - a) * self._randn()
        else:  # between a and b: the Brownian bridge
            b, w_b = self._times[k], self._values[k]
            w = w_a + (t - a) / (b - a) * (w_b - w_a) + math.sqrt((t - a) * (b - t) / (b - a)) * self._randn()
        self._times.insert(k, t)
        self._values.insert(k, w)
        return w

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        s, t = float(sigma), float(sigma_next)
        return (self._w(t) - self._w(s)) / math.sqrt(abs(t - s))


# ------------------------------------------------------------------------------------------------
# The k-diffusion samplers
# ------------------------------------------------------------------------------------------------


class _Run:
    """What every sampler sets up first (the shared prologue): model kwargs, sigma batch, noise."""

    def __init__(self, denoiser, x, extra_args, callback, noise_sampler, brownian=False):
        self.model_args = dict(extra_args or {})
        self.seed = self.model_args.pop("seed", None)  # the node seed, for noise only
        self.denoiser = denoiser
        self.callback = callback
        self.s_in = x.new_ones([x.shape[0]])
        self._noise_sampler = noise_sampler
        self._brownian = brownian
        self._x = x

    def model(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma * self.s_in, **self.model_args)

    def noise(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if self._noise_sampler is None:  # built on first use, so deterministic samplers draw nothing
            make = BrownianNoiseSampler if self._brownian else default_noise_sampler
            self._noise_sampler = make(self._x, self.seed)
        return self._noise_sampler(sigma, sigma_next)

    def report(self, i, x, sigma, denoised, sigma_hat=None):
        if self.callback is not None:
            sigma_hat = sigma if sigma_hat is None else sigma_hat
            self.callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. eq. 3)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step: deterministic to sigma_down, then add sigma_up noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _t(sigma):  # half log-SNR of a VE sigma: lambda = -log sigma
    return sigma.log().neg()


def _sigma(t):
    return t.neg().exp()


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        run.report(i, x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """Euler step down to sigma_down, then fresh noise of size sigma_up."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + run.noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler on the step to sigma = 0."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        run.report(i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], run.model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_heunpp2(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """Heun++: up to three slopes weighted by sigma / sigma_0 (sd-webui-samplers-scheduler, via ComfyUI)."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        run.report(i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], run.model(x_2, sigmas[i + 1]))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], run.model(x_3, sigmas[i + 2]))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """DPM-Solver-2 style midpoint step (midpoint taken in log sigma); Euler to sigma = 0."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        run.report(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm_2_midpoint(run, x, d, sigmas[i], sigmas[i + 1])
    return x


def _dpm_2_midpoint(run, x, d, sigma, sigma_to):
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, run.model(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """The dpm_2 midpoint step down to sigma_down, then fresh noise of size sigma_up."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_midpoint(run, x, d, sigmas[i], sigma_down)
            x = x + run.noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial j on the nodes t_i, ..., t_{i-order+1}."""
    nodes, weights = np.polynomial.legendre.leggauss(4)  # exact for the degree <= 3 polynomials used here
    a, b = float(t[i]), float(t[i + 1])
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - float(t[i - k])) / (float(t[i - j]) - float(t[i - k]))
    return float((b - a) / 2 * np.sum(weights * basis))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma) on the ODE slopes, up to 4th order."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    t = sigmas.detach().cpu().double().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        run.report(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            coeffs = [_lms_coefficient(cur, t, i, j) for j in range(cur)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step 2nd order down to sigma_down, then sigma_up noise."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = run.model(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + run.noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, 2 evaluations per step). Noise: :class:`BrownianNoiseSampler` (see module doc)."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, brownian=True)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = _t(sigmas[i]), _t(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        fac = 1 / (2 * r)
        sigma_s_1 = _sigma(lambda_s_1)
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # Step 1: to the intermediate point lambda_s + r h
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * run.noise(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = run.model(x_2, sigma_s_1)
        # Step 2: the full step with the combined x0 estimate
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * run.noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """DPM-Solver++(2M): 2nd-order multistep in log sigma; 1st order on the first and the last (to 0) step."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, order, solver_type):
    """DPM-Solver++(2M) SDE (order 2, midpoint or heun correction) and (3M) SDE (order 3)."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, brownian=True)
    denoised_1 = denoised_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _t(sigmas[i]), _t(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if order == 3 and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif order == 3 and h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
            elif order == 2 and denoised_1 is not None:
                r = h_1 / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - denoised_1)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - denoised_1)
            if eta > 0 and s_noise > 0:
                noise = run.noise(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant. Noise: :class:`BrownianNoiseSampler` (see module doc)."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 2, "midpoint")


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, heun variant. Noise: :class:`BrownianNoiseSampler` (see module doc)."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 2, "heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE. Noise: :class:`BrownianNoiseSampler` (see module doc)."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 3, None)


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """Ancestral DDPM posterior steps (Ho et al. 2020), run in the VP scale x / sqrt(1 + sigma^2)."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        denoised = run.model(x, sigma)
        run.report(i, x, sigma, denoised)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        acp = 1 / ((sigma * sigma) + 1)
        acp_prev = 1 / ((sigma_prev * sigma_prev) + 1)
        alpha = acp / acp_prev
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - acp).sqrt())
        if sigma_prev > 0:
            x += ((1 - alpha) * (1.0 - acp_prev) / (1.0 - acp)).sqrt() * run.noise(sigma, sigma_prev)
            x *= torch.sqrt(1.0 + sigma_prev**2.0)
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """Latent-consistency sampling: jump to x0, re-noise to the next sigma with fresh noise."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = run.noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


# Adams-Bashforth weights for iPNDM as integers over a denominator, newest slope first (Zhang & Chen
# 2022); kept as integers so the float32 rounding is ComfyUI's: x + dt * (3 d - d_1) / 2, ...
_IPNDM_WEIGHTS = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


@torch.no_grad()
def sample_ipndm(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, max_order=4):
    """Improved PNDM: fixed-coefficient Adams-Bashforth on the ODE slopes, order ramping up to 4."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    history = []  # previous slopes, oldest first
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        order = min(max_order, i + 1)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + dt * d
        else:
            weights, den = _IPNDM_WEIGHTS[order]
            acc = weights[0] * d
            for weight, past in zip(weights[1:], reversed(history)):
                acc = acc + weight * past
            x_next = x + dt * acc / den
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


@torch.no_grad()
def _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise):
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = _t(sigmas[i]), _t(old_sigma_down), _t(sigma_down), _t(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = _sigma(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0 and eta:
            x = x + run.noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """RES 2nd-order multistep exponential integrator (Zhang et al. 2023)."""
    return _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, 0.0, 1.0)


@torch.no_grad()
def sample_res_multistep_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """RES multistep down to sigma_down, then sigma_up noise."""
    return _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise)


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """ComfyUI's "ddim" is Euler (its separate inpainting-noise seed only matters with a noise mask)."""
    return sample_euler(denoiser, x, sigmas, extra_args=extra_args, callback=callback, noise_sampler=noise_sampler)


# ---- UniPC (Zhao et al. 2023), B(h) variants, data prediction, in the VP scale as ComfyUI runs it ----


def _vp(sigma: torch.Tensor):
    """(alpha, std, lambda) of the VP process equivalent to VE noise level sigma."""
    log_alpha = 0.5 * torch.log(1 / ((sigma * sigma) + 1))
    std = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
    lam = log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))
    return torch.exp(log_alpha), std, lam


def _col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - 1)]


def _unipc_update(model_fn, x, models, times, t, order, variant, use_corrector):
    """One UniPC step from times[-1] to t (both [B] sigmas) with the last `order` x0 predictions.

    Predictor (UniP) from the differences of past x0 predictions, then, unless it is the last step,
    the corrector (UniC) with a fresh evaluation at t, which is returned for the next step.
    """
    _, sigma_prev_0, lambda_prev_0 = _vp(times[-1])
    alpha_t, sigma_t, lambda_t = _vp(t)
    m0 = models[-1]
    h = lambda_t - lambda_prev_0
    rks, d1s = [], []
    for k in range(1, order):
        rk = ((_vp(times[-(k + 1)])[2] - lambda_prev_0) / h)[0]
        rks.append(rk)
        d1s.append((models[-(k + 1)] - m0) / rk)
    rks = torch.tensor(rks + [1.0], dtype=x.dtype, device=x.device)
    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for k in range(1, order + 1):
        rows.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b = torch.stack(rows), torch.tensor(b, dtype=x.dtype, device=x.device)
    d1s = torch.stack(d1s, dim=1) if d1s else None  # (B, K, C, H, W)

    x_t_ = _col(sigma_t / sigma_prev_0, x.ndim) * x - _col(alpha_t * h_phi_1, x.ndim) * m0
    scale = _col(alpha_t * b_h, x.ndim)
    if d1s is None:
        x_t = x_t_
    else:
        rhos_p = torch.tensor([0.5], dtype=x.dtype, device=x.device) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
        x_t = x_t_ - scale * torch.tensordot(d1s, rhos_p, dims=([1], [0]))
    if not use_corrector:
        return x_t, None
    model_t = model_fn(x_t, t)
    rhos_c = torch.tensor([0.5], dtype=x.dtype, device=x.device) if order == 1 else torch.linalg.solve(big_r, b)
    corr = rhos_c[-1] * (model_t - m0)
    if d1s is not None:
        corr = torch.tensordot(d1s, rhos_c[:-1], dims=([1], [0])) + corr
    return x_t_ - scale * corr, model_t


def _unipc(denoiser, x, sigmas, extra_args, callback, noise_sampler, variant):
    """UniPC multistep, order min(3, steps - 1), lower order on the final steps, no corrector on the last.

    As in ComfyUI, the state is x / sqrt(1 + sigma^2) (VP scale) and a final sigma of 0 is replaced by
    0.001, so the result keeps noise of sigma 0.001 (invisible). Deviation: with a single step ComfyUI
    uses order 0 and returns its input rescaled; here that one step is a first-order update.
    """
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    steps = len(ts) - 1
    order = max(1, min(3, steps - 1))
    batch = x.shape[0]

    def model_fn(x_vp, t):  # x0 from the VP-scale state: eps from D, then x0 with the VP alpha and std
        sig = _col(t, x_vp.ndim)
        x_in = x_vp * ((sig**2 + 1.0) ** 0.5)
        eps = (x_in - run.denoiser(x_in, t, **run.model_args)) / sig
        alpha, std, _ = _vp(t)
        return (x_vp - _col(std, x_vp.ndim) * eps) / _col(alpha, x_vp.ndim)

    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    t0 = ts[0].expand(batch)
    models, times = [model_fn(x, t0)], [t0]
    for step in range(1, steps + 1):
        run.report(step - 1, x * torch.sqrt(1.0 + ts[step - 1] ** 2.0), sigmas[step - 1], models[-1])
        t = ts[step].expand(batch)
        if step < order:  # warm-up: the order grows with the history
            x, model_x = _unipc_update(model_fn, x, models, times, t, step, variant, True)
            models, times = models + [model_x], times + [t]
        else:
            step_order = min(order, steps + 1 - step)
            x, model_x = _unipc_update(model_fn, x, models, times, t, step_order, variant, step < steps)
            times = (times + [t])[-order:]
            models = (models + [models[-1] if model_x is None else model_x])[-order:]
    return x / _vp(ts[-1])[0]


@torch.no_grad()
def sample_uni_pc(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """UniPC with B(h) = h (bh1)."""
    return _unipc(denoiser, x, sigmas, extra_args, callback, noise_sampler, "bh1")


@torch.no_grad()
def sample_uni_pc_bh2(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """UniPC with B(h) = e^h - 1 (bh2)."""
    return _unipc(denoiser, x, sigmas, extra_args, callback, noise_sampler, "bh2")


# Name -> sampler, in ComfyUI's combo-box order (KSAMPLER_NAMES, then ddim and the UniPCs).
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "res_multistep": sample_res_multistep,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
