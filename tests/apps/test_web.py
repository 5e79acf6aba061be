"""The web app without a server: input checks, generation, the bounded result store, the CLI.

The server itself, the load test and the browser are in test_web_server.py.
"""

import ast
import importlib.util
import inspect
import os
import threading
import time
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import pytest
from PIL import Image

from ccld import sampling  # noqa: E402
from ccld.apps import web  # noqa: E402
from ccld.apps.cli import build_parser, main  # noqa: E402
from ccld.io.images import read_png_parameters  # noqa: E402
from ccld.limits import WEB_SEED  # noqa: E402
from ccld.pipeline import DEFAULT_GUIDANCE, DEFAULT_STRENGTH, CCLDPipeline  # noqa: E402
from conftest import FakePipe, api_client, free_port  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                reason="the web app needs gradio (pip install -e '.[web]')")


def gradio():
    """gradio, imported by the tests that run, not while every worker collects this file (5 s)."""
    return importlib.import_module("gradio")


@pytest.fixture(scope="module")
def gr():
    return gradio()


@pytest.fixture
def store(tmp_path):
    s = web.ResultStore(tmp_path / "results")
    yield s
    s.close()


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "picture.png"
    Image.new("RGB", (80, 60), (200, 120, 40)).save(path)
    return str(path)


@pytest.fixture
def not_an_image(tmp_path):
    path = tmp_path / "notes.png"  # an image's name, a text file's bytes
    path.write_text("these are not pixels\n" * 10)
    return str(path)


@pytest.fixture(scope="module")
def pipe(fixtures):
    from ccld.pipeline import CCLDPipeline

    return CCLDPipeline.from_files(unet=str(fixtures / "unet.ckpt"),
                                   autoencoder=str(fixtures / "autoencoder.ckpt"),
                                   cloob=str(fixtures / "cloob.pkl"),
                                   cloob_config=str(fixtures / "cloob.json"))


def error_of(store, **kwargs) -> str:
    kwargs.setdefault("prompts", "a cat")
    with pytest.raises(gradio().Error) as e:
        web.generate(FakePipe(), store=store, **kwargs)
    return e.value.message


# Input checks: each a clear one-line message, before any model work

@pytest.mark.parametrize("kwargs, expected", [
    ({"steps": 0}, "steps must be a whole number from 1 to 250 (got 0)"),
    ({"steps": 251}, "steps must be a whole number from 1 to 250 (got 251)"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": None}, "steps is missing"),
    ({"num_images": 10_000}, "number of images must be a whole number from 1 to 16 (got 10000)"),
    ({"num_images": 0}, "number of images must be a whole number from 1 to 16"),
    ({"seed": 2 ** 40}, "seed must be a whole number from 0 to 4294967295"),
    ({"seed": -5}, "seed must be a whole number"),
    ({"method": "euler"}, "unknown method 'euler'; choose from plms"),
    ({"guidance": float("nan")}, "guidance must be a number"),
    ({"prompts": ""}, "type a prompt"),
    ({"prompts": "  \n \n"}, "type a prompt"),
    ({"prompts": "a cat:3x"}, "bad prompt weight in 'a cat:3x'"),
    ({"prompts": "a cat:1e9"}, "the weight in prompt 'a cat:1e9' must be a number from -100"),
    ({"prompts": "x" * 2000}, "keep each under 1000"),
    ({"prompts": "\n".join(["cat"] * 17)}, "17 prompts is too many"),
])
def test_bad_inputs_get_a_message(store, kwargs, expected):
    assert expected in error_of(store, **kwargs)
    assert store.batches() == []


def test_blank_values_take_their_defaults(png):
    request = web.check_request(prompts="a cat", image_prompts=[png], image_weight="",
                                init_image=None, strength=None, method="ddim", steps=3,
                                guidance="", seed="", num_images=2, max_upload_bytes=10 ** 6)
    assert request.guidance == DEFAULT_GUIDANCE
    assert [(p.value, p.weight) for p in request.prompts] == [("a cat", DEFAULT_GUIDANCE)]
    assert [(p.label, p.weight) for p in request.image_prompts] == [
        ("picture.png", DEFAULT_GUIDANCE)]
    # a strength is a setting of image to image only (the same rule everywhere)
    assert request.strength is None and request.init_image is None
    assert 0 <= request.seed <= WEB_SEED.high
    assert (request.method, request.steps, request.num_images) == ("ddim", 3, 2)
    # the image prompt weight follows the guidance when blank
    request = web.check_request(prompts="", image_prompts=png, image_weight=None, init_image=png,
                                strength=0.5, method="plms", steps=1, guidance=5, seed=4,
                                num_images=1, max_upload_bytes=10 ** 6)
    assert [p.weight for p in request.image_prompts] == [5.0]
    assert request.init_image.label == "picture.png" and request.strength == 0.5
    assert request.resolved({"method": "plms", "steps": 1, "guidance": 5}).strength == 0.5
    blank = web.check_request(prompts="", image_prompts=None, image_weight=None, init_image=png,
                              strength=None, method="plms", steps=1, guidance=None, seed=4,
                              num_images=1, max_upload_bytes=10 ** 6)
    assert blank.resolved({"method": "plms", "steps": 1, "guidance": 3}).strength == \
        DEFAULT_STRENGTH


def test_a_sampler_registered_at_run_time_is_offered_and_accepted(store, monkeypatch):
    monkeypatch.setitem(sampling.SAMPLERS, "mine", sampling.SAMPLERS["ddim"])
    demo = web.build_app(FakePipe(), store=store, size=64)
    method = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "method")
    assert [value for _, value in method.choices] == list(sampling.SAMPLERS)
    assert "mine" in error_of(store, method="euler")  # the message lists what is registered
    gallery, params = web.generate(FakePipe(), "a cat", method="mine", steps=1, seed=1,
                                   store=store, size=64)
    assert params["method"] == "mine" and len(gallery) == 1


