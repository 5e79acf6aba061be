"""The pipeline in parts: `CCLDPipeline` (pipeline.py) paints through conditioning (prompts and
the init image), noise (the seed's starting noise), painting (the one sampling path: guide,
sample, decode), scheduling (many pictures and paintings in batches) and metadata (what each PNG
records); loading and precision lay the models out."""

from ..settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_METHOD,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_VARIATION_STRENGTH,
    PRECISIONS,
    REFERENCE_METHOD,
    REFERENCE_PRECISION,
    REFERENCE_STEPS,
    InitImage,
    Prompt,
    Settings,
    picture_size,
)
from .loading import MODEL_INDEX
from .noise import next_noise, seed_noise, slerp
from .painting import sampling_defaults
from .pipeline import PREVIEW_EVERY, CCLDPipeline
from .precision import REDUCED_DTYPES, fast_bf16_cpu, resolve_precision

__all__ = [
    "CCLDPipeline", "DEFAULT_GUIDANCE", "DEFAULT_METHOD", "DEFAULT_SIZE", "DEFAULT_STEPS",
    "DEFAULT_STRENGTH", "DEFAULT_VARIATION_STRENGTH", "InitImage", "MODEL_INDEX", "PRECISIONS",
    "PREVIEW_EVERY", "Prompt", "REDUCED_DTYPES", "REFERENCE_METHOD", "REFERENCE_PRECISION",
    "REFERENCE_STEPS", "Settings", "fast_bf16_cpu", "next_noise", "picture_size",
    "resolve_precision", "sampling_defaults", "seed_noise", "slerp",
]
