"""ComfyUI's KSampler and KSampler (Advanced) on sdxl_core.sampling.sample (the SDXL samplers' path)."""

from __future__ import annotations

from ...sdxl_core.conditioning import check_comfy_conditioning
from ...sdxl_core.sampling import SAMPLERS
from ...sdxl_core.schedules import SCHEDULERS
from ..environment import NodeInputError
from ..sampling import CONTINUE_KEY, HIDDEN, continue_info, run_batched, run_sampler
from ..schema import MAX_SEED, Combo, Float, Int, NodeSchema, Output, Socket, node

LATENT_OUT = (Output("LATENT", "LATENT", "The denoised latent."),)
SAMPLER_NOTE = (
    "Conditioning entries that can share a UNet call always do (ComfyUI splits such batches when GPU memory is short)."
)


def check_conditioning(model, cond, name: str, node_name: str) -> None:
    """A CONDITIONING list must fit the UNet: token width = its context width, pooled + sizes = its vector."""
    check_comfy_conditioning(cond, f"{node_name} {name}")
    unet = model.config.unet
    n_sizes = 5 if model.kind == "refiner" else 6
    for k, (tokens, options) in enumerate(cond):
        pooled = options.get("pooled_output")
        pooled_w = pooled.shape[-1] if pooled is not None else None
        if tokens.shape[-1] != unet.context_dim or (pooled_w is not None and pooled_w + n_sizes * 256 != unet.adm_in_channels):
            raise NodeInputError(
                f"{node_name}: '{name}' entry {k} has {tokens.shape[-1]}-wide tokens, but the {model.kind} UNet "
                f"({model.path}) takes {unet.context_dim}. Encode this prompt with the CLIP of the same "
                f"checkpoint as the MODEL (the {model.kind}'s)."
            )


def _common():
    return (
        Float("cfg", "Classifier-free guidance scale.", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        Combo("sampler_name", "The solver (ComfyUI's names).", list(SAMPLERS)),
        Combo("scheduler", "How the noise levels are spaced (ComfyUI's names).", list(SCHEDULERS)),
        Socket("positive", "CONDITIONING", "What the image should show."),
        Socket("negative", "CONDITIONING", "What the image should not show."),
        Socket("latent_image", "LATENT", "The latent to denoise."),
    )


def _seed(name):
    return Int(name, "Seed of the noise.", default=0, min=0, max=MAX_SEED, step=None, control_after_generate=True)


def _steps():
    return Int("steps", "Steps of the schedule.", default=20, min=1, max=10000, step=None)


@node(NodeSchema(
    id="KSampler",
    display_name="KSampler",
    category="sampling",
    description="Denoises the latent with the model and the positive/negative conditioning. denoise < 1 runs "
                "the last part of a longer schedule (img2img, hires fix).",
    inputs=(
        Socket("model", "MODEL", "The UNet from Load Checkpoint."),
        _seed("seed"), _steps(), *_common(),
        Float("denoise", "How much of the schedule to run: 1 = from pure noise.", default=1.0, min=0.0, max=1.0,
              step=0.01),
    ),
    outputs=LATENT_OUT,
    hidden=HIDDEN,
))
class KSampler:
    BATCH_FUNCTION = "run_batch"  # several jobs in one UNet batch (runtime executor, `run --batch N`)

    def run_batch(self, calls):
        return run_batched(self, calls)

    DIFFERS_FROM_COMFYUI = SAMPLER_NOTE

    def run(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
            progress=None, unique_id=None):
        for name, c in (("positive", positive), ("negative", negative)):
            check_conditioning(model, c, name, "KSampler")
        out = {k: v for k, v in latent_image.items() if k != CONTINUE_KEY}
        out["samples"] = run_sampler(model, positive, negative, latent_image, progress, seed=seed, steps=steps,
                                     cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise)
        return (out,)


@node(NodeSchema(
    id="KSamplerAdvanced",
    display_name="KSampler (Advanced)",
    category="sampling",
    description="KSampler over steps start_at_step … end_at_step of a 'steps'-step schedule, with or without "
                "new noise and with or without leftover noise at the end: the official base + refiner split.",
    inputs=(
        Socket("model", "MODEL", "The UNet from Load Checkpoint."),
        Combo("add_noise", "enable: add the seed's noise first; disable: continue a noisy latent.",
              ["enable", "disable"]),
        _seed("noise_seed"), _steps(), *_common(),
        Int("start_at_step", "First step to run.", default=0, min=0, max=10000, step=None),
        Int("end_at_step", "Step to stop at (beyond the schedule = run to the end).", default=10000, min=0,
            max=10000, step=None),
        Combo("return_with_leftover_noise", "enable: stop with the noise of end_at_step left in (for a second "
              "sampler); disable: finish clean.", ["disable", "enable"]),
    ),
    outputs=LATENT_OUT,
    hidden=HIDDEN,
))
class KSamplerAdvanced:
    BATCH_FUNCTION = "run_batch"  # several jobs in one UNet batch (runtime executor, `run --batch N`)

    def run_batch(self, calls):
        return run_batched(self, calls)

    DIFFERS_FROM_COMFYUI = SAMPLER_NOTE + " A latent stopped early with leftover noise also carries a hand-over record, so SDXL Noise & Refine can continue it."

    def run(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_at_step, end_at_step, return_with_leftover_noise, progress=None, unique_id=None):
        for name, c in (("positive", positive), ("negative", negative)):
            check_conditioning(model, c, name, "KSamplerAdvanced")
        out = {k: v for k, v in latent_image.items() if k != CONTINUE_KEY}
        if start_at_step >= min(end_at_step, steps):  # nothing to run: ComfyUI hands the latent back
            return (out,)
        leftover = return_with_leftover_noise == "enable"
        out["samples"] = run_sampler(
            model, positive, negative, latent_image, progress, seed=noise_seed, steps=steps, cfg=cfg,
            sampler_name=sampler_name, scheduler=scheduler, start_step=start_at_step,
            end_step=end_at_step if end_at_step < steps else None,
            add_noise=add_noise == "enable", return_with_leftover_noise=leftover,
        )
        if leftover and end_at_step < steps:  # SDXL Noise & Refine can continue it
            out[CONTINUE_KEY] = continue_info(steps, end_at_step, scheduler)
        return (out,)


NODES = (KSampler, KSamplerAdvanced)
