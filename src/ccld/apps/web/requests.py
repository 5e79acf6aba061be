"""The web app's requests: the form's values checked into `ccld.Settings`, painted, and written as
PNGs into a bounded store of results.

Every input is checked in `check_request` (the WEB_* limits of `ccld.limits` first, then the
settings' own rules, the same as everywhere), which turns a bad value, an unreadable upload or a
`CCLDError` into a `gr.Error`: the page shows its one-line message and the server carries on.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

from ...errors import CCLDError
from ...limits import (
    SIZE,
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
from ...pipeline import PREVIEW_EVERY
from ...settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_METHOD,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    InitImage,
    Prompt,
    Settings,
)

log = logging.getLogger("ccld.apps.web")

DEFAULT_MAX_UPLOAD_MB = UPLOAD_MB.default
KEEP_BATCHES = 64
KEEP_MINUTES = 60.0
# the form's fields, in the order of the API's parameters
FORM_FIELDS = ("prompts", "image_prompts", "image_weight", "init_image", "strength", "method",
               "steps", "guidance", "seed", "num_images", "width", "height", "mask", "mask_blur",
               "hires_width", "hires_height", "hires_strength")
VARIATION_FIELDS = ("variation_of", "variation_index", "variation_strength")
# what a field that is not sent at all is (a Python caller's)
FORM_DEFAULTS = {"method": DEFAULT_METHOD, "steps": DEFAULT_STEPS, "num_images": 1}
# how the page names a setting in a message (see `ccld.errors`)
LABELS = {"num_images": "number of images", "image_prompts": "image prompts",
          "init_image": "init image", "variation_of": "variation of",
          "variation_index": "variation index", "variation_strength": "variation strength",
          "latent_scale": "latent scale", "mask_blur": "mask blur",
          "hires": "larger size", "hires_strength": "larger picture's strength"}
GIVING = {"prompts": "type a prompt in Prompts, TEXT or TEXT:WEIGHT a line",
          "image_prompts": "upload one under Image prompts",
          "init_image": "upload one under Init image",
          "mask": "upload one under Mask", "hires": "set a larger width and height"}


def page_words(name: str, giving: bool, what: str = "") -> str:
    if giving and name in GIVING:
        return GIVING[name]
    return LABELS.get(name, name.replace("_", " "))


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
    one the user can act on, its settings named as the page names them."""
    try:
        yield
    except CCLDError as e:
        raise _error(e.worded(page_words)) from None


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
    from ...io.images import load_image

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


def editor_background(init_image) -> dict | None:
    """The mask editor's value for a newly uploaded init image: that image to draw on."""
    path = _upload_path(init_image)
    return None if path is None else {"background": path, "layers": [], "composite": path}


