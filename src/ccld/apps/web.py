"""`ccld serve`: the web app, a Gradio page with a gallery of paintings and the same as an API.

    ccld serve                                   # http://127.0.0.1:7860, the default student
    ccld serve --model FOLDER --port 8000        # model options as in `ccld generate`

The models load once at start. While sampling, the gallery shows a quick preview of the clean
image every few steps (the autoencoder's linear latent-to-RGB map, or the tiny decoder where the
pipeline has one: `--decoder tiny:PATH`, or a `--model` folder that has one), and then the full
decoder's paintings. The page sets the picture's width and height (`--size` is their starting
value), and "Vary" paints variations of the selected result. Requests wait in Gradio's queue (bounded by
`--queue-size`) and at most `--concurrency` of them sample at once (1 on a CPU). Every input is
checked in `generate`, which turns a bad value, an unreadable upload or a `CCLDError` from the
pipeline into a `gr.Error`: the page shows its one-line message and the server carries on.
Results are PNGs written by `ccld.io.images.save_png`, so each carries its parameters; they live in
a temporary folder that keeps only recent batches (`ResultStore`) and is removed when the server
stops.

The generation is also an API (`api_name="generate"`), e.g. with `gradio_client`:

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    gallery, params = client.predict(
        prompts="a snowy landscape, oil on canvas:3\\nblue:1",  # one TEXT[:WEIGHT] a line
        image_prompts=[handle_file("ref.png")],  # or [] ; image_weight= their weight
        init_image=None, strength=0.6,            # handle_file("start.png") to start from it
        method="plms", steps=15, guidance=3.0, seed=0, num_images=4,
        width=256, height=256,                    # optional; blank: the server's --size
        api_name="/generate")
    gallery[0]["image"]  # a local copy of the first PNG; params is its parameters (a dict)

Gradio is imported only when the app is built, so `ccld --help` stays fast without it.
"""

from __future__ import annotations

import argparse
import contextvars
import ipaddress
import logging
import math
import os
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CCLDError
from ..limits import (
    SIZE,
    STRENGTH,
    UPLOAD_MB,
    VARIATION_INDEX,
    VARIATION_STRENGTH,
    WEB_IMAGE_PROMPTS,
    WEB_IMAGES,
    WEB_PROMPT_CHARS,
    WEB_PROMPTS,
    WEB_SEED,
    WEB_STEPS,
    WEIGHT,
)
from ..pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_METHOD,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_VARIATION_STRENGTH,
    PREVIEW_EVERY,
)

log = logging.getLogger("ccld.apps.web")

# A request's limits are the WEB_* rows of ccld.limits.
DEFAULT_MAX_UPLOAD_MB = UPLOAD_MB.default
DEFAULT_QUEUE_SIZE = 32
DEFAULT_NUM_IMAGES = 4
DEFAULT_SIZE = 256
DECODE_CHUNK = 4  # images decoded at once, so 16 images do not need 16 images' activations
KEEP_BATCHES = 64
KEEP_MINUTES = 60.0
TITLE = "ccld: CLOOB-conditioned latent diffusion"

EXAMPLES = [
    # prompts, method, steps, guidance, num_images, seed
    ["a snowy landscape, oil on canvas", "plms", 15, 3.0, 4, 0],
    ["a portrait of a woman in a red hat, by Rembrandt:3\nblurry:-1", "plms", 25, 3.0, 4, 1],
    ["water lilies at dusk, impressionism", "ddim", 30, 5.0, 4, 2],
    ["a futuristic city skyline, cubism:4", "dpm++2m", 15, 3.0, 2, 3],
]

API_DOC = """\
**API.** The same generation is a Gradio API endpoint, `/generate` (see "Use via API" below).
```python
from gradio_client import Client, handle_file
client = Client("{url}")  # this page's address
gallery, params = client.predict(prompts="a snowy landscape, oil on canvas:3", image_prompts=[],
    init_image=None, method="plms", steps=15, guidance=3.0, seed=0, num_images=4,
    api_name="/generate")
print(gallery[0]["image"], params["seed"])  # a local copy of the first PNG; its parameters
```
Image prompts and the init image are uploads: `image_prompts=[handle_file("ref.png")]`,
`init_image=handle_file("start.png")`; `width=` and `height=` set the size (multiples of 64).
"""


# Results on disk, bounded

