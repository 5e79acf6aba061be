"""`CCLDPipeline`: prompts in, paintings out, in the style of a diffusers pipeline.

    pipe = CCLDPipeline.from_pretrained()                  # the distilled WikiArt student
    images = pipe("a snowy landscape, oil on canvas", num_images=4, seed=0)

The three frozen parts are a CLOOB model (text and image prompts to one embedding space), the
conditioned U-Net (predicts v on 4x32x32 latents) and the KL-f8 autoencoder (latents to pixels).
With the same seed the initial noise is the reference demo's (`torch.manual_seed(seed);
torch.randn([n, 4, 32, 32])` on the CPU), so the same settings paint the same pictures.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, Union

import torch
from torch.nn import functional as F

from . import sampling
from ._version import __version__
from .errors import CCLDError, in_python_terms
from .io import checkpoints, hub
from .limits import (
    ETA,
    IMAGES_PER_CALL,
    IMAGES_PER_RUN,
    LATENT_SCALE,
    SEED,
    SIZE,
    STEPS,
    STRENGTH,
    VARIATION_INDEX,
    VARIATION_STRENGTH,
    WEIGHT,
)
from .models import float32_weights, held_dtype, hold_weights_in, release_held_weights
from .prompts import parse_weighted

if TYPE_CHECKING:
    from PIL import Image

# The default sampler: the fastest setting of the solver table whose error against a 500-step
# solution is no worse than the demo's plms-15 on random AND on trained weights: 11 guided
# forwards instead of 24 (benchmarks/bench_solvers.py; unipc-10 misses on the small trained
# model whatever its schedule).
DEFAULT_METHOD = "unipc"
DEFAULT_STEPS = 11
# The reference demo's recipe (`--reference`): plms, 15 steps, contiguous float32.
REFERENCE_METHOD = "plms"
REFERENCE_STEPS = 15
REFERENCE_PRECISION = "fp32"
DEFAULT_GUIDANCE = 3.0
DEFAULT_STRENGTH = 0.6  # how far image-to-image noises the init image (1: ignore it)
DEFAULT_SIZE = 256  # pixels; the size the published models were trained at
PREVIEW_EVERY = 2  # sampling steps between previews in the CLI and the web app (and the last)
DEFAULT_VARIATION_STRENGTH = 0.25  # how far a variation moves from its seed's noise (1: all new)
LATENT_CHANNELS = 4
DOWNSCALE = 8
MODEL_INDEX = "model_index.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
CLOOB_WEIGHTS = "model.safetensors"

PathLike = Union[str, os.PathLike]
ImageLike = Union[PathLike, "Image.Image", torch.Tensor]  # a path, PIL image or [3,H,W] in [0,1]
# one prompt: "text[:weight]" / "path[:weight]", (value, weight), a Prompt, or an image
PromptLike = Union[str, os.PathLike, tuple, "Prompt", "Image.Image", torch.Tensor]
PromptsLike = Union[PromptLike, Sequence[PromptLike], None]


@dataclass
class Prompt:
    """A text or an image prompt with its guidance weight (negative steers away)."""
    value: object  # str for text; a path, PIL image or [3,H,W] tensor in [0,1] for images
    weight: float = DEFAULT_GUIDANCE
    label: str = field(default="")


def as_prompts(items: PromptsLike, default_weight: float, what: str) -> list[Prompt]:
    """Prompts in any of the forms `CCLDPipeline.__call__` takes, as a list of `Prompt`s
    (a list of `Prompt`s comes back as it is)."""
    if items is None:
        return []
    single_pair = (isinstance(items, tuple) and len(items) == 2
                   and isinstance(items[1], (int, float)))
    if single_pair or isinstance(items, (str, os.PathLike, Prompt)) or not isinstance(items, Sequence):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, Prompt):
            WEIGHT.check(f"the weight of {what} {item.label!r}", item.weight)
            out.append(item)
        elif isinstance(item, tuple):
            value, weight = item
            label = str(value) if isinstance(value, (str, os.PathLike)) else what
            out.append(Prompt(value, float(WEIGHT.check(f"the weight of {what} {label!r}", weight)),
                              label))
        elif isinstance(item, (str, os.PathLike)) and what == "image prompt":
            path, weight = parse_weighted(str(item), default_weight, what, is_path=True)
            out.append(Prompt(path, weight, path))
        elif isinstance(item, str):
            text, weight = parse_weighted(item, default_weight, what)
            out.append(Prompt(text, weight, text))
        else:  # a PIL image or a tensor, at the default weight
            out.append(Prompt(item, float(default_weight), what))
    return out


FILE_ARGUMENTS = ("unet", "autoencoder", "autoencoder_config", "cloob", "cloob_config")


def _file_arguments_checked(method):
    """Decorates `from_files`: each file argument is a path or None (a CLOOB config may also be a
    dict); anything else is a CCLDError naming the argument, not a TypeError deep in a loader."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            is_path = value is None or isinstance(value, (str, os.PathLike))
            if name in FILE_ARGUMENTS and not is_path and not (
                    name == "cloob_config" and isinstance(value, dict)):
                raise CCLDError(f"{name}={value!r:.60}: not a file path but "
                                f"{type(value).__name__}; pass the path as a str or pathlib.Path")
        return method(*args, **kwargs)

    return wrapper


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REDUCED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _in_autocast(method):
    """Runs a pipeline method inside the pipeline's inference/autocast context."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.autocast():
            return method(self, *args, **kwargs)
    return wrapper


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) under which its kernels have no bf16
# arithmetic: set to one of these, a CPU with AVX512-BF16 or AMX runs as one without.
_ISAS_WITHOUT_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core",
                      "avx512_core_vnni"}


def fast_bf16_cpu() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AMX or AVX512-BF16), as oneDNN is
    allowed to use it.

    Elsewhere bf16 is emulated and many times slower than float32, so `auto` keeps float32.
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower() in _ISAS_WITHOUT_BF16:
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: fp16 on CUDA, bf16 on a CPU with native bf16, else the bit-faithful fp32."""
    if precision not in PRECISIONS:
        raise CCLDError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and fast_bf16_cpu():
        return "bf16"
    return "fp32"


