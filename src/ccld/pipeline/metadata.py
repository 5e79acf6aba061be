"""What a painting records: the parameters each PNG carries (its settings, resolved, and how it
was painted), and reading them back (`settings_from_png`) to paint the same picture again."""

from __future__ import annotations

import json
import os

from .. import sampling
from .._version import __version__
from ..errors import CCLDError
from ..settings import Settings

DISTILLATION_RECORDS = ("guidance_input", "guidance_range", "distilled_steps")


def describe(pipe, settings: Settings) -> dict:
    """Everything needed to paint the same pictures again (resolved settings), and how they were
    painted: precision and layout, decoder, models, ccld's version; for a distilled student also
    `distilled` (the guidance it gave in one row, or None, and its rows per image per step)."""
    params = settings.to_dict()
    params.update(precision=pipe.precision, channels_last=pipe.channels_last,
                  decoder=pipe.decoder_name(settings.full_decoder), models=pipe.sources,
                  ccld_version=__version__)
    unet_config = pipe.unet.config
    if any(k in unet_config for k in DISTILLATION_RECORDS[1:]):
        one_row = sampling.one_row_guidance(pipe.unet.distilled_guidance, settings.weights)
        params["distilled"] = {
            "unet": {k: unet_config[k] for k in DISTILLATION_RECORDS if k in unet_config},
            "one_row_guidance": one_row,
            "rows_per_image": 1 if one_row is not None
            else 1 + len(settings.prompts) + len(settings.image_prompts)}
    return params


def with_parameters(image, params: dict, index: int):
    """`image` carrying `params` and its place in its seed's run, as JSON in `info`."""
    image.info["parameters"] = json.dumps({**params, "index": index})
    return image


def settings_from_png(path: str | os.PathLike, **overrides) -> Settings:
    """The settings that painted a ccld PNG, for painting the same picture again (with the same
    models): one picture, at its place in its seed's run. `overrides` change single settings
    (by name, as the pipeline takes them)."""
    from ..io.images import read_png_parameters

    params = read_png_parameters(path)
    if not params:
        raise CCLDError(f"{path}: a PNG without ccld's parameters; give a picture ccld painted")
    if params.get("grid"):
        raise CCLDError(f"{path}: a grid of several pictures; give the PNG of one of them")
    try:
        settings = Settings.from_dict(params, records=True)
    except CCLDError as e:
        raise CCLDError(f"{path}: {e.template}") from None
    settings = settings.replace(num_images=1)
    if settings.eta and settings.batch_size is None:
        # a stochastic sampler's picture depends on its batch: the run's whole
        settings = settings.replace(batch_size=min(int(params.get("num_images", 1)), 32))
    return Settings.build(base=settings, **overrides) if overrides else settings
