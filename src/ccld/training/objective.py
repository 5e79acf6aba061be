"""What the training loop optimises: the `Objective` protocol, and the noising that the velocity
objectives (`train.VelocityObjective`, `distill.DistillationObjective`) share.

The trainer owns the loop: data order, gradient accumulation, the optimizer, the EMA,
checkpoints and logs. An objective owns everything between a batch of encoded images and a
loss: which timesteps, which noise, which targets (the true velocity, a teacher's, two DDIM steps
of a teacher, a decoder's pixels) and how they are weighted. The trainer hands it the clean data
and the run's sources of randomness, so that whatever the objective draws is reproducible and
continues exactly across a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..sampling import t_to_alpha_sigma
from .data import sample_posterior


class SobolTimesteps:
    """The run's timesteps in [0, 1): a scrambled Sobol sequence, which spreads every batch over
    the whole range more evenly than independent uniform draws.

    A resumed run fast-forwards the sequence by the number of items this process has consumed,
    so an objective that draws from it draws exactly one timestep per item (or none at all);
    one that needs another scheme keeps its own source.
    """

    def __init__(self, seed: int, start: int = 0):
        self.engine = torch.quasirandom.SobolEngine(1, scramble=True, seed=seed)
        self.engine.fast_forward(start)

    def draw(self, n: int) -> torch.Tensor:
        return self.engine.draw(n)[:, 0]


@dataclass
class LatentBatch:
    """One micro-batch as the trainer hands it to an objective: clean data and randomness."""
    mean: torch.Tensor  # the autoencoder posterior [n, 4, h, w], in the autoencoder's units
    logvar: torch.Tensor
    embed: torch.Tensor  # CLOOB image embeddings [n, d]
    autoencoder_scale: torch.Tensor  # the U-Net works on latents / autoencoder_scale
    generator: torch.Generator  # a CPU generator seeded for this process, step and micro-batch
    timesteps: SobolTimesteps


class Objective(Protocol):
    """A loss for the trainer to minimise, and what the run's outputs are called.

    An objective whose model is not a U-Net (`decoder.DecoderDistillationObjective`) also has
    `export(ema, folder) -> [paths written]`, which the trainer calls instead of writing the
    EMA weights in the U-Net release format.
    """

    kind: str  # "train", "distill", ...: prefixes the logged losses and marks the checkpoints
    export_stem: str  # the file name of the exported EMA weights, e.g. "model_ema"

    def to(self, device) -> Objective:
        """Moves what the objective holds (a teacher) to the training device."""

    def loss(self, model: torch.nn.Module, batch: LatentBatch) -> tuple[torch.Tensor, dict]:
        """(the loss to minimise, {name: a part of it worth logging}) for one micro-batch."""

    def demo_rows(self, ema: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(label, U-Net) rows of the demo grid."""


# Noised latents: the inputs of the velocity objectives

@dataclass
class NoisedBatch:
    x: torch.Tensor  # noised latents alpha * x0 + sigma * noise
    t: torch.Tensor
    cond: torch.Tensor  # CLOOB embeddings, zero where dropped
    v: torch.Tensor  # the true velocity alpha * noise - sigma * x0


def noised_batch(mean, logvar, embed, scale, t, generator, cond_drop: float) -> NoisedBatch:
    """The training input of one micro-batch; the noise is drawn on the CPU from `generator`."""
    device = mean.device
    posterior_noise = torch.randn(mean.shape, generator=generator).to(device)
    keep = (torch.rand(mean.shape[0], generator=generator) > cond_drop).to(device)
    noise = torch.randn(mean.shape, generator=generator).to(device)
    x0 = sample_posterior(mean, logvar, posterior_noise) / scale
    cond = torch.where(keep[:, None], embed.float(), torch.zeros_like(embed, dtype=torch.float32))
    t = t.to(device)
    alpha, sigma = (a[:, None, None, None] for a in t_to_alpha_sigma(t))
    return NoisedBatch(x0 * alpha + noise * sigma, t, cond, noise * alpha - x0 * sigma)


def noised_latents(batch: LatentBatch, cond_drop: float) -> NoisedBatch:
    """JD-P's training input: a posterior sample, noised at the run's Sobol timesteps, with the
    condition dropped to the zero embedding with probability `cond_drop`."""
    t = batch.timesteps.draw(batch.mean.shape[0])
    return noised_batch(batch.mean, batch.logvar, batch.embed, batch.autoencoder_scale, t,
                        batch.generator, cond_drop)
