"""The solvers: k-diffusion's samplers and ComfyUI's additions, one function each, with no SDXL knowledge.

Contract (crowsonkb/k-diffusion ``sampling.py``; ComfyUI v0.8 ``comfy/k_diffusion/sampling.py``):
``sample_<name>(model, x, sigmas, *, extra_args, callback, disable, noise_sampler, ...)`` where
``model(x, sigma_batch, **extra_args)`` returns the denoised x0 and ``sigmas`` ends in 0 (or at a
nonzero sigma for a run stopped early). Randomness comes from an injected noise sampler, else from one
built on first use from ``extra_args["seed"]`` (mandatory then: a missing seed is an error, never an
unseeded generator): ComfyUI's ``default_noise_sampler`` (CPU generator seeded with seed + 1) or, for
the SDE samplers, torchsde's Brownian tree seeded as ComfyUI seeds it (:class:`BrownianTreeNoiseSampler`).
CFG++ samplers read the unconditional x0 through the model's ``post_cfg`` hook (see :class:`_Run`).
``disable`` is accepted for k-diffusion compatibility (progress goes through ``callback``).

The arithmetic follows ComfyUI's operation for operation on float32 tensors. Papers: Karras et al. 2022
(Euler, Heun; arXiv:2206.00364), Lu et al. 2022 (DPM-Solver, DPM-Solver++; arXiv:2206.00927,
2211.01095), Zhao et al. 2023 (UniPC; 2302.04867), Zhang & Chen 2022 (iPNDM, DEIS; 2204.13902), Zhou et
al. 2024 (iPNDM-v; 2312.00094), Zhang et al. 2023 (RES; 2308.02157), Luo et al. 2023 (LCM), Chung et al.
2024 (CFG++; 2406.08070), Gonzalez et al. 2023 (SEEDS; 2305.14267), Cui et al. 2023 (ER-SDE;
2309.06169), Xue et al. 2023 (SA-Solver; 2309.05019), Permenter & Yuan 2024 (gradient estimation).

Differences from ComfyUI (the only ones known):

* ``lms`` integrates its Lagrange coefficients exactly in float64; ComfyUI calls ``scipy.integrate.quad``
  on float32 numpy values, so results agree to ~1e-6, not bit for bit.
* ``heunpp2`` in ComfyUI draws (and discards) one ``randn_like`` from the global RNG per step; not here.
  Likewise noise whose coefficient is 0 (``dpm_fast``/``dpm_adaptive`` at eta 0, ``res_multistep``) is
  not drawn; the result is the same.
* The ancestral noise sampler's seed is ``seed + 1`` on CPU, as in ComfyUI; for ``seed = 2**64 - 1``
  ComfyUI's ``manual_seed`` overflows, here it wraps to 0.
* ``uni_pc``/``uni_pc_bh2`` with a single step: ComfyUI runs order 0 and returns its input rescaled;
  here the step is a first-order update. Callbacks report every sampler's state in the k-diffusion
  scale (ComfyUI's UniPC reports its internal x / sqrt(1 + sigma^2), its iPNDM the initial x).
* ``sa_solver`` builds its Lagrange weights from moments by a recursion instead of ComfyUI's matrix
  form; ``deis`` takes d sigma/dt analytically instead of by autograd (both float32, ~1e-7 apart).

ComfyUI's own quirks kept on purpose, for its pixels: ``dpmpp_2s_ancestral_cfg_pp`` uses the midpoint
call's uncond x0 in its full step; ``dpm_fast``/``dpm_adaptive`` use only the schedule's end points and
stop at the last nonzero sigma; ``dpm_adaptive``'s callback counts attempts.

Verification: every sampler k-diffusion has equals k-diffusion's on the same inputs (tests, <= 1e-5;
the SDE ones on ComfyUI's seeded tree). The 21 samplers this project had before the CFG++, SEEDS,
ER-SDE, SA-Solver, DEIS, iPNDM-v, gradient-estimation and DPM-Solver-fast/adaptive additions were also
run against ComfyUI's own code (outside this repository: bit-identical float32 except ``lms``, the SDE
ones with a shared injected noise sampler); the additions are checked against k-diffusion where it has
them and otherwise against hand derivations from their papers, not against ComfyUI itself.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
import torchsde

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


class BrownianTreeNoiseSampler:
    """Normalized Brownian increments ``(W(b) - W(a)) / sqrt|b - a|`` from torchsde's ``BrownianTree``.

    Built exactly as ComfyUI v0.8 builds it for its SDE samplers (``comfy/k_diffusion/sampling.py``
    ``BrownianTreeNoiseSampler`` / ``BatchedBrownianTree``), so a seed gives ComfyUI's numbers:

    * one ``torchsde.BrownianTree(t0, w0 = zeros_like(x), t1, entropy=seed)`` over sigma itself, from
      ``sigma_min`` (the smallest nonzero sigma the sampler runs) to ``sigma_max`` (its largest), the seed
      being the node seed unchanged (not seed + 1 as for the plain ancestral noise);
    * ``cpu=True`` (``dpmpp_sde`` and friends): the tree lives on the CPU, queries are float32 CPU
      times and the increment is moved to the sigma's device and dtype afterwards, so CPU and GPU runs
      agree; ``cpu=False`` (the ``_gpu`` twins): the tree lives on x's device and draws with that
      device's generator;
    * a query (a, b) is answered for the sorted pair and the sign restored, then divided by
      ``sqrt|b - a|`` computed on the sigmas as given.

    torchsde's tree splits intervals at fixed midpoints, so the answer for an interval does not depend
    on the order of the queries.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: int | None, *, cpu: bool = True):
        if seed is None:
            raise SamplingError("an SDE sampler needs a seed: pass extra_args['seed'] (the node seed) or a noise_sampler")
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self._cpu = cpu
        self._sign = 1 if t0 < t1 else -1
        if self._sign < 0:
            t0, t1 = t1, t0
        w0 = torch.zeros_like(x)
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self._tree = torchsde.BrownianTree(t0, w0, t1, entropy=int(seed))

    def _increment(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sign = 1 if a < b else -1
        if sign < 0:
            a, b = b, a
        device, dtype = a.device, a.dtype
        if self._cpu:
            a, b = a.detach().cpu().float(), b.detach().cpu().float()
        return self._tree(a, b).to(device=device, dtype=dtype) * (self._sign * sign)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        with warnings.catch_warnings():
            # torchsde keeps t1 at reduced precision and warns when sigma_max itself is queried; the
            # answer is the same as ComfyUI's (which shows the warning), so it is noise in the log here.
            warnings.filterwarnings("ignore", message="Should have tb<=t1", category=UserWarning)
            w = self._increment(a, b)
        return w / (b - a).abs().sqrt()


def brownian_noise_sampler(x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, *, cpu: bool = True):
    """ComfyUI's SDE noise for a run over ``sigmas``: the tree spans the smallest nonzero to the largest sigma."""
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed, cpu=cpu)