class ResultStore:
    """A folder of per-request batch folders that keeps the newest `keep` batches, none older
    than `max_age` seconds; `close()` removes it. Gradio copies results into its own cache (which
    `delete_cache` ages out), so these files only need to outlive one response."""

    def __init__(self, root: str | os.PathLike | None = None, keep: int = KEEP_BATCHES,
                 max_age: float = KEEP_MINUTES * 60):
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="ccld-web-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, int(keep))
        self.max_age = float(max_age)
        self._lock = threading.Lock()

    def new_batch(self) -> Path:
        with self._lock:
            self._prune(reserve=1)
            folder = self.root / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
            folder.mkdir()
            return folder

    def prune(self) -> None:
        with self._lock:
            self._prune(reserve=0)

    def _prune(self, reserve: int) -> None:
        try:
            batches = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return
        now = time.time()
        excess = len(batches) + reserve - self.keep
        for i, folder in enumerate(batches):  # oldest first: names start with the time
            try:
                old = now - folder.stat().st_mtime > self.max_age
            except OSError:
                continue
            if i < excess or old:
                shutil.rmtree(folder, ignore_errors=True)

    def batches(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir())

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)


# Generation

SAVE_FAILED = "the server could not save the images (see its log); try again later"


def _error(message: str):
    import gradio as gr

    log.info("rejected: %s", message)
    return gr.Error(message, print_exception=False)


@contextmanager
def _page_errors():
    """Turns a `CCLDError` raised inside into the page's error: its one-line message is already
    one the user can act on."""
    try:
        yield
    except CCLDError as e:
        raise _error(str(e)) from None


def _upload_path(item) -> str | None:
    """The local path of an upload as Gradio passes it (a str, a dict or a FileData-like)."""
    if item is None or item == "":
        return None
    if isinstance(item, dict):
        item = item.get("path") or item.get("name")
    elif not isinstance(item, (str, os.PathLike)):
        item = getattr(item, "path", None) or getattr(item, "name", None)
    return None if item is None else os.fspath(item)


def _load_upload(item, what: str, max_bytes: int):
    """(PIL image, file name) from an upload; a clear gr.Error for a big or non-image file."""
    from ..io.images import load_image

    path = _upload_path(item)
    if path is None:
        return None, None
    name = Path(path).name
    try:
        nbytes = os.path.getsize(path)
    except OSError:
        raise _error(f"{what} {name!r}: the upload is gone; upload it again") from None
    if nbytes > max_bytes:
        raise _error(f"{what} {name!r} is {nbytes / 1e6:.1f} MB, more than the "
                     f"{max_bytes / 1e6:g} MB upload limit; upload a smaller image")
    try:
        image = load_image(path)
    except CCLDError as e:
        message = str(e).replace(str(Path(path).expanduser()), name).replace(path, name)
        raise _error(f"{what} {message}") from None
    return image, name


def _load_image_prompts(items, weight: float, max_bytes: int) -> list:
    """The uploaded image prompts as `Prompt`s of `weight`, labelled with their file names."""
    from ..pipeline import Prompt

    if items is None or items == "":
        items = []
    elif not isinstance(items, (list, tuple)):
        items = [items]  # a single upload, as some clients send one
    if len(items) > WEB_IMAGE_PROMPTS.high:
        raise _error(f"{len(items)} image prompts is too many; give at most {WEB_IMAGE_PROMPTS.high}")
    prompts = []
    for item in items:
        image, name = _load_upload(item, "image prompt", max_bytes)
        if image is not None:
            prompts.append(Prompt(image, weight, name))
    return prompts


def parse_prompts(text, guidance: float) -> list[tuple[str, float]]:
    """One `TEXT[:WEIGHT]` prompt a line (blank lines skipped) as (text, weight) pairs."""
    from ..prompts import parse_weighted

    if text is None:
        return []
    if not isinstance(text, str):
        raise _error(f"prompts must be text, one prompt a line (got {type(text).__name__})")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > WEB_PROMPTS.high:
        raise _error(f"{len(lines)} prompts is too many; give at most {WEB_PROMPTS.high}, one a line")
    out = []
    for line in lines:
        if len(line) > WEB_PROMPT_CHARS.high:
            raise _error(f"a prompt is {len(line)} characters long; keep each under "
                         f"{WEB_PROMPT_CHARS.high} (the text encoder reads only the first 77 tokens)")
        with _page_errors():  # weights are checked against WEIGHT there
            out.append(parse_weighted(line, guidance))
    return out


