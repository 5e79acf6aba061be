"""Larger pictures from a 256-pixel model ("hires fix"): paint at the base size, upscale, then
refine at the target size by image to image.

The first stage is the plain base-size painting of the same settings and seed, exactly. The
second starts from it, upscaled, noised to `hires_strength` of the schedule with the target
size's own seed noise (that of the same seed and picture at that size, so it does not depend
on batching), and samples `hires_steps` steps with the same prompts and guidance. A model
trained at 256 pixels composes a larger picture badly from pure noise (repeated subjects); from
an upscaled painting it only has to add detail.

Upscaling: `pixels` (the default) decodes the first stage, scales the picture with Lanczos and
encodes it again; `latents` scales the latents bicubically, which skips a decode and an encode
but smears them (see benchmarks/notes/hires.md for the measurement behind the default). The
second stage runs a few pictures at a time (as many as DECODE_PIXELS holds), so memory stays
bounded at 1024x1024 on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .noise import DOWNSCALE, seed_noise
from .painting import DECODE_PIXELS, Trajectory, sample, timesteps


@dataclass(frozen=True)
class Hires:
    """The second stage of a painting: its size, its walk, and how the first is upscaled."""
    height: int
    width: int
    times: torch.Tensor
    upscale: str


def prepare(unet, sampler, settings, device) -> Hires:
    """The second stage of resolved settings with a `hires` size."""
    width, height = settings.hires
    return Hires(height, width, timesteps(unet, sampler, settings.hires_steps,
                                          settings.hires_strength, device), settings.hires_upscale)


def upscale(pipe, latents: torch.Tensor, pixels: torch.Tensor, hires: Hires,
            scale: float) -> torch.Tensor:
    """The first stage's pictures as init latents at the target size."""
    if hires.upscale == "latents":
        return F.interpolate(latents.float(), size=(hires.height // DOWNSCALE,
                                                    hires.width // DOWNSCALE), mode="bicubic")
    from PIL import Image

    from ..io.images import pil_to_tensor, tensor_to_pil
    from ..models.autoencoder import encode_moments

    big = [pil_to_tensor(tensor_to_pil(picture).resize((hires.width, hires.height), Image.LANCZOS))
           for picture in pixels]
    mean, _ = encode_moments(pipe.autoencoder, torch.stack(big).to(pipe.device) * 2 - 1)
    return mean / scale


def pictures_per_call(hires: Hires) -> int:
    """Pictures refined at once: as many as DECODE_PIXELS holds, one at 1024x1024."""
    return max(1, DECODE_PIXELS // (hires.height * hires.width))


def refine(pipe, plan, latents: torch.Tensor, pixels: torch.Tensor, indices,
           callback=None) -> torch.Tensor:
    """The second stage of pictures `indices` (places in the run) of `plan`: pixels at the
    target size, from the first stage's `latents` and decoded `pixels`. `callback(info)` is
    called after every sampling step."""
    settings, hires = plan.settings, plan.hires
    per_call = pictures_per_call(hires)
    out = []
    for first in range(0, len(indices), per_call):
        chunk = slice(first, first + per_call)
        with pipe.autocast():
            init = upscale(pipe, latents[chunk], pixels[chunk], hires, settings.latent_scale)
            noise = torch.cat([seed_noise(settings.seed, index, hires.height, hires.width)
                               for index in indices[chunk]])
            generator = torch.Generator().manual_seed(settings.seed) if settings.eta else None
            refined = sample(pipe.unet, [(plan.guide, len(noise))], noise,
                             Trajectory(plan.sampler, hires.times, settings.eta, generator),
                             init=[init], callback=callback)
        out.append(pipe.decode(refined, settings.latent_scale,
                               full_decoder=settings.full_decoder))
    return torch.cat(out)