def folder_unet_architecture(folder: Path, config: dict) -> dict:
    """The U-Net architecture a pipeline folder's unet/config.json records, checked."""
    def positive(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    wanted = {"base_channels": (positive, "a positive integer"),
              "embed_dim": (positive, "a positive integer"),
              "channel_multipliers": (lambda v: isinstance(v, list) and len(v) == 4
                                      and all(map(positive, v)), "a list of four positive integers")}
    architecture = {}
    for key, (fits, kind) in wanted.items():
        value = config.get(key) if isinstance(config, dict) else None
        if not fits(value):
            raise CCLDError(f"{folder}/unet/config.json: {key} is {value!r}, not {kind}; convert "
                            "the model again")
        architecture[key] = value
    # a distilled student's records (see ccld.models.unet), present only when it has them
    optional = {"guidance_input": (lambda v: v is True, "true"),
                "guidance_range": (lambda v: isinstance(v, list) and len(v) == 2 and all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) for w in v),
                    "a [low, high] pair of numbers"),
                "distilled_steps": (positive, "a positive integer")}
    for key, (fits, kind) in optional.items():
        if key in config:
            if not fits(config[key]):
                raise CCLDError(f"{folder}/unet/config.json: {key} is {config[key]!r}, not "
                                f"{kind}; convert the model again")
            architecture[key] = config[key]
    return architecture


def sampling_defaults(unet_config: dict) -> dict:
    """The method, steps and guidance a U-Net samples with unless a call says otherwise, and the
    U-Net rows each image costs per forward at that guidance.

    A plain model: DEFAULT_METHOD, DEFAULT_STEPS, DEFAULT_GUIDANCE, two rows (conditional and
    unconditional). A step-distilled student (`distilled_steps`): the `distilled` sampler at
    its own step count. A guidance-distilled one (`guidance_range`): DEFAULT_GUIDANCE brought
    into its range, in one row (see `CCLDPipeline.distilled_guidance`).
    """
    steps = unet_config.get("distilled_steps")
    method, steps = ("distilled", steps) if steps else (DEFAULT_METHOD, DEFAULT_STEPS)
    guidance, rows = DEFAULT_GUIDANCE, 2
    if unet_config.get("guidance_range"):
        low, high = unet_config["guidance_range"]
        guidance, rows = min(max(DEFAULT_GUIDANCE, low), high), 1
    return {"method": method, "steps": steps, "guidance": guidance, "rows_per_image": rows}


def picture_size(size: int | None = None, height: int | None = None,
                 width: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels, checked: `height` and `width`, else `size` for both (the
    square alias), else DEFAULT_SIZE."""
    if size is not None:
        size = SIZE.check("size", size)
        if (height is not None and height != size) or (width is not None and width != size):
            raise CCLDError(f"size={size} disagrees with height={height}, width={width}; give "
                            "size for a square picture, or height and width")
    side = DEFAULT_SIZE if size is None else size
    return (SIZE.check("height", side if height is None else height),
            SIZE.check("width", side if width is None else width))


def next_noise(generator: torch.Generator, count: int, height: int = DEFAULT_SIZE,
               width: int | None = None) -> torch.Tensor:
    """The starting noise of the next `count` images of `height` x `width` pixels (`width`
    defaults to `height`) from `generator` (on the CPU). Drawn batch after batch, it is exactly
    the noise one draw for all the images gives: torch fills a tensor from the generator's
    stream in order, and one image is a whole number of draws."""
    width = height if width is None else width
    shape = [count, LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE]
    return torch.randn(shape, generator=generator)


def seed_noise(seed: int, index: int, height: int, width: int) -> torch.Tensor:
    """Picture `index`'s starting noise [1, 4, height/8, width/8] of a run with `seed`: the
    generator's stream is drawn up to it, a bounded number of pictures at a time."""
    generator = torch.Generator().manual_seed(int(seed))
    while index > 0:
        skipped = min(index, IMAGES_PER_CALL.high)
        next_noise(generator, skipped, height, width)
        index -= skipped
    return next_noise(generator, 1, height, width)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0, exactly) to `b` (t=1) per picture (the first
    dimension; `a` may be one picture for all). Along the great circle a Gaussian noise stays
    a plausible Gaussian noise, where a straight line would shrink it towards its midpoint."""
    a = a.expand_as(b)
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6  # (nearly) the same direction: the straight line is the arc
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe_sin)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe_sin)
    shape = [-1] + [1] * (b.ndim - 1)
    return (a * wa.to(a.dtype).view(shape) + b * wb.to(b.dtype).view(shape)).to(b.dtype)


def require_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor`, unless a value is NaN or infinite: then a CCLDError, instead of a black PNG."""
    if not bool(torch.isfinite(tensor).all()):
        raise CCLDError(f"{what} went non-finite (NaN or infinity); lower the guidance or the "
                        "prompt weights, or use fp32 precision")
    return tensor


@dataclass(frozen=True)
class _SamplingPlan:
    """What every batch of one request shares: checked settings and the work done once."""
    sampler: sampling.Sampler
    embeds: torch.Tensor  # [zero, prompts..., image prompts...]
    weights: torch.Tensor  # their guidance weights
    timesteps: torch.Tensor
    init_latent: torch.Tensor | None
    eta: float
    seed: int
    height: int
    width: int
    varied_noise: torch.Tensor | None  # the starting noise a variation moves away from
    variation_strength: float
    distilled_guidance: float | None = None  # a guidance-distilled student's one-row w

    def next_noise(self, generator: torch.Generator, count: int) -> torch.Tensor:
        """The starting noise of the next `count` pictures: the seed's, or with a variation
        that noise slerped from the varied picture's by `variation_strength`."""
        noise = next_noise(generator, count, self.height, self.width)
        if self.varied_noise is None:
            return noise
        return slerp(self.varied_noise, noise, self.variation_strength)

    @property
    def stochastic(self) -> bool:
        """Whether sampling draws noise after the start (ddpm, ddim with eta), so that the
        pictures depend on how the images are batched."""
        return bool(self.sampler.eta(self.eta))

    @property
    def painted_alone(self) -> bool:
        """Whether its batches hold no other request's rows: a stochastic sampler's pictures
        depend on its own batches, and a guidance-distilled student's one-row forward has no
        place for other rows' conditions."""
        return self.stochastic or self.distilled_guidance is not None


@dataclass(frozen=True)
class _ImagesRequest:
    """One `iter_images` call, checked and planned: what `_paint_batches` paints."""
    plan: _SamplingPlan
    params: dict  # what each PNG records, less its index
    num_images: int
    batch_size: int
    latent_scale: float | None
    full_decoder: bool

    def shares_batches_with(self) -> tuple:
        """Requests with equal keys can be sampled in one batch (each row guided by its own
        request's prompts, from its own seed's noise) and decoded together, painting the
        pictures each paints alone; some requests share with none (`painted_alone`)."""
        if self.plan.painted_alone:
            return ("alone", id(self))
        return (self.params["method"], tuple(self.plan.timesteps.tolist()), self.plan.height,
                self.plan.width, self.latent_scale, self.full_decoder)


