"""The settings of a painting: one schema that every front-end builds and the pipeline takes.

A `Settings` holds everything that shapes a painting: the prompts and their weights, the image
prompts, the init image, its strength and an inpainting mask, the sampler (method, steps, eta),
the guidance, the seed and which pictures of its run, the size, a variation, the decoding
(latent scale, decoder), the batch size (which shapes a stochastic sampler's pictures) and the
precision. Creating one validates every field against `ccld.limits` (finite, in range, of the
right type; numpy and torch scalars count as numbers), and `to_dict`/`from_dict` are the one
conversion to and from the JSON that PNG parameters, manifests and prompt-file rows hold. The
CLI, the Python API, prompt files and the web form all build one; the pipeline's internals take
it, not its fields.

Settings left as None are the model's own (`resolved`): a distilled student brings its sampler,
steps and guidance, and a prompt without a weight is weighted by the guidance.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import limits
from .errors import CCLDError, arg, give
from .prompts import parse_weighted

DEFAULT_METHOD = "unipc"  # the fastest setting of the solver table no worse than the demo's plms-15
DEFAULT_STEPS = 11
DEFAULT_GUIDANCE = 3.0
DEFAULT_STRENGTH = 0.6  # how far image to image noises the init image (1: ignore it)
DEFAULT_SIZE = 256  # pixels; the size the published models were trained at
DEFAULT_HIRES_STRENGTH = 0.5  # how far the hires refinement noises the upscaled picture
UPSCALERS = ("pixels", "latents")  # how hires upscales: the decoded picture, or the latents
DEFAULT_UPSCALE = "pixels"
DEFAULT_VARIATION_STRENGTH = 0.25  # how far a variation moves from its seed's noise (1: all new)
# The reference demo's recipe (`--reference`): plms, 15 steps, contiguous float32.
REFERENCE_METHOD = "plms"
REFERENCE_STEPS = 15
REFERENCE_PRECISION = "fp32"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# What a prompt-file row may call a setting, as the CLI option does
ALIASES = {"n": "num_images"}
# Keys of PNG parameters that record how a picture was painted, not what to paint: read back
# by nobody (`from_dict` skips them)
RECORDS = frozenset({"grid", "xy", "interpolation", "models", "ccld_version", "distilled",
                     "decoder", "batch"})


@dataclass(frozen=True)
class Prompt:
    """A text or an image prompt with its guidance weight (negative steers away; None: the
    painting's guidance)."""
    value: object  # str for text; a path, PIL image or [3,H,W] tensor in [0,1] for images
    weight: float | None = None
    label: str = ""  # how PNGs name it: the text, the path, or an upload's file name


@dataclass(frozen=True)
class InitImage:
    """The picture image to image starts from, and how PNGs name it."""
    value: object  # a path, a PIL image or a [3,H,W] tensor in [0,1]
    label: str = "image"


def _doc(text: str, limit: limits.Limit | None = None) -> dict:
    return {"doc": text, "limit": limit}


@dataclass(frozen=True)
class Settings:
    """Every setting of a painting, validated on creation (a `CCLDError` naming the setting)."""

    prompts: tuple[Prompt, ...] = field(default=(), metadata=_doc(
        "text prompts: TEXT[:WEIGHT] strings or (TEXT, WEIGHT) pairs; they mix"))
    image_prompts: tuple[Prompt, ...] = field(default=(), metadata=_doc(
        "image prompts: PATH[:WEIGHT], (image, WEIGHT) pairs, PIL images or tensors"))
    init_image: InitImage | None = field(default=None, metadata=_doc(
        "image to image: the picture to start from (a path, a PIL image or a tensor)"))
    strength: float | None = field(default=None, metadata=_doc(
        f"how far to noise the init image (default {DEFAULT_STRENGTH})", limits.STRENGTH))
    mask: InitImage | None = field(default=None, metadata=_doc(
        "inpainting: repaint the white part of this mask image (scaled to the picture) and keep "
        "the rest of the init image exactly"))
    mask_blur: int | None = field(default=None, metadata=_doc(
        "feather the mask's edge by this many pixels (default 0: a hard edge)",
        limits.MASK_BLUR))
    method: str | None = field(default=None, metadata=_doc(
        f"the sampler (default {DEFAULT_METHOD}, or a distilled student's own)"))
    steps: int | None = field(default=None, metadata=_doc(
        f"sampling steps (default {DEFAULT_STEPS}, or a distilled student's own)", limits.STEPS))
    eta: float = field(default=0.0, metadata=_doc("DDIM noise (0: deterministic)", limits.ETA))
    guidance: float | None = field(default=None, metadata=_doc(
        f"the weight of prompts given without one (default {DEFAULT_GUIDANCE:g})", limits.WEIGHT))
    seed: int = field(default=0, metadata=_doc("the seed of the starting noise", limits.SEED))
    index: int = field(default=0, metadata=_doc(
        "the first picture's place in its seed's run (0: the run's first picture)",
        limits.VARIATION_INDEX))
    num_images: int = field(default=1, metadata=_doc("how many pictures", limits.IMAGES_PER_RUN))
    picture: int | None = field(default=None, metadata=_doc(
        "paint only this picture of the run (its place in the seed's run), in one batch with the "
        "others: how a picture painted in a batch of several is painted again exactly",
        limits.VARIATION_INDEX))
    batch_size: int | None = field(default=None, metadata=_doc(
        "pictures sampled at once (a stochastic sampler's pictures depend on it)",
        limits.IMAGES_PER_CALL))
    width: int = field(default=DEFAULT_SIZE, metadata=_doc("width in pixels", limits.SIZE))
    height: int = field(default=DEFAULT_SIZE, metadata=_doc("height in pixels", limits.SIZE))
    variation_of: int | None = field(default=None, metadata=_doc(
        "paint variations of the picture this seed painted", limits.SEED))
    variation_index: int | None = field(default=None, metadata=_doc(
        "which picture of that seed's run (default 0)", limits.VARIATION_INDEX))
    variation_strength: float | None = field(default=None, metadata=_doc(
        f"how far from it (default {DEFAULT_VARIATION_STRENGTH:g}; 0 paints it again)",
        limits.VARIATION_STRENGTH))
    hires: tuple[int, int] | None = field(default=None, metadata=_doc(
        "a larger picture, (width, height) or \"WxH\": painted at width x height, upscaled, then "
        "refined at this size by image to image"))
    hires_strength: float | None = field(default=None, metadata=_doc(
        f"how far the refinement noises the upscaled picture (default {DEFAULT_HIRES_STRENGTH})",
        limits.STRENGTH))
    hires_steps: int | None = field(default=None, metadata=_doc(
        "sampling steps of the refinement (default: steps)", limits.STEPS))
    hires_upscale: str | None = field(default=None, metadata=_doc(
        f"how the first stage is upscaled: {' or '.join(UPSCALERS)} (default {DEFAULT_UPSCALE})"))
    latent_scale: float | None = field(default=None, metadata=_doc(
        "the decoding scale (default: the model's)", limits.LATENT_SCALE))
    full_decoder: bool = field(default=False, metadata=_doc(
        "decode with the KL decoder even where the pipeline has a tiny one"))
    precision: str | None = field(default=None, metadata=_doc(
        f"arithmetic: {', '.join(PRECISIONS)} (default: the pipeline's)"))
    channels_last: bool | None = field(default=None, metadata=_doc(
        "convolutions laid out channels-last (default: the precision's own layout, channels-last "
        "except in an explicit fp32, which keeps the reference's contiguous one bit for bit)"))

    def __post_init__(self):
        # numbers first, the cheapest checks, then the prompts and images (which look at files)
        for f in sorted(fields(self), key=lambda f: f.name in _LOOKS_AT_FILES):
            check = _CHECKS.get(f.name)
            value = getattr(self, f.name)
            if check is not None:
                value = check(f.name, value)
            elif f.metadata.get("limit") is not None:
                value = number(arg(f.name), value, f.metadata["limit"])
            object.__setattr__(self, f.name, value)
        self._check_together()

    def _check_together(self) -> None:
        """The rules that tie settings together, the same for every front-end."""
        if self.strength is not None and self.init_image is None:
            raise CCLDError(f"{arg('strength')} is how far to noise an init image; give "
                            f"{give('init_image', 'PATH')} too, or leave {arg('strength')} out")
        if self.mask is not None and self.init_image is None:
            raise CCLDError(f"{arg('mask')} marks what to repaint of an init image, so it needs "
                            f"one: {give('init_image', 'PATH')}, or leave {arg('mask')} out")
        if self.mask_blur is not None and self.mask is None:
            raise CCLDError(f"{arg('mask_blur')} feathers an inpainting mask; give "
                            f"{give('mask', 'PATH')} too, or leave {arg('mask_blur')} out")
        if self.hires is None:
            for name in ("hires_strength", "hires_steps", "hires_upscale"):
                if getattr(self, name) is not None:
                    raise CCLDError(f"{arg(name)} shapes the refinement of a larger picture; give "
                                    f"{give('hires', 'WxH')} too, or leave {arg(name)} out")
        elif self.hires[0] < self.width or self.hires[1] < self.height or self.hires == (
                self.width, self.height):
            raise CCLDError(f"{arg('hires')} {self.hires[0]}x{self.hires[1]} is not larger than the "
                            f"picture ({self.width}x{self.height}) it refines; give a larger size, "
                            f"or a smaller {arg('width')} and {arg('height')}")
        elif self.mask is not None:
            raise CCLDError(f"{arg('hires')} and {arg('mask')} do not go together yet; inpaint at "
                            "the picture's size, then paint it larger")
        if self.variation_of is None:
            for name in ("variation_index", "variation_strength"):
                if getattr(self, name) is not None:
                    raise CCLDError(f"{arg(name)} needs {give('variation_of', 'SEED')}, the seed "
                                    "of the picture to vary")
        if self.picture is not None and self.num_images > limits.IMAGES_PER_CALL.high:
            raise CCLDError(f"{arg('picture')} paints its run in one batch, which holds at most "
                            f"{limits.IMAGES_PER_CALL.high} pictures; give {give('num_images')} "
                            f"up to that, or leave {arg('picture')} out")
        if self.picture is not None and not (
                self.index <= self.picture < self.index + self.num_images):
            raise CCLDError(f"{arg('picture')} {self.picture} is not one of the run's pictures "
                            f"({self.index} to {self.index + self.num_images - 1}); give a "
                            f"place from {arg('index')} to {arg('index')} + {arg('num_images')} - 1")
        if not (self.prompts or self.image_prompts or self.init_image is not None):
            raise CCLDError(f"nothing to paint from; give a prompt ({give('prompts')}), an image "
                            f"prompt ({give('image_prompts', 'PATH')}) or an init image "
                            f"({give('init_image', 'PATH')})")

    # Building and changing

    @classmethod
    def build(cls, prompts=None, image_prompts=None, *, base: Settings | None = None,
              size=None, **options) -> Settings:
        """Settings from the Python API's keyword arguments: every field by name, and `size`
        for a square picture (width and height both); `base`'s settings where none is given.
        An unknown name is a CCLDError listing the settings."""
        unknown = [name for name in options if name not in FIELDS]
        if unknown:
            raise CCLDError(f"unknown setting {unknown[0]!r}; the settings are "
                            f"{', '.join(FIELDS)} (and size for both width and height)")
        if size is not None or "width" in options or "height" in options:
            options["height"], options["width"] = picture_size(
                size, options.pop("height", None), options.pop("width", None),
                default=None if base is None else (base.height, base.width))
        if prompts is not None:
            options["prompts"] = prompts
        if image_prompts is not None:
            options["image_prompts"] = image_prompts
        if base is not None:
            return dataclasses.replace(base, **options)
        return cls(**options)

    def replace(self, **changes) -> Settings:
        """A copy with some settings changed, validated again."""
        return dataclasses.replace(self, **changes)

    def resolved(self, defaults: dict) -> Settings:
        """The settings with everything left to the model filled in: `defaults` gives the
        model's method, steps and guidance (see `ccld.pipeline.sampling_defaults`); prompts
        without a weight get the guidance; the init image's strength and a variation's index
        and strength get their defaults; eta is what the sampler runs at."""
        from . import sampling

        guidance = defaults["guidance"] if self.guidance is None else self.guidance
        method = defaults["method"] if self.method is None else self.method
        sampler = sampling.get_sampler(method)

        def weighted(prompts):
            return tuple(p if p.weight is not None else dataclasses.replace(p, weight=guidance)
                         for p in prompts)

        changes = dict(method=method, guidance=guidance,
                       steps=defaults["steps"] if self.steps is None else self.steps,
                       prompts=weighted(self.prompts), image_prompts=weighted(self.image_prompts),
                       eta=sampler.eta(self.eta))
        if self.init_image is not None and self.strength is None:
            changes["strength"] = DEFAULT_STRENGTH
        if self.mask is not None and self.mask_blur is None:
            changes["mask_blur"] = 0
        if self.hires is not None:
            changes.update(
                hires_steps=changes["steps"] if self.hires_steps is None else self.hires_steps,
                hires_strength=(DEFAULT_HIRES_STRENGTH if self.hires_strength is None
                                else self.hires_strength),
                hires_upscale=self.hires_upscale or DEFAULT_UPSCALE)
        if self.variation_of is not None:
            changes["variation_index"] = self.variation_index or 0
            if self.variation_strength is None:
                changes["variation_strength"] = DEFAULT_VARIATION_STRENGTH
        return self.replace(**changes)

    @property
    def weights(self) -> list[float | None]:
        """The weights of the prompts, then of the image prompts."""
        return [p.weight for p in (*self.prompts, *self.image_prompts)]

    @property
    def wanted(self) -> range:
        """The pictures to keep, 0 being the run's first."""
        if self.picture is None:
            return range(self.num_images)
        return range(self.picture - self.index, self.picture - self.index + 1)

    # JSON: PNG parameters, manifests, prompt-file rows

    def to_dict(self) -> dict:
        """The settings as JSON values, as PNG parameters and manifests hold them: prompts as
        [text, weight] pairs, image prompts and the init image by their labels; settings left
        at None or at no effect are left out."""
        out = {"prompts": [[p.value, p.weight] for p in self.prompts],
               "image_prompts": [[p.label, p.weight] for p in self.image_prompts],
               "num_images": self.num_images, "seed": self.seed}
        if self.index:
            out["index"] = self.index
        for name in ("steps", "method", "guidance"):
            out[name] = getattr(self, name)
        out.update(width=self.width, height=self.height)
        if self.latent_scale is not None:
            out["latent_scale"] = self.latent_scale
        if self.eta or _stochastic(self.method):
            out["eta"] = self.eta
        if self.init_image is not None:
            out["init_image"] = self.init_image.label
            out["strength"] = self.strength
        if self.mask is not None:
            out.update(mask=self.mask.label, mask_blur=self.mask_blur)
        if self.hires is not None:
            out.update(hires=list(self.hires), hires_strength=self.hires_strength,
                       hires_steps=self.hires_steps, hires_upscale=self.hires_upscale)
        if self.variation_of is not None:
            out.update(variation_of=self.variation_of, variation_index=self.variation_index,
                       variation_strength=self.variation_strength)
        if self.eta and self.batch_size is not None:  # a stochastic sampler's pictures depend on it
            out["batch_size"] = self.batch_size
        if self.precision is not None:
            out["precision"] = self.precision
        if self.channels_last is not None:
            out["channels_last"] = self.channels_last
        if self.full_decoder:
            out["decoder"] = "full"
        return out

    @classmethod
    def from_dict(cls, values: dict, *, records: bool = False) -> Settings:
        """Settings from `to_dict`'s JSON (a PNG's parameters, a manifest's): see
        `options_from_dict`."""
        return cls.build(**options_from_dict(values, records=records))


FIELDS = {f.name: f for f in fields(Settings)}


def options_from_dict(values: dict, *, records: bool = False, not_allowed=(),
                      who: str = "the settings are") -> dict:
    """The keyword arguments of `Settings.build` that JSON settings give (a prompt-file row, a
    PNG's parameters): prompts as "TEXT[:WEIGHT]" strings or [TEXT, WEIGHT] pairs, image prompts
    and the init image as paths, `n` for num_images and `size` for width and height. An unknown
    key is a CCLDError naming it, unless `records` (PNG parameters, which also record how the
    picture was painted; see RECORDS), where those keys are skipped; a PNG's "decoder": "full"
    is `full_decoder`. Keys in `not_allowed` are refused too (a row may not set the run's batch
    size)."""
    if not isinstance(values, dict):
        raise CCLDError(f"a JSON {type(values).__name__}, not an object of settings; write "
                        'e.g. {"prompts": ["a castle"], "seed": 3}')
    known = {*FIELDS, "size"} - set(not_allowed)
    options = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if records and key in RECORDS:
            if key == "decoder" and value == "full":
                options["full_decoder"] = True
            continue
        if name not in known:
            allowed = sorted(n for n in (*known, *ALIASES) if ALIASES.get(n, n) in known)
            raise CCLDError(f"unknown key {key!r}; {who} {', '.join(allowed)}")
        if name in options:
            raise CCLDError(f"{key!r} repeats another key's setting; give it once")
        options[name] = value
    for name in ("prompts", "image_prompts"):
        if name in options:
            options[name] = _json_prompts(name, options[name])
    for name in ("init_image", "mask"):
        if isinstance(options.get(name), str):
            options[name] = InitImage(options[name], options[name])
    return options


def check_options(options: dict) -> None:
    """Checks settings given by name one by one (what a front-end can check before it knows
    the rest of a painting's settings, e.g. the command's options before a prompt file's rows)."""
    for name, value in sorted(options.items(), key=lambda item: item[0] in _LOOKS_AT_FILES):
        if name == "size":
            picture_size(value)
            continue
        check = _CHECKS.get(name)
        if check is not None:
            check(name, value)
        elif FIELDS[name].metadata.get("limit") is not None:
            number(arg(name), value, FIELDS[name].metadata["limit"])


def picture_size(size=None, height=None, width=None, default=None) -> tuple[int, int]:
    """(height, width) in pixels, checked: `height` and `width`, else `size` for both (the
    square alias), else `default` (height, width), else DEFAULT_SIZE."""
    if size is not None:
        size = number(arg("size"), size, limits.SIZE)
        if (height is not None and height != size) or (width is not None and width != size):
            raise CCLDError(f"size={size} disagrees with height={height}, width={width}; give "
                            "size for a square picture, or height and width")
        height = width = size
    default_height, default_width = default or (DEFAULT_SIZE, DEFAULT_SIZE)
    return (number(arg("height"), default_height if height is None else height, limits.SIZE),
            number(arg("width"), default_width if width is None else width, limits.SIZE))


def _stochastic(method: str | None) -> bool:
    if method is None:
        return False
    from . import sampling

    return method in sampling.SAMPLERS and sampling.SAMPLERS[method].stochastic


# Checking one value


def _is_tensor(value) -> bool:
    return type(value).__module__.partition(".")[0] == "torch" and hasattr(value, "ndim")


def _is_pil_image(value) -> bool:
    return type(value).__module__.partition(".")[0] == "PIL" and hasattr(value, "convert")


def _kind(value) -> str:
    """'an int', 'a str', ...: what a value is, for a message."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def number(named: str, value, limit: limits.Limit, optional: bool = True):
    """`value` as a plain int or float within `limit`, or None if `optional`; numpy and torch
    scalars are numbers, text and booleans are not. `named`: the value's name in messages
    (`arg(field)` for a setting)."""
    if value is None:
        if optional:
            return None
        raise CCLDError(f"{named} is missing; give {limit.range_text()}")
    if _is_tensor(value) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CCLDError(f"{named} must be {limit.range_text()}, not a "
                        f"{type(value).__name__} (got {_shown(value)}); {limit.fix}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    return limit.check(named, value)


def _required_number(limit: limits.Limit):
    return lambda name, value: number(arg(name), value, limit, optional=False)


def _method(name: str, value):
    if value is None:
        return None
    if not isinstance(value, str):
        raise CCLDError(f"{arg(name)} must be a sampler's name, not {_kind(value)} "
                        f"(got {_shown(value)})")
    from . import sampling

    sampling.get_sampler(value)  # the registry names the choices
    return value


def _flag(name: str, value):
    if not isinstance(value, bool):
        raise CCLDError(f"{arg(name)} must be true or false (got {_shown(value)})")
    return value


def _optional_flag(name: str, value):
    return None if value is None else _flag(name, value)


def _precision(name: str, value):
    if value is not None and value not in PRECISIONS:
        raise CCLDError(f"unknown precision {value!r}; choose from {', '.join(PRECISIONS)}")
    return value


def _image_value(name: str, value, what: str):
    """A path of an existing file, a PIL image or a [3,H,W] tensor; else a CCLDError."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            where = "is a folder, not an image file" if path.is_dir() else "no such image file"
            raise CCLDError(f"{what} {os.fspath(value)!r}: {where}; check the path")
        return os.fspath(value)
    if _is_pil_image(value):
        return value
    if _is_tensor(value):
        if value.ndim not in (3, 4) or value.shape[-3] != 3 or (value.ndim == 4 and value.shape[0] != 1):
            raise CCLDError(f"{arg(name)}: a tensor of shape {list(value.shape)}; give one image "
                            "[3, H, W] with values in [0, 1]")
        return value
    raise CCLDError(f"{arg(name)} {'holds' if name == 'image_prompts' else 'is'} {_shown(value)}; "
                    f"give an image ({_kind(value)} is none): a path, a PIL image or a "
                    "[3, H, W] tensor in [0, 1]")


def _weight(name: str, label: str, weight):
    if weight is None:
        return None
    return float(number(f"the weight of {name[:-1].replace('_', ' ')} {label!r}", weight,
                        limits.WEIGHT))


def _prompts(name: str, value) -> tuple[Prompt, ...]:
    """The forms a prompt list takes in Python: one prompt or a list of them, each a
    "TEXT:WEIGHT" string, a (value, weight) pair or a `Prompt` (image prompts: also a path,
    a PIL image or a tensor)."""
    images = name == "image_prompts"
    what = "image prompt" if images else "prompt"
    single = (isinstance(value, (str, os.PathLike, Prompt)) or _is_pil_image(value)
              or _is_tensor(value)
              or (isinstance(value, tuple) and len(value) == 2 and not isinstance(value[1], bool)
                  and (isinstance(value[1], numbers.Real) or _is_tensor(value[1]))))
    if single:
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise CCLDError(f"{arg(name)} must be a {what} or a list of them (got {_shown(value)}, "
                        f"{_kind(value)}); give \"TEXT[:WEIGHT]\" strings or "
                        "(TEXT, WEIGHT) pairs")
    if len(value) > limits.PROMPTS.high:
        raise CCLDError(f"{len(value)} {what}s: more than the {limits.PROMPTS.high} a painting "
                        f"mixes; {limits.PROMPTS.fix}")
    return tuple(_prompt(name, what, item) for item in value)


def _prompt(name: str, what: str, item) -> Prompt:
    images = name == "image_prompts"
    if isinstance(item, Prompt):
        value, weight, label = item.value, item.weight, item.label
    elif isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise CCLDError(f"{arg(name)} holds {_shown(item)}; a {what} with its weight is a "
                            "(value, weight) pair")
        value, weight = item
        label = os.fspath(value) if isinstance(value, (str, os.PathLike)) else what
    elif isinstance(item, str) or (images and isinstance(item, os.PathLike)):
        value, weight = parse_weighted(os.fspath(item), None, what, is_path=images)
        label = value
    elif images and (_is_pil_image(item) or _is_tensor(item)):
        value, weight, label = item, None, what
    else:
        raise CCLDError(f"{arg(name)} holds {_shown(item)}, {_kind(item)}; give "
                        f"\"TEXT[:WEIGHT]\" strings or (TEXT, WEIGHT) pairs")
    if images:
        value = _image_value(name, value, what)
    elif not isinstance(value, str):
        raise CCLDError(f"{arg(name)} holds {_shown(value)}, {_kind(value)}, as a "
                        "prompt's text; give a string")
    elif not value.strip():
        raise CCLDError(f"{arg(name)} holds an empty prompt; write the words to paint from")
    elif len(value) > limits.PROMPT_CHARS.high:
        raise CCLDError(f"a prompt of {len(value)} characters, more than "
                        f"{limits.PROMPT_CHARS.high}; {limits.PROMPT_CHARS.fix}")
    return Prompt(value, _weight(name, label or what, weight), str(label or what))


def _json_prompts(name: str, value):
    """A JSON prompt list: "TEXT[:WEIGHT]" strings and [TEXT, WEIGHT] pairs."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise CCLDError(f"{arg(name)} is {_shown(value)}; give a string or a list of them")
    out = []
    for item in value:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
            out.append(tuple(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise CCLDError(f"{arg(name)} holds {_shown(item)}; give \"TEXT[:WEIGHT]\" strings "
                            "or [TEXT, WEIGHT] pairs")
    return out


def _init_image(name: str, value):
    """An init image or a mask: a path, PIL image or tensor, and how PNGs name it."""
    if value is None:
        return None
    if isinstance(value, InitImage):
        value, label = value.value, value.label
    else:
        label = (os.fspath(value) if isinstance(value, (str, os.PathLike))
                 else "mask" if name == "mask" else "image")
    return InitImage(_image_value(name, value, name.replace("_", " ")), label)


def _hires(name: str, value):
    """A larger size: "WxH", a number (a square), or a (width, height) pair."""
    if value is None:
        return None
    if isinstance(value, str):
        width, sep, height = value.lower().partition("x")
        if not sep:
            raise CCLDError(f"{arg(name)} {value!r}: write the size as WxH, e.g. 512x512")
        value = (width.strip(), height.strip())
    elif not isinstance(value, (tuple, list)):
        value = (value, value)
    if len(value) != 2:
        raise CCLDError(f"{arg(name)} must be a (width, height) pair (got {_shown(value)})")
    sizes = [int(v) if isinstance(v, str) and v.isdigit() else v for v in value]
    return tuple(number(f"the width and height of {arg(name)}", v, limits.SIZE, optional=False)
                 for v in sizes)


def _upscale(name: str, value):
    if value is not None and value not in UPSCALERS:
        raise CCLDError(f"unknown {arg(name)} {_shown(value)}; choose from {', '.join(UPSCALERS)}")
    return value


_LOOKS_AT_FILES = ("prompts", "image_prompts", "init_image", "mask")
_CHECKS = {
    "prompts": _prompts, "image_prompts": _prompts, "init_image": _init_image,
    "mask": _init_image, "hires": _hires, "hires_upscale": _upscale,
    "method": _method, "full_decoder": _flag, "precision": _precision,
    "channels_last": _optional_flag,
    "eta": _required_number(limits.ETA), "seed": _required_number(limits.SEED),
    "index": _required_number(limits.VARIATION_INDEX),
    "num_images": _required_number(limits.IMAGES_PER_RUN),
    "width": _required_number(limits.SIZE), "height": _required_number(limits.SIZE),
}

