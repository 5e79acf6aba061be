"""Inpainting with any CCLD model, no retraining: the white part of a mask is repainted, the rest
of the init image kept.

Training-free latent blending: at every model call the latents outside the mask are replaced by
the init image's latents noised to that call's level with the picture's own starting noise, so
the U-Net paints the masked part in the context of the kept one. The decoded picture is then
composited with the init image's pixels outside the (feathered) mask, which keeps them exactly:
the autoencoder alone would blur them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..errors import CCLDError, arg
from .noise import DOWNSCALE


@dataclass(frozen=True)
class Inpainting:
    """A painting's mask at pixel size (an L image, 255: repaint) and at latent size (`keep`
    [1, 1, H/8, W/8], 1: keep the init image's latent), and the init image's pixels to keep."""
    pixel_mask: object  # PIL "L" image
    init_pixels: object  # PIL "RGB" image, the init image as the picture's size cuts it
    keep: torch.Tensor

    def composite(self, painted):
        """The painted PIL picture inside the mask, the init image's pixels outside it."""
        from PIL import Image

        return Image.composite(painted, self.init_pixels, self.pixel_mask)


def prepare(init_image, mask, height: int, width: int, blur: int, device) -> Inpainting:
    """The inpainting of a `height` x `width` picture: `mask` (a PIL image; white repaints) and
    the init image (a PIL image), each scaled to cover the picture and cut to its
    middle as image to image does, so that they stay aligned; the mask made hard (at half grey)
    and then feathered by `blur` pixels. An all-black mask repaints nothing: a CCLDError."""
    from PIL import ImageFilter

    from ..io.images import resize_to_cover

    pixels = resize_to_cover(init_image.convert("RGB"), width, height)
    grey = resize_to_cover(mask.convert("RGB"), width, height).convert("L")
    hard = grey.point(lambda level: 255 if level >= 128 else 0)
    low, high = hard.getextrema()
    if high == 0:
        raise CCLDError(f"the {arg('mask')} is all black, so it repaints nothing; paint the part "
                        f"to repaint white, or leave {arg('mask')} out to repaint the whole picture")
    if low == 255:
        warnings.warn("the mask is all white: the whole picture is repainted, as image to "
                      "image without a mask does", stacklevel=2)
    soft = hard.filter(ImageFilter.GaussianBlur(blur)) if blur else hard
    repaint = torch.frombuffer(bytearray(soft.tobytes()), dtype=torch.uint8).float() / 255
    repaint = repaint.view(1, 1, height, width)
    # a latent is repainted wherever any pixel it decodes to is: the composite keeps the rest
    latent_repaint = F.max_pool2d(repaint, DOWNSCALE)
    return Inpainting(soft, pixels, (1 - latent_repaint).to(device))


def blended_model(model, keep: torch.Tensor, known: torch.Tensor, noise: torch.Tensor):
    """model(x, t) evaluated with x's kept latents (`keep` 1) replaced by `known` (the init
    latents) noised to t with `noise` (the starting noise): what the U-Net sees at every step."""
    from ..sampling import t_to_alpha_sigma

    def blended(x, t):
        alpha, sigma = (a.view(-1, 1, 1, 1) for a in t_to_alpha_sigma(t))
        return model(torch.lerp(x, known * alpha + noise * sigma, keep), t)

    return blended
