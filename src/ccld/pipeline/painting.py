"""The one sampling path: guide, sample, decode.

The pipeline, the training demos and `ccld evaluate` all paint through `sample` and `decode`
(`paint` is both), so every one of them guides, schedules, checks and decodes alike, and the
latent-scale rule lives in `decoding_scale` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import sampling
from ..errors import CCLDError
from ..settings import DEFAULT_GUIDANCE, DEFAULT_METHOD, DEFAULT_STEPS


@dataclass(frozen=True)
class Guide:
    """How the rows of one request are guided: the embeddings [zero, prompts...] and their
    weights (classifier-free guidance), or for a guidance-distilled student that can give the
    guided velocity in one row, that w (`one_row`) and the one condition (embeds[1])."""
    embeds: torch.Tensor
    weights: torch.Tensor
    one_row: float | None = None

    @classmethod
    def of(cls, unet, embeds: torch.Tensor, user_weights: Sequence[float]) -> Guide:
        """The guide of conditions `embeds` [zero, each prompt's] with the prompts' weights;
        one row where the U-Net is a guidance-distilled student that can
        (`sampling.one_row_guidance`)."""
        weights = sampling.condition_weights(user_weights, embeds.device)
        return cls(embeds, weights, sampling.one_row_guidance(
            getattr(unet, "distilled_guidance", None), user_weights))

    @property
    def rows(self) -> int:
        """U-Net rows each image costs per forward."""
        return 1 if self.one_row is not None else self.embeds.shape[0]


def guided_model(unet, parts: Sequence[tuple[Guide, int]]) -> sampling.Model:
    """model(x, t) -> the guided velocity, the first rows of x guided by the first part's guide,
    the next by the next (all in one batched forward)."""
    if len(parts) > 1:
        if any(guide.one_row is not None for guide, _ in parts):
            raise ValueError("a one-row guide is sampled alone")
        return sampling.stacked_guided_model(unet, [(g.embeds, g.weights, rows) for g, rows in parts])
    guide = parts[0][0]
    if guide.one_row is not None:
        return sampling.distilled_guidance_model(unet, guide.embeds[1], guide.one_row)
    return sampling.guided_model(unet, guide.embeds, guide.weights)


def timesteps(unet, sampler: sampling.Sampler, steps: int, start: float = 1.0,
              device=None) -> torch.Tensor:
    """The times `sampler` visits in `steps` steps from `start` (1: pure noise): a step-distilled
    student's own grid, exactly, where it is sampled on it."""
    if (sampler.name == "distilled" and start == 1.0
            and steps == getattr(unet, "distilled_steps", None)):
        return unet.distilled_timesteps.float().to(device)
    return sampler.timesteps(steps, start, device=device)


def require_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor`, unless a value is NaN or infinite: then a CCLDError, instead of a black PNG."""
    if not bool(torch.isfinite(tensor).all()):
        raise CCLDError(f"{what} went non-finite (NaN or infinity); lower the guidance or the "
                        "prompt weights, or use fp32 precision")
    return tensor


@dataclass(frozen=True)
class Trajectory:
    """How sampling walks from noise to latents: the sampler, the times it steps through, DDIM's
    eta, and the generator a stochastic step draws its fresh noise from."""
    sampler: sampling.Sampler
    times: torch.Tensor
    eta: float = 0.0
    generator: torch.Generator | None = None


def sample(unet, parts: Sequence[tuple[Guide, int]], noise: torch.Tensor, path: Trajectory, *,
           init: Sequence[torch.Tensor | None] | None = None,
           keep: Sequence[torch.Tensor | None] | None = None,
           callback: sampling.Callback = None, record: list | None = None) -> torch.Tensor:
    """Latents sampled from `noise` (one batch, rows as `parts` lists them) along `path`.

    `init`: each part's init latent (image to image; None for a part without one), noised to
    the first time. `keep`: each part's inpainting mask at latent size (1 keeps the init latent,
    see `ccld.pipeline.inpainting`; None repaints everything). Whether every step stayed finite
    is checked once, after the batch (a check per step would stop the device at every step); a
    step that went NaN or infinite is named. `record` gets (x, t) of every guided model call.
    """
    times = path.times
    x = start_noise = noise.to(times.device)
    start = None
    if init is not None and any(latent is not None for latent in init):
        alpha, sigma = sampling.t_to_alpha_sigma(times[0])
        start = torch.cat([latent.expand(rows, *x.shape[1:]) if latent is not None
                           else torch.zeros_like(x[:rows]) for latent, (_, rows) in zip(init, parts)])
        x = start * alpha + x * sigma
    finite = []  # one flag per step, on the device

    def step(info: dict) -> None:
        finite.append(torch.isfinite(info["pred"]).all())
        if callback is not None:
            callback({**info, "steps": len(times)})

    model = guided_model(unet, parts)
    kept = None
    if keep is not None and any(mask is not None for mask in keep):
        from .inpainting import blended_model

        kept = torch.cat([(mask if mask is not None else torch.zeros_like(x[:1, :1])).expand(
            rows, 1, *x.shape[2:]) for mask, (_, rows) in zip(keep, parts)])
        model = blended_model(model, kept, start, start_noise)
    if record is not None:
        traced = model

        def model(x, t):
            record.append((x, t))
            return traced(x, t)

    latents = path.sampler(model, x, times, eta=path.eta, generator=path.generator,
                           callback=step)
    if kept is not None:  # the kept latents are the init image's, noised to t = 0: itself
        latents = torch.lerp(latents, start.to(latents.dtype), kept.to(latents.dtype))
    if finite and not bool(torch.stack(finite).all()):
        first = next(i for i, ok in enumerate(torch.stack(finite).tolist()) if not ok)
        require_finite(torch.tensor(float("nan")), f"sampling step {first + 1} of {len(times)}")
    return require_finite(latents, "the sampled latents")


def decoding_scale(unet, recorded: float | None = None, override: float | None = None) -> float:
    """The latent scale latents are decoded (and init images encoded) with: `override` (a
    setting), else the scale `recorded` for the model (the published WikiArt models decode at
    2.55, as their demos did, whatever their checkpoint's buffer says; see `ccld.io.hub`), else
    the U-Net's stored `autoencoder_scale`."""
    for scale in (override, recorded):
        if scale is not None:
            return float(scale)
    return float(unet.autoencoder_scale)


# Pixels per decoder call: the KL decoder holds about 1 KiB of activations per float32 pixel, so
# a batch of 16 pictures at 1024 px decoded at once would need tens of GB.
DECODE_PIXELS = 4 * 256 * 256


def decode(decoder, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Pixels in [-1, 1] (unclamped, float32) of latents in the U-Net's space, by `decoder`
    (the KL autoencoder or a tiny decoder), DECODE_PIXELS at a time."""
    from ..models.autoencoder import decode_latents

    per_call = max(1, DECODE_PIXELS // (64 * latents.shape[-2] * latents.shape[-1]))
    return torch.cat([decode_latents(decoder, chunk * scale).float()
                      for chunk in latents.split(per_call)])


def paint(unet, decoder, parts: Sequence[tuple[Guide, int]], noise: torch.Tensor,
          path: Trajectory, *, scale: float, record: list | None = None) -> torch.Tensor:
    """`sample` then `decode`: the pixels of one batch."""
    return decode(decoder, sample(unet, parts, noise, path, record=record), scale)


def sampling_defaults(unet_config: dict) -> dict:
    """The method, steps and guidance a U-Net samples with unless the settings say otherwise,
    and the U-Net rows each image costs per forward at that guidance.

    A plain model: DEFAULT_METHOD, DEFAULT_STEPS, DEFAULT_GUIDANCE, two rows (conditional and
    unconditional). A step-distilled student (`distilled_steps`): the `distilled` sampler at
    its own step count. A guidance-distilled one (`guidance_range`): DEFAULT_GUIDANCE brought
    into its range, in one row.
    """
    steps = unet_config.get("distilled_steps")
    method, steps = ("distilled", steps) if steps else (DEFAULT_METHOD, DEFAULT_STEPS)
    guidance, rows = DEFAULT_GUIDANCE, 2
    if unet_config.get("guidance_range"):
        low, high = unet_config["guidance_range"]
        guidance, rows = min(max(DEFAULT_GUIDANCE, low), high), 1
    return {"method": method, "steps": steps, "guidance": guidance, "rows_per_image": rows}