class SeedBatch:
    """The seeds of a batched run (``extra_args["seed"]``): several jobs stacked along x's batch axis.

    Rows ``[offset, offset + size)`` of x are one job's latent batch; that slice gets the noise sampler
    ``make_noise(slice, seed)`` its job would get sampled alone (its own generator, or its own Brownian
    tree), and a step's noise is their draws stacked, so each job's numbers do not depend on the others.
    """

    def __init__(self, seeds, sizes):
        self.seeds, self.sizes = tuple(int(s) for s in seeds), tuple(int(n) for n in sizes)
        if len(self.seeds) != len(self.sizes) or not self.seeds:
            raise SamplingError(f"a seed batch needs one seed per job: {len(self.seeds)} seeds, {len(self.sizes)} jobs")

    def noise_sampler(self, x: torch.Tensor, make_noise) -> NoiseSampler:
        if sum(self.sizes) != x.shape[0]:
            raise SamplingError(f"the seed batch covers {sum(self.sizes)} rows, x has {x.shape[0]}")
        offsets = np.cumsum((0,) + self.sizes)
        parts = [make_noise(x[a:b], seed) for seed, a, b in zip(self.seeds, offsets[:-1], offsets[1:])]
        return lambda sigma, sigma_next: torch.cat([part(sigma, sigma_next) for part in parts])


# ------------------------------------------------------------------------------------------------
# The k-diffusion samplers
# ------------------------------------------------------------------------------------------------