@dataclass(frozen=True)
class Request:
    """A checked request, in the pipeline's terms."""

    prompts: list[tuple[str, float]]  # (text, weight)
    image_prompts: list  # pipeline.Prompt, each labelled with its upload's file name
    init_image: object  # a PIL image, or None
    init_name: str | None  # the init image's file name, recorded instead of its server path
    strength: float  # checked only with an init image, the only thing it affects
    method: str
    steps: int
    guidance: float
    seed: int
    num_images: int
    width: int
    height: int
    variation: dict  # variation_of, variation_index, variation_strength; empty: none

    def pipeline_arguments(self) -> dict:
        """The keyword arguments `generate_latents` and `describe` share (the page has no eta)."""
        return dict(prompts=self.prompts, image_prompts=self.image_prompts,
                    num_images=self.num_images, steps=self.steps, method=self.method,
                    guidance=self.guidance, seed=self.seed, eta=0.0, init_image=self.init_image,
                    strength=self.strength, width=self.width, height=self.height,
                    **self.variation)


def check_variation(variation_of, variation_index, variation_strength) -> dict:
    """The pipeline's variation arguments, checked; {} when `variation_of` is None."""
    if variation_of is None:
        return {}
    with _page_errors():
        return dict(variation_of=WEB_SEED.check("variation of", variation_of),
                    variation_index=VARIATION_INDEX.check("variation index", variation_index),
                    variation_strength=VARIATION_STRENGTH.check("variation strength",
                                                                variation_strength))


def check_request(*, prompts, image_prompts, image_weight, init_image, strength, method, steps,
                  guidance, seed, num_images, width=None, height=None, size: int = DEFAULT_SIZE,
                  variation_of=None, variation_index=0,
                  variation_strength=DEFAULT_VARIATION_STRENGTH,
                  max_upload_bytes: int) -> Request:
    """The form's values checked, cheapest checks first and all before any model work; a
    `gr.Error` with a one-line message for the first one the user must fix. Blank values take
    defaults: the guidance DEFAULT_GUIDANCE, the image prompt weight the guidance, the seed a
    random one, the width and height `size` (the server's)."""
    from .. import sampling

    with _page_errors():
        steps = WEB_STEPS.check("steps", steps)
        num_images = WEB_IMAGES.check("number of images", num_images)
        width = SIZE.check("width", size if width in (None, "") else width)
        height = SIZE.check("height", size if height in (None, "") else height)
        sampling.get_sampler(method)
        guidance = WEIGHT.check("guidance", DEFAULT_GUIDANCE if guidance in (None, "") else guidance)
        image_weight = WEIGHT.check("image prompt weight",
                                    guidance if image_weight in (None, "") else image_weight)
        if seed is None or seed == "" or (isinstance(seed, (int, float)) and seed == -1):
            seed = secrets.randbelow(WEB_SEED.high + 1)
        seed = WEB_SEED.check("seed", seed)
    variation = check_variation(variation_of, variation_index, variation_strength)
    texts = parse_prompts(prompts, guidance)
    images = _load_image_prompts(image_prompts, image_weight, max_upload_bytes)
    if not texts and not images:
        raise _error("type a prompt (one a line, TEXT or TEXT:WEIGHT) or upload an image prompt")
    init, init_name = _load_upload(init_image, "init image", max_upload_bytes)
    if init is not None:
        with _page_errors():
            strength = STRENGTH.check("strength", strength)
    else:
        strength = DEFAULT_STRENGTH if strength in (None, "") else strength
    return Request(prompts=texts, image_prompts=images, init_image=init, init_name=init_name,
                   strength=strength, method=method, steps=steps, guidance=guidance, seed=seed,
                   num_images=num_images, width=width, height=height, variation=variation)


class _Progress:
    """Reports to a `gr.Progress`, when there is one: the stages, then each sampling step."""

    def __init__(self, progress: Callable | None, steps: int):
        self.progress, self.steps, self.done = progress, steps, 0

    def stage(self, fraction: float, desc: str) -> None:
        if self.progress is not None:
            self.progress(fraction, desc=desc)

    def step(self, info: dict) -> None:  # the sampler's callback
        self.done += 1
        if self.progress is not None:
            self.progress((min(self.done, self.steps), self.steps), desc="Sampling", unit="steps")


def _previewing(pipe, report: _Progress, preview: Callable | None) -> Callable:
    """The sampler's callback: progress, and every PREVIEW_EVERY steps and at the last one
    `preview(pixels, step, steps)` with the pipeline's quick preview of the clean prediction
    (`CCLDPipeline.preview`: the tiny decoder's, else the linear latent-to-RGB map's)."""
    if preview is None:
        return report.step

    def step(info: dict) -> None:
        report.step(info)
        if report.done % PREVIEW_EVERY == 0 or report.done == report.steps:
            preview(pipe.preview(info["pred"]), report.done, report.steps)

    return step


