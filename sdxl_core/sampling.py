"""Sampling for SDXL, step for step as ComfyUI does it (FACTS.md §7-§11): the SDXL side of the samplers.

Two layers, top-down; the solvers themselves live in :mod:`.samplers` and know nothing of SDXL:

1. :func:`sample` — ComfyUI's ``common_ksampler`` / ``KSamplerAdvanced``: schedule, start/end step,
   seeded noise, the sigma_max noise scaling, latent scaling in and out, progress and cancellation.
2. :class:`CFGDenoiser` — the discrete eps-prediction denoiser with classifier-free guidance:
   ``D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma))``, cond and uncond in one UNet call
   (ComfyUI ``comfy/model_base.py`` ``_apply_model``, ``comfy/samplers.py`` ``cfg_function``).

The node seed reaches the solvers as ``extra_args["seed"]`` (as in ComfyUI's ``CFGGuider``): they seed
their per-step noise sampler with it. Initial noise: :func:`prepare_noise` (ComfyUI ``comfy/sample.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import samplers as solvers
from .accel import sdpa_backends
from .conditioning import CondEntry, resolve_entries
from .config import LATENT_SCALE
from .errors import Cancelled, SamplingError
from .schedules import SCHEDULERS, get_sigmas, percent_to_sigma, sigma_max, sigma_to_timestep
from .types import Conditioning

logger = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1


# ------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise SamplingError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    return int(seed)


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """ComfyUI's initial noise (``comfy/sample.py`` ``prepare_noise``; FACTS.md §10), always on the CPU in float32.

    One ``randn`` over the whole [B, 4, h, w] batch from a CPU generator seeded with ``seed`` (the same
    numbers as ``torch.manual_seed(seed)``, without touching the global RNG; torch's CPU generator
    folds seeds >= 2**63 onto seed - 2**63, and so does ComfyUI). With ``batch_index`` (set by latent
    batch nodes), one [1, 4, h, w] draw per index 0..max(batch_index) in order, keeping the requested
    ones (repeated indices reuse the same draw).
    """
    generator = torch.Generator(device="cpu").manual_seed(_check_seed(seed))
    shape = list(latent.shape)
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator)
    wanted = {int(i) for i in batch_index}
    if min(wanted) < 0:
        raise SamplingError(f"batch_index entries must be >= 0, got {list(batch_index)}")
    draws = {}
    for i in range(max(wanted) + 1):
        noise = torch.randn([1] + shape[1:], dtype=torch.float32, generator=generator)
        if i in wanted:
            draws[i] = noise
    return torch.cat([draws[int(i)] for i in batch_index], dim=0)



# ------------------------------------------------------------------------------------------------
# The solvers, with what ComfyUI's samplers read from the model
# ------------------------------------------------------------------------------------------------


def _with_sdxl_tau(solver):
    """sa_solver's default SDE interval in ComfyUI is the model's: sigma from 20 % to 80 % of the timesteps."""
    @functools.wraps(solver)
    def run(denoiser, x, sigmas, **kwargs):
        kwargs.setdefault("tau_func", solvers.sa_tau_interval(percent_to_sigma(0.2), percent_to_sigma(0.8)))
        return solver(denoiser, x, sigmas, **kwargs)
    return run


# Name -> solver in ComfyUI's order (solvers.SAMPLERS), SDXL defaults bound.
SAMPLERS = {
    name: _with_sdxl_tau(fn) if name in ("sa_solver", "sa_solver_pece") else fn for name, fn in solvers.SAMPLERS.items()
}


# ------------------------------------------------------------------------------------------------
# The denoiser: discrete eps-prediction UNet + classifier-free guidance
# ------------------------------------------------------------------------------------------------


def _repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI ``repeat_to_batch_size``: tile along dim 0, then cut to ``batch``."""
    if t.shape[0] < batch:
        t = t.repeat([math.ceil(batch / t.shape[0])] + [1] * (t.ndim - 1))
    return t[:batch]


