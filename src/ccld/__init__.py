"""ccld: CLOOB-conditioned latent diffusion, from text and image prompts to paintings."""

__version__ = "0.1.0"

from .errors import CCLDError  # noqa: E402
from .pipeline import CCLDPipeline  # noqa: E402

__all__ = ["CCLDPipeline", "CCLDError", "__version__"]
