"""ccld: CLOOB-conditioned latent diffusion, from text and image prompts to paintings."""

from ._version import __version__
from .errors import CCLDError
from .pipeline import CCLDPipeline

__all__ = ["CCLDPipeline", "CCLDError", "__version__"]
