"""WebUI sampler names -> diffusers schedulers on SD's noise schedule."""
from __future__ import annotations

import inspect

from ..core.errors import InputError

# SD's training noise schedule, shared by every sampler
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# WebUI sampler name -> (diffusers scheduler class, its options). "linspace" spacing is the k-diffusion
# schedule the WebUI's samplers use (timesteps spread evenly over 999..0); DDIM / PLMS use the original
# "leading" spacing with steps_offset 1, as the LDM code does.
_K = dict(timestep_spacing="linspace", steps_offset=1)   # (steps_offset: no effect with linspace; silences a diffusers warning)
_LDM = dict(timestep_spacing="leading", steps_offset=1)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", _K),
    "Euler": ("EulerDiscreteScheduler", _K),
    "Heun": ("HeunDiscreteScheduler", _K),
    "LMS": ("LMSDiscreteScheduler", _K),
    "LMS Karras": ("LMSDiscreteScheduler", dict(_K, use_karras_sigmas=True)),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", dict(_K, algorithm_type="dpmsolver++", solver_order=2)),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        dict(_K, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", dict(_K, algorithm_type="sde-dpmsolver++", solver_order=2)),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            dict(_K, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "UniPC": ("UniPCMultistepScheduler", _K),
    "DDIM": ("DDIMScheduler", dict(_LDM, clip_sample=False, set_alpha_to_one=False)),
    "PLMS": ("PNDMScheduler", dict(_LDM, skip_prk_steps=True, set_alpha_to_one=False)),
}
SAMPLER_NAMES = list(SAMPLERS)


def make_scheduler(sampler: str, prediction_type: str = "epsilon", zero_snr: bool = False):
    """The diffusers scheduler of a WebUI sampler name, on SD's noise schedule (scaled_linear 0.00085..0.012,
    1000 steps). Zero-terminal-SNR models get rescaled betas and "trailing" timesteps."""
    if sampler not in SAMPLERS:
        raise InputError(f"Unknown sampler '{sampler}'. Standalone generation offers: {', '.join(SAMPLER_NAMES)}.")
    import diffusers
    cls_name, opts = SAMPLERS[sampler]
    cls = getattr(diffusers, cls_name)
    opts = dict(opts)
    if zero_snr:
        if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            raise InputError(f"The sampler '{sampler}' does not support zero-terminal-SNR models here: use Euler, "
                             f"Euler a, DPM++ 2M or DDIM.")
        opts.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        opts.pop("steps_offset", None)
    return cls(**NOISE_SCHEDULE, prediction_type=prediction_type, **opts)
