"""Decoder distillation (`ccld distill-decoder`): a tiny decoder learns to paint what the frozen
KL decoder paints.

Each micro-batch: latents z from the data's autoencoder posterior (a sample, or the mean), the
target the KL decoder's pixels of z (clamped to [-1, 1], what a PNG shows), and the loss the MSE
between the tiny decoder's pixels of z and the target, plus a weighted feature term: the
normalised MSE between the frozen KL *encoder*'s activations of both images, a perceptual-ish
loss that needs no downloaded network (the encoder was trained to see exactly what matters to
this decoder). No noise and no timesteps: the trainer's Sobol sequence is left untouched.

The tiny decoder learns on raw latents (its `input_scale` is 1.0) unless it starts from one that
has its own scale (`--init`, e.g. TAESD's 0.18215, for a fine-tune of the stock kl-f8).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn import functional as F

from ..models.autoencoder import KLAutoencoder, decode_latents
from ..models.tiny_decoder import (
    PIPELINE_SUBFOLDER,
    TinyDecoder,
    TinyDecoderConfig,
    tiny_decoder_from_state_dict,
)
from .data import sample_posterior
from .objective import LatentBatch

DEFAULT_FEATURE_WEIGHT = 0.1
FEATURE_LEVELS = 2  # encoder resolution levels compared: the early, texture-like ones, cheapest


def encoder_features(autoencoder: KLAutoencoder, images: torch.Tensor,
                     levels: int = FEATURE_LEVELS) -> list[torch.Tensor]:
    """The KL encoder's activations after its first `levels` resolution blocks."""
    encoder = autoencoder.encoder
    x = encoder.conv_in(images)
    features = []
    for block in encoder.down_blocks[:levels]:
        x = block(x)
        features.append(x)
    return features


def feature_distance(predicted: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Mean over levels of the MSE of the activations relative to the target's mean square, so
    that every level counts alike whatever its scale."""
    terms = [F.mse_loss(p.float(), t.float()) / t.float().square().mean().clamp_min(1e-8)
             for p, t in zip(predicted, target, strict=True)]
    return torch.stack(terms).mean()


def psnr(pixels: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (both clamped first)."""
    mse = F.mse_loss(pixels.float().clamp(-1, 1), target.float().clamp(-1, 1)).item()
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()


class DecoderDistillationObjective:
    """The tiny decoder (the trained model) against the frozen KL decoder's pixels."""

    kind = "distill-decoder"
    export_stem = PIPELINE_SUBFOLDER  # exported as a folder: see `export`

    def __init__(self, autoencoder: KLAutoencoder, feature_weight: float = DEFAULT_FEATURE_WEIGHT,
                 posterior_mean: bool = False, autocast=contextlib.nullcontext):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.feature_weight = float(feature_weight)
        self.posterior_mean = posterior_mean
        self.autocast = autocast

    def to(self, device):
        self.autoencoder.to(device)
        return self

    def latents(self, batch: LatentBatch) -> torch.Tensor:
        """Raw KL latents: the posterior mean, or a sample drawn with the batch's generator."""
        if self.posterior_mean:
            return batch.mean.float()
        noise = torch.randn(batch.mean.shape, generator=batch.generator).to(batch.mean.device)
        return sample_posterior(batch.mean, batch.logvar, noise)

    def loss(self, model, batch: LatentBatch):
        z = self.latents(batch)
        with torch.no_grad(), self.autocast():
            target = decode_latents(self.autoencoder, z).float().clamp(-1, 1)
            target_features = (encoder_features(self.autoencoder, target)
                               if self.feature_weight else None)
        pixels = model(z).float()
        pixel_mse = F.mse_loss(pixels, target)
        if not self.feature_weight:
            return pixel_mse, {"pixel_mse": pixel_mse}
        with self.autocast():
            features = encoder_features(self.autoencoder, pixels)
        feature_loss = feature_distance(features, target_features)
        return (pixel_mse + self.feature_weight * feature_loss,
                {"pixel_mse": pixel_mse, "feature_loss": feature_loss})

    def demo_rows(self, ema):
        return []  # demo grids sample U-Nets; this run has none (its command turns demos off)

    def export(self, ema: TinyDecoder, folder: Path) -> list[Path]:
        """The EMA decoder as a folder `--decoder tiny:FOLDER` reads."""
        return [ema.save_pretrained(Path(folder) / PIPELINE_SUBFOLDER)]


def new_tiny_decoder(width: int, seed: int) -> TinyDecoder:
    """A freshly initialised TAESD-shaped decoder, `width` channels throughout, on raw latents;
    the same weights on every process and run of a seed."""
    torch.manual_seed(seed)
    return TinyDecoder(TinyDecoderConfig(decoder_block_out_channels=(width,) * 4, input_scale=1.0))


def tiny_decoders_from_resume(resume: dict, path) -> tuple[TinyDecoder, TinyDecoder]:
    """(raw, EMA) tiny decoders of a `ccld distill-decoder` checkpoint."""
    from .checkpointing import split_state_dict

    config = TinyDecoderConfig.from_dict(resume["config"]["tiny_decoder"], str(path))
    raw, ema = split_state_dict(resume["state_dict"])
    return (tiny_decoder_from_state_dict(config, raw, path),
            tiny_decoder_from_state_dict(config, ema, path))