def test_non_image_upload_gets_a_message(store, not_an_image):
    message = error_of(store, image_prompts=[not_an_image])
    assert message.startswith("image prompt notes.png: not an image file ccld can read")
    assert os.path.dirname(not_an_image) not in message  # the upload's name, not its server path
    message = error_of(store, init_image=not_an_image)
    assert message.startswith("init image notes.png: not an image file ccld can read")


def test_upload_size_limit(gr, store, png):
    with pytest.raises(gr.Error, match=r"more than the 0.0001 MB upload limit"):
        web.generate(FakePipe(), "a cat", image_prompts=[png], store=store, max_upload_bytes=100)


def test_upload_limits_and_forms(store, png, tmp_path):
    assert "too many" in error_of(store, image_prompts=[png] * 9)
    assert "the upload is gone" in error_of(store, image_prompts=[str(tmp_path / "gone.png")])
    assert "strength must be a number above 0 and at most 1" in error_of(store, init_image=png,
                                                                        strength=0)
    # Gradio hands uploads over as paths, or as dicts through some clients
    gallery, params = web.generate(FakePipe(), "", image_prompts={"path": png}, store=store,
                                   steps=1, seed=3, size=64)
    assert params["image_prompts"] == [["picture.png", 3.0]]


def test_blank_seed_is_random_and_recorded(store):
    seeds = set()
    for _ in range(3):
        gallery, params = web.generate(FakePipe(), "a cat", seed=None, steps=1, store=store, size=64)
        assert 0 <= params["seed"] <= WEB_SEED.high
        seeds.add(params["seed"])
        assert read_png_parameters(gallery[0][0])["seed"] == params["seed"]
    assert len(seeds) > 1