class _Run:
    """What every sampler sets up first (the shared prologue): model kwargs, sigma batch, noise, uncond.

    * ``extra_args["seed"]`` is the node seed, used for the noise only (not passed to the model); a
      :class:`SeedBatch` gives each job of a batched run its own noise.
    * The noise sampler is the injected one, else built on first use by ``make_noise(x, seed)`` (so
      deterministic runs draw nothing and need no seed): by default ComfyUI's ``default_noise_sampler``.
    * ``cfg_pp=True``: every model call also asks the model for its unconditional prediction through
      ComfyUI's post-CFG hook protocol, ``model(..., post_cfg=fn)`` with ``fn({"denoised", "uncond_denoised",
      "cond_denoised"}) -> denoised``; the last one is :attr:`uncond` (CFG++, Chung et al. 2024).
    """

    def __init__(self, denoiser, x, extra_args, callback, noise_sampler, make_noise=None, cfg_pp=False, name=None):
        self.model_args = dict(extra_args or {})
        self.seed = self.model_args.pop("seed", None)
        self.denoiser = denoiser
        self.callback = callback
        self.s_in = x.new_ones([x.shape[0]])
        self._noise_sampler = noise_sampler
        self._make_noise = make_noise or default_noise_sampler
        self._x = x
        self._name = name
        self.uncond = None
        if cfg_pp:
            self.model_args["post_cfg"] = self._capture_uncond

    def _capture_uncond(self, args: dict) -> torch.Tensor:
        self.uncond = args["uncond_denoised"]
        return args["denoised"]

    def model(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if "post_cfg" in self.model_args:
            self.uncond = None
        denoised = self.denoiser(x, sigma * self.s_in, **self.model_args)
        if "post_cfg" in self.model_args and self.uncond is None:
            raise SamplingError(
                f"sampler {self._name!r} (CFG++) needs the unconditional prediction, but the model did not call "
                "its post_cfg hook; use a CFG denoiser that supports post_cfg"
            )
        return denoised

    def noise(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if self._noise_sampler is None:
            if isinstance(self.seed, SeedBatch):  # several jobs in one batch: one noise source each
                self._noise_sampler = self.seed.noise_sampler(self._x, self._make_noise)
            else:
                self._noise_sampler = self._make_noise(self._x, self.seed)
        return self._noise_sampler(sigma, sigma_next)

    def report(self, i, x, sigma, denoised, sigma_hat=None):
        if self.callback is not None:
            sigma_hat = sigma if sigma_hat is None else sigma_hat
            self.callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _brownian(sigmas, cpu=True):
    """A ``make_noise`` for the SDE samplers: ComfyUI's Brownian tree over this run's sigmas."""
    return lambda x, seed: brownian_noise_sampler(x, sigmas, seed, cpu=cpu)


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
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        run.report(i, x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
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
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
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
def sample_heunpp2(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
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
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
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
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
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
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, order=4):
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
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
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


def _dpmpp_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, r, cpu):
    """DPM-Solver++ (stochastic, 2 evaluations per step) on ComfyUI's Brownian tree."""
    if len(sigmas) <= 1:
        return x
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, make_noise=_brownian(sigmas, cpu))
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
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ SDE; Brownian tree on the CPU (ComfyUI's numbers on any device)."""
    return _dpmpp_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, r, cpu=True)


@torch.no_grad()
def sample_dpmpp_sde_gpu(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ SDE; Brownian tree on x's device (ComfyUI's ``_gpu`` twin: that device's random numbers)."""
    return _dpmpp_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, r, cpu=False)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
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


def _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, order, solver_type, cpu):
    """DPM-Solver++(2M) SDE (order 2, midpoint or heun correction) and (3M) SDE (order 3)."""
    if len(sigmas) <= 1:
        return x
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, make_noise=_brownian(sigmas, cpu))
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
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant; Brownian tree on the CPU."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 2, "midpoint", cpu=True)


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant; Brownian tree on x's device (ComfyUI's ``_gpu`` twin)."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 2, "midpoint", cpu=False)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, heun variant; Brownian tree on the CPU."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 2, "heun", cpu=True)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, heun variant; Brownian tree on x's device (ComfyUI's ``_gpu`` twin)."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 2, "heun", cpu=False)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE; Brownian tree on the CPU."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 3, None, cpu=True)


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE; Brownian tree on x's device (ComfyUI's ``_gpu`` twin)."""
    return _multistep_sde(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 3, None, cpu=False)


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
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
def sample_lcm(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
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
def sample_ipndm(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, max_order=4):
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


def _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, cfg_pp=False, name=None):
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, cfg_pp=cfg_pp, name=name)
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:  # Euler from the guided x0 along the uncond noise direction
                x = denoised + to_d(x, sigmas[i], run.uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = _t(sigmas[i]), _t(old_sigma_down), _t(sigma_down), _t(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - run.uncond)
                x = _sigma(h) * x + h * (b1 * run.uncond + b2 * old_denoised)
            else:
                x = _sigma(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0 and eta:
            x = x + run.noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = (run.uncond if cfg_pp else denoised), sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """RES 2nd-order multistep exponential integrator (Zhang et al. 2023)."""
    return _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, 0.0, 1.0)


@torch.no_grad()
def sample_res_multistep_cfg_pp(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """RES multistep with CFG++: the exponential step from x + (x0 - x0_uncond) with the uncond x0s."""
    return _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, 0.0, 1.0, True, "res_multistep_cfg_pp")


@torch.no_grad()
def sample_res_multistep_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """RES multistep down to sigma_down, then sigma_up noise."""
    return _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """RES multistep ancestral with CFG++."""
    return _res_multistep(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, True, "res_multistep_ancestral_cfg_pp")


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
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
def sample_uni_pc(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """UniPC with B(h) = h (bh1)."""
    return _unipc(denoiser, x, sigmas, extra_args, callback, noise_sampler, "bh1")


@torch.no_grad()
def sample_uni_pc_bh2(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """UniPC with B(h) = e^h - 1 (bh2)."""
    return _unipc(denoiser, x, sigmas, extra_args, callback, noise_sampler, "bh2")


# ---- CFG++ (Chung et al. 2024, arXiv:2406.08070): renoise with the unconditional x0 -------------
# The step moves to the guided x0 but takes its noise direction from the *unconditional* prediction.
# The model must report the uncond x0 through the post_cfg hook (see _Run).


def _euler_ancestral_cfg_pp(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, name):
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, cfg_pp=True, name=name)
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha_s = sigmas[i] * _t(sigmas[i]).exp()  # the VE alpha, 1 up to rounding (kept for ComfyUI's numbers)
        alpha_t = sigmas[i + 1] * _t(sigmas[i + 1]).exp()
        d = to_d(x, sigmas[i], alpha_s * run.uncond)  # the noise direction from the uncond x0
        sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta)
        x = alpha_t * denoised + (alpha_t * sigma_down) * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * run.noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Euler (DDIM) with CFG++: x_next = x0_guided + sigma_next * eps_uncond."""
    return _euler_ancestral_cfg_pp(denoiser, x, sigmas, extra_args, callback, noise_sampler, 0.0, 0.0, "euler_cfg_pp")


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """Euler ancestral with CFG++: to sigma_down along eps_uncond from the guided x0, then sigma_up noise."""
    return _euler_ancestral_cfg_pp(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, "euler_ancestral_cfg_pp")


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) ancestral with CFG++: both sub-steps start from x + (x0_guided - x0_uncond).

    As in ComfyUI, the full step uses the uncond x0 of the *midpoint* evaluation (the hook's latest value).
    """
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, cfg_pp=True, name="dpmpp_2s_ancestral_cfg_pp")
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised + to_d(x, sigmas[i], run.uncond) * sigma_down
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * (x + (denoised - run.uncond)) - (-h * 0.5).expm1() * denoised
            denoised_2 = run.model(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * (x + (denoised - run.uncond)) - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + run.noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DPM-Solver++(2M) with CFG++: x_next = x0 + e^-h (x - x0_uncond) - (e^-h - 1)/(2r) (x0 - x0_uncond_prev)."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, cfg_pp=True, name="dpmpp_2m_cfg_pp")
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        mix = -torch.exp(-h) * run.uncond
        if old_uncond is not None and sigmas[i + 1] != 0:
            r = (t - _t(sigmas[i - 1])) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = run.uncond
    return x


# ---- DPM-Solver-fast and -adaptive (Lu et al. 2022, arXiv:2206.00927), noise prediction in t = -log sigma --


def _dpm_eps(run, cache, key, x, t):
    if key not in cache:
        sigma = _sigma(t)
        cache[key] = (x - run.model(x, sigma)) / sigma
    return cache[key]


def _dpm_solver_1(run, cache, x, t, t_next):
    eps = _dpm_eps(run, cache, "eps", x, t)
    return x - _sigma(t_next) * (t_next - t).expm1() * eps


def _dpm_solver_2(run, cache, x, t, t_next, r1=0.5):
    h = t_next - t
    eps = _dpm_eps(run, cache, "eps", x, t)
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
    eps_r1 = _dpm_eps(run, cache, "eps_r1", u1, s1)
    return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)


def _dpm_solver_3(run, cache, x, t, t_next, r1=1 / 3, r2=2 / 3):
    h = t_next - t
    eps = _dpm_eps(run, cache, "eps", x, t)
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
    eps_r1 = _dpm_eps(run, cache, "eps_r1", u1, s1)
    u2 = x - _sigma(s2) * (r2 * h).expm1() * eps - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
    eps_r2 = _dpm_eps(run, cache, "eps_r2", u2, s2)
    return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _end_points(sigmas):
    """(sigma_max, sigma_min) the DPM-Solver samplers run between: ComfyUI uses sigmas[0] and the last
    nonzero sigma, and ignores the schedule in between."""
    return sigmas[0], sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]


def _ancestral_t(run, t, t_next, t_end, eta):
    """(t_next_, sigma_up) of an ancestral DPM-Solver step (eta > 0), else (t_next, 0)."""
    if not eta:
        return t_next, 0.0
    sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = torch.minimum(t_end, _t(sd))
    return t_next_, (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=0.0, s_noise=1.0):
    """DPM-Solver-fast: ``len(sigmas) - 1`` model evaluations spent on equal steps in t = -log sigma
    between sigmas[0] and the last nonzero sigma, 3rd-order steps then a 2nd/1st-order remainder.

    As in ComfyUI, only the end points of the schedule are used and the result keeps the noise of the
    last nonzero sigma.
    """
    if len(sigmas) <= 1:
        return x
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    nfe = len(sigmas) - 1
    s_max, s_min = _end_points(sigmas)
    t_start, t_end = _t(torch.as_tensor(s_max)), _t(torch.as_tensor(s_min))
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache = {}
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _ancestral_t(run, t, t_next, t_end, eta)
        eps = _dpm_eps(run, cache, "eps", x, t)
        run.report(i, x, _sigma(t), x - _sigma(t) * eps)
        step = {1: _dpm_solver_1, 2: _dpm_solver_2, 3: _dpm_solver_3}[order]
        x = step(run, cache, x, t, t_next_)
        if su:
            x = x + su * s_noise * run.noise(_sigma(t), _sigma(t_next))
    return x


class PIDStepSizeController:
    """PID step-size control on the inverse error (Söderlind 2003 digital filters, as in k-diffusion).

    The new step is ``h * limiter(e0^b1 e1^b2 e2^b3)`` with e = 1 / error and ``limiter(f) = 1 + atan(f - 1)``;
    a step is accepted when that factor is at least ``accept_safety``. With (p, i, d) = (0, 1, 0), the
    default, it is the classic integral controller ``h * (1 / error)^(1 / order)``.
    """

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-23 (or -12) with adaptive step size from sigmas[0] to the last nonzero sigma.

    Each attempt takes an order-``order`` step and an embedded lower-order one from the same
    evaluations; the scaled RMS of their difference (``atol``/``rtol`` against the larger of the low
    estimate and the previous one) drives :class:`PIDStepSizeController`. Rejected attempts cost
    evaluations but do not move x. The callback's ``i`` counts attempts, so it may exceed the schedule's
    step count (as in ComfyUI).
    """
    if len(sigmas) <= 1:
        return x
    if order not in (2, 3):
        raise SamplingError(f"dpm_adaptive order must be 2 or 3, got {order!r}")
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    s_max, s_min = _end_points(sigmas)
    t_start, t_end = _t(torch.as_tensor(s_max)), _t(torch.as_tensor(s_min))
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, x_prev, attempts = t_start, x, 0
    while s < t_end - 1e-5:
        cache = {}
        t = torch.minimum(t_end, s + pid.h)
        t_, su = _ancestral_t(run, s, t, t_end, eta)
        eps = _dpm_eps(run, cache, "eps", x, s)
        denoised = x - _sigma(s) * eps
        if order == 2:
            x_low = _dpm_solver_1(run, cache, x, s, t_)
            x_high = _dpm_solver_2(run, cache, x, s, t_)
        else:
            x_low = _dpm_solver_2(run, cache, x, s, t_, r1=1 / 3)
            x_high = _dpm_solver_3(run, cache, x, s, t_)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if su:
                x = x + su * s_noise * run.noise(_sigma(s), _sigma(t))
            s = t
        run.report(attempts, x, _sigma(s), denoised)
        attempts += 1
    return x


# ---- SEEDS (Gonzalez et al. 2023, arXiv:2305.14267) and the exponential Heun x0 solvers -------------
# Data prediction in lambda = -log sigma; stochastic sub-steps of size r h get the exact
# Ornstein-Uhlenbeck noise, chained so the noise over the whole step is one consistent path.


def _phi_1(h):  # h * phi_1(h)
    return torch.expm1(h)


def _phi_2(h):  # h * phi_2(h)
    return (torch.expm1(h) - h) / h


def _seeds_2(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, r, solver_type):
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = _t(sigmas[i]), _t(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = _sigma(lambda_s_1)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # 1. the sub-step to lambda_s + r h
        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * _phi_1(-r * h_eta) * denoised
        if inject:
            path = (-2 * r * h * eta).expm1().neg().sqrt() * run.noise(sigmas[i], sigma_s_1)
            x_2 = x_2 + path * sigma_s_1 * s_noise
        denoised_2 = run.model(x_2, sigma_s_1)
        # 2. the full step from x with both x0 estimates
        decay = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
        if solver_type == "phi_1":
            x = decay - alpha_t * _phi_1(-h_eta) * torch.lerp(denoised, denoised_2, 1 / (2 * r))
        else:
            b2 = _phi_2(-h_eta) / r
            x = decay - alpha_t * ((_phi_1(-h_eta) - b2) * denoised + b2 * denoised_2)
        if inject:  # continue the same noise path over the rest of the step
            seg = (r - 1) * h * eta
            path = path * seg.exp() + seg.mul(2).expm1().neg().sqrt() * run.noise(sigma_s_1, sigmas[i + 1])
            x = x + path * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_exp_heun_2_x0(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Exponential Heun (2nd order, data prediction, lambda time): SEEDS-2 with r = 1, phi_2 weights, no noise."""
    return _seeds_2(denoiser, x, sigmas, extra_args, callback, noise_sampler, 0.0, 0.0, 1.0, "phi_2")


@torch.no_grad()
def sample_exp_heun_2_x0_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """Stochastic exponential Heun: SEEDS-2 with r = 1 and phi_2 weights."""
    return _seeds_2(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, 1.0, "phi_2")


@torch.no_grad()
def sample_seeds_2(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """SEEDS-2: two-stage stochastic exponential solver (midpoint r = 1/2, phi_1 combination)."""
    if solver_type not in ("phi_1", "phi_2"):
        raise SamplingError(f"seeds_2 solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    return _seeds_2(denoiser, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, r, solver_type)


@torch.no_grad()
def sample_seeds_3(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=1.0, s_noise=1.0, r_1=1 / 3, r_2=2 / 3):
    """SEEDS-3: three-stage stochastic exponential solver at r_1 = 1/3, r_2 = 2/3 of each step."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = _t(sigmas[i]), _t(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1, lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_1), torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = _sigma(lambda_s_1), _sigma(lambda_s_2)
        alpha_s_1, alpha_s_2 = sigma_s_1 * lambda_s_1.exp(), sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # 1. to lambda_s + r_1 h
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * _phi_1(-r_1 * h_eta) * denoised
        if inject:
            path = (-2 * r_1 * h * eta).expm1().neg().sqrt() * run.noise(sigmas[i], sigma_s_1)
            x_2 = x_2 + path * sigma_s_1 * s_noise
        denoised_2 = run.model(x_2, sigma_s_1)
        # 2. to lambda_s + r_2 h
        a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        a3_1 = _phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            seg = (r_1 - r_2) * h * eta
            path = path * seg.exp() + seg.mul(2).expm1().neg().sqrt() * run.noise(sigma_s_1, sigma_s_2)
            x_3 = x_3 + path * sigma_s_2 * s_noise
        denoised_3 = run.model(x_3, sigma_s_2)
        # 3. the full step
        b3 = _phi_2(-h_eta) / r_2
        b1 = _phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            seg = (r_2 - 1) * h * eta
            path = path * seg.exp() + seg.mul(2).expm1().neg().sqrt() * run.noise(sigma_s_2, sigmas[i + 1])
            x = x + path * sigmas[i + 1] * s_noise
    return x


# ---- Variable-step multistep methods on the ODE slopes d = (x - x0) / sigma, in sigma -------------------


def _ipndm_v_weights(sigmas, i, order):
    """Weights (newest slope first) of iPNDM-v's variable-step multistep update at step i (Zhou et al.
    2024, arXiv:2312.00094): Adams-Bashforth 2 with the true step ratio, plus the paper's 3rd/4th-order
    corrections in the ratios of the last steps (equal to AB3/AB4 on a uniform grid)."""
    h = [float(sigmas[i + 1] - sigmas[i])] + [float(sigmas[i - k] - sigmas[i - k - 1]) for k in range(order - 1)]
    w = [(2 + h[0] / h[1]) / 2, -(h[0] / h[1]) / 2]
    if order >= 3:
        q1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
        w = [w[0] + q1, w[1] - (1 + h[1] / h[2]) * q1, q1 * h[1] / h[2]]
    if order == 4:
        ratio = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
        q2 = (((1 - h[0] / (3 * (h[0] + h[1]))) / 2 + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (6 * (h[0] + h[1] + h[2])))
              * (h[0] * (h[0] + h[1]) * (h[0] + h[1] + h[2])) / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3])))
        w = [w[0] + q2, w[1] - (1 + h[1] / h[2] + ratio) * q2, w[2] + (h[1] / h[2] + ratio * (1 + h[2] / h[3])) * q2,
             -q2 * ratio * h[1] / h[2]]
    return w


