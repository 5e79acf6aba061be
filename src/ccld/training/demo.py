"""Demo grids during training: guided PLMS samples of fixed prompts from fixed noise.

Each row is one model (the EMA weights; for distillation the teacher above the student), each
column one prompt, all from the same noise, so grids from different steps and rows compare
directly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import sampling

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
def render_demo(rows: list[tuple[str, torch.nn.Module]], autoencoder, cloob, prompts: list[str],
                latent_shape: tuple, steps: int = 50, guidance: float = 3.0, seed: int = 0,
                autocast=contextlib.nullcontext):
    """A grid image: one row per (label, U-Net), one column per prompt."""
    from ..io.images import make_grid, tensor_to_pil
    from ..models.autoencoder import decode_latents

    device = next(rows[0][1].parameters()).device
    embeds = cloob.encode_text(prompts).float().to(device)
    noise = torch.randn([len(prompts), *latent_shape], generator=torch.Generator().manual_seed(seed))
    t = sampling.get_timesteps(steps, device=device)
    weights = sampling.condition_weights([guidance], device)
    images = []
    for _, unet in rows:
        for i, embed in enumerate(embeds):
            conditions = torch.stack([torch.zeros_like(embed), embed])
            with autocast():
                latents = sampling.plms(sampling.guided_model(unet, conditions, weights),
                                        noise[i:i + 1].to(device), t)
            pixels = decode_latents(autoencoder, latents.float() * unet.autoencoder_scale)
            images.append(tensor_to_pil(pixels[0].float()))
    return make_grid(images, cols=len(prompts) if len(rows) > 1 else None)


def demo_caption(rows: list[tuple[str, torch.nn.Module]], prompts: list[str]) -> str:
    labels = " / ".join(label for label, _ in rows)
    layout = f"rows: {labels}; columns:" if len(rows) > 1 else "row by row:"
    return layout + "\n" + "\n".join(f"{i}: {p}" for i, p in enumerate(prompts))