def test_progress_and_serialised_sampling(store):
    fake = FakePipe(delay=0.2)
    lock = threading.BoundedSemaphore(1)
    updates = []

    def progress(value, desc=None, unit=None):
        updates.append((value, desc))

    def one(i):
        web.generate(fake, f"cat {i}", steps=4, seed=i, num_images=1, store=store, size=64,
                     lock=lock, progress=progress if i == 0 else None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert fake.calls == 3
    assert fake.most_at_once == 1  # one sampling at a time
    steps = [v for v, d in updates if d == "Sampling"]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert ("Decoding" in [d for _, d in updates])


def test_result_store_is_bounded(tmp_path):
    s = web.ResultStore(tmp_path / "r", keep=3, max_age=3600)
    folders = [s.new_batch() for _ in range(6)]
    assert s.batches() == folders[-3:]
    old = time.time() - 7200
    os.utime(folders[-2], (old, old))
    s.prune()
    assert s.batches() == [folders[-3], folders[-1]]
    owned = web.ResultStore()
    owned.new_batch()
    owned.close()
    assert not owned.root.exists()


def test_generate_paints_pngs_with_parameters(pipe, store, png):
    calls = []
    gallery, params = web.generate(
        pipe, "a snowy landscape:2\nblue", image_prompts=[png], image_weight=1.5, init_image=png,
        strength=0.8, method="ddim", steps=2, guidance=3, seed=7, num_images=2, store=store,
        size=64, progress=lambda value, desc=None, unit=None: calls.append(desc))
    assert len(gallery) == 2
    assert calls.count("Sampling") == 2
    for i, (path, caption) in enumerate(gallery):
        assert caption == f"seed 7 · {i + 1}/2"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64)
        saved = read_png_parameters(path)
        assert saved["index"] == i
        assert saved["prompts"] == [["a snowy landscape", 2.0], ["blue", 3.0]]
        assert saved["image_prompts"] == [["picture.png", 1.5]]
        assert saved["init_image"] == "picture.png" and saved["strength"] == 0.8
        assert saved["seed"] == 7 and saved["steps"] == 2 and saved["method"] == "ddim"
    assert params == {k: v for k, v in saved.items() if k != "index"}
    # the same settings paint the same pictures
    again, _ = web.generate(pipe, "a snowy landscape:2\nblue", image_prompts=[png],
                            image_weight=1.5, init_image=png, strength=0.8, method="ddim",
                            steps=2, guidance=3, seed=7, num_images=2, store=store, size=64)
    with Image.open(gallery[1][0]) as a, Image.open(again[1][0]) as b:
        assert a.tobytes() == b.tobytes()


def test_previews_come_from_the_tiny_decoder_and_the_pngs_from_the_full_one(gr, store):
    fake = FakePipe(tiny_decoder="a tiny decoder")
    outputs = list(web.generate_with_previews(fake, "a cat", steps=5, seed=1, num_images=2,
                                              store=store, size=64))
    *previews, (gallery, params) = outputs
    assert [[caption for _, caption in shown] for shown, _ in previews] == \
        [[f"preview · step {k}/5"] * 2 for k in (2, 4, 5)]  # every 2 steps, and the last
    assert all(isinstance(image, Image.Image) and cleared is None
               for shown, cleared in previews for image, _ in shown)
    assert fake.decoded_by == ["tiny"] * 3 + ["full"]  # one full decode: both images, one chunk
    assert params["decoder"] == "full" and read_png_parameters(gallery[1][0])["decoder"] == "full"
    # without a tiny decoder the linear latent-to-RGB map previews; errors reach the caller
    plain = FakePipe()
    assert len(list(web.generate_with_previews(plain, "a cat", steps=3, store=store,
                                               size=64))) == 3
    assert plain.decoded_by == ["linear"] * 2 + ["full"]
    with pytest.raises(gr.Error, match="type a prompt"):
        list(web.generate_with_previews(fake, "", steps=3, store=store, size=64))


def test_previews_with_the_real_pipeline(pipe, store):
    from ccld.models.tiny_decoder import TinyDecoder, TinyDecoderConfig

    tiny = TinyDecoder(TinyDecoderConfig(decoder_block_out_channels=(8, 8, 8, 8)))
    with_tiny = CCLDPipeline(pipe.unet, pipe.autoencoder, pipe.cloob, dict(pipe.sources),
                             decoder=tiny)
    *previews, (gallery, params) = web.generate_with_previews(
        with_tiny, "a cat", steps=2, seed=1, store=store, size=64)
    assert len(previews) == 1 and previews[0][0][0][0].size == (64, 64)
    full, _ = web.generate(pipe, "a cat", steps=2, seed=1, store=store, size=64)
    with Image.open(gallery[0][0]) as a, Image.open(full[0][0]) as b:
        assert a.tobytes() == b.tobytes()  # the PNG is the full decoder's
    # without one, the linear map's previews, at the picture's size
    *previews, _ = web.generate_with_previews(pipe, "a cat", steps=2, seed=1, width=128,
                                              height=64, store=store, size=64)
    assert len(previews) == 1 and previews[0][0][0][0].size == (128, 64)


def test_width_and_height_from_the_page(store):
    gallery, params = web.generate(FakePipe(), "a cat", steps=1, seed=1, width=192, height=128,
                                   store=store, size=64)
    with Image.open(gallery[0][0]) as image:
        assert image.size == (192, 128)
    assert (params["width"], params["height"]) == (192, 128)
    _, params = web.generate(FakePipe(), "a cat", steps=1, seed=1, store=store, size=64)
    assert (params["width"], params["height"]) == (64, 64)  # blank: the server's --size


