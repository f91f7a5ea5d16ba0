"""Latent and sampler nodes: empty latent, the base sampler and the refiner's noise-and-refine."""

from __future__ import annotations

import contextvars
import logging

import torch

from ..sdxl_core.sampling import SAMPLERS, NotBatchable, SampleJob, sample, sample_batch
from ..sdxl_core.schedules import SCHEDULERS
from .environment import NodeInputError
from .progress import StepReporter
from .schema import MAX_RESOLUTION, MAX_SEED, Combo, Float, Int, NodeSchema, Output, Socket, node

log = logging.getLogger(__name__)

# Extra key in LATENT: how a base run stopped early, so the refiner continues on the same schedule.
CONTINUE_KEY = "sdxl_continue"
HIDDEN = {"progress": "SDXL_PROGRESS", "unique_id": "UNIQUE_ID"}


@node(NodeSchema(
    id="SDXLEmptyLatent",
    display_name="SDXL Empty Latent",
    category="sdxl/latent",
    description="An empty (all-zero) latent batch to start text-to-image from. SDXL works best near 1024×1024 "
                "pixels (e.g. 1024×1024, 1152×896, 1216×832).",
    inputs=(
        # No VALIDATE_INPUTS: ComfyUI skips its min/max checks for every input such a function names
        # (execution.py validate_inputs) and shows its message on all of them. `multiple_of` is checked
        # by our validator on the offending input alone; inside ComfyUI, run() says it.
        Int("width", "Image width in pixels; must be a multiple of 8.", default=1024, min=16, max=MAX_RESOLUTION,
            step=8, multiple_of=8),
        Int("height", "Image height in pixels; must be a multiple of 8.", default=1024, min=16, max=MAX_RESOLUTION,
            step=8, multiple_of=8),
        Int("batch_size", "How many images to generate at once.", default=1, min=1, max=4096),
    ),
    outputs=(Output("LATENT", "LATENT", "An all-zero latent of shape [batch, 4, height/8, width/8]."),),
))
class EmptyLatent:
    def run(self, width, height, batch_size):
        bad = [f"{n} {v}" for n, v in (("width", width), ("height", height)) if v % 8]
        if bad:
            raise NodeInputError(f"{' and '.join(bad)} not a multiple of 8; SDXL latents are 1/8 of the image size")
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


def _common_inputs():
    return (
        Socket("model", "SDXL_MODEL", "The UNet from SDXL Checkpoint Loader."),
        Socket("positive", "SDXL_COND", "What the image should show."),
        Socket("negative", "SDXL_COND", "What the image should not show (used when cfg > 1)."),
        Socket("latent", "LATENT", "The latent to denoise."),
        Int("seed", "Seed of the starting noise (and of the per-step noise of ancestral/SDE samplers); the "
            "same seed gives the same image as ComfyUI.", default=0, min=0, max=MAX_SEED),
    )


def _cfg():
    return Float("cfg", "Classifier-free guidance: how strongly the prompt is followed. 1 disables the "
                 "negative prompt; 5–9 is typical for SDXL.", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)


def _sampler():
    return Combo("sampler_name", "The solver that steps from noise to image (ComfyUI's names).", list(SAMPLERS))


def _scheduler():
    return Combo("scheduler", "How the noise levels are spaced over the steps (ComfyUI's names).", list(SCHEDULERS))


def _check_model_and_conds(model, positive, negative, node_name: str):
    adm = model.config.unet.adm_in_channels
    for name, c in (("positive", positive), ("negative", negative)):
        if c.vector.shape[-1] != adm:
            need = "SDXL Size/Crop Conditioning" if model.kind == "base" else "SDXL Refiner Conditioning"
            raise NodeInputError(
                f"{node_name}: '{name}' conditioning has a {c.vector.shape[-1]}-wide vector ({c.kind or 'other'} "
                f"conditioning) but the {model.kind} UNet expects {adm}. Build it with {need} from the "
                f"{model.kind} checkpoint's clip."
            )


def run_sampler(model, positive, negative, latent, progress, **kwargs):
    """Sample a LATENT dict with a model handle: honours its batch_index and noise_mask (both node sets).

    While :func:`run_batched` collects a batch, the request is recorded and a :class:`PendingSamples` stands in
    for the result."""
    collecting = _COLLECTING.get()
    if collecting is not None:
        StepReporter(progress).check()
        request = PendingSamples(model, positive, negative, latent, progress, kwargs)
        collecting.append(request)
        return request
    unet = model.load_for_sampling()
    device = next(unet.parameters()).device
    samples = latent["samples"]
    steps = StepReporter(progress)
    steps.check()
    out = sample(
        unet, positive, negative, samples.to(device), batch_index=latent.get("batch_index"),
        noise_mask=latent.get("noise_mask"), refiner=model.kind == "refiner", callback=steps, **kwargs
    )
    return out.cpu()


# ------------------------------------------------------------------------------------------------
# Several jobs' sampler calls as one batch (the executor's BATCH_FUNCTION; `sdxl-nodes run --batch N`)

