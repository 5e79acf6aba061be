"""End to end: the pipeline and `ccld generate` reproduce the reference demo on the fixtures."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ccld import CCLDPipeline
from ccld.apps.cli import main
from ccld.io.images import read_png_parameters
from conftest import max_rel_err

PROMPT = "A martian landscape painting, oil on canvas"


@pytest.fixture(scope="module")
def files(model_files):
    return model_files


@pytest.fixture(scope="module")
def pipe(fixture_pipeline):
    return fixture_pipeline


@pytest.fixture(scope="module")
def reference(fixtures):
    return load_file(fixtures / "end_to_end.safetensors")


def reference_uint8(pixels):
    # the demo's to_pil_image: clamp, to [0, 1], then mul(255).byte() truncation
    return ((pixels.clamp(-1, 1) + 1) / 2).mul(255).byte().permute(0, 2, 3, 1).numpy()


def assert_pixels_match(images, reference):
    expected = reference_uint8(reference["pixels"]).astype(int)
    for image, exp in zip(images, expected, strict=True):
        assert np.abs(np.asarray(image).astype(int) - exp).max() <= 1


def test_end_to_end_latents_and_pixels(pipe, reference):
    image_prompt = (reference["image_prompt"][0], 1.0)
    latents = pipe.generate_latents([PROMPT], [image_prompt], num_images=2, steps=6,
                                    method="plms", seed=42)
    assert max_rel_err(latents, reference["latents"]) < 1e-4
    assert max_rel_err(pipe.decode(latents, latent_scale=2.55), reference["pixels"]) < 1e-4


def test_call_returns_pil_images_with_parameters(pipe, reference):
    images = pipe(f"{PROMPT}:3", image_prompts=[(reference["image_prompt"][0], 1.0)],
                  num_images=2, steps=6, method="plms", seed=42, latent_scale=2.55, progress=False)
    assert [im.size for im in images] == [(256, 256)] * 2
    assert_pixels_match(images, reference)
    params = json.loads(images[1].info["parameters"])
    assert params["prompts"] == [[PROMPT, 3.0]] and params["seed"] == 42 and params["index"] == 1


def test_seed_noise_is_the_demo_noise(pipe):
    noise, _ = pipe.initial_noise(3, 1234)
    torch.manual_seed(1234)
    assert torch.equal(noise, torch.randn([3, 4, 32, 32]))


def test_same_seed_same_picture_and_other_seed_differs(pipe):
    kw = dict(num_images=1, steps=3, method="ddpm", progress=False)
    a, b = pipe("a red circle", seed=5, **kw), pipe("a red circle", seed=5, **kw)
    c = pipe("a red circle", seed=6, **kw)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_default_latent_scale_is_the_unets(pipe):
    latents = torch.randn(1, 4, 32, 32)
    assert torch.equal(pipe.decode(latents), pipe.decode(latents, latent_scale=3.25))


def test_image_to_image_starts_from_the_noised_init(pipe, tmp_path):
    Image.new("RGB", (300, 200), (200, 40, 40)).save(tmp_path / "init.png")
    seen = []
    latents = pipe.generate_latents("a red circle", init_image=tmp_path / "init.png", strength=0.3,
                                    steps=4, method="ddim", seed=0,
                                    callback=lambda info: seen.append(float(info["t"])))
    assert latents.shape == (1, 4, 32, 32)
    # strength is a position on the demo's schedule: it starts there, never at full noise
    from ccld.sampling import get_timesteps
    assert seen == pytest.approx(get_timesteps(4, start=0.3).tolist()) and seen[0] < 0.5


def test_save_pretrained_round_trip_paints_the_same(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    again = CCLDPipeline.from_pretrained(tmp_path / "model")
    kw = dict(num_images=1, steps=3, seed=1, progress=False)
    assert np.array_equal(np.asarray(pipe("a red circle", **kw)[0]),
                          np.asarray(again("a red circle", **kw)[0]))
    assert float(again.unet.autoencoder_scale) == 3.25


def cli_files(files):
    return ["--unet", str(files["unet"]), "--autoencoder", str(files["autoencoder"]),
            "--cloob", str(files["cloob"]), "--cloob-config", str(files["cloob_config"])]


@pytest.mark.parametrize("recipe", [["--method", "plms", "--precision", "fp32"], ["--reference"]])
def test_cli_generate_reproduces_the_reference(files, reference, tmp_path, capsys, recipe):
    prompt_png = tmp_path / "prompt.png"
    arr = (reference["image_prompt"][0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(prompt_png)
    out = tmp_path / "out"
    code = main(["generate", f"{PROMPT}:3", "--image-prompt", f"{prompt_png}:1", "-n", "2",
                 "--seed", "42", "--steps", "6", *recipe, "--latent-scale", "2.55",
                 "--out", str(out), "--grid", "-q", "--device", "cpu", *cli_files(files)])
    assert code == 0
    images = [Image.open(out / f"{i:05}.png") for i in range(2)]
    assert_pixels_match(images, reference)
    params = read_png_parameters(out / "00000.png")
    assert params["method"] == "plms" and params["steps"] == 6 and params["latent_scale"] == 2.55
    assert params["image_prompts"] == [[str(prompt_png), 1.0]]
    with Image.open(out / "grid-00000.png") as grid:
        assert grid.size == (512, 256)
    # a second run numbers on instead of overwriting, its grid too
    assert main(["generate", "x", "--steps", "1", "--out", str(out), "-q", "--grid",
                 *cli_files(files)]) == 0
    assert (out / "00002.png").is_file() and (out / "grid-00002.png").is_file()
    with Image.open(out / "grid-00000.png") as grid:
        assert grid.size == (512, 256)


def folder_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("crash", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_convert_into_a_pipeline_folder_replaces_it_whole_or_not_at_all(files, tmp_path, capsys,
                                                                        monkeypatch, crash):
    """A conversion that dies mid-write (Ctrl-C, a full disk) leaves the folder that was there
    byte for byte as it was, and no half-written sibling; one that finishes replaces it whole."""
    import safetensors.torch

    folder = tmp_path / "m"
    assert main(["convert", str(folder), *cli_files(files)]) == 0
    (folder / "notes.txt").write_text("mine")  # a stray file goes with the old folder
    before = folder_bytes(folder)
    writes = []
    real_save = safetensors.torch.save_file

    def dying_save(tensors, path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:  # the CLOOB weights, after the U-Net's
            Path(path).write_bytes(b"half")
            raise crash
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    other_unet = ["--unet", str(files["unet"].parent / "unet_lightning.ckpt")]
    if crash is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            CCLDPipeline.from_files(**{**files, "unet": files["unet"].parent / "unet_lightning.ckpt"}
                                    ).save_pretrained(folder)
    else:
        assert main(["convert", str(folder), *cli_files(files)[2:], *other_unet]) == 2
        assert "could not write the pipeline folder (No space left" in capsys.readouterr().err
    assert folder_bytes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left beside it
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert main(["convert", str(folder), *cli_files(files)[2:], *other_unet]) == 0
    after = folder_bytes(folder)
    assert "notes.txt" not in after and after["unet/config.json"] != before["unet/config.json"]


def test_convert_refuses_a_folder_that_is_not_a_pipeline(files, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    assert main(["convert", str(tmp_path / "photos"), *cli_files(files)]) == 2
    err = capsys.readouterr().err
    assert "a folder that holds other files, not a pipeline folder" in err and err.count("\n") == 1
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_cli_convert_then_generate_from_the_folder(files, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "m"), *cli_files(files)]) == 0
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for args, out in [(["--model", str(tmp_path / "m")], "a"), (cli_files(files), "b")]:
        assert main(["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / out),
                     "-q", *args]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "00000.png")),
                          np.asarray(Image.open(tmp_path / "b" / "00000.png")))


def test_cli_info(fixtures, capsys, tmp_path):
    assert main(["info", str(fixtures / "unet.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "CCLD U-Net" in out and "23912012" in out and "3.25" in out
    assert "3.25 (the file's stored autoencoder_scale" in out and "2.55" not in out
    assert main(["info", "--json", str(fixtures / "unet_lightning.ckpt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["channel_multipliers"] == [1, 1, 1, 1] and info["autoencoder_scale"] == 5.0
    # a file named like the published student: its demo's 2.55 is mentioned
    (tmp_path / "model_student.ckpt").write_bytes((fixtures / "unet.ckpt").read_bytes())
    assert main(["info", "--json", str(tmp_path / "model_student.ckpt")]) == 0
    assert "--latent-scale 2.55" in json.loads(capsys.readouterr().out)["latent_scale"]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ["--image-prompt", "--init-image", "--strength", "--method", "--latent-scale",
                   "--unet", "--cloob-config", "--grid", "dpm++2m", "2.55"]:
        assert option in out


def test_defaults_are_the_fast_recipe_and_reference_is_the_demos(files, reference, tmp_path):
    from ccld.pipeline import DEFAULT_METHOD, DEFAULT_STEPS

    args = [f"{PROMPT}:3", "-n", "2", "--seed", "42", "--width", "64", "--height", "64", "-q",
            "--device", "cpu", *cli_files(files)]  # (small: the recipe is what is checked)
    assert main(["generate", *args, "--out", str(tmp_path / "fast")]) == 0
    params = read_png_parameters(tmp_path / "fast" / "00000.png")
    assert (params["method"], params["steps"]) == (DEFAULT_METHOD, DEFAULT_STEPS) == ("unipc", 11)
    assert params["precision"] in ("fp32", "bf16") and params["channels_last"]
    # --reference is the demo's recipe; explicit options still win over it
    assert main(["generate", *args, "--out", str(tmp_path / "ref"), "--reference",
                 "--steps", "6"]) == 0
    params = read_png_parameters(tmp_path / "ref" / "00000.png")
    assert (params["method"], params["steps"], params["precision"]) == ("plms", 6, "fp32")
    assert not params["channels_last"] and params["latent_scale"] == 3.25  # a local file: its buffer


def test_published_models_decode_at_the_demos_latent_scale(fixture_pipeline, files, tmp_path):
    from ccld.io import hub

    pipe = CCLDPipeline(fixture_pipeline.unet, fixture_pipeline.autoencoder, fixture_pipeline.cloob,
                        latent_scale=hub.PUBLISHED_LATENT_SCALE)
    latents = torch.randn(1, 4, 32, 32)
    assert torch.equal(pipe.decode(latents), fixture_pipeline.decode(latents, latent_scale=2.55))
    assert pipe.describe("x", (), num_images=1, steps=1, method="ddim", guidance=3.0, seed=0,
                         eta=0.0, init_image=None, latent_scale=None,
                         size=256)["latent_scale"] == 2.55
    # a converted folder keeps the scale it was decoded with; --latent-scale still overrides
    pipe.save_pretrained(tmp_path / "m")
    again = CCLDPipeline.from_pretrained(tmp_path / "m")
    assert again.default_latent_scale == 2.55 and float(again.unet.autoencoder_scale) == 3.25
    assert torch.equal(again.decode(latents, latent_scale=4.0),
                       fixture_pipeline.decode(latents, latent_scale=4.0))


# Many images: painted a batch at a time, written as they are done, never overwriting

def test_noise_drawn_in_batches_is_the_one_batch_noise():
    from ccld.pipeline import next_noise

    torch.manual_seed(77)
    expected = torch.randn([7, 4, 32, 32])
    generator = torch.Generator().manual_seed(77)
    batches = [next_noise(generator, count) for count in (3, 3, 1)]
    assert torch.equal(torch.cat(batches), expected)


def test_batches_paint_the_pictures_of_one_batch(pipe):
    kw = dict(num_images=3, steps=2, seed=9, size=128, progress=False)  # (decodes: the time)
    whole = pipe(PROMPT, **kw)
    batched = list(pipe.iter_images(PROMPT, batch_size=2, **kw))
    for a, b in zip(whole, batched, strict=True):  # the same noise; only float rounding,
        # which differs between the kernels of different batch sizes, may move a level
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
    assert [json.loads(b.info["parameters"])["index"] for b in batched] == [0, 1, 2]
    # a stochastic sampler's pictures depend on the batch size, which its PNGs then record
    ddpm = next(pipe.iter_images(PROMPT, num_images=3, batch_size=2, steps=1, method="ddpm",
                                 size=64, progress=False))
    assert json.loads(ddpm.info["parameters"])["batch_size"] == 2


def numbered_images(count, size=8):
    """Small images carrying parameters, as `iter_images` yields them."""
    for i in range(count):
        image = Image.new("RGB", (size, size), (i, 0, 0))
        image.info["parameters"] = json.dumps({"num_images": count, "index": i})
        yield image


def test_output_names_are_claimed_atomically(tmp_path):
    """Two runs writing into one folder at once, each numbering from what it saw at its start,
    never overwrite each other: every name is claimed by the first writer."""
    import threading

    from ccld.io.images import next_index, save_numbered

    out = tmp_path / "out"
    out.mkdir()
    written = []

    def run(shade):
        number = next_index(out) - 1
        for image in numbered_images(20):
            image.putpixel((0, 0), (shade, shade, shade))
            path, number = save_numbered(image, out, number + 1)
            written.append((path, shade, image.getpixel((1, 0))))

    runs = [threading.Thread(target=run, args=(shade,)) for shade in (100, 200)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()
    assert len({path for path, _, _ in written}) == 40 == len(list(out.glob("*.png")))
    for path, shade, pixel in written:  # each file still holds what its writer wrote
        with Image.open(path) as image:
            assert image.getpixel((0, 0)) == (shade,) * 3 and image.getpixel((1, 0)) == pixel


def test_the_grid_is_capped(tmp_path, capsys):
    from ccld.apps.generate import write_numbered
    from ccld.limits import GRID_IMAGES

    write_numbered(numbered_images(GRID_IMAGES.high + 6), tmp_path, grid=True)
    assert len(list(tmp_path.glob("0*.png"))) == GRID_IMAGES.high + 6
    with Image.open(tmp_path / "grid-00000.png") as grid:
        assert grid.size == (8 * 8, 8 * 8)  # 64 of the 70, eight by eight
    assert f"the grid shows the first 64 of the {GRID_IMAGES.high + 6} pictures" in \
        capsys.readouterr().err


def test_a_folder_made_for_a_picture_that_cannot_be_written_is_removed(tmp_path, monkeypatch):
    from ccld import CCLDError
    from ccld.apps.generate import write_numbered

    def disk_full(image, path, parameters, exclusive=False):
        raise CCLDError(f"{path}: could not write the image (No space left on device)")

    monkeypatch.setattr("ccld.io.images.save_png", disk_full)
    with pytest.raises(CCLDError, match="No space left"):
        write_numbered(numbered_images(2), tmp_path / "new" / "out", grid=False)
    assert list(tmp_path.iterdir()) == []
