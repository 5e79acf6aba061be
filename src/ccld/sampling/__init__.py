"""Sampling a v-predicting diffusion model: schedules, classifier-free guidance and the samplers.

Time t in [0, 1] maps to alpha = cos(pi t / 2), sigma = sin(pi t / 2); a noised latent is
x = alpha * x0 + sigma * eps and the model predicts v = alpha * eps - sigma * x0.
`schedules` holds the timesteps, `guidance` the guided velocity, `samplers` the samplers (one
function each) and their registry; all of it is importable from here.
"""

from .guidance import (
    condition_weights,
    distilled_guidance_model,
    guided_model,
    one_row_guidance,
    stacked_guided_model,
)
from .samplers import (
    SAMPLERS,
    Callback,
    Model,
    Sampler,
    ddim,
    dpmpp_2m,
    get_sampler,
    iplms,
    pie,
    plms,
    plms2,
    prk,
    register_sampler,
    sample,
    unipc,
)
from .schedules import (
    UNIPC_T_MIN,
    UNIPC_T_MIN_STEPS,
    alpha_sigma_to_t,
    ddpm_schedule,
    get_timesteps,
    power_timesteps,
    spliced_ddpm_cosine_schedule,
    t_to_alpha_sigma,
    uniform_timesteps,
)

__all__ = [
    "SAMPLERS", "UNIPC_T_MIN", "UNIPC_T_MIN_STEPS", "Callback", "Model", "Sampler",
    "alpha_sigma_to_t", "condition_weights", "ddim", "ddpm_schedule", "distilled_guidance_model",
    "dpmpp_2m", "get_sampler", "get_timesteps", "guided_model", "iplms", "one_row_guidance",
    "pie", "plms", "plms2", "power_timesteps", "prk", "register_sampler", "sample",
    "spliced_ddpm_cosine_schedule", "stacked_guided_model", "t_to_alpha_sigma",
    "uniform_timesteps", "unipc",
]