def paint(pipe, request: Request, *, lock=None, progress: Callable | None = None,
          preview: Callable | None = None):
    """Samples and decodes the request's images, holding `lock` (when given) meanwhile; their
    pixels by the full decoder, in chunks of DECODE_CHUNK images. `preview`: see `_previewing`.
    Running out of memory is a message, not a crash."""
    report = _Progress(progress, request.steps)
    report.stage(0.0, "Waiting for the model" if lock is not None else "Starting")
    try:
        with lock if lock is not None else nullcontext(), _page_errors():
            report.stage(0.0, "Encoding prompts")
            latents = pipe.generate_latents(**request.pipeline_arguments(),
                                            callback=_previewing(pipe, report, preview))
            report.stage(1.0, "Decoding")
            pixels = [pipe.decode(latents[i:i + DECODE_CHUNK], full_decoder=True).float().cpu()
                      for i in range(0, request.num_images, DECODE_CHUNK)]
            del latents  # freed before the next request takes the lock and makes its own
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            log.warning("out of memory painting %d images of %dx%d px", request.num_images,
                        request.width, request.height)
            raise _error(f"out of memory painting {request.num_images} images; "
                         "ask for fewer images") from None
        raise
    return pixels


def save_gallery(store: ResultStore, request: Request, pixels, params: dict):
    """Writes the images into a new batch folder as PNGs carrying `params` and their index;
    returns the gallery's (path, caption) pairs. Failing to save is the server's problem, and the
    message says so plainly."""
    from ..io.images import save_png, tensor_to_pil

    gallery = []
    images = (image for chunk in pixels for image in chunk)
    try:
        folder = store.new_batch()
        for index, image in enumerate(images):
            path = folder / f"ccld-{request.seed}-{index:02d}.png"
            save_png(tensor_to_pil(image), path, {**params, "index": index})
            caption = f"seed {request.seed} · {index + 1}/{request.num_images}"
            if request.variation:
                caption = f"variation of {request.variation['variation_of']} · {caption}"
            gallery.append((str(path), caption))
    except CCLDError as e:  # a full disk, say
        log.error("%s", e)
        raise _error(SAVE_FAILED) from None
    except OSError as e:
        log.error("cannot create a result folder in %s: %s", store.root, e)
        raise _error(SAVE_FAILED) from None
    return gallery


def generate(pipe, prompts: str = "", *, image_prompts=None, image_weight=DEFAULT_GUIDANCE,
             init_image=None, strength=DEFAULT_STRENGTH, method=DEFAULT_METHOD, steps=DEFAULT_STEPS,
             guidance=DEFAULT_GUIDANCE, seed=None, num_images=1, width=None, height=None,
             variation_of=None, variation_index=0, variation_strength=DEFAULT_VARIATION_STRENGTH,
             store: ResultStore, size: int = DEFAULT_SIZE,
             max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6), lock=None,
             progress: Callable | None = None, preview: Callable | None = None):
    """Checks the inputs, paints, writes the PNGs; returns ([(png path, caption)], parameters).

    Every problem the user can fix is raised as `gr.Error` with a one-line message. A blank
    width or height is `size`. `variation_of` (a seed) with `variation_index` and
    `variation_strength`: variations of that picture, as `CCLDPipeline.__call__` paints them.
    `lock` (a Lock or Semaphore) bounds how many samplings run at once; `progress` is a
    `gr.Progress`; `preview(pixels, step, steps)` receives previews while sampling (see
    `generate_with_previews`). The PNGs are the full decoder's.
    """
    started = time.perf_counter()
    request = check_request(
        prompts=prompts, image_prompts=image_prompts, image_weight=image_weight,
        init_image=init_image, strength=strength, method=method, steps=steps, guidance=guidance,
        seed=seed, num_images=num_images, width=width, height=height, size=size,
        variation_of=variation_of, variation_index=variation_index,
        variation_strength=variation_strength, max_upload_bytes=max_upload_bytes)
    pixels = paint(pipe, request, lock=lock, progress=progress, preview=preview)
    params = pipe.describe(**request.pipeline_arguments(), latent_scale=None, full_decoder=True)
    if request.init_image is not None:  # the pipeline has only the pixels; the PNG gets the name
        params["init_image"] = request.init_name
    gallery = save_gallery(store, request, pixels, params)
    log.info("painted %d image(s), %s %d steps, seed %d, in %.1f s", request.num_images,
             request.method, request.steps, request.seed, time.perf_counter() - started)
    return gallery, params


def preview_gallery(pixels, step: int, steps: int) -> list:
    """The gallery's (image, caption) pairs of a preview; PIL images, nothing saved."""
    from ..io.images import tensor_to_pil

    return [(tensor_to_pil(image), f"preview · step {step}/{steps}") for image in pixels]


