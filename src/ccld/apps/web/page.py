"""The web app's page: a Gradio Blocks app of the form, the gallery and the API endpoint around a
loaded pipeline (`build_app`)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from ...limits import SIZE, WEB_IMAGE_PROMPTS, WEB_IMAGES, WEB_PROMPTS, WEB_SEED, WEB_STEPS
from ...settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_METHOD,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_VARIATION_STRENGTH,
)
from .requests import (
    DEFAULT_MAX_UPLOAD_MB,
    KEEP_MINUTES,
    ResultStore,
    editor_background,
    generate_with_previews,
    mask_from_drawing,
    pick_variation,
)

DEFAULT_QUEUE_SIZE = 32
DEFAULT_NUM_IMAGES = 4
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
`init_image=handle_file("start.png")`; `width=` and `height=` set the size (multiples of 64);
`mask=handle_file("mask.png")` inpaints its white part; `hires_width=` and `hires_height=`
paint larger (0: off).
"""


API_URL_UNKNOWN = "http://HOST:PORT/"  # until the page, loaded, puts its own address in
_API_DOC_JS = ("() => " + json.dumps(API_DOC)
               + ".replace('{url}', window.location.origin + window.location.pathname)")

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
    mask: object
    mask_blur: object
    mask_editor: object  # draws a mask on the init image into `mask` (not an API input)
    hires_width: object
    hires_height: object
    hires_strength: object

    def api_inputs(self) -> list:
        """The inputs of `generate`, in the order of its parameters (the API's)."""
        return [self.prompts, self.image_prompts, self.image_weight, self.init_image,
                self.strength, self.method, self.steps, self.guidance, self.seed, self.num_images,
                self.width, self.height, self.mask, self.mask_blur, self.hires_width,
                self.hires_height, self.hires_strength]

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
        mask = gr.File(label="Mask (inpainting: repaint its white part of the init image)",
                       file_count="single", elem_id="mask")
        mask_editor = gr.ImageEditor(
            label="... or draw it on the init image (what you paint is repainted)", type="pil",
            sources=(), layers=False, transforms=(), image_mode="RGBA",
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="mask-editor")
        mask_blur = _named_range_checks(gr.Slider(
            0, 64, value=0, step=1, label="Mask blur", info="pixels of feathering at its edge",
            elem_id="mask-blur"))
    return image_prompts, image_weight, init_image, strength, mask, mask_blur, mask_editor


def _hires_inputs():
    """A larger picture (the hires fix): its size (0: off) and the refinement's strength."""
    import gradio as gr

    with gr.Accordion("Larger picture", open=False):
        with gr.Row():
            width, height = (gr.Number(0, precision=0, label=f"Larger {side}",
                                       info="0: off; painted at Width x Height, then refined",
                                       elem_id=f"hires-{side}") for side in ("width", "height"))
        strength = _named_range_checks(gr.Slider(
            0.05, 1.0, value=DEFAULT_HIRES_STRENGTH, step=0.05, label="Refinement strength",
            elem_id="hires-strength"))
    return width, height, strength


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

    from ... import sampling

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
        (image_prompts, image_weight, init_image, strength, mask, mask_blur,
         mask_editor) = _upload_inputs()
        hires_width, hires_height, hires_strength = _hires_inputs()
    return _Form(prompts=prompts, generate=button, method=method, steps=steps, guidance=guidance,
                 num_images=count, seed=seed, dice=dice, image_prompts=image_prompts,
                 image_weight=image_weight, init_image=init_image, strength=strength,
                 width=width, height=height, mask=mask, mask_blur=mask_blur,
                 mask_editor=mask_editor,
                 hires_width=hires_width, hires_height=hires_height,
                 hires_strength=hires_strength)


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


def _generate_handler(pipe, *, store: ResultStore, lock, size: int, max_upload_bytes: int):
    """The Generate button's function: the form's values into `generate_with_previews` (a
    generator, so the gallery can show previews; the API returns its last value). The Vary
    button passes a `variation` too (see `pick_variation`)."""
    import gradio as gr

    def run(prompts, image_prompts=None, image_weight=None, init_image=None, strength=None,
            method=None, steps=None, guidance=None, seed=None, num_images=None, width=None,
            height=None, mask=None, mask_blur=None, hires_width=None, hires_height=None,
            hires_strength=None, variation=None,
            progress=gr.Progress()):  # None defaults: optional in the API (components' values)
        form = dict(image_prompts=image_prompts, image_weight=image_weight,
                    init_image=init_image, strength=strength, method=method, steps=steps,
                    guidance=guidance, seed=seed, num_images=num_images, width=width,
                    height=height, mask=mask, mask_blur=mask_blur, hires_width=hires_width,
                    hires_height=hires_height, hires_strength=hires_strength,
                    **(variation or {}))
        yield from generate_with_previews(pipe, prompts, store=store, size=size,
                                          max_upload_bytes=max_upload_bytes, lock=lock,
                                          progress=progress, **form)

    return run


def _selected_index(evt) -> int:
    return evt.index


def _wire(form: _Form, results: _Results, run, concurrency: int, store: ResultStore) -> None:
    """Generate paints (also the API's `/generate`); Vary picks the variation and a seed, then
    paints (not an API: a client varies with `variation_of=` in Python); clicking a picture
    selects it; the die rolls a seed in the browser; an uploaded init image is put in the mask
    editor, and what is drawn there becomes the Mask upload."""
    import gradio as gr

    form.init_image.change(editor_background, form.init_image, form.mask_editor,
                           api_visibility="private", queue=False)
    # nothing drawn (a new background included) leaves an uploaded mask as it is
    form.mask_editor.change(lambda value: mask_from_drawing(value, store) or gr.skip(),
                            form.mask_editor, form.mask, api_visibility="private", queue=False)

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
            api_doc = gr.Markdown(API_DOC.format(url=API_URL_UNKNOWN))
        _wire(form, results, run, concurrency, store)
        # the address is the browser's: the server's --host and --port, or a proxy in front
        demo.load(None, None, api_doc, js=_API_DOC_JS, queue=False, api_visibility="private")
    demo.queue(max_size=max(1, int(queue_size)), default_concurrency_limit=concurrency)
    demo.ccld_store = store  # for the server's cleanup and for tests
    demo.ccld_css = CSS
    return demo


