"""Parameter grids (`ccld generate --xy`, as AUTOMATIC1111's X/Y plot): every combination of
the values of one or two settings, painted from the same seed, and one labelled grid of them.

An axis is `NAME=V1,V2,...`: NAME is any setting of `ccld.Settings` (as the Python API names it:
guidance, steps, method, seed, strength, ...) or `weight`, the weight of every text prompt.
Values are JSON where they read as JSON (numbers, true/false), else text (a sampler's name, a
prompt). Every combination is checked before anything is painted, and combinations that may
share batches do (`CCLDPipeline.iter_many`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass

from ..errors import CCLDError
from ..limits import XY_VALUES
from ..settings import FIELDS, Settings

WEIGHT_AXIS = "weight"  # the weight of every text prompt
LABEL_HEIGHT = 24  # pixels of the band that names each column, and of each row's label line


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple

    def label(self, value) -> str:
        return f"{self.name}={value:g}" if isinstance(value, float) else f"{self.name}={value}"


def _value(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (bool, int, float)) else text


def parse_axis(text: str) -> Axis:
    """An axis from `NAME=V1,V2,...`; a CCLDError naming what is wrong."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    settable = sorted(n for n in FIELDS if n not in ("num_images", "picture", "index"))
    if not sep or not values.strip():
        raise CCLDError(f"--xy {text!r}: write an axis as NAME=V1,V2,... (e.g. guidance=1,3,5)")
    if name != WEIGHT_AXIS and name not in settable:
        raise CCLDError(f"--xy {text!r}: {name!r} is not a setting; choose from "
                        f"{', '.join([WEIGHT_AXIS, *settable])}")
    items = [item.strip() for item in values.split(",")]
    if "" in items:
        raise CCLDError(f"--xy {text!r}: an empty value; separate values by single commas")
    XY_VALUES.check(f"--xy {name}: the number of values", len(items))
    return Axis(name, tuple(_value(item) for item in items))


def parse_axes(texts) -> list[Axis]:
    axes = [parse_axis(text) for text in texts]
    if len(axes) == 2 and axes[0].name == axes[1].name:
        raise CCLDError(f"--xy names {axes[0].name!r} twice; give two different settings")
    return axes


def _with(settings: Settings, axis: Axis, value) -> Settings:
    if axis.name == WEIGHT_AXIS:
        if not settings.prompts:
            raise CCLDError("--xy weight=...: the weight of the text prompts, but there are none; "
                            "give a prompt")
        prompts = tuple(dataclasses.replace(p, weight=value) for p in settings.prompts)
        return Settings.build(base=settings, prompts=prompts)
    return Settings.build(base=settings, **{axis.name: value})


def combinations(settings: Settings, axes: list[Axis]) -> list[Settings]:
    """The settings of every cell, row by row (the first axis across, the second down)."""
    columns = axes[0].values
    rows = axes[1].values if len(axes) > 1 else (None,)
    cells = []
    for row, column in itertools.product(rows, columns):
        try:
            cell = _with(settings, axes[0], column)
            if len(axes) > 1:
                cell = _with(cell, axes[1], row)
        except CCLDError as e:
            where = axes[0].label(column) + ("" if len(axes) == 1 else f", {axes[1].label(row)}")
            raise CCLDError(f"--xy cell {where}: {e.template}") from None
        cells.append(cell)
    return cells


def labelled_grid(images: list, axes: list[Axis]):
    """The cells' pictures in a grid, the first axis's values over the columns and the second's
    beside the rows, drawn with Pillow's own font."""
    from PIL import Image, ImageDraw, ImageFont

    columns, rows = len(axes[0].values), len(images) // len(axes[0].values)
    width, height = images[0].size
    font = ImageFont.load_default(size=14)
    row_labels = [axes[1].label(v) for v in axes[1].values] if len(axes) > 1 else []
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([int(draw.textlength(text, font=font)) + 12 for text in row_labels], default=0)
    grid = Image.new("RGB", (left + columns * width, LABEL_HEIGHT + rows * height), "white")
    draw = ImageDraw.Draw(grid)
    def centred(text, x, y):  # by its box: a bitmap font (Pillow without FreeType) has no anchors
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((x - (box[2] - box[0]) // 2, y - (box[3] - box[1]) // 2 - box[1]), text,
                  fill="black", font=font)

    for i, value in enumerate(axes[0].values):
        centred(axes[0].label(value), left + i * width + width // 2, LABEL_HEIGHT // 2)
    for j, text in enumerate(row_labels):
        box = draw.textbbox((0, 0), text, font=font)
        centred(text, 6 + (box[2] - box[0]) // 2, LABEL_HEIGHT + j * height + height // 2)
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), (left + (k % columns) * width,
                                          LABEL_HEIGHT + (k // columns) * height))
    return grid


def grid_parameters(first_picture, axes: list[Axis]) -> dict:
    """What a grid PNG records: its first picture's parameters, and the axes."""
    return {**json.loads(first_picture.info["parameters"]), "grid": True,
            "xy": [[axis.name, list(axis.values)] for axis in axes]}
