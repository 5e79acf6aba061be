"""Demo grids during training: guided PLMS paintings of fixed prompts from fixed noise.

Each row is one model (the EMA weights; for distillation the teacher above the student), each
column one prompt, all from the same noise, so grids from different steps and rows compare
directly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import sampling
from ..settings import Settings

DEFAULT_DEMO_PROMPTS = [
    "a landscape with mountains and a river at dawn, oil on canvas",
    "portrait of an old man with a beard, by Rembrandt",
    "a still life with fruit and a jug, impressionism",
    "a stormy sea with a sailing ship, romanticism",
    "a cubist painting of a guitar and a bottle",
    "a quiet village street in winter, watercolor",
    "an abstract composition of red and blue shapes",
    "a garden with water lilies, by Claude Monet",
]


def read_demo_prompts(path: str | None) -> list[str]:
    from ..errors import CCLDError

    if path is None:
        return list(DEFAULT_DEMO_PROMPTS)
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CCLDError(f"{path}: cannot read the demo prompts ({type(e).__name__}); give a "
                        "text file with one prompt a line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CCLDError(f"{path}: no prompts in the file; write one prompt a line")
    return prompts


@torch.no_grad()
def render_demo(rows: list[tuple[str, torch.nn.Module]], autoencoder, cloob, settings: Settings,
                autocast=contextlib.nullcontext):
    """A grid image: one row per (label, U-Net), one column per prompt of `settings` (each alone,
    from picture i of the seed's run), painted as the pipeline paints (`ccld.pipeline.painting`)."""
    from ..io.images import make_grid, tensor_to_pil
    from ..pipeline.noise import NoiseStream
    from ..pipeline.painting import Guide, Trajectory, decoding_scale, paint, timesteps

    device = next(rows[0][1].parameters()).device
    prompts = [p.value for p in settings.prompts]
    embeds = cloob.encode_text(prompts).float().to(device)
    noise = NoiseStream(settings).take(0, len(prompts))
    sampler = sampling.get_sampler(settings.method)
    images = []
    for _, unet in rows:
        path = Trajectory(sampler, timesteps(unet, sampler, settings.steps, device=device))
        for i, embed in enumerate(embeds):
            guide = Guide.of(unet, torch.stack([torch.zeros_like(embed), embed]), [settings.guidance])
            with autocast():
                pixels = paint(unet, autoencoder, [(guide, 1)], noise[i:i + 1].to(device), path,
                               scale=decoding_scale(unet))
            images.append(tensor_to_pil(pixels[0]))
    return make_grid(images, cols=len(prompts) if len(rows) > 1 else None)


def demo_settings(prompts: list[str], latent_shape: tuple, steps: int, guidance: float,
                  seed: int) -> Settings:
    """The settings of a training run's demo grid: PLMS, at the data's size."""
    from ..errors import CCLDError

    height, width = (8 * n for n in latent_shape[-2:])
    try:
        return Settings.build(prompts, method="plms", steps=steps, guidance=guidance, seed=seed,
                              width=width, height=height)
    except CCLDError as e:
        raise CCLDError(f"the demo grids' settings (--demo-prompts, --demo-steps, "
                        f"--demo-guidance, --seed): {e}") from None


def demo_caption(rows: list[tuple[str, torch.nn.Module]], prompts: list[str]) -> str:
    labels = " / ".join(label for label, _ in rows)
    layout = f"rows: {labels}; columns:" if len(rows) > 1 else "row by row:"
    return layout + "\n" + "\n".join(f"{i}: {p}" for i, p in enumerate(prompts))