def generate_with_previews(pipe, prompts: str = "", **options):
    """`generate` as a generator, the Generate button's: it yields (preview gallery, None)
    while sampling, then `generate`'s (gallery, parameters); errors are raised as `generate`
    raises them.

    Sampling runs in a thread (with this context, so Gradio's progress reaches the page) that
    hands the previews over through a queue: the sampler's callback cannot yield.
    """
    updates = queue.Queue()

    def work():
        try:
            result = generate(pipe, prompts, **options,
                              preview=lambda *shown: updates.put(("preview", shown)))
            updates.put(("done", result))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            updates.put(("error", e))

    threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True,
                     name="ccld-paint").start()
    while True:
        kind, value = updates.get()
        if kind == "preview":
            yield preview_gallery(*value), None
        elif kind == "error":
            raise value
        else:
            yield value
            return


# The page

INTRO = (f"## {TITLE}\nPaint pictures from text and image prompts. One prompt a line as `TEXT` or "
         "`TEXT:WEIGHT` (a negative weight steers away). Every PNG records its parameters; the "
         "same seed and settings paint the same picture.")
CSS = "#dice {min-width: 3em; max-width: 4em; align-self: end; font-size: 1.6em}"


def _named_range_checks(slider):
    """Leaves a slider's range check to `generate`, whose message names the field.

    Gradio checks a slider's range before the function runs, with a message that does not say
    which field is wrong ("Value 0 is less than minimum value 1"). A subclass would be plainer,
    but Gradio writes a .pyi stub beside any module that subclasses a component.
    """
    slider.preprocess = lambda payload: payload
    return slider


@dataclass(frozen=True)
class _Form:
    """The input column's components."""

    prompts: object
    generate: object  # the Generate button
    method: object
    steps: object
    guidance: object
    num_images: object
    seed: object
    dice: object  # the button that rolls a random seed
    image_prompts: object
    image_weight: object
    init_image: object
    strength: object
    width: object
    height: object

    def api_inputs(self) -> list:
        """The inputs of `generate`, in the order of its parameters (the API's)."""
        return [self.prompts, self.image_prompts, self.image_weight, self.init_image,
                self.strength, self.method, self.steps, self.guidance, self.seed, self.num_images,
                self.width, self.height]

    def example_inputs(self) -> list:
        """The inputs an EXAMPLES row fills, in its order."""
        return [self.prompts, self.method, self.steps, self.guidance, self.num_images, self.seed]


def _upload_inputs():
    """The image prompts, their weight, the init image and its strength: a folded section."""
    import gradio as gr

    with gr.Accordion("Image prompts and init image", open=False):
        image_prompts = gr.File(label=f"Image prompts (up to {WEB_IMAGE_PROMPTS.high})",
                                file_count="multiple", elem_id="image-prompts")
        image_weight = gr.Number(DEFAULT_GUIDANCE, label="Image prompt weight",
                                 elem_id="image-weight")
        init_image = gr.File(label="Init image (start from this picture)",
                             file_count="single", elem_id="init-image")
        strength = _named_range_checks(gr.Slider(
            0.05, 1.0, value=DEFAULT_STRENGTH, step=0.05, label="Strength",
            info="how far from the init image (1 ignores it)", elem_id="strength"))
    return image_prompts, image_weight, init_image, strength


def _size_inputs(size: int):
    """The picture's width and height sliders, starting at the server's `--size`."""
    import gradio as gr

    with gr.Row():
        width, height = (_named_range_checks(gr.Slider(
            SIZE.low, SIZE.high, value=size, step=SIZE.multiple_of, label=label,
            info="pixels; best near 256",
            elem_id=label.lower())) for label in ("Width", "Height"))
    return width, height


