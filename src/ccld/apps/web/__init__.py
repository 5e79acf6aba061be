"""`ccld serve`: the web app, a Gradio page with a gallery of paintings and the same as an API.

    ccld serve                                   # http://127.0.0.1:7860, the default student
    ccld serve --model FOLDER --port 8000        # model options as in `ccld generate`

The models load once at start. While sampling, the gallery shows a quick preview of the clean
image every few steps (the autoencoder's linear latent-to-RGB map, or the tiny decoder where the
pipeline has one: `--decoder tiny:PATH`, or a `--model` folder that has one), and then the full
decoder's paintings. The page sets the picture's width and height (`--size` is their starting
value), and "Vary" paints variations of the selected result. Requests wait in Gradio's queue (bounded by
`--queue-size`) and at most `--concurrency` of them sample at once (1 on a CPU). Every input is
checked in `check_request` (requests.py), which turns a bad value, an unreadable upload or a
`CCLDError` into a `gr.Error`: the page shows its one-line message and the server carries on.
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

from .page import API_DOC, EXAMPLES, TITLE, build_app, examples_for, model_defaults
from .requests import (
    FORM_FIELDS,
    ResultStore,
    check_request,
    editor_background,
    generate,
    generate_with_previews,
    mask_from_drawing,
    parse_prompts,
    pick_variation,
)
from .server import add_serve_command, cmd_serve

__all__ = ["API_DOC", "EXAMPLES", "FORM_FIELDS", "TITLE", "ResultStore", "add_serve_command",
           "build_app", "check_request", "cmd_serve", "editor_background", "examples_for",
           "generate", "generate_with_previews", "mask_from_drawing", "model_defaults",
           "parse_prompts", "pick_variation"]