class CCLDPipeline:
    """Text and image prompts to paintings: CLOOB embeds the prompts, the U-Net samples latents
    under classifier-free guidance, the KL autoencoder decodes them.

    Where a diffusers user would expect otherwise:
    - Several prompts in one call are *mixed* into one guided velocity (each with its weight,
      negative steering away), not batched: `num_images` pictures of the one mixture come out.
    - Randomness is a `seed` (int), not a `generator`: the seed's noise is drawn on the CPU as the
      reference demo drew it, so a seed paints the same picture on every device.
    - The guidance weight is per prompt (`"text:5"`, default `guidance`); the unconditional
      weight is 1 - sum(weights), as in the demo, so `guidance=1` means no guidance.
    - `latent_scale` plays the part of diffusers' `vae.config.scaling_factor` (which stays 1.0
      here): 2.55 for the published WikiArt models, as their demos decode, else the U-Net's
      stored `autoencoder_scale` (see `default_latent_scale`).
    - Every option after the prompts is keyword-only; `height` and `width` are in pixels
      (multiples of 64, default 256; `size` sets both), the noise `[n, 4, height/8, width/8]`.
    - An optional tiny decoder (`decoder=`, a `TinyDecoder`) paints instead of the KL decoder,
      many times faster and a little less faithfully, unless a call asks for `full_decoder`.
    """

    def __init__(self, unet, autoencoder, cloob, sources: dict | None = None,
                 latent_scale: float | None = None, decoder=None, precision: str = "fp32"):
        self.unet = unet.eval().requires_grad_(False)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.cloob = cloob.eval().requires_grad_(False)
        self.tiny_decoder = None if decoder is None else decoder.eval().requires_grad_(False)
        self.sources = dict(sources or {})  # where each part came from, recorded in PNGs
        # the tiny decoder's name, as the PNGs record it: taesd, tiny:<path> (see DecoderOption)
        if decoder is None:
            self.sources.pop("tiny_decoder", None)
        else:
            self.sources.setdefault("tiny_decoder", "tiny")
        self.device = torch.device("cpu")
        self.precision = "fp32"  # the reference's numerics until `to(..., precision=)` says else
        self.channels_last = False
        # the decoding scale; None: the U-Net's stored autoencoder_scale (see `default_latent_scale`)
        self.latent_scale = latent_scale
        self._laid_out = None  # (device, precision, channels_last) once `to` laid the nets out
        self.to(precision=precision)  # lays the nets out for it (fp32: the reference's layout)

    # Loading and saving

    @classmethod
    @in_python_terms
    @_file_arguments_checked
    def from_files(cls, unet: PathLike | None = None, autoencoder: PathLike | None = None,
                   autoencoder_config: PathLike | None = None, cloob: PathLike | None = None,
                   cloob_config: PathLike | dict | None = None,
                   decoder: str | None = None, precision: str = "fp32") -> CCLDPipeline:
        """Builds from release files; any part left out is the published default (downloaded
        once). Parts given as files load first, so a bad path is reported before any download.
        `decoder`: full (None), taesd or tiny:PATH, as `ccld generate --decoder` takes it;
        `precision` as `to` takes it (given here, the weights are laid out for it once)."""
        from .models.autoencoder import import_converter_early, load_autoencoder
        from .models.cloob import load_cloob
        from .models.tiny_decoder import DecoderOption
        from .models.unet import load_unet, stored_rounded_weights

        decoder_option = DecoderOption.parse(decoder)  # checked before anything loads
        # The converted cache gives the U-Net what its release file cannot: channels-last
        # kernels, which float32 on a CPU then takes without a copy. Rounded to bf16 or fp16
        # (copied whatever the layout), or kept contiguous (fp32), it maps the file itself.
        on_cpu = resolve_precision(precision, torch.device("cpu"))
        cache_unet = precision != "fp32" and on_cpu == "fp32"
        built_rounded = REDUCED_DTYPES.get(on_cpu)

        # part -> (the files given, or None; the default's files; how to load the files)
        parts = {
            # (the weights as stored: the pipeline lays them out for its precision when used)
            "unet": (None if unet is None else (unet,), lambda: (hub.default_unet(),),
                     lambda path: load_unet(path, stored_layout=True, cache=cache_unet)),
            "autoencoder": (None if autoencoder is None else (autoencoder, None),
                            hub.default_autoencoder,
                            lambda ckpt, yaml: load_autoencoder(ckpt, autoencoder_config or yaml,
                                                                stored_layout=True)),
            "cloob": (None if cloob is None else (cloob,),
                      lambda: (hub.download_cloob(hub.builtin_cloob_name(cloob_config)),),
                      lambda path: load_cloob(path, cloob_config)),
        }
        # An autoencoder to convert loads last, its converter imported meanwhile; but a given
        # file is never checked after a download.
        may_wait = autoencoder is None or all(given for given, _, _ in parts.values())
        loaded, sources, last = {}, {}, []
        for name in sorted(parts, key=lambda name: parts[name][0] is None):
            given, default, load = parts[name]
            files = given if given is not None else default()
            sources[name] = str(files[0])
            if (name == "autoencoder" and may_wait
                    and import_converter_early(files[0], autoencoder_config or files[1])):
                last.append((name, files))
                continue
            loaded[name] = load(*files)
        for name, files in last:
            loaded[name] = parts[name][2](*files)
        if (built_rounded is not None
                and not str(sources["unet"]).endswith(checkpoints.SAFETENSORS_SUFFIXES)):
            # the rounded copies as stored by a former run (or now, for the next): `to` keeps them
            hold_weights_in(loaded["unet"], built_rounded, torch.channels_last,
                            stored_rounded_weights(sources["unet"], loaded["unet"], built_rounded))
        # the published student is decoded as its demo did, whatever its buffer says
        latent_scale = hub.PUBLISHED_LATENT_SCALE if unet is None else None
        tiny = decoder_option.load()
        if tiny is not None:
            sources["tiny_decoder"] = decoder_option.label
        return cls(**loaded, sources=sources, latent_scale=latent_scale, decoder=tiny,
                   precision=precision)

    @classmethod
    def from_pretrained(cls, source: PathLike | None = None, device: str | torch.device | None = None,
                        precision: str | None = None, decoder: str | None = None,
                        **files) -> CCLDPipeline:
        """A pipeline from a folder written by `save_pretrained`, a known hub repo, or (None)
        the default student; `files` (unet=, autoencoder=, cloob=, ...) override single parts.
        `decoder` (full, taesd, tiny:PATH) replaces a folder's own choice (its `tiny_decoder/`
        if it has one)."""
        if source is not None and Path(source).is_dir():
            pipe = cls._from_folder(Path(source), decoder, precision or "fp32")
        elif source is None or str(source) == hub.DEFAULT_UNET[0]:
            pipe = cls.from_files(decoder=decoder, precision=precision or "fp32", **files)
        elif str(source) == hub.TEACHER_REPO:
            names = [f for f in hub.hub_list_files(source)
                     if f.endswith((".ckpt", ".safetensors")) and not f.startswith("ae_model")]
            if not names:
                raise CCLDError(f"the hub repo {source} holds no U-Net checkpoint")
            pipe = cls.from_files(unet=hub.hub_download(source, names[0]), decoder=decoder,
                                  precision=precision or "fp32", **files)
            pipe.latent_scale = hub.PUBLISHED_LATENT_SCALE  # the teacher's cfg_sample.py decodes so
        else:
            raise CCLDError(f"{source}: not a pipeline folder (no {MODEL_INDEX}) nor a known hub "
                            f"model ({hub.DEFAULT_UNET[0]}, {hub.TEACHER_REPO}); "
                            "pass a folder written by `ccld convert`")
        return pipe.to(device, precision)

    @classmethod
    def _from_folder(cls, folder: Path, decoder: str | None = None,
                     precision: str = "fp32") -> CCLDPipeline:
        from .models.autoencoder import load_autoencoder
        from .models.cloob import cloob_from_state_dict
        from .models.tiny_decoder import PIPELINE_SUBFOLDER, DecoderOption, load_tiny_decoder
        from .models.unet import unet_from_state_dict

        index_path = folder / MODEL_INDEX
        if not index_path.is_file():
            raise CCLDError(f"{folder}: no {MODEL_INDEX}; give a folder written by "
                            "`ccld convert` or `CCLDPipeline.save_pretrained`")
        try:
            index = json.loads(index_path.read_text())
            unet_config = json.loads((folder / "unet" / "config.json").read_text())
            cloob_config = json.loads((folder / "cloob" / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CCLDError(f"{folder}: unreadable pipeline config ({e}); convert again") from None
        unet_sd = checkpoints.load_safetensors_file(folder / "unet" / UNET_WEIGHTS, "U-Net weights")
        architecture = folder_unet_architecture(folder, unet_config)
        unet = unet_from_state_dict(unet_sd, folder / "unet", architecture)
        cloob_sd = checkpoints.load_safetensors_file(folder / "cloob" / CLOOB_WEIGHTS, "CLOOB weights")
        sources = index.get("sources", {})  # with the folder's tiny decoder's name, if it has one
        if decoder is not None:
            option = DecoderOption.parse(decoder)
            tiny, sources = option.load(), {**sources, "tiny_decoder": option.label}
        elif (folder / PIPELINE_SUBFOLDER).is_dir():
            tiny = load_tiny_decoder(folder / PIPELINE_SUBFOLDER)
        else:
            tiny = None
        return cls(unet, load_autoencoder(folder / "vae"), cloob_from_state_dict(cloob_config, cloob_sd),
                   sources, index.get("latent_scale"), decoder=tiny, precision=precision)

    def save_pretrained(self, folder: PathLike) -> Path:
        """Writes a self-contained folder of safetensors and JSON configs. It appears whole or
        not at all (an earlier pipeline folder there is replaced in one step; see
        `ccld.io.files.write_folder`)."""
        from .io.files import write_folder

        self.latent_preview  # noqa: B018 - fitted first if missing, so the folder keeps one
        return write_folder(folder, self._write_folder, "pipeline folder",
                            replaceable=lambda existing: (existing / MODEL_INDEX).is_file())

    def _write_folder(self, folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / "unet").mkdir()
        (folder / "cloob").mkdir()
        unet_sd = {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
        save_file(unet_sd, str(folder / "unet" / UNET_WEIGHTS))
        unet_config = {**self.unet.config, "autoencoder_scale": float(self.unet.autoencoder_scale)}
        (folder / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2))
        cloob_sd = {k: v.detach().contiguous().cpu() for k, v in self.cloob.state_dict().items()}
        save_file(cloob_sd, str(folder / "cloob" / CLOOB_WEIGHTS))
        (folder / "cloob" / "config.json").write_text(json.dumps(self.cloob.config, indent=2))
        self.autoencoder.save_pretrained(folder / "vae")
        index = {"_class_name": type(self).__name__, "ccld_version": __version__,
                 "unet": ["ccld", "CCLDUNet"], "vae": ["diffusers", "AutoencoderKL"],
                 "cloob": ["ccld", "CLOOB"], "sources": self.sources}
        if self.tiny_decoder is not None:
            from .models.tiny_decoder import PIPELINE_SUBFOLDER

            self.tiny_decoder.save_pretrained(folder / PIPELINE_SUBFOLDER)
            index["tiny_decoder"] = ["ccld", "TinyDecoder"]
        if self.latent_scale is not None:
            index["latent_scale"] = self.latent_scale
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2))

    def to(self, device: str | torch.device | None = None,
           precision: str | None = None) -> CCLDPipeline:
        """Moves the models; `precision` (auto, fp32, bf16, fp16) picks the arithmetic.

        `auto` is fp16 on CUDA, bf16 on CPUs with native bf16 and float32 elsewhere, always with
        channels-last convolutions. Reduced precision runs every network under autocast, the
        painting nets' convolution and linear weights held rounded to its dtype as autocast
        would round them at every call (same bits; the float32 originals stay, so switching
        back is free and a saved pipeline is float32); the sampler's own arithmetic and the
        seed noise stay float32. An explicit `fp32` is contiguous and bit-faithful to the
        reference demo.
        """
        new_device = self.device if device is None else torch.device(device)
        # Channels-last convolutions measure faster in every precision, on CPUs with or without
        # bf16 and on GPUs (fp32 student 1.17x on an AVX2 EPYC), and stay within 1e-5 of
        # contiguous fp32; only an explicit fp32 keeps the reference's layout, bit for bit.
        wanted = (new_device,
                  self.precision if precision is None else resolve_precision(precision, new_device),
                  self.channels_last if precision is None else precision != "fp32")
        if wanted == self._laid_out:
            return self  # as it is: nothing is moved, laid out or rounded again
        painting_nets = [net for net in (self.unet, self.autoencoder.decoder, self.tiny_decoder)
                         if net is not None]
        for net in painting_nets:  # the originals move and are laid out; copies are made last
            if new_device != self.device or held_dtype(net) != REDUCED_DTYPES.get(wanted[1]):
                release_held_weights(net)
        if new_device != self.device:
            for part in (self.unet, self.autoencoder, self.cloob, self.tiny_decoder):
                if part is not None:
                    part.to(new_device)
        self.device, self.precision, self.channels_last = wanted
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.precision == "fp32":
            # Weights come channels-last from the converted cache: the fast path takes them as
            # they are, only the exact one copies them. The encoder (init images only) is left
            # as it is loaded, so its memory-mapped weights are not even read for a painting.
            for net in painting_nets:
                net.to(memory_format=memory_format)
        with float32_weights(self.autoencoder.decoder):  # folded from the float32 weights
            self.autoencoder.decoder.fold_upsampling(self.channels_last)
        if self.precision != "fp32":
            # the rounded copies are laid out; the float32 originals stay as they are loaded
            for net in painting_nets:
                hold_weights_in(net, REDUCED_DTYPES[self.precision], memory_format)
        self._laid_out = wanted
        return self

    def compile(self, **options) -> CCLDPipeline:
        """torch.compile the U-Net in place (its state dict keeps its keys); the next sampling
        pays the compilation, later ones with the same shapes run the compiled graph."""
        self.unet.compile(**options)
        return self

    @contextlib.contextmanager
    def autocast(self):
        """The context every network runs in: inference mode, plus autocast when reduced."""
        with torch.inference_mode():
            if self.precision == "fp32":
                yield
                return
            with torch.autocast(self.device.type, dtype=REDUCED_DTYPES[self.precision]):
                yield

    @property
    def default_latent_scale(self) -> float:
        """The scale latents are decoded (and init images encoded) with unless a call says
        otherwise: the published WikiArt models' 2.55 (what their demos decode with, whatever
        the checkpoint stored), else the U-Net's stored `autoencoder_scale`."""
        return float(self.unet.autoencoder_scale if self.latent_scale is None else self.latent_scale)

    @property
    def sampling_defaults(self) -> dict:
        """method, steps, guidance (and rows_per_image) used where a call leaves them out: the
        U-Net's own for a distilled student (see `sampling_defaults`), else the fast defaults."""
        return sampling_defaults(self.unet.config)

    def _with_defaults(self, steps, method, guidance) -> tuple[int, str, float]:
        defaults = self.sampling_defaults
        return (defaults["steps"] if steps is None else steps,
                defaults["method"] if method is None else method,
                defaults["guidance"] if guidance is None else guidance)

    def distilled_guidance(self, prompts: list[Prompt], image_prompts: list[Prompt]) -> float | None:
        """The guidance weight at which a guidance-distilled student runs one row per image for
        these prompts, or None for ordinary classifier-free guidance: one prompt (text or
        image) whose weight lies in the student's range runs at w = that weight; several
        prompts, a negative weight or one outside the range are ordinary guidance over the
        student's plain velocities (see `sampling.one_row_guidance`)."""
        return sampling.one_row_guidance(self.unet.distilled_guidance,
                                         [p.weight for p in [*prompts, *image_prompts]])

    # Conditioning

    @_in_autocast
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.cloob.encode_text(list(texts)).float()

    @_in_autocast
    def encode_image(self, image: ImageLike) -> torch.Tensor:
        """CLOOB embedding of an image prompt: path, PIL image, or [3,H,W] tensor in [0,1]."""
        from .io.images import load_image, pil_to_tensor, resize_and_center_crop

        size = self.cloob.config["image_encoder"]["image_size"]
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        if not isinstance(image, torch.Tensor):
            image = pil_to_tensor(resize_and_center_crop(image.convert("RGB"), size))
        batch = image.reshape(1, *image.shape[-3:]).to(self.device, torch.float32)
        if batch.shape[-2:] != (size, size):
            raise CCLDError(f"image prompt tensor is {tuple(batch.shape[-2:])}, CLOOB needs "
                            f"{size}x{size}; pass a PIL image or a path to have it resized")
        return F.normalize(self.cloob.encode_image(batch).float(), dim=-1)

    def conditions(self, prompts: PromptsLike = (), image_prompts: PromptsLike = (),
                   guidance: float = DEFAULT_GUIDANCE) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings [zero, prompts..., image prompts...] and their guidance weights."""
        texts = as_prompts(prompts, guidance, "prompt")
        images = as_prompts(image_prompts, guidance, "image prompt")
        d = self.cloob.config["d_embed"]
        embeds = [torch.zeros([1, d], device=self.device)]
        embeds += [self.encode_text([p.value]) for p in texts]
        embeds += [self.encode_image(p.value) for p in images]
        weights = sampling.condition_weights([p.weight for p in texts + images], self.device)
        return torch.cat(embeds), weights

    # Sampling

    def initial_noise(self, num_images: int, seed: int, height: int = DEFAULT_SIZE,
                      width: int | None = None) -> tuple[torch.Tensor, torch.Generator]:
        """The reference demo's starting noise for a seed, drawn on the CPU on every device."""
        generator = torch.Generator().manual_seed(int(seed))
        return next_noise(generator, num_images, height, width), generator

    @property
    def default_batch_size(self) -> int:
        """How many images `iter_images` (and `ccld generate`) sample at once unless told: 16 on
        a GPU; 4 elsewhere, where larger batches are no faster and only cost memory."""
        return 16 if self.device.type == "cuda" else 4

    @_in_autocast
    def _plan(self, prompts: list[Prompt], image_prompts: list[Prompt], *, steps: int,
              method: str, guidance: float, seed: int, eta: float, init_image: ImageLike | None,
              strength: float, size: int | None, height: int | None,
              width: int | None, variation_of: int | None, variation_index: int,
              variation_strength: float) -> _SamplingPlan:
        """Checks the settings (cheapest first, all before any model work), then does the work
        every batch of one request shares: the prompts' embeddings, the timesteps and the init
        image's latent."""
        sampler = sampling.get_sampler(method)
        steps = STEPS.check("steps", steps)
        WEIGHT.check("guidance", guidance)
        seed = SEED.check("seed", seed)
        eta = ETA.check("eta", eta)
        height, width = picture_size(size, height, width)
        start = 1.0 if init_image is None else float(STRENGTH.check("strength", strength))
        varied = None
        if variation_of is not None:
            variation_strength = float(VARIATION_STRENGTH.check("variation_strength",
                                                                variation_strength))
            varied = seed_noise(SEED.check("variation_of", variation_of),
                                VARIATION_INDEX.check("variation_index", variation_index),
                                height, width)
        embeds, weights = self.conditions(prompts, image_prompts, guidance)
        init_latent = (None if init_image is None
                       else self.encode_init_image(init_image, height=height, width=width))
        timesteps = sampler.timesteps(steps, start, device=self.device)
        if method == "distilled" and steps == self.unet.distilled_steps and start == 1.0:
            timesteps = self.unet.distilled_timesteps.float()  # exactly those it was trained on
        return _SamplingPlan(sampler, embeds, weights, timesteps, init_latent, eta, seed, height,
                             width, varied, variation_strength,
                             self.distilled_guidance(prompts, image_prompts))

    @_in_autocast
    def _sample(self, parts: Sequence[tuple[_SamplingPlan, int]], noise: torch.Tensor,
                generator: torch.Generator | None, callback: sampling.Callback = None
                ) -> torch.Tensor:
        """Latents sampled from `noise` (one batch); stops at the first step that is not finite.
        `parts` lists (plan, rows): the first rows of `noise` are sampled under the first plan,
        the next under the next; plans sampled together must share their timesteps and sampler
        (see `_ImagesRequest.shares_batches_with`)."""
        plan = parts[0][0]
        x = noise.to(self.device)
        if any(p.init_latent is not None for p, _ in parts):
            alpha, sigma = sampling.t_to_alpha_sigma(plan.timesteps[0])
            init = torch.cat([p.init_latent.expand(rows, *x.shape[1:]) if p.init_latent is not None
                              else torch.zeros_like(x[:rows]) for p, rows in parts])
            x = init * alpha + x * sigma
        steps = len(plan.timesteps)

        def check_step(info: dict) -> None:
            require_finite(info["pred"], f"sampling step {info['i'] + 1} of {steps}")
            if callback is not None:
                callback({**info, "steps": steps})

        if len(parts) > 1:
            model = sampling.stacked_guided_model(
                self.unet, [(p.embeds, p.weights, rows) for p, rows in parts])
        elif plan.distilled_guidance is not None:
            model = sampling.distilled_guidance_model(self.unet, plan.embeds[1],
                                                      plan.distilled_guidance)
        else:
            model = sampling.guided_model(self.unet, plan.embeds, plan.weights)
        latents = plan.sampler(model, x, plan.timesteps, eta=plan.eta, generator=generator,
                               callback=check_step)
        return require_finite(latents, "the sampled latents")

    @_in_autocast
    def generate_latents(self, prompts: PromptsLike = (), image_prompts: PromptsLike = (), *,
                         num_images: int = 1, steps: int | None = None,
                         method: str | None = None, guidance: float | None = None,
                         seed: int = 0, eta: float = 0.0, init_image: ImageLike | None = None,
                         strength: float = DEFAULT_STRENGTH, size: int | None = None,
                         height: int | None = None, width: int | None = None,
                         variation_of: int | None = None, variation_index: int = 0,
                         variation_strength: float = DEFAULT_VARIATION_STRENGTH,
                         callback: sampling.Callback = None) -> torch.Tensor:
        """Samples latents (in the U-Net's scaled space); see `__call__` for the arguments."""
        num_images = IMAGES_PER_CALL.check("num_images", num_images)
        steps, method, guidance = self._with_defaults(steps, method, guidance)
        plan = self._plan(as_prompts(prompts, guidance, "prompt"),
                          as_prompts(image_prompts, guidance, "image prompt"), steps=steps,
                          method=method, guidance=guidance, seed=seed, eta=eta,
                          init_image=init_image, strength=strength, size=size, height=height,
                          width=width, variation_of=variation_of, variation_index=variation_index,
                          variation_strength=variation_strength)
        generator = torch.Generator().manual_seed(plan.seed)
        noise = plan.next_noise(generator, num_images)
        return self._sample([(plan, num_images)], noise, generator, callback)

    @_in_autocast
    def encode_init_image(self, image: ImageLike, size: int | None = None, *,
                          height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The posterior mean latent of an init image, in the U-Net's scaled space; the image is
        scaled to cover `height` x `width` and its middle cut out (its aspect ratio kept)."""
        from .io.images import load_image, pil_to_tensor, resize_to_cover
        from .models.autoencoder import encode_moments

        height, width = picture_size(size, height, width)
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        pixels = pil_to_tensor(resize_to_cover(image.convert("RGB"), width, height))
        mean, _ = encode_moments(self.autoencoder, pixels[None].to(self.device) * 2 - 1)
        return mean / self.default_latent_scale

    @_in_autocast
    def decode(self, latents: torch.Tensor, latent_scale: float | None = None, *,
               full_decoder: bool = False) -> torch.Tensor:
        """Pixels in [-1, 1] (unclamped) from latents; the scale defaults to the U-Net's own.
        The tiny decoder paints when the pipeline has one, unless `full_decoder`."""
        from .models.autoencoder import decode_latents

        scale = self.default_latent_scale if latent_scale is None else float(latent_scale)
        decoder = self.autoencoder if full_decoder or self.tiny_decoder is None else self.tiny_decoder
        return decode_latents(decoder, latents * scale).float()

    @property
    def latent_preview(self):
        """The autoencoder's latent-to-RGB map (`ccld.models.latent_preview`); fitted now, once,
        if it came without one (a folder saved before the maps existed)."""
        from .models.latent_preview import fit_latent_preview

        if self.autoencoder.latent_preview is None:
            # in float32 whatever the pipeline's precision, so a map is the same everywhere
            with (torch.autocast(self.device.type, enabled=False),
                  float32_weights(self.autoencoder.decoder)):
                self.autoencoder.latent_preview = fit_latent_preview(self.autoencoder)
        return self.autoencoder.latent_preview

    def preview(self, latents: torch.Tensor, latent_scale: float | None = None) -> torch.Tensor:
        """A quick look at latents (a sampler's clean prediction): pixels in [-1, 1] on the CPU,
        by the tiny decoder where the pipeline has one, else by the autoencoder's linear
        latent-to-RGB map, which costs next to nothing but shows only colours and shapes."""
        if self.tiny_decoder is not None:
            return self.decode(latents, latent_scale).float().cpu()
        scale = self.default_latent_scale if latent_scale is None else float(latent_scale)
        return self.latent_preview(latents.float() * scale)

    def decoder_name(self, full_decoder: bool = False) -> str:
        """Which decoder `decode` paints with: full, taesd or tiny:<path>."""
        return "full" if full_decoder or self.tiny_decoder is None else self.sources["tiny_decoder"]

    def __call__(self, prompts: PromptsLike = (), image_prompts: PromptsLike = (), *,
                 num_images: int = 1, steps: int | None = None, method: str | None = None,
                 guidance: float | None = None, seed: int = 0, eta: float = 0.0,
                 init_image: ImageLike | None = None, strength: float = DEFAULT_STRENGTH,
                 latent_scale: float | None = None, size: int | None = None,
                 height: int | None = None, width: int | None = None,
                 variation_of: int | None = None, variation_index: int = 0,
                 variation_strength: float = DEFAULT_VARIATION_STRENGTH,
                 progress: bool = True, full_decoder: bool = False) -> list[Image.Image]:
        """Paints `num_images` PIL images (at most IMAGES_PER_CALL; `iter_images` paints any
        number, a batch at a time).

        prompts / image_prompts: a string (`"text:weight"`, `"path:weight"`), a (value, weight)
        tuple, or a list of them; a weight left out is `guidance` (the demo's 3). Negative
        weights steer away. steps, method and guidance left out (None) are the model's own
        (`sampling_defaults`): DEFAULT_STEPS, DEFAULT_METHOD and DEFAULT_GUIDANCE unless it is
        a distilled student. Each image carries its generation parameters in `image.info`.
        Every number is checked against `ccld.limits`. `height`, `width`: the picture's size in
        pixels (multiples of 64, default 256, where the published models paint best); `size`
        sets both. `variation_of`: paint variations of the picture that seed painted (picture
        `variation_index` of its run): each starting noise is slerped from that picture's
        towards this call's seed's by `variation_strength` (0 paints that picture again).
        `full_decoder`: paint with the KL decoder even when the pipeline has a tiny one.
        """
        num_images = IMAGES_PER_CALL.check("num_images", num_images)
        return list(self.iter_images(
            prompts, image_prompts, num_images=num_images, batch_size=num_images, steps=steps,
            method=method, guidance=guidance, seed=seed, eta=eta, init_image=init_image,
            strength=strength, latent_scale=latent_scale, size=size, height=height, width=width,
            variation_of=variation_of, variation_index=variation_index,
            variation_strength=variation_strength, progress=progress, full_decoder=full_decoder))

    def iter_images(self, prompts: PromptsLike = (), image_prompts: PromptsLike = (), *,
                    num_images: int = 1, batch_size: int | None = None,
                    steps: int | None = None, method: str | None = None,
                    guidance: float | None = None, seed: int = 0, eta: float = 0.0,
                    init_image: ImageLike | None = None, strength: float = DEFAULT_STRENGTH,
                    latent_scale: float | None = None, size: int | None = None,
                    height: int | None = None, width: int | None = None,
                    variation_of: int | None = None, variation_index: int = 0,
                    variation_strength: float = DEFAULT_VARIATION_STRENGTH,
                    progress: bool = True, full_decoder: bool = False,
                    callback: sampling.Callback = None) -> Iterator[Image.Image]:
        """Paints `num_images` PIL images `batch_size` at a time (default `default_batch_size`),
        yielding each batch's as soon as it is decoded: memory stays that of one batch however
        many images there are. The arguments are checked now, the painting happens as the
        images are taken.

        With a deterministic sampler the pictures are those of one batch of `num_images` (the
        seed's noise is drawn batch after batch, in order). The stochastic ones (ddpm, ddim
        with eta) draw their step noise per batch, so theirs depend on the batch size too,
        which their PNGs then record. `callback(info)` is called after every sampling step, as
        the samplers call it (`info["pred"]`: the current clean prediction of the batch).
        """
        request = self._request(
            prompts, image_prompts, num_images=num_images, batch_size=batch_size, steps=steps,
            method=method, guidance=guidance, seed=seed, eta=eta, init_image=init_image,
            strength=strength, latent_scale=latent_scale, size=size, height=height, width=width,
            variation_of=variation_of, variation_index=variation_index,
            variation_strength=variation_strength, full_decoder=full_decoder)
        return self._paint_batches(request, progress, callback)

    def _request(self, prompts: PromptsLike, image_prompts: PromptsLike, *, num_images: int,
                 batch_size: int | None, steps: int, method: str, guidance: float, seed: int,
                 eta: float, init_image: ImageLike | None, strength: float,
                 latent_scale: float | None, size: int | None, height: int | None,
                 width: int | None, variation_of: int | None, variation_index: int,
                 variation_strength: float, full_decoder: bool) -> _ImagesRequest:
        """`iter_images`' arguments (less `progress` and `callback`), checked and planned."""
        num_images = IMAGES_PER_RUN.check("num_images", num_images)
        steps, method, guidance = self._with_defaults(steps, method, guidance)
        batch_size = IMAGES_PER_CALL.check(
            "batch_size", self.default_batch_size if batch_size is None else batch_size)
        if latent_scale is not None:
            latent_scale = LATENT_SCALE.check("latent_scale", latent_scale)
        WEIGHT.check("guidance", guidance)  # the default weight of the prompts read next
        texts = as_prompts(prompts, guidance, "prompt")
        images = as_prompts(image_prompts, guidance, "image prompt")
        settings = dict(steps=steps, method=method, guidance=guidance, seed=seed, eta=eta,
                        init_image=init_image, strength=strength, size=size, height=height,
                        width=width, variation_of=variation_of, variation_index=variation_index,
                        variation_strength=variation_strength)
        plan = self._plan(texts, images, **settings)
        params = self.describe(texts, images, num_images=num_images, **settings,
                               latent_scale=latent_scale, full_decoder=full_decoder)
        if plan.stochastic and batch_size < num_images:
            params["batch_size"] = batch_size
        return _ImagesRequest(plan, params, num_images, batch_size, latent_scale, full_decoder)

    def _paint_batches(self, request: _ImagesRequest, progress: bool,
                       callback: sampling.Callback = None) -> Iterator[Image.Image]:
        from tqdm.auto import tqdm

        plan = request.plan
        generator = torch.Generator().manual_seed(plan.seed)  # one stream for the whole run
        firsts = range(0, request.num_images, request.batch_size)
        with tqdm(total=len(plan.timesteps) * len(firsts), desc=f"{plan.sampler.name} sampling",
                  disable=not progress, leave=False) as bar:
            def step(info: dict) -> None:
                bar.update(1)
                if callback is not None:
                    callback(info)

            for first in firsts:
                count = min(request.batch_size, request.num_images - first)
                noise = plan.next_noise(generator, count)
                latents = self._sample([(plan, count)], noise, generator, step)
                yield from self._decode_images(latents, [(request, range(first, first + count))])

    def _decode_images(self, latents: torch.Tensor,
                       rows: Sequence[tuple[_ImagesRequest, Sequence[int]]]) -> Iterator[Image.Image]:
        """The PIL images of one batch of latents, whose rows are the listed images of the
        listed requests in order (all decoded alike), each with its parameters."""
        from .io.images import tensor_to_pil

        first = rows[0][0]
        pixels = self.decode(latents, first.latent_scale, full_decoder=first.full_decoder)
        pixels = iter(require_finite(pixels.float().cpu(), "decoding"))
        del latents  # not held while the caller writes the images
        for request, indices in rows:
            for index in indices:
                image = tensor_to_pil(next(pixels))
                image.info["parameters"] = json.dumps({**request.params, "index": index})
                yield image

    def iter_many(self, requests: Sequence[dict], *, wanted: Sequence[Sequence[int]] | None = None,
                  names: Sequence[str] | None = None, batch_size: int | None = None,
                  progress: bool = True) -> Iterator[tuple[int, Image.Image]]:
        """Paints several `iter_images` requests (dicts of its keyword arguments, prompts
        included), yielding (the request's position, image) as each batch is decoded.

        Requests with a deterministic sampler and the same steps, schedule, size and decoding
        share batches of `batch_size`: each row of a batch is guided by its own request's
        prompts and starts from its own seed's noise, so every picture is the one
        `iter_images` paints for its request alone (float rounding aside). `wanted` lists, per
        request, the image indices to paint (default all; the others' noise is drawn and
        skipped). Every request is checked before any painting; `names` say how errors name
        them (default "request N").
        """
        batch_size = IMAGES_PER_CALL.check(
            "batch_size", self.default_batch_size if batch_size is None else batch_size)
        names = names or [f"request {i}" for i in range(len(requests))]
        signature = inspect.signature(self.iter_images)
        planned = []
        for name, kwargs in zip(names, requests, strict=True):
            try:
                arguments = signature.bind(**{"batch_size": batch_size, **kwargs})
            except TypeError as e:
                raise CCLDError(f"{name}: {e}; iter_images takes {', '.join(signature.parameters)}"
                                ) from None
            arguments.apply_defaults()
            for painting_only in ("progress", "callback"):
                arguments.arguments.pop(painting_only)
            try:
                planned.append(self._request(**arguments.arguments))
            except CCLDError as e:
                raise CCLDError(f"{name}: {e}") from None
        if wanted is None:
            wanted = [range(request.num_images) for request in planned]
        else:
            wanted = [sorted(set(indices)) for indices in wanted]
            for name, request, indices in zip(names, planned, wanted, strict=True):
                if indices and not 0 <= indices[0] <= indices[-1] < request.num_images:
                    raise CCLDError(f"{name}: wanted holds {indices}, not image indices from 0 "
                                    f"to {request.num_images - 1}; pass indices of its images")
        return self._paint_many(planned, wanted, batch_size, progress)

    def _paint_many(self, planned: list[_ImagesRequest], wanted: list[Sequence[int]],
                    batch_size: int, progress: bool) -> Iterator[tuple[int, Image.Image]]:
        from tqdm.auto import tqdm

        groups: dict[tuple, list[int]] = {}  # requests that share batches, in order
        for number, request in enumerate(planned):
            if wanted[number]:
                groups.setdefault(request.shares_batches_with(), []).append(number)
        work = []  # (a request painted whole, as alone) or (request number, image index) pairs
        for numbers in groups.values():
            if planned[numbers[0]].plan.painted_alone:
                work.append(numbers[0])
                continue
            items = [(n, i) for n in numbers for i in wanted[n]]
            work += [items[k:k + batch_size] for k in range(0, len(items), batch_size)]

        def steps(item) -> int:  # sampling steps the item takes, for the progress bar
            if isinstance(item, list):
                return len(planned[item[0][0]].plan.timesteps)
            request = planned[item]
            return len(request.plan.timesteps) * -(-request.num_images // request.batch_size)

        streams = {}  # request number -> (its seed's generator, images whose noise it has drawn)
        with tqdm(total=sum(map(steps, work)), desc="sampling", disable=not progress,
                  leave=False) as bar:
            for items in work:
                if not isinstance(items, list):  # a stochastic request: its pictures depend on
                    # its batches and its step noise on its own stream, so it is painted alone
                    indices = set(wanted[items])
                    images = self._paint_batches(planned[items], False)
                    for index, image in enumerate(itertools.islice(images, max(indices) + 1)):
                        if index in indices:
                            yield items, image
                    bar.update(steps(items))
                    continue
                rows, noise = [], []
                for number, index in items:
                    plan = planned[number].plan
                    generator, drawn = streams.get(number) or (torch.Generator().manual_seed(plan.seed), 0)
                    # the noise of the images before this one is drawn and dropped, in order
                    noise.append(plan.next_noise(generator, index + 1 - drawn)[-1:])
                    streams[number] = (generator, index + 1)
                    if rows and rows[-1][0] == number:
                        rows[-1][1].append(index)
                    else:
                        rows.append((number, [index]))
                latents = self._sample([(planned[n].plan, len(indices)) for n, indices in rows],
                                       torch.cat(noise), None, lambda info: bar.update(1))
                images = self._decode_images(latents, [(planned[n], indices) for n, indices in rows])
                for number, image in zip([n for n, _ in items], images, strict=True):
                    yield number, image

    def describe(self, prompts: PromptsLike, image_prompts: PromptsLike, *, num_images: int,
                 steps: int, method: str, guidance: float, seed: int, eta: float,
                 init_image: ImageLike | None, strength: float, latent_scale: float | None,
                 size: int | None = None, height: int | None = None, width: int | None = None,
                 variation_of: int | None = None, variation_index: int = 0,
                 variation_strength: float = DEFAULT_VARIATION_STRENGTH,
                 full_decoder: bool = False) -> dict:
        """Everything needed to paint the same picture again, as recorded in each PNG; for a
        distilled student also how it ran (`distilled`: the guidance it gave in one row, or
        None, and its rows per image per step)."""
        steps, method, guidance = self._with_defaults(steps, method, guidance)
        height, width = picture_size(size, height, width)
        texts = as_prompts(prompts, guidance, "prompt")
        images = as_prompts(image_prompts, guidance, "image prompt")
        sampler = sampling.get_sampler(method)
        params = {
            "prompts": [[p.value, p.weight] for p in texts],
            "image_prompts": [[p.label, p.weight] for p in images],
            "num_images": num_images, "seed": seed, "steps": steps, "method": method,
            "guidance": guidance, "width": width, "height": height,
            "latent_scale": self.default_latent_scale if latent_scale is None else float(latent_scale),
            "precision": self.precision, "channels_last": self.channels_last,
            "decoder": self.decoder_name(full_decoder), "models": self.sources,
            "ccld_version": __version__,
        }
        unet_config = self.unet.config
        if any(k in unet_config for k in ("guidance_range", "distilled_steps")):
            one_row = self.distilled_guidance(texts, images)
            params["distilled"] = {"unet": {k: unet_config[k] for k in (
                                       "guidance_input", "guidance_range", "distilled_steps")
                                       if k in unet_config},
                                   "one_row_guidance": one_row,
                                   "rows_per_image": 1 if one_row is not None
                                   else 1 + len(texts) + len(images)}
        if sampler.stochastic:
            params["eta"] = sampler.eta(eta)
        if init_image is not None:
            params["init_image"] = str(init_image) if isinstance(init_image, (str, os.PathLike)) else "image"
            params["strength"] = strength
        if variation_of is not None:
            params.update(variation_of=variation_of, variation_index=variation_index,
                          variation_strength=variation_strength)
        return params