_COLLECTING: contextvars.ContextVar[list | None] = contextvars.ContextVar("sdxl_collecting_samples", default=None)


class PendingSamples:
    """A sampling request recorded while :func:`run_batched` runs each job's node function; the node puts it where
    the sampled tensor goes (``out["samples"]``) and it is replaced by the tensor once the batch has run."""

    def __init__(self, model, positive, negative, latent, progress, kwargs: dict):
        self.model, self.progress = model, progress
        self.seed = kwargs.pop("seed")
        self.kwargs = kwargs
        self.job = SampleJob(positive, negative, latent["samples"], self.seed,
                             batch_index=latent.get("batch_index"), noise_mask=latent.get("noise_mask"))
        self.result: torch.Tensor | None = None

    def key(self) -> tuple:
        return (id(self.model), tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())))


def _sample_requests(requests: list[PendingSamples]) -> None:
    """Sample requests that share a model and every setting but conditioning, latent and seed in one batch."""
    first = requests[0]
    unet = first.model.load_for_sampling()
    device = next(unet.parameters()).device
    steps = StepReporter(first.progress)
    steps.check()
    jobs = [SampleJob(r.job.positive, r.job.negative, r.job.latent.to(device), r.seed, batch_index=r.job.batch_index,
                      noise_mask=r.job.noise_mask) for r in requests]
    kwargs = dict(first.kwargs, refiner=first.model.kind == "refiner", callback=steps)
    try:
        outs = sample_batch(unet, jobs, **kwargs)
    except NotBatchable as e:
        log.warning("these %d jobs are sampled one by one, not as one batch: %s", len(jobs), e)
        outs = [sample_batch(unet, [job], **kwargs)[0] for job in jobs]
    for request, out in zip(requests, outs):
        request.result = out.cpu()


def _resolve(value):
    if isinstance(value, PendingSamples):
        return value.result
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_resolve(v) for v in value)
    return value


def run_batched(node, calls: list[dict]) -> list:
    """The executor's batch entry point of a sampler node (``BATCH_FUNCTION``): ``calls`` are the keyword
    arguments of several jobs' calls of ``node.FUNCTION``; returns what each call returns alone.

    Each job's node function runs as usual (checks, output dict), but its ``run_sampler`` only records the
    request; requests sharing the model and every setting but conditioning, latent and seed are then sampled
    together by :func:`~..sdxl_core.sampling.sample_batch` (each job's own noise and generators), and their
    results replace the stand-ins in the returned outputs."""
    function = getattr(node, node.FUNCTION)
    requests: list[PendingSamples] = []
    returned = []
    token = _COLLECTING.set(requests)
    try:
        for kwargs in calls:
            returned.append(function(**kwargs))
    finally:
        _COLLECTING.reset(token)
    groups: dict[tuple, list[PendingSamples]] = {}
    for request in requests:
        groups.setdefault(request.key(), []).append(request)
    for group in groups.values():
        _sample_requests(group)
    return [_resolve(r) for r in returned]


def continue_info(steps: int, start_step: int, scheduler: str) -> dict:
    """What a stopped-early latent carries (LATENT[CONTINUE_KEY]; also saved by SaveLatent)."""
    return {"steps": int(steps), "start_step": int(start_step), "scheduler": str(scheduler)}


def check_continue_info(info, where: str) -> dict:
    """A CONTINUE_KEY value (possibly read back from a file) → a checked dict, or NodeInputError."""
    if not isinstance(info, dict):
        raise NodeInputError(f"{where}: the latent's hand-over record is not a dict: {info!r:.80}")
    steps, start, scheduler = info.get("steps"), info.get("start_step"), info.get("scheduler")
    ok = (isinstance(steps, int) and isinstance(start, int) and 0 < start < steps <= 10000
          and scheduler in SCHEDULERS)
    if not ok:
        raise NodeInputError(
            f"{where}: the latent's hand-over record {info!r:.120} is not usable (needs steps, start_step with "
            f"0 < start_step < steps, and a scheduler of {', '.join(SCHEDULERS)}). Set continue_from_step to the "
            "step to continue from instead."
        )
    return continue_info(steps, start, scheduler)