def test_vary_picks_the_selected_picture_and_a_new_seed(gr, pipe, store):
    _, params = web.generate(pipe, "a cat", steps=2, seed=5, num_images=2, store=store, size=64)
    variation, seed = web.pick_variation(params, 1, 0.0)
    assert variation == {"variation_of": 5, "variation_index": 1, "variation_strength": 0.0}
    assert 0 <= seed <= WEB_SEED.high
    assert web.pick_variation(params, None, 0.3)[0]["variation_index"] == 0  # nothing selected
    # a variation at strength 0 is the selected picture again; its PNG records the variation
    first, _ = web.generate(pipe, "a cat", steps=2, seed=5, num_images=1, store=store, size=64)
    again, varied = web.generate(pipe, "a cat", steps=2, seed=seed, num_images=1, store=store,
                                 size=64, **web.pick_variation(params, 0, 0.0)[0])
    with Image.open(first[0][0]) as a, Image.open(again[0][0]) as b:
        assert a.tobytes() == b.tobytes()
    assert varied["variation_of"] == 5 and varied["seed"] == seed
    # varying a variation varies the same picture again
    assert web.pick_variation(varied, 0, 0.5)[0] == \
        {"variation_of": 5, "variation_index": 0, "variation_strength": 0.5}
    with pytest.raises(gr.Error, match="paint some pictures first"):
        web.pick_variation(None, 0, 0.3)
    with pytest.raises(gr.Error, match="variation strength must be a number from 0 to 1"):
        web.pick_variation(params, 0, 2)


def test_pipeline_errors_become_messages(gr, pipe, store):
    with pytest.raises(gr.Error, match="width must be a multiple of 64"):
        web.generate(pipe, "a cat", steps=1, store=store, width=100)


def test_build_app_api_and_queue(gr, store):
    demo = web.build_app(FakePipe(), store=store, concurrency=1, queue_size=5, size=64)
    assert isinstance(demo, gr.Blocks)
    info = demo.get_api_info()
    endpoint = info["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == ["prompts", "image_prompts", "image_weight", "init_image", "strength",
                     "method", "steps", "guidance", "seed", "num_images", "width", "height",
                     "mask", "mask_blur", "hires_width", "hires_height", "hires_strength"]
    optional = {p["parameter_name"] for p in endpoint["parameters"] if p["parameter_has_default"]}
    assert optional == set(names) - {"prompts"}
    assert len(endpoint["returns"]) == 2
    assert list(info["named_endpoints"]) == ["/generate"]  # the dice is not an API
    assert demo._queue.max_size == 5
    fn = next(f for f in demo.fns.values() if f.api_name == "generate")
    assert fn.concurrency_limit == 1
    # nothing written into the package (Gradio writes a .pyi beside a component subclass)
    assert not Path(web.__file__).with_suffix(".pyi").exists()


@pytest.mark.parametrize("name", ["generate_latents", "decode", "preview", "describe"])
def test_fake_pipe_takes_what_the_pipeline_takes(name):
    """The stand-in's methods have the pipeline's parameters and defaults; keyword-only past the
    prompts, so the web app must call the pipeline by keyword."""
    real = inspect.signature(getattr(CCLDPipeline, name)).parameters
    fake = inspect.signature(getattr(FakePipe, name)).parameters
    assert [(p.name, p.default) for p in fake.values()] == \
        [(p.name, p.default) for p in real.values()]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in list(fake.values())[3:])


def test_web_does_not_import_the_cli():
    """The CLI imports the web app for `ccld serve`; the other way round would be a circle."""
    imported = set()
    for path in Path(web.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):  # its modules sit in ccld.apps.web
                package = ["ccld", "apps", "web"][:4 - node.level] if node.level else []
                module = ".".join([*package, node.module or ""])
                imported.add(module.rstrip("."))
                imported.update(f"{module.rstrip('.')}.{alias.name}" for alias in node.names)
    assert "ccld.apps.options" in imported  # what it uses instead
    assert not {m for m in imported if m == "ccld.apps.cli" or m.startswith("ccld.apps.cli.")}


