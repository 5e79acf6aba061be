"""ccld: CLOOB-conditioned latent diffusion, from text and image prompts to paintings."""

from ._version import __version__
from .errors import CCLDError
from .settings import Settings

__all__ = ["CCLDPipeline", "CCLDError", "Settings", "__version__"]


def __getattr__(name: str):
    # The pipeline (and torch, seconds to import) loads on first use, so that the `ccld` command
    # starts inside its own error handling, where Ctrl-C during start-up is a one-line message.
    if name == "CCLDPipeline":
        from .pipeline import CCLDPipeline

        return CCLDPipeline
    raise AttributeError(f"module 'ccld' has no attribute {name!r}")
