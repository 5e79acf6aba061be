"""`CCLDPipeline`: prompts in, paintings out, in the style of a diffusers pipeline.

    pipe = CCLDPipeline.from_pretrained()                  # the distilled WikiArt student
    images = pipe("a snowy landscape, oil on canvas", num_images=4, seed=0)

The three frozen parts are a CLOOB model (text and image prompts to one embedding space), the
conditioned U-Net (predicts v on 4x32x32 latents) and the KL-f8 autoencoder (latents to pixels).
With the same seed the initial noise is the reference demo's (`torch.manual_seed(seed);
torch.randn([n, 4, 32, 32])` on the CPU), so the same settings paint the same pictures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .. import sampling
from ..errors import CCLDError, arg
from ..limits import IMAGES_PER_CALL, IMAGES_PER_RUN, Limit
from ..models import autocast_off, float32_weights
from ..settings import DEFAULT_SIZE, Settings, number, picture_size
from . import conditioning, metadata, scheduling
from .loading import PipelineLoading
from .noise import NoiseStream, next_noise
from .painting import decode, decoding_scale, sample, sampling_defaults
from .precision import Layout, lay_out

if TYPE_CHECKING:
    from PIL import Image

PREVIEW_EVERY = 2  # sampling steps between previews in the CLI and the web app (and the last)


class CCLDPipeline(PipelineLoading):
    """Text and image prompts to paintings: CLOOB embeds the prompts, the U-Net samples latents
    under classifier-free guidance, the KL autoencoder decodes them.

    Every painting is described by one `ccld.Settings`: pass its fields as keyword arguments
    (`steps=20, seed=3`), or a whole `settings=` (keywords then change single fields).
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
    - `height` and `width` are in pixels (multiples of 64, default 256; `size` sets both), the
      noise `[n, 4, height/8, width/8]`.
    - An optional tiny decoder (`decoder=`, a `TinyDecoder`) paints instead of the KL decoder,
      many times faster and a little less faithfully, unless the settings ask for `full_decoder`.
    """

    def __init__(self, unet, autoencoder, cloob, sources: dict | None = None,
                 latent_scale: float | None = None, decoder=None, precision: str | None = None):
        self.unet = unet.eval().requires_grad_(False)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.cloob = cloob.eval().requires_grad_(False)
        self.tiny_decoder = None if decoder is None else decoder.eval().requires_grad_(False)
        self.sources = dict(sources or {})  # what identifies each part (not where it lies), for PNGs
        # the tiny decoder's name, as the PNGs record it: taesd, tiny:<path> (see DecoderOption)
        if decoder is None:
            self.sources.pop("tiny_decoder", None)
        else:
            self.sources.setdefault("tiny_decoder", "tiny")
        # the decoding scale; None: the U-Net's stored autoencoder_scale (see `default_latent_scale`)
        self.latent_scale = latent_scale
        # the reference's numerics until `to(..., precision=)` says else (or a GPU: see Layout)
        self.layout = Layout(torch.device("cpu"), "fp32", False, chosen=False)
        self._laid_out = None  # the layout the nets are laid out for, once `to` did it
        self.to(precision=precision)

    # Device, precision and layout

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def precision(self) -> str:
        return self.layout.precision

    @property
    def channels_last(self) -> bool:
        return self.layout.channels_last

    def to(self, device: str | torch.device | None = None, precision: str | None = None,
           channels_last: bool | None = None) -> CCLDPipeline:
        """Moves the models; `precision` (auto, fp32, bf16, fp16) picks the arithmetic and
        `channels_last` the convolutions' layout (default: the precision's; see
        `ccld.pipeline.precision`): the sampler's own arithmetic and the seed noise stay float32,
        and a saved pipeline is float32 whatever it runs in."""
        wanted = Layout.wanted(self.layout, device, precision, channels_last)
        if wanted == self._laid_out:
            return self  # as it is: nothing is moved, laid out or rounded again
        parts = {"unet": self.unet, "autoencoder": self.autoencoder, "cloob": self.cloob,
                 "tiny_decoder": self.tiny_decoder}
        painting_nets = [net for net in (self.unet, self.autoencoder.decoder, self.tiny_decoder)
                         if net is not None]
        lay_out(parts, painting_nets, self.layout, wanted)
        self.layout = self._laid_out = wanted
        return self

    def __reduce__(self):
        # each memory-mapped tensor would pickle its whole file: gigabytes for a small model
        raise CCLDError("a CCLDPipeline does not pickle; save it with save_pretrained(FOLDER) "
                        "and load it with CCLDPipeline.from_pretrained(FOLDER), or load it in "
                        "each process")

    def compile(self, build: bool = True) -> CCLDPipeline:
        """Runs the U-Net compiled; its state dict keeps its keys. On the CPU: AOTInductor
        packages kept in ccld's cache, one per input shape (`ccld.pipeline.compiled`); with
        `build`, the first shape the cache lacks is compiled now (a minute or more, reported)
        and stored for every later process, which loads it in milliseconds; other shapes run
        eager. On a GPU: `torch.compile` in place, paid again by each process."""
        if self.device.type == "cpu":
            from . import compiled

            compiled.install(self.unet, build=build)
        elif build:
            self.unet.compile()
        return self

    def autocast(self):
        """The context every network runs in: inference mode, plus autocast when reduced."""
        return self.layout.autocast()

    # The model's own defaults

    @property
    def default_latent_scale(self) -> float:
        """The scale latents are decoded (and init images encoded) with unless the settings say
        otherwise (see `ccld.pipeline.painting.decoding_scale`)."""
        return decoding_scale(self.unet, self.latent_scale)

    @property
    def sampling_defaults(self) -> dict:
        """method, steps, guidance (and rows_per_image) used where the settings leave them out:
        the U-Net's own for a distilled student (see `sampling_defaults`), else the fast ones."""
        return sampling_defaults(self.unet.config)

    @property
    def default_batch_size(self) -> int:
        """How many images are sampled at once unless the settings say: 16 on a GPU; 4
        elsewhere, where larger batches are no faster and only cost memory."""
        return 16 if self.device.type == "cuda" else 4

    # Settings

    def check_inputs(self, prompts=None, image_prompts=None, settings: Settings | None = None,
                     most: Limit = IMAGES_PER_RUN, **options) -> Settings:
        """The settings of a call (its `settings`, changed by `prompts`, `image_prompts` and
        `options`), checked, with at most `most` images, and resolved against the model: every
        setting left to the model filled in, the precision the pipeline's (moving it to the
        settings' own first)."""
        if settings is not None and not isinstance(settings, Settings):
            raise CCLDError(f"{arg('settings')} must be a ccld.Settings, not a "
                            f"{type(settings).__name__}")
        if most is IMAGES_PER_CALL:  # before the settings' own, wider, check
            number(arg("num_images"), options.get("num_images", getattr(settings, "num_images", 1)),
                   IMAGES_PER_CALL, optional=False)
        settings = Settings.build(prompts, image_prompts, base=settings, **options)
        if settings.precision is not None or settings.channels_last is not None:
            self.to(precision=settings.precision, channels_last=settings.channels_last)
        one_batch = settings.num_images if most is IMAGES_PER_CALL else self.default_batch_size
        return settings.resolved(self.sampling_defaults).replace(
            latent_scale=decoding_scale(self.unet, self.latent_scale, settings.latent_scale),
            precision=self.precision, channels_last=self.channels_last,
            batch_size=settings.batch_size or min(one_batch, settings.num_images))

    def settings_from_png(self, path, **overrides) -> Settings:
        """The settings that painted a ccld PNG, to paint the same picture again (`pipe(
        settings=pipe.settings_from_png("00003.png"))`); `overrides` change single settings."""
        return metadata.settings_from_png(path, **overrides)

    def describe(self, prompts=None, image_prompts=None, *, settings: Settings | None = None,
                 **options) -> dict:
        """The parameters each PNG of these settings records (less its `index`)."""
        return metadata.describe(self, self.check_inputs(prompts, image_prompts, settings, **options))

    # Painting

    def __call__(self, prompts=None, image_prompts=None, *, settings: Settings | None = None,
                 progress: bool = True, callback: sampling.Callback = None,
                 **options) -> list[Image.Image]:
        """Paints `num_images` PIL images (at most IMAGES_PER_CALL; `iter_images` paints any
        number, a batch at a time), each carrying its parameters in `image.info["parameters"]`.

        prompts / image_prompts: a string (`"text:weight"`, `"path:weight"`), a (value, weight)
        pair, or a list of them; a weight left out is the guidance. Every other setting is a
        keyword (`steps`, `method`, `guidance`, `seed`, `init_image`, `strength`, `width`,
        `height`, `variation_of`, ...: see `ccld.Settings`) or comes in `settings`; left out,
        it is the model's own. Every value is checked against `ccld.limits` before any work.
        `callback(info)` is called after every sampling step (`info["pred"]`: the clean
        prediction).
        """
        # 1. Check inputs: the settings, resolved against the model's own defaults
        settings = self.check_inputs(prompts, image_prompts, settings, IMAGES_PER_CALL, **options)
        # 2. Encode prompts (and the init image): what every batch shares
        with self.autocast():
            plan = conditioning.plan(self, settings)
        # 3-6. Prepare noise, sample, decode, describe: a batch at a time
        painted = scheduling.paint(self, [plan], [settings.wanted],
                                   settings.batch_size, progress, callback)
        return [image for _, image in painted]

    def iter_images(self, prompts=None, image_prompts=None, *, settings: Settings | None = None,
                    progress: bool = True, callback: sampling.Callback = None,
                    **options) -> Iterator[Image.Image]:
        """Paints any number of PIL images (`num_images`), `batch_size` at a time (default
        `default_batch_size`), yielding each batch's as soon as it is decoded: memory stays that
        of one batch. The settings are checked now, the painting happens as images are taken.

        With a deterministic sampler the pictures are those of one batch of `num_images` (the
        seed's noise is drawn batch after batch, in order). The stochastic ones (ddpm, ddim
        with eta) draw their step noise per batch, so theirs depend on the batch size too,
        which their PNGs then record.
        """
        settings = self.check_inputs(prompts, image_prompts, settings, **options)
        with self.autocast():
            plan = conditioning.plan(self, settings)
        painted = scheduling.paint(self, [plan], [settings.wanted],
                                   settings.batch_size, progress, callback)
        return (image for _, image in painted)

    def iter_many(self, requests: Sequence[Settings | dict], *,
                  wanted: Sequence[Sequence[int]] | None = None,
                  names: Sequence[str] | None = None, batch_size: int | None = None,
                  progress: bool = True) -> Iterator[tuple[int, Image.Image]]:
        """Paints several paintings (`Settings`, or dicts of the keyword arguments `__call__`
        takes), yielding (the request's position, image) as each batch is decoded.

        Requests with a deterministic sampler and the same steps, schedule, size and decoding
        share batches of `batch_size` (see `ccld.pipeline.scheduling`): every picture is the one
        each paints alone. `wanted` lists, per request, the pictures to paint (0 is its first;
        default all). Every request is checked before any painting; `names` say how errors
        name them (default "request N").
        """
        batch_size = IMAGES_PER_CALL.check(
            arg("batch_size"), self.default_batch_size if batch_size is None else batch_size)
        names = names or [f"request {i}" for i in range(len(requests))]
        plans = []
        for name, request in zip(names, requests, strict=True):
            try:
                settings = (self.check_inputs(settings=request) if isinstance(request, Settings)
                            else self.check_inputs(**request))
                with self.autocast():
                    plans.append(conditioning.plan(self, settings))
            except CCLDError as e:
                raise CCLDError(f"{name}: {e.template}") from None
        if wanted is None:
            wanted = [range(plan.settings.num_images) for plan in plans]
        wanted = [sorted(set(indices)) for indices in wanted]
        for name, plan, indices in zip(names, plans, wanted, strict=True):
            if indices and not 0 <= indices[0] <= indices[-1] < plan.settings.num_images:
                raise CCLDError(f"{name}: wanted holds {indices}, not image indices from 0 "
                                f"to {plan.settings.num_images - 1}; pass indices of its images")
        return scheduling.paint(self, plans, wanted, batch_size, progress)

    def generate_latents(self, prompts=None, image_prompts=None, *,
                         settings: Settings | None = None, callback: sampling.Callback = None,
                         **options) -> torch.Tensor:
        """Samples the latents (in the U-Net's scaled space) of at most IMAGES_PER_CALL images
        in one batch; the settings as `__call__` takes them."""
        settings = self.check_inputs(prompts, image_prompts, settings, IMAGES_PER_CALL, **options)
        stream = NoiseStream(settings)
        with self.autocast():
            plan = conditioning.plan(self, settings)
            return sample(self.unet, [(plan.guide, settings.num_images)],
                          stream.take(settings.index, settings.num_images),
                          plan.trajectory(stream.generator), init=[plan.init_latent],
                          keep=[None if plan.inpainting is None else plan.inpainting.keep],
                          callback=callback)

    # The parts, usable alone

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        with self.autocast():
            return conditioning.encode_text(self.cloob, texts)

    def encode_image(self, image) -> torch.Tensor:
        """CLOOB embedding of an image prompt: path, PIL image, or [3,H,W] tensor in [0,1]."""
        with self.autocast():
            return conditioning.encode_image(self.cloob, image, self.device)

    def encode_init_image(self, image, size: int | None = None, *, height: int | None = None,
                          width: int | None = None) -> torch.Tensor:
        """The posterior mean latent of an init image, in the U-Net's scaled space; the image is
        scaled to cover `height` x `width` and its middle cut out (its aspect ratio kept)."""
        height, width = picture_size(size, height, width)
        with self.autocast():
            return conditioning.encode_init_image(self.autoencoder, image, height, width,
                                                  self.default_latent_scale, self.device)

    def conditions(self, prompts=None, image_prompts=None, **options):
        """The embeddings [zero, prompts..., image prompts...] and their guidance weights."""
        settings = self.check_inputs(prompts, image_prompts, **options)
        with self.autocast():
            embeds = conditioning.conditions(self.cloob, settings, self.device)
        return embeds, sampling.condition_weights(settings.weights, self.device)

    def initial_noise(self, num_images: int, seed: int, height: int = DEFAULT_SIZE,
                      width: int | None = None) -> tuple[torch.Tensor, torch.Generator]:
        """The reference demo's starting noise for a seed, drawn on the CPU on every device."""
        generator = torch.Generator().manual_seed(int(seed))
        return next_noise(generator, num_images, height, width), generator

    def decode(self, latents: torch.Tensor, latent_scale: float | None = None, *,
               full_decoder: bool = False) -> torch.Tensor:
        """Pixels in [-1, 1] (unclamped) from latents; the scale defaults to the model's. The
        tiny decoder paints when the pipeline has one, unless `full_decoder`."""
        decoder = self.autoencoder if full_decoder or self.tiny_decoder is None else self.tiny_decoder
        with self.autocast():
            return decode(decoder, latents, decoding_scale(self.unet, self.latent_scale,
                                                           latent_scale))

    def decoder_name(self, full_decoder: bool = False) -> str:
        """Which decoder `decode` paints with: full, taesd or tiny:<path>."""
        return "full" if full_decoder or self.tiny_decoder is None else self.sources["tiny_decoder"]

    @property
    def latent_preview(self):
        """The autoencoder's latent-to-RGB map (`ccld.models.latent_preview`); fitted now, once,
        if it came without one (a folder saved before the maps existed)."""
        from ..models.latent_preview import fit_latent_preview

        if self.autoencoder.latent_preview is None:
            # in float32 whatever the pipeline's precision, so a map is the same everywhere
            with (autocast_off(self.device.type),
                  float32_weights(self.autoencoder.decoder)):
                self.autoencoder.latent_preview = fit_latent_preview(self.autoencoder)
        return self.autoencoder.latent_preview

    def preview(self, latents: torch.Tensor, latent_scale: float | None = None) -> torch.Tensor:
        """A quick look at latents (a sampler's clean prediction): pixels on the CPU, about
        [-1, 1] and not clamped (the linear map overshoots it; `ccld.io.images.tensor_to_pil`
        clamps), by the tiny decoder where the pipeline has one, else by the autoencoder's linear
        latent-to-RGB map, which costs next to nothing but shows only colours and shapes."""
        if self.tiny_decoder is not None:
            return self.decode(latents, latent_scale).float().cpu()
        scale = decoding_scale(self.unet, self.latent_scale, latent_scale)
        return self.latent_preview(latents.float() * scale)
