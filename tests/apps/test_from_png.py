"""Painting a picture again from its PNG: `ccld generate --from-png` and
`CCLDPipeline.settings_from_png`, the proof that the settings round-trip through a PNG."""

import numpy as np
import pytest
from PIL import Image

from ccld import CCLDError
from ccld.apps.cli import main
from ccld.io.images import read_png_parameters
from ccld.settings import Settings

# every setting away from its default: weighted prompts, an image prompt, guidance, seed, steps,
# method, a non-square size and a variation of another seed's picture
UNUSUAL = ["a red tower:2", "fog:-0.5", "--guidance", "4.5", "--seed", "11", "--steps", "3",
           "--method", "ddim", "--width", "192", "--height", "128", "--variation-of", "5",
           "--variation-index", "1", "--variation-strength", "0.4", "-n", "3", "-q"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture
def image_prompt(tmp_path):
    path = tmp_path / "prompt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("sampler", [[], ["--eta", "0.7", "--batch-size", "2"]],
                         ids=["deterministic", "stochastic"])
def test_from_png_paints_a_non_default_picture_again_pixel_for_pixel(model_flags, tmp_path,
                                                                   image_prompt, sampler):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["generate", *UNUSUAL, "--image-prompt", f"{image_prompt}:0.7", *sampler,
                 "--out", str(first), *model_flags]) == 0
    original = first / "00002.png"  # the last picture: with --eta, of the run's second batch
    assert main(["generate", "--from-png", str(original), "-q", "--out", str(again),
                 *model_flags]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["00000.png"]
    assert np.array_equal(pixels(again / "00000.png"), pixels(original))
    recorded, repainted = read_png_parameters(original), read_png_parameters(again / "00000.png")
    assert {k: v for k, v in repainted.items() if k != "num_images"} == \
        {k: v for k, v in recorded.items() if k != "num_images"}


def test_options_given_with_from_png_change_single_settings(model_flags, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["generate", *UNUSUAL, "--out", str(first), *model_flags]) == 0
    assert main(["generate", "--from-png", str(first / "00001.png"), "--seed", "12", "--steps",
                 "2", "-q", "--out", str(again), *model_flags]) == 0
    recorded, changed = read_png_parameters(first / "00001.png"), read_png_parameters(again / "00000.png")
    assert (changed["seed"], changed["steps"]) == (12, 2)
    kept = ("prompts", "guidance", "method", "width", "height", "variation_of",
            "variation_index", "variation_strength", "index")
    assert {k: changed[k] for k in kept} == {k: recorded[k] for k in kept}


def test_from_png_with_prompts_of_its_own_takes_them(model_flags, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["generate", *UNUSUAL, "--out", str(first), *model_flags]) == 0
    assert main(["generate", "a blue sea", "--from-png", str(first / "00000.png"), "-q",
                 "--out", str(again), *model_flags]) == 0
    changed = read_png_parameters(again / "00000.png")
    assert [p["prompt"] if isinstance(p, dict) else p for p in changed["prompts"]] != \
        read_png_parameters(first / "00000.png")["prompts"]
    assert changed["guidance"] == 4.5 and changed["seed"] == 11


def test_settings_from_png_paints_the_same_picture_in_python(model_files, model_flags, tmp_path):
    from ccld import CCLDPipeline

    out = tmp_path / "out"
    assert main(["generate", *UNUSUAL, "--out", str(out), *model_flags]) == 0
    pipe = CCLDPipeline.from_files(**model_files)  # its own: the PNG's layout changes it
    settings = pipe.settings_from_png(out / "00002.png")
    assert isinstance(settings, Settings)
    assert (settings.seed, settings.steps, settings.method, settings.width, settings.height,
            settings.guidance, settings.variation_of, settings.variation_strength) == \
        (11, 3, "ddim", 192, 128, 4.5, 5, 0.4)
    # picture 2, painted again in the batch it was painted in (pictures 0 to 2): exactly
    assert (settings.picture, settings.index, settings.num_images, settings.batch_size) == (2, 0, 3, 3)
    assert [(p.value, p.weight) for p in settings.prompts] == [("a red tower", 2.0), ("fog", -0.5)]
    (image,) = pipe(settings=settings)
    assert np.array_equal(np.asarray(image), pixels(out / "00002.png"))
    # overrides change single settings, checked as any setting is; that picture is painted alone
    changed = pipe.settings_from_png(out / "00002.png", steps=4)
    assert (changed.steps, changed.picture, changed.index, changed.num_images) == (4, None, 2, 1)
    with pytest.raises(CCLDError, match="steps"):
        pipe.settings_from_png(out / "00002.png", steps=0)


def test_a_png_without_parameters_is_one_clear_line(model_flags, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 64)).save(plain)
    assert main(["generate", "--from-png", str(plain), "--out", str(tmp_path / "o"),
                 *model_flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "without ccld's parameters" in err
    assert not (tmp_path / "o").exists()


def test_pngs_record_what_identifies_the_models_never_a_path(model_flags, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (relative paths, as a user types them)
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--steps", "1", "--width", "64",
                 "--height", "64", "-q", "--out", "out", *model_flags]) == 0
    models = read_png_parameters(out / "00000.png")["models"]
    assert models["unet"].startswith("unet.ckpt@") and len(models["unet"]) == len("unet.ckpt@") + 12
    assert models["cloob"].startswith("cloob.pkl@")
    assert not any("/" in value for value in models.values())
    # a pipeline folder is recorded as the folder
    assert main(["convert", str(tmp_path / "m"), *model_flags]) == 0
    assert main(["generate", "a cat", "--steps", "1", "--width", "64", "--height", "64", "-q",
                 "--out", "out2", "--model", str(tmp_path / "m")]) == 0
    models = read_png_parameters(tmp_path / "out2" / "00000.png")["models"]
    assert models["pipeline"].startswith("m@") and not any("/" in v for v in models.values())


def test_a_hub_download_is_recorded_as_its_repo_and_file():
    from ccld.pipeline.metadata import model_identity

    path = "/home/u/.cache/huggingface/hub/models--huggan--distill-ccld-wa/snapshots/0a1b/model_student.ckpt"
    assert model_identity(path) == "huggan/distill-ccld-wa/model_student.ckpt"
    assert model_identity("taesd") == "taesd"