def mask_from_drawing(value, store: ResultStore) -> str | None:
    """The mask drawn in the editor (what its strokes cover is white: repainted) as a PNG in
    `store`, for the form's Mask upload; None where nothing is drawn."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    from PIL import ImageChops

    alpha = layers[0].convert("RGBA").getchannel("A")
    for layer in layers[1:]:
        alpha = ImageChops.lighter(alpha, layer.convert("RGBA").getchannel("A"))
    mask = alpha.point(lambda a: 255 if a else 0)
    if mask.getextrema()[1] == 0:
        return None
    path = store.new_batch() / "drawn-mask.png"
    mask.save(path, format="PNG")
    return str(path)


def _load_image_prompts(items, weight: float, max_bytes: int) -> list:
    """The uploaded image prompts as `Prompt`s of `weight`, labelled with their file names."""
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
    from ...prompts import parse_weighted

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


def _blank(value) -> bool:
    return value is None or value == ""


def check_request(*, size: int = DEFAULT_SIZE, max_upload_bytes: int, **form) -> Settings:
    """The form's values (FORM_FIELDS, and VARIATION_FIELDS for Vary) as the settings they
    paint, checked, cheapest checks first and all before any model work; a `gr.Error` with a
    one-line message for the first one the user must fix. Blank values take defaults: the
    guidance DEFAULT_GUIDANCE, the image prompt weight the guidance, the seed a random one, the
    width and height `size` (the server's). The PNGs are the full decoder's."""
    unknown = set(form) - {*FORM_FIELDS, *VARIATION_FIELDS}
    if unknown:
        raise TypeError(f"check_request() got unknown form fields {sorted(unknown)}")
    form = {**FORM_DEFAULTS, **form}  # (the page sends every field: None is a blank one)
    get = form.get
    with _page_errors():
        steps = WEB_STEPS.check("steps", get("steps"))
        num_images = WEB_IMAGES.check("number of images", get("num_images"))
        guidance = WEIGHT.check("guidance", DEFAULT_GUIDANCE if _blank(get("guidance"))
                                else get("guidance"))
        image_weight = WEIGHT.check("image prompt weight", guidance if _blank(get("image_weight"))
                                    else get("image_weight"))
        seed = get("seed")
        if _blank(seed) or (isinstance(seed, (int, float)) and seed == -1):
            seed = secrets.randbelow(WEB_SEED.high + 1)
        seed = WEB_SEED.check("seed", seed)
        options = dict(steps=steps, num_images=num_images, guidance=guidance, seed=seed,
                       method=get("method"), full_decoder=True,
                       width=size if _blank(get("width")) else get("width"),
                       height=size if _blank(get("height")) else get("height"))
        if get("variation_of") is not None:
            options.update(variation_of=WEB_SEED.check("variation of", get("variation_of")),
                           variation_index=get("variation_index") or 0,
                           variation_strength=get("variation_strength"))
    prompts = parse_prompts(get("prompts"), guidance)
    image_prompts = _load_image_prompts(get("image_prompts"), image_weight, max_upload_bytes)
    init, init_name = _load_upload(get("init_image"), "init image", max_upload_bytes)
    if init is not None:
        options.update(init_image=InitImage(init, init_name), strength=get("strength"))
    mask, mask_name = _load_upload(get("mask"), "mask", max_upload_bytes)
    if mask is not None:
        options.update(mask=InitImage(mask, mask_name),
                       mask_blur=None if _blank(get("mask_blur")) else get("mask_blur"))
    hires = [get("hires_width"), get("hires_height")]
    if not all(_blank(side) or side == 0 for side in hires):  # 0 or blank: no larger picture
        with _page_errors():
            width, height = (SIZE.check(f"larger {side}", value) for side, value in
                             zip(("width", "height"), hires))
        options.update(hires=(width, height), hires_strength=(
            None if _blank(get("hires_strength")) else get("hires_strength")))
    with _page_errors():
        return Settings.build(prompts, image_prompts, **options)


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


def paint(pipe, settings: Settings, *, lock=None, progress: Callable | None = None,
          preview: Callable | None = None):
    """Samples and decodes the settings' images, holding `lock` (when given) meanwhile; their
    pixels by the full decoder (a few pictures per call: `ccld.pipeline.painting.decode`).
    `preview`: see `_previewing`.
    Running out of memory is a message, not a crash."""
    report = _Progress(progress, settings.steps)
    report.stage(0.0, "Waiting for the model" if lock is not None else "Starting")
    try:
        with lock if lock is not None else nullcontext(), _page_errors():
            report.stage(0.0, "Encoding prompts")
            latents = pipe.generate_latents(settings=settings,
                                            callback=_previewing(pipe, report, preview))
            report.stage(1.0, "Decoding")
            pixels = [pipe.decode(latents, full_decoder=True).cpu()]
            del latents  # freed before the next request takes the lock and makes its own
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            log.warning("out of memory painting %d images of %dx%d px", settings.num_images,
                        settings.width, settings.height)
            raise _error(f"out of memory painting {settings.num_images} images; "
                         "ask for fewer images") from None
        raise
    return pixels


def save_gallery(store: ResultStore, settings: Settings, pixels, params: dict):
    """Writes the images into a new batch folder as PNGs carrying `params` and their index;
    returns the gallery's (path, caption) pairs. Failing to save is the server's problem, and the
    message says so plainly."""
    from ...io.images import save_png, tensor_to_pil

    gallery = []
    images = (image for chunk in pixels for image in chunk)
    try:
        folder = store.new_batch()
        for index, image in enumerate(images):
            path = folder / f"ccld-{settings.seed}-{index:02d}.png"
            save_png(tensor_to_pil(image), path, {**params, "index": index})
            caption = f"seed {settings.seed} · {index + 1}/{settings.num_images}"
            if settings.variation_of is not None:
                caption = f"variation of {settings.variation_of} · {caption}"
            gallery.append((str(path), caption))
    except CCLDError as e:  # a full disk, say
        log.error("%s", e)
        raise _error(SAVE_FAILED) from None
    except OSError as e:
        log.error("cannot create a result folder in %s: %s", store.root, e)
        raise _error(SAVE_FAILED) from None
    return gallery


def generate(pipe, prompts: str = "", *, store: ResultStore, size: int = DEFAULT_SIZE,
             max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6), lock=None,
             progress: Callable | None = None, preview: Callable | None = None, **form):
    """Checks the form's values (`check_request`), paints, writes the PNGs; returns
    ([(png path, caption)], parameters).

    Every problem the user can fix is raised as `gr.Error` with a one-line message. `lock` (a
    Lock or Semaphore) bounds how many samplings run at once; `progress` is a `gr.Progress`;
    `preview(pixels, step, steps)` receives previews while sampling (see
    `generate_with_previews`).
    """
    started = time.perf_counter()
    settings = check_request(prompts=prompts, size=size, max_upload_bytes=max_upload_bytes, **form)
    pixels = paint(pipe, settings, lock=lock, progress=progress, preview=preview)
    with _page_errors():
        params = pipe.describe(settings=settings)
    gallery = save_gallery(store, settings, pixels, params)
    log.info("painted %d image(s), %s %d steps, seed %d, in %.1f s", settings.num_images,
             settings.method, settings.steps, settings.seed, time.perf_counter() - started)
    return gallery, params


def preview_gallery(pixels, step: int, steps: int) -> list:
    """The gallery's (image, caption) pairs of a preview; PIL images, nothing saved."""
    from ...io.images import tensor_to_pil

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
    with _page_errors():
        variation = dict(variation_of=WEB_SEED.check("variation of", of),
                         variation_index=VARIATION_INDEX.check("variation index", index),
                         variation_strength=VARIATION_STRENGTH.check("variation strength",
                                                                     strength))
    return variation, secrets.randbelow(WEB_SEED.high + 1)


