"""A cheap look at latents: a linear map from the 4 latent channels to RGB, plus a bias.

Sampling previews show the current clean prediction every few steps; decoding it with the KL
decoder would cost as much as the painting's own decode each time. The map costs nothing: each
latent pixel becomes one colour, and the picture is that grid scaled up. It is fitted once per
autoencoder, by least squares, on what the autoencoder itself decodes (`fit_latent_preview`,
a second or two on a CPU: done when a pipeline first shows a preview, not on every load), and
stored with it as `latent_preview.json` in a saved autoencoder folder (`ccld convert`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

FILE_NAME = "latent_preview.json"
# How the map is fitted, recorded with every saved map (latent_preview.json).
FIT_RECIPE = ("latent preview 1: 4 pictures of 64 px, random 16 px colour blocks (seed 0), "
              "encoded, decoded; least squares from each latent pixel to its 8x8 block's mean")
FIT_PICTURES, FIT_SIZE, FIT_BLOCK, FIT_SEED = 4, 64, 16, 0
DOWNSCALE = 8  # pixels per latent pixel, each way


@dataclass(frozen=True)
class LatentPreview:
    """RGB in [-1, 1] from unscaled latents (what the decoder takes): `rgb = weight.T @ z + bias`
    per latent pixel."""

    weight: torch.Tensor  # [latent channels, 3]
    bias: torch.Tensor  # [3]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels [n, 3, 8h, 8w] of latents [n, c, h, w], smoothly scaled up, on the CPU."""
        latents = latents.detach().float().cpu()
        rgb = torch.einsum("nchw,cr->nrhw", latents, self.weight) + self.bias.view(1, 3, 1, 1)
        return F.interpolate(rgb, scale_factor=DOWNSCALE, mode="bilinear", align_corners=False)

    def to_dict(self) -> dict:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist(), "fit": FIT_RECIPE}

    @classmethod
    def from_dict(cls, data) -> LatentPreview | None:
        """The map a `to_dict` wrote; None for anything else (then it is fitted again)."""
        try:
            weight = torch.tensor(data["weight"], dtype=torch.float32)
            bias = torch.tensor(data["bias"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError):
            return None
        if weight.ndim != 2 or weight.shape[1] != 3 or bias.shape != (3,):
            return None
        return cls(weight, bias)

    def save(self, folder: str | Path) -> Path:
        from ..io.files import atomic_write

        text = json.dumps(self.to_dict(), indent=1).encode()
        return atomic_write(Path(folder) / FILE_NAME, lambda f: f.write(text), "latent preview map")

    @classmethod
    def load(cls, folder: str | Path) -> LatentPreview | None:
        """The map saved in `folder`, or None when there is none (or it is unreadable)."""
        try:
            return cls.from_dict(json.loads((Path(folder) / FILE_NAME).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None


def fit_linear_map(latents: torch.Tensor, pixels: torch.Tensor) -> LatentPreview:
    """The least-squares `LatentPreview` from latents [n, c, h, w] to pixels [n, 3, 8h, 8w]: each
    latent pixel against the mean colour of its 8x8 block."""
    colours = F.avg_pool2d(pixels.double(), DOWNSCALE)
    x = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [c + 1, 3]
    return LatentPreview(solution[:-1].float(), solution[-1].float())


@torch.inference_mode()
def fit_latent_preview(autoencoder) -> LatentPreview:
    """The map of a `KLAutoencoder`, fitted on what it decodes from the latents of a few random
    colour-block pictures (deterministic): latents like those of paintings, not of noise, in a
    fraction of a second on a CPU."""
    generator = torch.Generator().manual_seed(FIT_SEED)
    side = FIT_SIZE // FIT_BLOCK
    blocks = torch.rand([FIT_PICTURES, 3, side, side], generator=generator) * 2 - 1
    pictures = F.interpolate(blocks, scale_factor=FIT_BLOCK, mode="nearest")
    param = next(autoencoder.parameters())
    latents, _ = autoencoder.encode_moments(pictures.to(param.device, param.dtype))
    decoded = autoencoder.decode(latents)
    return fit_linear_map(latents.float().cpu(), decoded.float().cpu())
