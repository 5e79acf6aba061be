"""ccld: CLOOB-conditioned latent diffusion, from text and image prompts to paintings."""

__version__ = "0.1.0"
