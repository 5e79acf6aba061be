"""Animations: frames walking between prompts' embeddings, and optionally between two seeds'
noises, each painted as an ordinary picture.

Frame i of N sits at position i (K - 1) / (N - 1) along the K prompts: between prompt j and j+1
its condition is the slerp of their CLOOB embeddings (a walk along the sphere the embeddings
live near, as variations walk between noises), and with a second seed its starting noise is the
slerp of the two seeds' noises by i / (N - 1). The first and last frames are therefore the
plain paintings of the end prompts (and seeds). Frames are sampled several to a batch, each row
guided by its own condition.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .. import sampling
from ..errors import CCLDError
from ..settings import Settings
from .conditioning import encode_text
from .metadata import describe, with_parameters
from .noise import seed_noise, slerp
from .painting import Guide, Trajectory, sample, timesteps


def frame_position(frame: int, frames: int, prompts: int) -> tuple[int, float]:
    """(segment j, fraction t) of a frame: between prompt j and j + 1, t of the way."""
    if frames == 1 or prompts == 1:
        return 0, 0.0
    u = frame * (prompts - 1) / (frames - 1)
    segment = min(int(u), prompts - 2)
    return segment, u - segment


def require_deterministic(method: str | None, eta: float = 0.0) -> None:
    """A CCLDError unless `method` (None: the default) samples without fresh noise at `eta`:
    a frame must change only with its prompts and noise."""
    if eta or (method is not None and sampling.get_sampler(method).eta(eta)):
        raise CCLDError("interpolate needs a deterministic sampler, whose frames change only "
                        "with their prompts and noise; leave --eta out and pick another --method")


def paint_frames(pipe, prompts: Sequence[str], frames: int, settings: Settings,
                 seed_to: int | None = None, batch_size: int | None = None,
                 progress: bool = True) -> Iterator:
    """PIL frames, in order, each carrying its parameters; `settings` (resolved by the pipeline
    from the first prompt) give everything else: sampler, steps, guidance, seed, size."""
    from tqdm.auto import tqdm

    from ..io.images import tensor_to_pil

    require_deterministic(settings.method, settings.eta)
    sampler = sampling.get_sampler(settings.method)
    times = timesteps(pipe.unet, sampler, settings.steps, 1.0, pipe.device)
    (guidance,) = {p.weight for p in settings.prompts}
    height, width = settings.height, settings.width
    with pipe.autocast():
        embeds = [encode_text(pipe.cloob, [text]) for text in prompts]
        zero = torch.zeros_like(embeds[0])
    noise_from = seed_noise(settings.seed, 0, height, width)
    noise_to = None if seed_to is None else seed_noise(seed_to, 0, height, width)
    params = describe(pipe, settings)
    guides = []
    for frame in range(frames):
        segment, t = frame_position(frame, frames, len(prompts))
        embed = embeds[0] if len(prompts) == 1 else slerp(embeds[segment], embeds[segment + 1], t)
        guides.append(Guide.of(pipe.unet, torch.cat([zero, embed]), [guidance]))
    size = 1 if guides[0].one_row is not None else (batch_size or pipe.default_batch_size)
    with tqdm(total=len(times) * -(-frames // size), desc="frames", disable=not progress,
              leave=False) as bar:
        for first in range(0, frames, size):
            batch = range(first, min(first + size, frames))
            noise = torch.cat([noise_from if noise_to is None else
                               slerp(noise_from, noise_to, i / max(frames - 1, 1)) for i in batch])
            with pipe.autocast():
                latents = sample(pipe.unet, [(guides[i], 1) for i in batch], noise,
                                 Trajectory(sampler, times),
                                 callback=lambda info: bar.update(1))
            pixels = pipe.decode(latents, settings.latent_scale,
                                 full_decoder=settings.full_decoder)
            for i, picture in zip(batch, pixels.float().cpu()):
                record = {**params, "interpolation": {
                    "prompts": list(prompts), "frame": i, "frames": frames, "seed_to": seed_to}}
                yield with_parameters(tensor_to_pil(picture), record, 0)
