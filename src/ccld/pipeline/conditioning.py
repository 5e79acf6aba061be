"""Conditioning: the prompts' CLOOB embeddings, the init image's latent (and inpainting mask),
and the plan of a painting (everything its batches share, worked out once)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .. import sampling
from ..errors import CCLDError
from ..settings import Settings
from .hires import Hires
from .hires import prepare as prepare_hires
from .inpainting import Inpainting
from .inpainting import prepare as prepare_inpainting
from .painting import Guide, Trajectory, timesteps


def _pil(image):
    """A path, PIL image or [3,H,W] tensor in [0, 1] as an RGB PIL image."""
    from ..io.images import load_image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        from PIL import Image

        pixels = image.detach().reshape(3, *image.shape[-2:]).float().clamp(0, 1).mul(255).round()
        return Image.fromarray(pixels.byte().permute(1, 2, 0).cpu().numpy(), "RGB")
    return image.convert("RGB")


def encode_text(cloob, texts) -> torch.Tensor:
    return cloob.encode_text(list(texts)).float()


def encode_image(cloob, image, device) -> torch.Tensor:
    """CLOOB embedding of an image prompt (a path, PIL image, or [3,H,W] tensor in [0,1] at
    CLOOB's input size; other images are resized and cropped as the reference does)."""
    from ..io.images import pil_to_tensor, resize_and_center_crop

    size = cloob.config["image_encoder"]["image_size"]
    if isinstance(image, torch.Tensor):
        batch = image.reshape(1, *image.shape[-3:]).to(device, torch.float32)
        if batch.shape[-2:] != (size, size):
            raise CCLDError(f"image prompt tensor is {tuple(batch.shape[-2:])}, CLOOB needs "
                            f"{size}x{size}; pass a PIL image or a path to have it resized")
    else:
        batch = pil_to_tensor(resize_and_center_crop(_pil(image), size))[None].to(device)
    return F.normalize(cloob.encode_image(batch).float(), dim=-1)


def encode_init_image(autoencoder, image, height: int, width: int, scale: float,
                      device) -> torch.Tensor:
    """The posterior mean latent of an init image in the U-Net's space (divided by `scale`); the
    image is scaled to cover `height` x `width` and its middle cut out (its aspect ratio kept)."""
    from ..io.images import pil_to_tensor, resize_to_cover
    from ..models.autoencoder import encode_moments

    pixels = pil_to_tensor(resize_to_cover(_pil(image), width, height))
    mean, _ = encode_moments(autoencoder, pixels[None].to(device) * 2 - 1)
    return mean / scale


def conditions(cloob, settings: Settings, device) -> torch.Tensor:
    """The embeddings [zero, prompts..., image prompts...] of resolved settings."""
    embeds = [torch.zeros([1, cloob.config["d_embed"]], device=device)]
    embeds += [encode_text(cloob, [p.value]) for p in settings.prompts]
    embeds += [encode_image(cloob, p.value, device) for p in settings.image_prompts]
    return torch.cat(embeds)


@dataclass(frozen=True)
class SamplingPlan:
    """What every batch of one painting's settings shares: the resolved settings and the work
    done once (embeddings, timesteps, the init image's latent)."""
    settings: Settings
    sampler: sampling.Sampler
    guide: Guide
    timesteps: torch.Tensor
    init_latent: torch.Tensor | None
    inpainting: Inpainting | None = None
    hires: Hires | None = None

    @property
    def stochastic(self) -> bool:
        """Whether sampling draws noise after the start (ddpm, ddim with eta), so that the
        pictures depend on how the images are batched."""
        return bool(self.settings.eta)

    @property
    def painted_alone(self) -> bool:
        """Whether its batches hold no other painting's rows: a stochastic sampler's pictures
        depend on its own batches, and a guidance-distilled student's one-row forward has no
        place for other rows' conditions; a painting of one `picture` is painted in the company
        its settings give."""
        return (self.stochastic or self.guide.one_row is not None
                or self.settings.picture is not None or self.inpainting is not None
                or self.hires is not None)

    def trajectory(self, generator: torch.Generator | None = None) -> Trajectory:
        """The walk its batches sample along; `generator` draws a stochastic sampler's noise."""
        return Trajectory(self.sampler, self.timesteps, self.settings.eta, generator)

    def shares_batches_with(self) -> tuple:
        """Plans with equal keys can be sampled in one batch (each row guided by its own
        prompts, from its own seed's noise) and decoded together, painting the pictures each
        paints alone; some plans share with none (`painted_alone`)."""
        if self.painted_alone:
            return ("alone", id(self))
        s = self.settings
        return (s.method, tuple(self.timesteps.tolist()), s.height, s.width, s.latent_scale,
                s.full_decoder)


def plan(pipe, settings: Settings) -> SamplingPlan:
    """The plan of resolved settings on `pipe`: encodes the prompts and the init image."""
    sampler = sampling.get_sampler(settings.method)
    embeds = conditions(pipe.cloob, settings, pipe.device)
    init_latent, start = None, 1.0
    if settings.init_image is not None:
        start = settings.strength
        init_latent = encode_init_image(pipe.autoencoder, settings.init_image.value,
                                        settings.height, settings.width, settings.latent_scale,
                                        pipe.device)
    inpainting = None
    if settings.mask is not None:
        inpainting = prepare_inpainting(_pil(settings.init_image.value), _pil(settings.mask.value),
                                        settings.height, settings.width, settings.mask_blur,
                                        pipe.device)
    return SamplingPlan(settings, sampler, Guide.of(pipe.unet, embeds, settings.weights),
                        timesteps(pipe.unet, sampler, settings.steps, start, pipe.device),
                        init_latent, inpainting,
                        None if settings.hires is None
                        else prepare_hires(pipe.unet, sampler, settings, pipe.device))