@torch.no_grad()
def sample_ipndm_v(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, max_order=4):
    """iPNDM with variable steps: the multistep weights follow the actual sigma spacing; order ramps up to 4."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    history = []  # previous slopes, newest last
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            weights = _ipndm_v_weights(sigmas, i, order)
            acc = weights[0] * d
            for weight, past in zip(weights[1:], reversed(history)):
                acc = acc + weight * past
            x_next = x + (sigmas[i + 1] - sigmas[i]) * acc
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


# DEIS's time: EDM sigma -> the VP-SDE time t of Song et al. with beta(t) linear, fitted to EDM's range
# sigma in [0.002, 80] at t in [1e-3, 1] (ComfyUI comfy/k_diffusion/deis.py, after zju-pi/diff-sampler).
_DEIS_EPS_S, _DEIS_SIGMA_MIN, _DEIS_SIGMA_MAX, _DEIS_POINTS = 1e-3, 0.002, 80.0, 10000


def _deis_vp_time(sigmas: torch.Tensor):
    """(t(sigma), beta_0, beta_1) in float32: t solves sigma^2 + 1 = exp(beta_0 t + (beta_1 - beta_0) t^2 / 2)."""
    log_min = torch.tensor(_DEIS_SIGMA_MIN).square().add(1).log()
    log_max = torch.tensor(_DEIS_SIGMA_MAX).square().add(1).log()
    beta_d = 2 * (log_min / _DEIS_EPS_S - log_max) / (_DEIS_EPS_S - 1)
    beta_min = log_max - 0.5 * beta_d
    t = ((beta_min**2 + 2 * beta_d * (sigmas.detach().cpu().float() ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def _deis_coefficients(sigmas: torch.Tensor, i: int, order: int) -> list[torch.Tensor]:
    """DEIS-tAB weights (Zhang & Chen 2023, arXiv:2204.13902) for step i: the integral over [t_i, t_i+1]
    of dsigma/dt times each Lagrange basis polynomial on the last ``order`` times, by ComfyUI's
    10,000-point Riemann sum (so the weights are ComfyUI's, not the exact integrals: ~1e-4 relative)."""
    t, beta_0, beta_1 = _deis_vp_time(sigmas)
    taus = torch.linspace(t[i], t[i + 1], _DEIS_POINTS)
    dtau = (t[i + 1] - t[i]) / _DEIS_POINTS
    alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)  # alpha_bar(t)
    dsigma_dt = 0.5 * (taus * (beta_1 - beta_0) + beta_0) / torch.sqrt(alpha * (1 - alpha))
    nodes = [t[i - k] for k in range(order)]
    weights = []
    for j in range(order):
        basis = torch.ones_like(taus)
        for k in range(order):
            if k != j:
                basis = basis * (taus - nodes[k]) / (nodes[j] - nodes[k])
        weights.append(torch.sum(dsigma_dt * basis) * dtau)
    return weights


