"""What a painting records: the parameters each PNG carries (its settings, resolved, and how it
was painted), and reading them back (`settings_from_png`) to paint the same picture again."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .. import sampling
from .._version import __version__
from ..errors import CCLDError
from ..settings import Settings

DISTILLATION_RECORDS = ("guidance_input", "guidance_range", "distilled_steps")
_HUB_CACHE_PATH = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\](.+)$")
_NAMED_BY_HASH = re.compile(r"[0-9a-f]{64}\.[a-z]+$")  # a release named by its sha256 (CLOOB's)
_ENDS = 1 << 20


def model_identity(source: str | os.PathLike) -> str:
    """What identifies a model in a picture's record, never where it lies on a machine: the hub
    repo and file of a Hugging Face cache download (`huggan/distill-ccld-wa/model_student.ckpt`),
    a release file named by its sha256 as it is, else the file's (or folder's) name and a short
    hash of its size and first and last MiB (`teacher.ckpt@3f2a9c1b0d4e`). A label that is no
    path (`taesd`) stays as it is; `tiny:PATH` becomes `tiny:` and the identity of PATH."""
    text = str(source)
    if text.startswith("tiny:"):
        return "tiny:" + model_identity(text[len("tiny:"):])
    hub_file = _HUB_CACHE_PATH.search(text.replace("\\", "/"))
    if hub_file:
        return f"{hub_file[1]}/{hub_file[2]}/{hub_file[3]}"
    path = Path(text)
    if _NAMED_BY_HASH.search(path.name):
        return path.name
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    try:
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(path) if path.is_dir() else ''}:{size}".encode())
            with open(file, "rb") as f:
                digest.update(f.read(_ENDS))
                if size > 2 * _ENDS:
                    f.seek(size - _ENDS)
                    digest.update(f.read(_ENDS))
    except OSError:
        return path.name or text  # (not a readable file: a label)
    return f"{path.name}@{digest.hexdigest()[:12]}"


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


def with_parameters(image, params: dict, index: int, batch: list[int] | None = None):
    """`image` carrying `params`, its place in its seed's run and, where it was painted in a
    batch of its run's pictures [first, count], that batch, as JSON in `info`."""
    image.info["parameters"] = json.dumps({**params, "index": index,
                                           **({"batch": batch} if batch else {})})
    return image


def settings_from_png(path: str | os.PathLike, **overrides) -> Settings:
    """The settings that painted a ccld PNG, for painting the same picture again (with the same
    models): one picture, at its place in its seed's run, and where it was painted in a batch
    of several, in that batch again (`Settings.picture`), so that it comes out pixel for pixel.
    `overrides` change single settings (by name, as the pipeline takes them); the picture is
    then painted alone."""
    from ..io.images import read_png_parameters

    params = read_png_parameters(path)
    if not params:
        raise CCLDError(f"{path}: a PNG without ccld's parameters; give a picture ccld painted")
    if params.get("interpolation"):
        raise CCLDError(f"{path}: a frame of `ccld interpolate`, whose condition is between its "
                        "prompts; paint the animation again with the prompts, frames and seeds "
                        "its 'interpolation' parameters record")
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
    if overrides:  # other settings paint another picture: alone
        return Settings.build(base=settings, **overrides)
    batch = params.get("batch")
    if (isinstance(batch, list) and len(batch) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in batch)):
        # painted in a batch of several: painted again in that batch (which alone rounds the
        # same), keeping this picture
        first, count = batch
        try:
            settings = settings.replace(index=first, num_images=count, picture=settings.index,
                                        batch_size=settings.batch_size or count)
        except CCLDError as e:
            raise CCLDError(f"{path}: its batch record {batch}: {e.template}") from None
    return settings