@node(NodeSchema(
    id="SDXLBaseSampler",
    display_name="SDXL Base Sampler",
    category="sdxl/sampling",
    description=(
        "Denoises a latent with the SDXL base UNet (ComfyUI's KSampler). With denoise_end < 1 it stops early "
        "and hands the still-noisy latent to SDXL Noise & Refine, which finishes the same schedule with the "
        "refiner — the official base + refiner split (ComfyUI's KSamplerAdvanced pair)."
    ),
    inputs=(
        *_common_inputs(),
        Int("steps", "Steps of the whole schedule (base and refiner together).", default=25, min=1, max=10000),
        _cfg(),
        _sampler(),
        _scheduler(),
        Float("denoise_end", "Fraction of the schedule the base runs before handing over with its noise left "
              "in (0.8 = steps 0–20 of 25). 1.0 finishes the image here.", default=1.0, min=0.0, max=1.0, step=0.01),
    ),
    outputs=(Output("LATENT", "LATENT", "The denoised latent, or the partly denoised one when denoise_end < 1."),),
    hidden=HIDDEN,
))
class BaseSampler:
    BATCH_FUNCTION = "run_batch"  # several jobs in one UNet batch (runtime executor, `run --batch N`)

    def run_batch(self, calls):
        return run_batched(self, calls)

    def run(self, model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, denoise_end,
            progress=None, unique_id=None):
        if model.kind != "base":
            raise NodeInputError(
                f"SDXL Base Sampler got the {model.kind} UNet ({model.path}); wire the base checkpoint's model "
                "here and the refiner's into SDXL Noise & Refine."
            )
        _check_model_and_conds(model, positive, negative, "SDXL Base Sampler")
        end_step = round(steps * denoise_end)
        if end_step < 1:
            raise NodeInputError(f"denoise_end {denoise_end} of {steps} steps leaves no step for the base; "
                                 "raise denoise_end or steps")
        early = end_step < steps
        samples = run_sampler(
            model, positive, negative, latent, progress, seed=seed, steps=steps, cfg=cfg,
            sampler_name=sampler_name, scheduler=scheduler, end_step=end_step if early else None,
            return_with_leftover_noise=early,
        )
        out = {k: v for k, v in latent.items() if k not in ("samples", CONTINUE_KEY)}
        out["samples"] = samples
        if early:
            out[CONTINUE_KEY] = continue_info(steps, end_step, scheduler)
        return (out,)


@node(NodeSchema(
    id="SDXLNoiseAndRefine",
    display_name="SDXL Noise & Refine",
    category="sdxl/sampling",
    description=(
        "Refines a latent with the SDXL refiner. 'continue' finishes a latent that SDXL Base Sampler stopped "
        "early, on the same schedule and without new noise (ComfyUI's second KSamplerAdvanced). 'renoise' adds "
        "seeded noise to a finished latent at the given strength and denoises it again (SDEdit / img2img)."
    ),
    inputs=(
        *_common_inputs(),
        _cfg(),
        _sampler(),
        Combo("mode", "continue: finish the base's stopped-early schedule (steps/scheduler/strength come from "
              "the base). renoise: noise a finished latent by 'strength' and denoise it in 'steps' steps.",
              ["continue", "renoise"]),
        Int("steps", "renoise: denoising steps. Ignored by continue, which uses the base's schedule.", default=20, min=1,
            max=10000),
        _scheduler(),
        Float("strength", "renoise: how much noise to add, 0–1 (0.3 keeps the picture, 1.0 redraws it). "
              "Ignored by continue.", default=0.3, min=0.0, max=1.0, step=0.01),
        Int("continue_from_step", "continue: the step of the whole schedule to continue from. 0 = the step "
            "recorded in the latent (by SDXL Base Sampler, KSampler (Advanced) with leftover noise, or a saved "
            "latent). Above 0: continue a schedule of 'steps' steps of 'scheduler' from this step (e.g. 20 with "
            "steps 25), for latents that carry no record.", default=0, min=0, max=10000),
    ),
    outputs=(Output("LATENT", "LATENT", "The refined latent."),),
    hidden=HIDDEN,
))
class NoiseAndRefine:
    BATCH_FUNCTION = "run_batch"  # several jobs in one UNet batch (runtime executor, `run --batch N`)

    def run_batch(self, calls):
        return run_batched(self, calls)

    def run(self, model, positive, negative, latent, seed, cfg, sampler_name, mode, steps, scheduler, strength,
            continue_from_step=0, progress=None, unique_id=None):
        _check_model_and_conds(model, positive, negative, "SDXL Noise & Refine")
        if mode == "continue":
            if continue_from_step:
                if continue_from_step >= steps:
                    raise NodeInputError(f"continue_from_step {continue_from_step} must be below steps ({steps})")
                info = continue_info(steps, continue_from_step, scheduler)
            else:
                info = latent.get(CONTINUE_KEY)
                if not info:
                    raise NodeInputError(
                        "mode 'continue' needs a latent that was stopped early (SDXL Base Sampler with denoise_end "
                        "< 1, or KSampler (Advanced) with leftover noise), and this latent carries no record of "
                        "that. Set continue_from_step (e.g. 20 with steps 25 and the base's scheduler), or use "
                        "mode 'renoise' to refine a finished latent or image."
                    )
                info = check_continue_info(info, "SDXL Noise & Refine")
            kwargs = dict(steps=info["steps"], scheduler=info["scheduler"], start_step=info["start_step"],
                          add_noise=False)
        elif mode == "renoise":
            if strength <= 0:
                return ({k: v for k, v in latent.items() if k != CONTINUE_KEY},)
            kwargs = dict(steps=steps, scheduler=scheduler, denoise=strength)
        else:
            raise NodeInputError(f"mode must be 'continue' or 'renoise', got {mode!r}")
        samples = run_sampler(model, positive, negative, latent, progress, seed=seed, cfg=cfg,
                               sampler_name=sampler_name, **kwargs)
        out = {k: v for k, v in latent.items() if k not in ("samples", CONTINUE_KEY)}
        out["samples"] = samples
        return (out,)