@torch.no_grad()
def sample_deis(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, max_order=3):
    """DEIS (tAB): Adams-Bashforth on eps in the VP time, exact for the dsigma/dt factor; order up to 3."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    history = []
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        order = 1 if sigmas[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            weights = _deis_coefficients(sigmas, i, order)
            x_next = x + weights[0].to(x.device) * d
            for weight, past in zip(weights[1:], reversed(history)):
                x_next = x_next + weight.to(x.device) * past
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


@torch.no_grad()
def sample_gradient_estimation(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, ge_gamma=2.0):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models from an
    optimization perspective"): Euler plus (gamma - 1) times the change of the slope since the last step."""
    return _gradient_estimation(denoiser, x, sigmas, extra_args, callback, noise_sampler, ge_gamma, False)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, ge_gamma=2.0):
    """Gradient estimation with CFG++: the slope comes from the uncond x0, the step lands on the guided x0."""
    return _gradient_estimation(denoiser, x, sigmas, extra_args, callback, noise_sampler, ge_gamma, True)


def _gradient_estimation(denoiser, x, sigmas, extra_args, callback, noise_sampler, ge_gamma, cfg_pp):
    name = "gradient_estimation_cfg_pp" if cfg_pp else "gradient_estimation"
    run = _Run(denoiser, x, extra_args, callback, noise_sampler, cfg_pp=cfg_pp, name=name)
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        d = to_d(x, sigmas[i], run.uncond if cfg_pp else denoised)
        run.report(i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


# ---- ER-SDE (Cui et al. 2023, arXiv:2309.06169), VP ER-SDE-Solver-3 -------------------------------


def _er_sde_noise_scaler(x):  # the paper's default noise-scale function for SD models
    return x * ((x**0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None, s_noise=1.0, noise_scaler=None, max_stage=3):
    """Extended reverse-time SDE solver, up to 3 stages; the stage-2/3 integrals by a 200-point sum."""
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    scaler = _er_sde_noise_scaler if noise_scaler is None else noise_scaler
    points = 200.0
    indices = torch.arange(0, points, dtype=torch.float32, device=x.device)
    er_lambdas = _t(sigmas).neg().exp()  # sigma_t / alpha_t, which is sigma itself for a VE model
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = run.model(x, sigmas[i])
        run.report(i, x, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = scaler(lam_t) / scaler(lam_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised  # stage 1
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / points
                grid = lam_t + indices * step
                scaled = scaler(grid)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * scaler(lam_t)) * denoised_d  # stage 2
                if stage >= 3:
                    s_u = torch.sum((grid - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * scaler(lam_t)) * denoised_u  # stage 3
                old_denoised_d = denoised_d
            if s_noise > 0:
                spread = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * run.noise(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
    return x


# ---- SA-Solver (Xue et al. 2023, arXiv:2309.05019): stochastic Adams predictor-corrector -----------


def _sa_exponential_moments(lam_s, lam_t, n, tau):
    """m_p = (1 + tau^2) * int_s^t exp((1 + tau^2)(lam - t)) lam^p dlam for p < n, by parts:
    m_p = t^p - s^p e^{-(1+tau^2) h} - p / (1 + tau^2) * m_{p-1}."""
    c = 1 + tau**2
    decay = (-c * (lam_t - lam_s)).exp()
    moments = []
    for p in range(n):
        m = lam_t**p - lam_s**p * decay
        if p:
            m = m - p / c * moments[-1]
        moments.append(m)
    return torch.stack(moments)


def _sa_coefficients(sigma_next, lambdas, lam_s, lam_t, tau):
    """b_k = alpha_t (1 + tau^2) int exp((1+tau^2)(lam - lam_t)) L_k(lam) dlam over [lam_s, lam_t], L_k the
    Lagrange basis on ``lambdas``: solve sum_k b_k lambda_k^p = alpha_t m_p (a transposed Vandermonde system)."""
    n = lambdas.shape[0]
    vandermonde_t = torch.vander(lambdas, n, increasing=True).T
    integrals = torch.linalg.solve(vandermonde_t, _sa_exponential_moments(lam_s, lam_t, n, tau))
    return sigma_next * lam_t.exp() * integrals


def sa_tau_interval(sigma_start: float, sigma_end: float, eta: float = 1.0) -> Callable[[torch.Tensor], float]:
    """SA-Solver's stochasticity tau(sigma): eta inside [sigma_end, sigma_start], 0 (ODE) outside."""
    def tau(sigma) -> float:
        sigma = float(sigma)
        return eta if eta > 0 and sigma_start >= sigma >= sigma_end else 0.0
    return tau


def _sa_solver(denoiser, x, sigmas, extra_args, callback, noise_sampler, tau_func, s_noise, predictor_order,
               corrector_order, use_pece, name):
    if len(sigmas) <= 1:
        return x
    if tau_func is None:
        raise SamplingError(f"{name} needs tau_func (the SDE interval; the model's default comes from sdxl_core.sampling)")
    run = _Run(denoiser, x, extra_args, callback, noise_sampler)
    lambdas = _t(sigmas)
    keep = max(predictor_order, corrector_order)
    x_pred, h, tau_t, noise, preds = x, 0.0, 0.0, 0.0, []
    to_end = float(sigmas[-1]) == 0  # lower the orders on the last steps, for stability
    for i in range(len(sigmas) - 1):
        denoised = run.model(x_pred, sigmas[i])
        run.report(i, x_pred, sigmas[i], denoised)
        preds = (preds + [denoised])[-keep:]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if to_end:
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)
        # 1. Correct the last prediction with the new evaluation (same noise as the predictor)
        if c_order == 0:
            x = x_pred
        else:
            b = _sa_coefficients(sigmas[i], lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau_t)
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + torch.tensordot(torch.stack(preds[-c_order:], dim=1), b, dims=([1], [0]))
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if use_pece:  # evaluate the corrected state (PECE)
                denoised = run.model(x, sigmas[i])
                preds[-1] = denoised
        # 2. Predict the next state
        if sigmas[i + 1] == 0:
            x_pred = denoised
            continue
        tau_t = tau_func(sigmas[i + 1])
        b = _sa_coefficients(sigmas[i + 1], lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau_t)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + torch.tensordot(torch.stack(preds[-p_order:], dim=1), b, dims=([1], [0]))
        if tau_t > 0 and s_noise > 0:
            noise = run.noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * tau_t**2 * h).expm1().neg().sqrt() * s_noise
            x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
def sample_sa_solver(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None,
                     tau_func=None, s_noise=1.0, predictor_order=3, corrector_order=4):
    """SA-Solver, predictor order 3 and corrector order 4 (PEC: the corrector reuses the next evaluation)."""
    return _sa_solver(denoiser, x, sigmas, extra_args, callback, noise_sampler, tau_func, s_noise,
                      predictor_order, corrector_order, False, "sa_solver")


@torch.no_grad()
def sample_sa_solver_pece(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None,
                          tau_func=None, s_noise=1.0, predictor_order=3, corrector_order=4):
    """SA-Solver in PECE mode: one more evaluation per step, of the corrected state."""
    return _sa_solver(denoiser, x, sigmas, extra_args, callback, noise_sampler, tau_func, s_noise,
                      predictor_order, corrector_order, True, "sa_solver_pece")


# Name -> sampler, in ComfyUI's combo-box order (comfy/samplers.py SAMPLER_NAMES: KSAMPLER_NAMES, then
# ddim and the UniPCs), so workflows that store the combo index agree.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "exp_heun_2_x0": sample_exp_heun_2_x0,
    "exp_heun_2_x0_sde": sample_exp_heun_2_x0_sde,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde_gpu,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde_gpu,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": sample_dpmpp_2m_sde_heun_gpu,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde_gpu,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