def _can_batch(a: CondEntry, b: CondEntry) -> bool:
    """Whether two entries share one UNet call (ComfyUI ``can_concat_cond`` for SDXL's crossattn + y).

    Contexts of different token lengths are repeated to their least common multiple, but only when
    that is at most 4 times the shorter one; the vectors must have the same width.
    """
    ca, cb = a.crossattn.shape, b.crossattn.shape
    if ca != cb:
        if ca[0] != cb[0] or ca[2] != cb[2]:
            return False
        if math.lcm(ca[1], cb[1]) // min(ca[1], cb[1]) > 4:
            return False
    return a.vector.shape == b.vector.shape


def _as_entries(cond: Conditioning | list[CondEntry] | None) -> list[CondEntry]:
    if cond is None:
        return []
    if isinstance(cond, Conditioning):
        return [CondEntry(cond.crossattn, cond.vector)]
    return list(cond)


# Images per UNet call before a step's batch is split (and the interrupt polled between the slices).
UNET_MAX_BATCH = 8


class CFGDenoiser:
    """x0 = D(x, sigma) for an eps-prediction UNet ``unet(x_in, timesteps, context, y) -> eps``, with CFG.

    * UNet input ``x / sqrt(sigma^2 + 1)``; timestep = nearest table index of log sigma (float);
      ``x0 = x - sigma * eps`` with the exact sigma (ComfyUI ``EPS``, ``_apply_model``; FACTS.md §7).
    * positive / negative are a `Conditioning` or a list of `CondEntry` (ComfyUI's CONDITIONING lists,
      see ``conditioning.resolve_entries``). Each side's prediction is the strength-weighted average of
      its entries that are active at this sigma (ComfyUI ``_calc_cond_batch``; 0 when none is).
    * CFG on x0: ``uncond + (cond - uncond) * cfg``; the uncond side is skipped when cfg == 1.
      Entries that can share a UNet call do (ComfyUI's grouping and order: for one entry a side,
      batch [uncond, cond]); contexts of different token lengths are each repeated along the token
      axis to their least common multiple, which leaves attention unchanged (``CONDCrossAttn``).
    * UNet inputs are cast to ``dtype`` (the UNet's; default its parameters' dtype, else float32),
      timesteps stay float32, eps comes back as float32; the sampling state is float32 throughout.
    """

    def __init__(self, unet, positive, negative, cfg: float, dtype=None, *, should_stop=None,
                 max_batch: int = UNET_MAX_BATCH, job_rows: int | None = None):
        if dtype is None and isinstance(getattr(unet, "dtype", None), torch.dtype):
            dtype = unet.dtype  # the compute dtype: fp32 for fp16 weights run through ops.manual_cast
        if dtype is None:
            params = getattr(unet, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            dtype = first.dtype if first is not None else torch.float32
        self.unet, self.cfg, self.dtype = unet, float(cfg), dtype
        self.should_stop, self.max_batch = should_stop, max(1, int(max_batch))
        self.use_uncond = not math.isclose(self.cfg, 1.0)
        if self.use_uncond and negative is None:
            raise SamplingError(f"cfg = {cfg} needs a negative conditioning (or set cfg to 1.0)")
        self.positive = _as_entries(positive)
        self.negative = _as_entries(negative) if self.use_uncond else []
        if not self.positive:
            raise SamplingError("the positive conditioning has no entries")
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._negative = negative  # for post_cfg at cfg 1 (CFG++ samplers), see _uncond_at_cfg_one
        self.job_rows = job_rows  # batched run (sample_batch): rows of x per job, each job's block job-major
        self._block_rows: int | None = None  # rows per job block in the UNet call now running (see _per_job_blocks)

    def _context(self, entries: list[CondEntry], batch: int, device: torch.device):
        key = (tuple(id(e) for e in entries), batch, device)
        if key not in self._cache:
            tokens = math.lcm(*(e.crossattn.shape[1] for e in entries))
            context = torch.cat([
                _repeat_to_batch(e.crossattn, batch).repeat(1, tokens // e.crossattn.shape[1], 1) for e in entries
            ])
            y = torch.cat([_repeat_to_batch(e.vector, batch) for e in entries])
            self._cache[key] = (context.to(device, self.dtype), y.to(device, self.dtype))
        return self._cache[key]

    def _predict(self, x: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
        """[cond x0, uncond x0]: each side's strength-weighted average over its active entries."""
        now = float(sigma[0])
        to_run = [(e, 0) for e in self.positive if e.active(now)] + [(e, 1) for e in self.negative if e.active(now)]
        out = [torch.zeros_like(x), torch.zeros_like(x)]
        counts = [torch.ones_like(x) * 1e-37, torch.ones_like(x) * 1e-37]
        while to_run:
            first = to_run[0][0]
            group = [k for k in range(len(to_run)) if _can_batch(to_run[k][0], first)]
            picked = [to_run.pop(k) for k in reversed(group)]  # ComfyUI's order: last matching entry first
            n = len(picked)
            context, y = self._context([e for e, _ in picked], x.shape[0], x.device)
            x_all, sigma_all = torch.cat([x] * n), torch.cat([sigma] * n)  # (n*B, 4, h, w), (n*B,)
            s = sigma_all.view(-1, *([1] * (x.ndim - 1)))
            x_in = (x_all / (s**2 + 1.0) ** 0.5).to(self.dtype)
            if self.job_rows is not None and self.job_rows < x.shape[0]:
                eps = self._unet_per_job(x_in, sigma_to_timestep(sigma_all), context, y, n)
            else:
                eps = self._unet(x_in, sigma_to_timestep(sigma_all), context, y)
            denoised = x_all - eps * s
            for chunk, (entry, side) in zip(denoised.chunk(n), picked):
                out[side] += chunk * entry.strength
                counts[side] += entry.strength
        return [out[0] / counts[0], out[1] / counts[1]]

    def _unet(self, x_in: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps as float32. A batch over ``max_batch`` images runs in slices of that size, polling ``should_stop``
        between them, so a huge batch can be interrupted within a step; smaller batches (every usual graph:
        CFG × batch 4 is 8) run in one call, as before."""
        n = x_in.shape[0]
        if n <= self.max_batch:
            return self.unet(x_in, timesteps, context, y).float()
        parts = []
        for a in range(0, n, self.max_batch):
            if a and self.should_stop is not None and self.should_stop():
                raise Cancelled(f"sampling stopped by the caller inside a step, after {a} of {n} images")
            b = a + self.max_batch
            parts.append(self.unet(x_in[a:b], timesteps[a:b], context[a:b], y[a:b]).float())
        return torch.cat(parts)  # (n, 4, h, w)

    def _unet_per_job(self, x_in, timesteps, context, y, n: int) -> torch.Tensor:
        """eps of a batched run (several jobs of ``job_rows`` rows each, :func:`sample_batch`) as each job's own run
        computes it: the rows are reordered job-major (job 1's n groups of rows, then job 2's, …) so that every
        UNet call holds whole job blocks in the order a lone job's call has them, a job block bigger than
        ``max_batch`` is sliced as a lone job slices it, and the layers whose rounding may depend on the number
        of rows (linear layers, attention) run block by block (:func:`_per_job_blocks`)."""
        rows, total = self.job_rows, x_in.shape[0] // n
        jobs = total // rows
        # (n, jobs, rows) -> (jobs, n, rows): index of each job-major row in the entry-major batch
        order = torch.arange(n * total, device=x_in.device).view(n, jobs, rows).transpose(0, 1).reshape(-1)
        block = n * rows
        if block <= self.max_batch:  # whole jobs per call
            per_call = self.max_batch // block * block
            spans = [(a, min(a + per_call, n * total)) for a in range(0, n * total, per_call)]
        else:  # each job's block in the slices its lone run makes
            spans = [(j * block + a, j * block + min(a + self.max_batch, block))
                     for j in range(jobs) for a in range(0, block, self.max_batch)]
        parts = []
        for a, b in spans:
            if a and self.should_stop is not None and self.should_stop():
                raise Cancelled(f"sampling stopped by the caller inside a step, after {a} of {n * total} images")
            idx = order[a:b]
            self._block_rows = block if block <= self.max_batch else None
            try:
                parts.append(self.unet(x_in[idx], timesteps[idx], context[idx], y[idx]).float())
            finally:
                self._block_rows = None
        eps = torch.empty_like(torch.cat(parts))
        eps[order] = torch.cat(parts)
        return eps  # (n*total, 4, h, w), entry-major again

    def _uncond_at_cfg_one(self) -> None:
        """A post_cfg hook wants the uncond prediction: evaluate it even at cfg 1, as ComfyUI does when a
        sampler sets ``disable_cfg1_optimization`` (its CFG++ samplers)."""
        if self._negative is None:
            raise SamplingError("this sampler (CFG++) needs a negative conditioning even at cfg 1.0")
        self.use_uncond, self.negative = True, _as_entries(self._negative)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, post_cfg=None, **_unused: Any) -> torch.Tensor:
        """x0; ``post_cfg({"denoised", "uncond_denoised", "cond_denoised"}) -> denoised`` is ComfyUI's
        ``sampler_post_cfg_function`` hook (how its CFG++ samplers see the unconditional prediction)."""
        if post_cfg is not None and not self.use_uncond:
            self._uncond_at_cfg_one()
        cond, uncond = self._predict(x, sigma)
        if not self.use_uncond:
            return cond
        if post_cfg is not None:
            return post_cfg({"denoised": uncond + (cond - uncond) * self.cfg, "uncond_denoised": uncond,
                             "cond_denoised": cond})
        return uncond + (cond - uncond) * self.cfg


def prepare_noise_mask(mask: torch.Tensor, shape: torch.Size | list[int]) -> torch.Tensor:
    """A LATENT's ``noise_mask`` ([H, W], [B, H, W] or [B, 1, H, W], 1 = denoise) → [B, C, h, w] float32.

    Bilinear resize to the latent's size, repeated over the channels and tiled to the batch
    (ComfyUI ``reshape_mask``).
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        raise SamplingError(f"noise_mask must be a tensor [H, W] or [B, H, W], got {type(mask).__name__}")
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    m = torch.nn.functional.interpolate(m, size=tuple(shape[2:]), mode="bilinear")
    if m.shape[1] < shape[1]:
        m = m.repeat(1, shape[1], 1, 1)[:, : shape[1]]
    return _repeat_to_batch(m, shape[0])


class InpaintDenoiser:
    """Keeps the unmasked area on the original latent (ComfyUI ``KSamplerX0Inpaint``).

    Before each prediction the unmasked area of x is replaced by the original latent noised to the
    current sigma (``latent + noise * sigma``); after it, the unmasked area of x0 is the original.
    """

    def __init__(self, inner: solvers.Denoiser, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor):
        self.inner, self.mask, self.latent, self.noise = inner, mask, latent, noise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        keep = 1.0 - self.mask
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        x = x * self.mask + (self.noise * s + self.latent) * keep
        out = self.inner(x, sigma, **kwargs)
        return out * self.mask + self.latent * keep


# ------------------------------------------------------------------------------------------------
# The high-level API: ComfyUI's common_ksampler / KSamplerAdvanced
# ------------------------------------------------------------------------------------------------


def _validate(latent, steps, cfg, sampler_name, scheduler, denoise, start_step, end_step):
    if sampler_name not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler_name!r}; expected one of: {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        raise SamplingError(f"unknown scheduler {scheduler!r}; expected one of: {', '.join(SCHEDULERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplingError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
        raise SamplingError(f"cfg must be a finite number, got {cfg!r}")
    if not isinstance(denoise, (int, float)) or not 0.0 <= denoise <= 1.0:
        raise SamplingError(f"denoise must be in [0, 1], got {denoise!r}")
    if not isinstance(start_step, int) or start_step < 0:
        raise SamplingError(f"start_step must be an integer >= 0, got {start_step!r}")
    if end_step is not None:
        if not isinstance(end_step, int) or end_step < 0:
            raise SamplingError(f"end_step must be an integer >= 0 or None, got {end_step!r}")
        if start_step >= end_step:
            raise SamplingError(f"start_step ({start_step}) must be smaller than end_step ({end_step})")
    if latent.ndim != 4:
        raise SamplingError(f"latent must be [B, 4, H/8, W/8], got shape {list(latent.shape)}")
    if not torch.isfinite(latent).all():
        raise SamplingError("latent contains NaN or inf values; the previous step (VAE encode or sampler) failed")


def sample(
    unet,
    positive: Conditioning | list,
    negative: Conditioning | list | None,
    latent: torch.Tensor,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    start_step: int = 0,
    end_step: int | None = None,
    add_noise: bool = True,
    return_with_leftover_noise: bool = False,
    batch_index: list[int] | None = None,
    noise_mask: torch.Tensor | None = None,
    refiner: bool = False,
    dtype: torch.dtype | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Sample a RAW latent (ComfyUI's LATENT["samples"]) into a raw latent, as ComfyUI's KSampler(Advanced).

    ``steps`` is the length of the whole schedule; ``start_step``/``end_step`` cut it (FACTS.md §11):
    base steps 0-20 with ``return_with_leftover_noise=True`` followed by ``add_noise=False``,
    ``start_step=20`` on the same 25-step schedule is one trajectory. ``callback(step, total, x, x0)``
    is called once per step (step = 1..total, x = the state the step started from, x0 = the denoised
    prediction, both in model scale); ``should_stop()`` is polled after every step and raises
    :class:`Cancelled`.

    positive / negative: our `Conditioning`, or ComfyUI's CONDITIONING list ([tensor, options] pairs;
    sizes default from the latent, ``refiner`` picks the refiner's vector and its 6.0 / 2.5 scores,
    see ``conditioning.resolve_entries``). ``noise_mask`` (a LATENT's, 1 = denoise) keeps the
    unmasked area on the input latent (ComfyUI's inpainting sampler).
    """
    job = SampleJob(positive, negative, latent, seed, batch_index=batch_index, noise_mask=noise_mask)
    return sample_batch(
        unet, [job], steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
        start_step=start_step, end_step=end_step, add_noise=add_noise, return_with_leftover_noise=return_with_leftover_noise,
        refiner=refiner, dtype=dtype, callback=callback, should_stop=should_stop,
    )[0]


# ------------------------------------------------------------------------------------------------
# Several jobs in one sampling run (sdxl-nodes run --batch N)
# ------------------------------------------------------------------------------------------------


class NotBatchable(SamplingError):
    """These jobs cannot share one sampling run with each job's own result (the caller runs them one by one)."""


# Samplers whose step depends on the whole batch (dpm_adaptive sizes its steps by the error norm over all
# of x): a batch of jobs would step differently from each job alone.
UNBATCHABLE_SAMPLERS = frozenset({"dpm_adaptive"})


@dataclass
class SampleJob:
    """What one job of :func:`sample_batch` brings: its conditioning, latent, seed and the LATENT's extras."""

    positive: Any
    negative: Any
    latent: torch.Tensor
    seed: int
    batch_index: list[int] | None = None
    noise_mask: torch.Tensor | None = None


def _stack_entries(per_job: list[list[CondEntry]], rows: int, side: str) -> list[CondEntry]:
    """One entry list for a batch of jobs: entry k's context/vector are the jobs' own, each repeated to the job's
    ``rows`` as its lone run repeats it, stacked in job order. The jobs must have matching entries (count,
    shapes, strengths, sigma ranges) so that the lone runs and the batch group their UNet calls alike."""
    first = per_job[0]
    for number, entries in enumerate(per_job, 1):
        if len(entries) != len(first):
            raise NotBatchable(f"{side}: job {number} has {len(entries)} conditioning entries, job 1 has {len(first)}")
        if len({e.crossattn.shape[0] for e in entries} | {e.vector.shape[0] for e in entries}) > 1:
            raise NotBatchable(f"{side}: job {number}'s conditioning entries have different batch sizes")
        for k, (a, b) in enumerate(zip(first, entries)):
            if a.crossattn.shape != b.crossattn.shape or a.vector.shape != b.vector.shape:
                raise NotBatchable(f"{side} entry {k}: job {number}'s context is {list(b.crossattn.shape)}, job 1's "
                                   f"{list(a.crossattn.shape)} (prompts of different token lengths)")
            if (a.strength, a.sigma_start, a.sigma_end) != (b.strength, b.sigma_start, b.sigma_end):
                raise NotBatchable(f"{side} entry {k}: job {number} has another strength or timestep range")
    return [
        CondEntry(torch.cat([_repeat_to_batch(entries[k].crossattn, rows) for entries in per_job]),
                  torch.cat([_repeat_to_batch(entries[k].vector, rows) for entries in per_job]),
                  strength=e.strength, sigma_start=e.sigma_start, sigma_end=e.sigma_end)
        for k, e in enumerate(first)
    ]


def _row_dependent(module) -> bool:
    """Layers whose float rounding may change with the number of rows they get: matrix products (CPU BLAS takes
    other kernels for 1-2 rows than for 4: the per-image time/ADM vectors, the 1×1 middle of a small latent) and
    attention (its kernel splits work by batch and query length). Convolutions and norms gave each image the same
    bits in any batch in our CPU tests (tiny base and refiner; full-size in benchmarks/bench_batch.py)."""
    return isinstance(module, torch.nn.Linear) or hasattr(module, "to_q")


@contextlib.contextmanager
def _per_job_blocks(unet, denoiser: CFGDenoiser):
    """While a batched UNet call runs, its row-dependent layers (:func:`_row_dependent`) compute each job block on
    its own, with the rows the job's lone call gives them (see ``CFGDenoiser._unet_per_job``); everything else
    runs once over the whole batch."""
    modules = getattr(unet, "modules", None)
    if not callable(modules):
        yield
        return
    wrapped = [m for m in modules() if _row_dependent(m)]

    def blockwise(forward):
        def run(v, *args, **kwargs):
            block = denoiser._block_rows
            if block is None or v.shape[0] <= block:
                return forward(v, *args, **kwargs)
            n = v.shape[0]

            def rows(t, a):  # the block's rows of a per-row tensor argument (attention's context)
                return t[a:a + block] if isinstance(t, torch.Tensor) and t.shape[:1] == (n,) else t

            return torch.cat([forward(v[a:a + block], *(rows(t, a) for t in args),
                                      **{k: rows(t, a) for k, t in kwargs.items()})
                              for a in range(0, n, block)])
        return run

    for m in wrapped:
        m.forward = blockwise(m.forward)  # an instance attribute over the class's forward, removed below
    try:
        yield
    finally:
        for m in wrapped:
            del m.forward


def _check_batch(jobs: list[SampleJob], sampler_name: str) -> None:
    if sampler_name in UNBATCHABLE_SAMPLERS:
        raise NotBatchable(f"sampler {sampler_name!r} steps by the error of the whole batch")
    shape = jobs[0].latent.shape
    for number, job in enumerate(jobs, 1):
        if job.latent.shape != shape:
            raise NotBatchable(f"job {number}'s latent is {list(job.latent.shape)}, job 1's {list(shape)}")
        if (job.noise_mask is None) != (jobs[0].noise_mask is None) or (job.negative is None) != (jobs[0].negative is None):
            raise NotBatchable(f"job {number} differs from job 1 in having a noise mask or a negative")


def sample_batch(
    unet,
    jobs: list[SampleJob],
    *,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    start_step: int = 0,
    end_step: int | None = None,
    add_noise: bool = True,
    return_with_leftover_noise: bool = False,
    refiner: bool = False,
    dtype: torch.dtype | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[torch.Tensor]:
    """:func:`sample` for several jobs that share every setting but their conditioning, latent and seed: one
    UNet call per model evaluation for all of them (CFG: uncond and cond of every job), one result per job.

    Each job's result is the one :func:`sample` gives for it alone: its own initial noise
    (:func:`prepare_noise` with its seed and batch_index), its own per-step noise (a :class:`~.samplers.SeedBatch`
    gives each job the generator or Brownian tree of its lone run), its conditioning repeated to its latent batch,
    and UNet calls laid out per job (``CFGDenoiser._unet_per_job``). Elementwise float maths is the same either
    way; on the CPU the results are bit-identical (tests); on a GPU, kernels chosen by batch size may differ in
    the last bits. Jobs that cannot be batched this way raise :class:`NotBatchable` before anything runs.
    """
    # 1. Check inputs
    if not jobs:
        raise SamplingError("sample_batch needs at least one job")
    for job in jobs:
        _validate(job.latent, steps, cfg, sampler_name, scheduler, denoise, start_step, end_step)
    seeds = [_check_seed(job.seed) for job in jobs]
    if len(jobs) > 1:
        _check_batch(jobs, sampler_name)
    device = jobs[0].latent.device

    # 2. The schedule, cut to [start_step, end_step]
    sigmas = get_sigmas(scheduler, steps, sampler_name=sampler_name, denoise=denoise)
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[: end_step + 1].clone()
        if not return_with_leftover_noise:
            sigmas[-1] = 0  # finish clean: the last kept step jumps straight to x0
    if start_step >= len(sigmas) - 1:
        logger.info("start_step %d leaves no step of %d sigmas; returning the latent unchanged", start_step, len(sigmas))
        return [job.latent.clone() for job in jobs]
    sigmas = sigmas[start_step:].to(device)
    sigma_0 = sigmas[0]
    at_max = math.isclose(float(sigma_0), sigma_max(), rel_tol=1e-5) or float(sigma_0) > sigma_max()

    # 3. Per job: initial noise (CPU, float32), the starting state x = noise * s + latent * 0.13025, conditioning
    xs, noises, latents, positives, negatives, masks = [], [], [], [], [], []
    for job, seed in zip(jobs, seeds):
        latent = job.latent
        if add_noise:
            noise = prepare_noise(latent, seed, job.batch_index).to(latent.device)
        else:
            noise = torch.zeros(latent.shape, dtype=torch.float32, device=latent.device)
        latent = latent.float()
        if torch.count_nonzero(latent) > 0:  # ComfyUI does not scale an all-zero (empty) latent
            latent = latent * LATENT_SCALE
        x = noise * (torch.sqrt(1.0 + sigma_0**2.0) if at_max else sigma_0)
        x += latent
        hw = (latent.shape[2], latent.shape[3])
        positives.append(resolve_entries(job.positive, refiner=refiner, latent_hw=hw, negative=False, where="positive"))
        negatives.append(None if job.negative is None else resolve_entries(
            job.negative, refiner=refiner, latent_hw=hw, negative=True, where="negative"))
        if job.noise_mask is not None:
            masks.append(prepare_noise_mask(job.noise_mask, latent.shape).to(latent.device))
        xs.append(x)
        noises.append(noise)
        latents.append(latent)
    rows = jobs[0].latent.shape[0]
    if len(jobs) == 1:
        x, noise, latent, positive, negative = xs[0], noises[0], latents[0], positives[0], negatives[0]
        extra_args, job_rows = {"seed": seeds[0]}, None
    else:
        positive = _stack_entries(positives, rows, "positive")
        negative = None if negatives[0] is None else _stack_entries(negatives, rows, "negative")
        x, noise, latent = torch.cat(xs), torch.cat(noises), torch.cat(latents)  # (jobs*rows, 4, h, w)
        extra_args, job_rows = {"seed": solvers.SeedBatch(seeds, [rows] * len(jobs))}, rows

    # 4. Denoise
    total = len(sigmas) - 1

    def k_callback(info: dict) -> None:
        if callback is not None:
            callback(info["i"] + 1, total, info["x"], info["denoised"])
        if should_stop is not None and should_stop():
            raise Cancelled(f"sampling stopped by the caller after step {info['i'] + 1} of {total}")

    if should_stop is not None and should_stop():
        raise Cancelled(f"sampling stopped by the caller before step 1 of {total}")
    cfg_denoiser = CFGDenoiser(unet, positive, negative, cfg, dtype=dtype, should_stop=should_stop, job_rows=job_rows)
    denoiser = cfg_denoiser
    if masks:
        denoiser = InpaintDenoiser(denoiser, torch.cat(masks), latent, noise)
    logger.debug("sampling %s/%s, %d steps, %d job(s), sigma %.4f -> %.4f", sampler_name, scheduler, total, len(jobs),
                 float(sigmas[0]), float(sigmas[-1]))
    blocks = _per_job_blocks(unet, cfg_denoiser) if job_rows is not None else contextlib.nullcontext()
    with blocks, sdpa_backends(x.device):
        samples = SAMPLERS[sampler_name](denoiser, x, sigmas, extra_args=extra_args, callback=k_callback)
    out = samples.float() / LATENT_SCALE
    return [out] if len(jobs) == 1 else [part.clone() for part in out.split(rows)]