def model_defaults(pipe) -> dict:
    """The form's method, steps and guidance: the model's own (a distilled student's, see
    `CCLDPipeline.sampling_defaults`), else the fast defaults (also for stand-in pipelines)."""
    plain = {"method": DEFAULT_METHOD, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
    return {**plain, **{k: v for k, v in (getattr(pipe, "sampling_defaults", None) or {}).items()
                        if k in plain}}


def examples_for(examples: list, defaults: dict) -> list:
    """The example rows, with a distilled student's own method, steps and guidance instead of
    theirs (those would run it as the plain model it no longer is)."""
    if defaults["method"] == DEFAULT_METHOD and defaults["guidance"] == DEFAULT_GUIDANCE:
        return examples
    return [[prompts, defaults["method"], defaults["steps"], defaults["guidance"], n, seed]
            for prompts, _, _, _, n, seed in examples]


def _input_column(num_images: int, size: int, defaults: dict) -> _Form:
    """Prompts and the Generate button, the sampler's settings (at the model's `defaults`),
    then the folded uploads."""
    import gradio as gr

    from .. import sampling

    with gr.Column(scale=2, min_width=320):
        prompts = gr.Textbox(label="Prompts", lines=3, max_lines=WEB_PROMPTS.high, elem_id="prompts",
                             placeholder="a snowy landscape, oil on canvas:3")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            # The samplers registered now, when the app is built, including any added at run time.
            method = gr.Dropdown(list(sampling.SAMPLERS), value=defaults["method"], label="Method",
                                 elem_id="method")
            steps = _named_range_checks(gr.Slider(
                1, WEB_STEPS.high, value=defaults["steps"], step=1, label="Steps", elem_id="steps"))
        with gr.Row():
            guidance = gr.Number(defaults["guidance"], label="Guidance",
                                 info="weight of prompts given without one", elem_id="guidance")
            count = _named_range_checks(gr.Slider(
                1, WEB_IMAGES.high, value=num_images, step=1, label="Number of images",
                elem_id="num-images"))
        with gr.Row():
            seed = gr.Number(0, precision=0, label="Seed", info="blank: a random one",
                             elem_id="seed")
            dice = gr.Button("⚄", elem_id="dice", size="lg")  # a die: a random seed
        width, height = _size_inputs(size)
        image_prompts, image_weight, init_image, strength = _upload_inputs()
    return _Form(prompts=prompts, generate=button, method=method, steps=steps, guidance=guidance,
                 num_images=count, seed=seed, dice=dice, image_prompts=image_prompts,
                 image_weight=image_weight, init_image=init_image, strength=strength,
                 width=width, height=height)


@dataclass(frozen=True)
class _Results:
    """The results column's components."""

    gallery: object
    params: object  # the parameters of the pictures shown
    selected: object  # a State: the index of the picture last clicked in the gallery
    vary: object  # the Vary button
    variation_strength: object
    variation: object  # a State: the variation the Vary button asks for (see `pick_variation`)


def _results_column() -> _Results:
    """The gallery of PNGs, Vary with its strength, and the parameters they were painted with."""
    import gradio as gr

    with gr.Column(scale=3, min_width=320):
        gallery = gr.Gallery(label="Results", columns=4, height="auto", format="png",
                             object_fit="contain", interactive=False,
                             buttons=["download", "fullscreen"], elem_id="gallery")
        with gr.Row():
            vary = gr.Button("Vary", elem_id="vary", scale=0, min_width=100)
            variation_strength = _named_range_checks(gr.Slider(
                0.0, 1.0, value=DEFAULT_VARIATION_STRENGTH, step=0.05, label="Variation strength",
                info="Vary paints variations of the selected picture (else the first); "
                     "0 paints it again", elem_id="variation-strength"))
        params = gr.JSON(label="Parameters", elem_id="parameters", open=True, max_height=320)
    return _Results(gallery=gallery, params=params, selected=gr.State(None), vary=vary,
                    variation_strength=variation_strength, variation=gr.State(None))


def pick_variation(params, selected, strength) -> tuple[dict, int]:
    """What the Vary button paints: variations of the selected result (the gallery's picture
    `selected`, else the first), as `generate`'s variation arguments, and a new random seed for
    the noise to vary towards. A result that is itself a variation is varied from the same
    picture again, since its noise is not any one seed's."""
    if not isinstance(params, dict) or "seed" not in params:
        raise _error("paint some pictures first, then select one and press Vary")
    if "variation_of" in params:
        of, index = params["variation_of"], params.get("variation_index", 0)
    else:
        count = params.get("num_images", 1)
        index = selected if isinstance(selected, int) and 0 <= selected < count else 0
        of = params["seed"]
    variation = check_variation(of, index, strength)
    return variation, secrets.randbelow(WEB_SEED.high + 1)


def _generate_handler(pipe, *, store: ResultStore, lock, size: int, max_upload_bytes: int):
    """The Generate button's function: the form's values into `generate_with_previews` (a
    generator, so the gallery can show previews; the API returns its last value). The Vary
    button passes a `variation` too (see `pick_variation`)."""
    import gradio as gr

    def run(prompts, image_prompts=None, image_weight=None, init_image=None, strength=None,
            method=None, steps=None, guidance=None, seed=None, num_images=None, width=None,
            height=None, variation=None,
            progress=gr.Progress()):  # None defaults: optional in the API (components' values)
        yield from generate_with_previews(
            pipe, prompts, image_prompts=image_prompts, image_weight=image_weight,
            init_image=init_image, strength=strength, method=method, steps=steps,
            guidance=guidance, seed=seed, num_images=num_images, width=width, height=height,
            **(variation or {}), store=store, size=size, max_upload_bytes=max_upload_bytes,
            lock=lock, progress=progress)

    return run


def _selected_index(evt) -> int:
    return evt.index


def _wire(form: _Form, results: _Results, run, concurrency: int) -> None:
    """Generate paints (also the API's `/generate`); Vary picks the variation and a seed, then
    paints (not an API: a client varies with `variation_of=` in Python); clicking a picture
    selects it; the die rolls a seed in the browser."""
    import gradio as gr

    outputs = [results.gallery, results.params]
    form.generate.click(run, inputs=form.api_inputs(), outputs=outputs,
                        api_name="generate",
                        api_description="Paint images; returns the gallery of PNGs and their "
                                        "parameters.",
                        concurrency_limit=concurrency, concurrency_id="paint",
                        show_progress="full")
    results.vary.click(
        pick_variation, inputs=[results.params, results.selected, results.variation_strength],
        outputs=[results.variation, form.seed], api_visibility="private", queue=False,
    ).success(run, inputs=[*form.api_inputs(), results.variation], outputs=outputs,
              api_visibility="private", concurrency_limit=concurrency, concurrency_id="paint",
              show_progress="full")
    # the hint is the class itself: gradio is imported lazily, so a postponed annotation
    # ("gr.SelectData") could not be resolved by Gradio
    _selected_index.__annotations__["evt"] = gr.SelectData
    results.gallery.select(_selected_index, None, results.selected, api_visibility="private",
                           queue=False)
    form.dice.click(None, None, form.seed, js=f"() => Math.floor(Math.random() * {WEB_SEED.high + 1})",
                    api_visibility="private", queue=False)


def build_app(pipe, *, store: ResultStore | None = None, concurrency: int = 1,
              queue_size: int = DEFAULT_QUEUE_SIZE, size: int = DEFAULT_SIZE,
              max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6),
              keep_minutes: float = KEEP_MINUTES, num_images: int = DEFAULT_NUM_IMAGES,
              examples=EXAMPLES):
    """The Gradio Blocks app around a loaded pipeline (not launched)."""
    import gradio as gr

    store = store or ResultStore(max_age=keep_minutes * 60)
    concurrency = max(1, int(concurrency))
    run = _generate_handler(pipe, store=store, lock=threading.BoundedSemaphore(concurrency),
                            size=size, max_upload_bytes=max_upload_bytes)
    age = max(60, int(keep_minutes * 60))
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(min(600, age), age)) as demo:
        gr.Markdown(INTRO, elem_id="ccld-title")
        with gr.Row(equal_height=False):
            defaults = model_defaults(pipe)
            form = _input_column(num_images, size, defaults)
            results = _results_column()
        if examples:
            gr.Examples(examples=examples_for(examples, defaults),
                        inputs=form.example_inputs(), label="Example prompts",
                        cache_examples=False)
        with gr.Accordion("API", open=False):
            gr.Markdown(API_DOC.format(url="http://127.0.0.1:7860/"))
        _wire(form, results, run, concurrency)
    demo.queue(max_size=max(1, int(queue_size)), default_concurrency_limit=concurrency)
    demo.ccld_store = store  # for the server's cleanup and for tests
    demo.ccld_css = CSS
    return demo