def test_serve_command_options():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.func) == ("127.0.0.1", 7860, web.cmd_serve)
    assert args.queue_size >= 1 and args.concurrency is None


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be from 0 to 65535"),
    (["--queue-size", "0"], "--queue-size must be at least 1"),
    (["--size", "100"], "--size must be a multiple of 64 from 64 to 1024 (got 100)"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be a number above 0"),
])
def test_serve_rejects_bad_options_before_loading(capsys, argv, message):
    assert main(["serve", *argv, "--unet", "/nonexistent/unet.ckpt"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:::gradio.queueing")  # Gradio's own use of pandas
def test_queue_is_bounded_and_overflow_gets_a_message(tmp_path, store):
    """A launched app with a queue of 1 turns extra requests away with a message and carries on."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    demo = web.build_app(FakePipe(delay=1.5), store=store, concurrency=1, queue_size=1, size=64)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                share=False, ssr_mode=False, mcp_server=False, run_history=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        clients = [api_client(url, tmp_path / str(i)) for i in range(4)]

        def one(i):
            try:
                clients[i].predict(prompts=f"cat {i}", steps=2, seed=i, num_images=1,
                                   api_name="/generate")
                return "ok"
            except Exception as e:  # noqa: BLE001 - the message is what is checked
                return str(e)

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(one, range(4)))
        assert "ok" in outcomes
        refused = [o for o in outcomes if o != "ok"]
        assert refused and all("queue is full" in o.lower() for o in refused), outcomes
        assert one(0) == "ok"  # and it carries on
    finally:
        demo.close()


def test_the_api_example_takes_the_pages_own_address(store):
    """Not a fixed 127.0.0.1:7860: the page puts its own address in when it loads (whatever
    --host and --port, or a proxy in front, made it)."""
    demo = web.build_app(FakePipe(), store=store, size=64, examples=[])
    config = demo.get_config_file()
    texts = [c["props"].get("value", "") for c in config["components"]
             if c.get("type") == "markdown"]
    assert not any("7860" in str(t) for t in texts)
    assert any("window.location" in str(d.get("js")) for d in config["dependencies"])


def test_a_web_response_reveals_no_server_path(pipe, store, fixtures):
    gallery, params = web.generate(pipe, "a cat", steps=1, seed=5, num_images=1, store=store,
                                   size=64)
    from ccld.io.images import read_png_parameters

    served = read_png_parameters(gallery[0][0])
    for record in (params, served):
        assert str(fixtures) not in repr(record) and str(store.root) not in repr(record)
    assert not any("/" in value for value in params["models"].values()), params["models"]


def test_inpainting_and_a_larger_picture_from_the_form(gr, pipe, store, tmp_path):
    from PIL import Image

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (32, 0, 64, 64))
    half.save(mask)
    request = web.check_request(prompts="a cat", init_image=str(init), mask=str(mask),
                                mask_blur=2.0, strength=1.0, max_upload_bytes=10**6, size=64)
    assert (request.mask.label, request.mask_blur) == ("mask.png", 2)
    larger = web.check_request(prompts="a cat", hires_width=128, hires_height=64.0,
                               hires_strength=0.4, max_upload_bytes=10**6, size=64)
    assert (larger.hires, larger.hires_strength) == ((128, 64), 0.4)
    off = web.check_request(prompts="a cat", hires_width=0, hires_height=None,
                            max_upload_bytes=10**6, size=64)
    assert off.hires is None
    with pytest.raises(gr.Error, match="larger width must be a multiple of 64"):
        web.check_request(prompts="a cat", hires_width=100, hires_height=128,
                          max_upload_bytes=10**6, size=64)
    with pytest.raises(gr.Error, match="mask marks what to repaint of an init image, so it "
                                       "needs one: upload one under Init image, or leave mask out"):
        web.check_request(prompts="a cat", mask=str(mask), max_upload_bytes=10**6, size=64)


def test_a_mask_drawn_on_the_init_image_becomes_the_mask_upload(store, tmp_path):
    import numpy as np

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(init)
    assert web.editor_background(str(init)) == {"background": str(init), "layers": [],
                                                "composite": str(init)}
    assert web.editor_background(None) is None
    stroke = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 200), (40, 0, 64, 48))
    path = web.mask_from_drawing({"background": None, "layers": [stroke], "composite": None},
                                 store)
    with Image.open(path) as mask:
        assert mask.size == (64, 48) and mask.mode == "L"
        pixels = np.asarray(mask)
    assert (pixels[:, 40:] == 255).all() and (pixels[:, :40] == 0).all()
    empty = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    assert web.mask_from_drawing({"layers": [empty]}, store) is None
    assert web.mask_from_drawing({"layers": []}, store) is None
    assert web.mask_from_drawing(None, store) is None
