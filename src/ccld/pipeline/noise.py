"""The starting noise of a painting: the reference demo's for a seed, drawn on the CPU so that a
seed paints the same picture on every device (`torch.manual_seed(seed); torch.randn([n, 4, H/8,
W/8])`), and the slerped noise of variations."""

from __future__ import annotations

import torch

from ..limits import IMAGES_PER_CALL
from ..settings import DEFAULT_SIZE, Settings

LATENT_CHANNELS = 4
DOWNSCALE = 8


def next_noise(generator: torch.Generator, count: int, height: int = DEFAULT_SIZE,
               width: int | None = None) -> torch.Tensor:
    """The starting noise of the next `count` images of `height` x `width` pixels (`width`
    defaults to `height`) from `generator` (on the CPU). Drawn batch after batch, it is exactly
    the noise one draw for all the images gives: torch fills a tensor from the generator's
    stream in order, and one image is a whole number of draws."""
    width = height if width is None else width
    shape = [count, LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE]
    return torch.randn(shape, generator=generator)


def skip_noise(generator: torch.Generator, count: int, height: int, width: int) -> None:
    """Draws and drops the noise of `count` pictures, a bounded number at a time."""
    while count > 0:
        skipped = min(count, IMAGES_PER_CALL.high)
        next_noise(generator, skipped, height, width)
        count -= skipped


def seed_noise(seed: int, index: int, height: int, width: int) -> torch.Tensor:
    """Picture `index`'s starting noise [1, 4, height/8, width/8] of a run with `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    skip_noise(generator, index, height, width)
    return next_noise(generator, 1, height, width)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0, exactly) to `b` (t=1) per picture (the first
    dimension; `a` may be one picture for all). Along the great circle a Gaussian noise stays
    a plausible Gaussian noise, where a straight line would shrink it towards its midpoint."""
    a = a.expand_as(b)
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6  # (nearly) the same direction: the straight line is the arc
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe_sin)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe_sin)
    shape = [-1] + [1] * (b.ndim - 1)
    return (a * wa.to(a.dtype).view(shape) + b * wb.to(b.dtype).view(shape)).to(b.dtype)


class NoiseStream:
    """The starting noise of the pictures of one seed's run, drawn in order from one generator
    (which a stochastic sampler then goes on drawing its step noise from); with a variation,
    each picture's noise slerped from the varied picture's by the variation strength."""

    def __init__(self, settings: Settings):
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.drawn = 0  # pictures whose noise has been drawn
        self.height, self.width = settings.height, settings.width
        self.varied = None
        if settings.variation_of is not None:
            self.varied = seed_noise(settings.variation_of, settings.variation_index,
                                     self.height, self.width)
            self.strength = settings.variation_strength

    def take(self, first: int, count: int) -> torch.Tensor:
        """The noise of pictures first .. first + count - 1 of the run (those before `first` not
        drawn yet are drawn and dropped)."""
        if first < self.drawn:
            raise ValueError(f"picture {first}'s noise was drawn already")
        skip_noise(self.generator, first - self.drawn, self.height, self.width)
        noise = next_noise(self.generator, count, self.height, self.width)
        self.drawn = first + count
        return noise if self.varied is None else slerp(self.varied, noise, self.strength)