# `ccld serve`

def add_serve_command(sub) -> argparse.ArgumentParser:
    """Adds `ccld serve` to the CLI's subparsers."""
    from .options import add_model_options

    s = sub.add_parser("serve", help="run the web app (Gradio) on this machine",
                       description="Serve the gallery web app and its API. The models load once "
                       "at start; requests queue and are painted one at a time on a CPU.")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 makes the app "
                        "reachable from the network)")
    s.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    s.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="most requests waiting at once; more are turned away with a message "
                        "(default: %(default)s)")
    s.add_argument("--concurrency", type=int, default=None,
                   help="samplings at once (default: 1 on a CPU, 2 on a GPU)")
    s.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest image upload in MB (default: %(default)s)")
    s.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="the page's starting width and height in pixels, a multiple of 64 "
                        "(default: %(default)s, the size the models were trained at)")
    s.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES,
                   help="the page's initial number of images (default: %(default)s)")
    s.add_argument("--keep-minutes", type=float, default=KEEP_MINUTES,
                   help="how long results stay downloadable (default: %(default)s)")
    add_model_options(s)
    s.set_defaults(func=cmd_serve)
    return s


def _check_serve_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CCLDError(f"--port must be from 0 to 65535 (got {args.port})")
    if args.queue_size < 1:
        raise CCLDError(f"--queue-size must be at least 1 (got {args.queue_size})")
    if args.concurrency is not None and args.concurrency < 1:
        raise CCLDError(f"--concurrency must be at least 1 (got {args.concurrency})")
    UPLOAD_MB.check("--max-upload-mb", args.max_upload_mb)
    SIZE.check("--size", args.size)
    WEB_IMAGES.check("--num-images", args.num_images)
    if not (math.isfinite(args.keep_minutes) and args.keep_minutes > 0):
        raise CCLDError(f"--keep-minutes must be a positive number (got {args.keep_minutes})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    """Fails now, not after the models have loaded, when the address is taken."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CCLDError(f"--host {host!r} is not an address of this machine ({e.strerror}); "
                        "use 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            reason = "in use" if e.errno in (98, 48, 10048) else (e.strerror or str(e))
            raise CCLDError(f"cannot listen on {host}:{port} ({reason}); pass another --port, "
                            "or stop the program using it") from None


def _log_to_stderr() -> None:
    """The server's own log lines on stderr, marked as ccld serve's, and nothing of Gradio's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ccld serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # Gradio's internal deprecation notices and unclosed event loops are not the user's concern.
    warnings.filterwarnings("ignore", category=ResourceWarning)
    warnings.filterwarnings("ignore", module=r"gradio(_client)?(\.|$)")


def _keep_gradio_private(workdir: Path) -> None:
    """Sets Gradio up (through its environment variables, read at import) so that nothing leaves
    this machine and its files stay in `workdir`, which the server removes at exit."""
    # No analytics, no version check, no share links: nothing leaves this machine.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_RUN_HISTORY", "False")
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")  # the queue's local statistics
    if "GRADIO_TEMP_DIR" not in os.environ:  # Gradio's upload and result cache
        os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")


def _require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CCLDError("the web app needs Gradio; install it with pip install 'ccld[web]'") from None


def _load_models(args):
    """(the pipeline, loaded once; how many samplings may run at once on its device)."""
    from .options import load_pipeline

    log.info("loading the models ...")
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    concurrency = args.concurrency or (1 if pipe.device.type in ("cpu", "mps") else 2)
    log.info("models loaded in %.1f s on %s (%s); %d sampling(s) at once, queue of %d",
             time.perf_counter() - t0, pipe.device,
             ", ".join(f"{k}: {v}" for k, v in pipe.sources.items()), concurrency,
             args.queue_size)
    return pipe, concurrency


def _launch(demo, args, max_upload_bytes: int) -> None:
    """Starts serving `demo` in Gradio's threads and says where; an address it cannot listen on
    is a CCLDError."""
    if not _is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach this machine can use the app",
                    args.host)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False,
                    inbrowser=False, prevent_thread_lock=True, show_error=True,
                    max_file_size=max_upload_bytes, allowed_paths=[str(demo.ccld_store.root)],
                    ssr_mode=False, mcp_server=False, pwa=False, run_history=False,
                    enable_monitoring=False, footer_links=["api"], quiet=True,
                    css=demo.ccld_css)
    except OSError as e:
        reason = " ".join(str(e).split(". ")[:1]).strip()
        raise CCLDError(f"cannot listen on {args.host}:{args.port} ({reason}); pass another "
                        "--port or --host") from None
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    if ":" in host:
        host = f"[{host}]"
    port = demo.server_port if getattr(demo, "server_port", None) else args.port
    log.info("ready: open http://%s:%d/ (Ctrl+C stops)", host, port)


def _wait_for_stop() -> None:
    """Returns on SIGTERM or Ctrl+C; meanwhile the server runs in Gradio's threads."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def _close(demo) -> None:
    if demo is None:
        return
    try:
        demo.close()
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass


def cmd_serve(args) -> int:
    """`ccld serve`: checks the options and the port before the slow model loading, serves until
    stopped, then removes everything it wrote."""
    _check_serve_args(args)
    _check_port_free(args.host, args.port)
    _log_to_stderr()
    workdir = Path(tempfile.mkdtemp(prefix="ccld-serve-"))
    _keep_gradio_private(workdir)
    demo = None
    try:
        _require_gradio()
        pipe, concurrency = _load_models(args)
        store = ResultStore(workdir / "results", max_age=args.keep_minutes * 60)
        log.info("scratch folder %s (removed at exit)", workdir)
        max_upload_bytes = int(args.max_upload_mb * 1e6)
        demo = build_app(pipe, store=store, concurrency=concurrency, queue_size=args.queue_size,
                         size=args.size, max_upload_bytes=max_upload_bytes,
                         keep_minutes=args.keep_minutes, num_images=args.num_images)
        _launch(demo, args, max_upload_bytes)
        _wait_for_stop()
        log.info("stopping")
        return 0
    finally:
        _close(demo)
        shutil.rmtree(workdir, ignore_errors=True)
