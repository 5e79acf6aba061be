"""Pictures of any size (multiples of 64) and variations of a seed's picture, through the
pipeline and `ccld generate`, on the fixture models."""

import numpy as np
import pytest
import torch
from PIL import Image

from ccld import CCLDError
from ccld.apps.cli import main
from ccld.io.images import read_png_parameters, resize_to_cover
from ccld.pipeline import next_noise, seed_noise, slerp

FAST = ["--steps", "2", "--method", "ddim", "-q"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# Any size

def test_cli_paints_320x192_and_records_it(model_flags, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "a wide landscape", "--width", "320", "--height", "192", *FAST,
                 "--out", str(out), *model_flags]) == 0
    with Image.open(out / "00000.png") as image:
        assert image.size == (320, 192)
    params = read_png_parameters(out / "00000.png")
    assert (params["width"], params["height"]) == (320, 192)


def test_pipeline_noise_of_any_size_is_the_seeds(fixture_pipeline):
    latents = fixture_pipeline.generate_latents("a tower", height=192, width=320, steps=1,
                                                method="ddim", seed=4, num_images=2)
    assert latents.shape == (2, 4, 24, 40)
    noise, _ = fixture_pipeline.initial_noise(2, 4, 192, 320)
    torch.manual_seed(4)
    assert torch.equal(noise, torch.randn([2, 4, 24, 40]))


def test_size_is_the_square_alias(fixture_pipeline):
    kw = dict(steps=1, method="ddim", seed=2)
    assert torch.equal(fixture_pipeline.generate_latents("x", size=64, **kw),
                       fixture_pipeline.generate_latents("x", height=64, width=64, **kw))
    params = fixture_pipeline.describe("x", (), num_images=1, steps=1, method="ddim",
                                       guidance=3.0, seed=0, eta=0.0, init_image=None,
                                       latent_scale=None, size=128)
    assert (params["width"], params["height"]) == (128, 128)
    with pytest.raises(CCLDError, match="size=64 disagrees with height=None, width=128"):
        fixture_pipeline.generate_latents("x", size=64, width=128, **kw)
    with pytest.raises(CCLDError, match=r"height must be a multiple of 64 from 64 to 1024 \(got 100\)"):
        fixture_pipeline.generate_latents("x", height=100, **kw)


def test_a_non_square_init_image_is_cover_cropped(fixture_pipeline, tmp_path):
    # black quarter, white half, black quarter: covering 128x64 keeps exactly the white middle
    strip = np.zeros((100, 400, 3), np.uint8)
    strip[:, 100:300] = 255
    image = Image.fromarray(strip)
    covered = resize_to_cover(image, 128, 64)
    assert covered.size == (128, 64)
    assert np.asarray(covered)[:, 2:-2].min() >= 250  # (the Lanczos ringing at the seams aside)
    assert resize_to_cover(image, 64, 128).size == (64, 128)
    image.save(tmp_path / "strip.png")
    latent = fixture_pipeline.encode_init_image(tmp_path / "strip.png", height=64, width=128)
    assert latent.shape == (1, 4, 8, 16)
    latents = fixture_pipeline.generate_latents("x", init_image=tmp_path / "strip.png",
                                                height=64, width=128, steps=2, method="ddim")
    assert latents.shape == (1, 4, 8, 16)


def test_cli_refuses_a_bad_size_before_loading(model_flags, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "x", "--width", "100", "--out", str(out), *model_flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ccld: error: --width must be a multiple of 64 from 64 to 1024 (got 100); "
                   "the models were trained at 256 and paint best near it"]
    assert not out.exists()


# Variations

def test_slerp_ends_exactly_at_its_ends_and_keeps_the_norm():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn([1, 4, 8, 8], generator=generator), torch.randn([3, 4, 8, 8], generator=generator)
    assert torch.equal(slerp(a, b, 0.0), a.expand_as(b))
    assert torch.equal(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    assert middle.shape == b.shape and middle.dtype == b.dtype
    norms = middle.flatten(1).norm(dim=1)
    ends = (a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1)) / 2
    assert torch.allclose(norms, ends, rtol=0.05)  # a straight line would lose ~30% of it
    assert torch.allclose(slerp(a, a, 0.3), a)  # parallel: no division by sin(0)


def test_seed_noise_is_that_picture_of_its_run():
    generator = torch.Generator().manual_seed(3)
    run = next_noise(generator, 40, 64, 128)
    assert torch.equal(seed_noise(3, 0, 64, 128), run[:1])
    assert torch.equal(seed_noise(3, 37, 64, 128), run[37:38])  # drawn past whole batches


def test_a_variation_at_strength_0_is_its_seeds_picture(fixture_pipeline):
    kw = dict(steps=2, method="ddim", size=64)
    base = fixture_pipeline.generate_latents("a castle", seed=3, **kw)
    same = fixture_pipeline.generate_latents("a castle", seed=9, variation_of=3,
                                             variation_strength=0.0, **kw)
    assert torch.equal(same, base)
    varied = fixture_pipeline.generate_latents("a castle", seed=9, variation_of=3,
                                               variation_strength=0.3, **kw)
    other = fixture_pipeline.generate_latents("a castle", seed=9, **kw)
    assert not torch.equal(varied, base)
    # nearer its seed's picture than the run seed's own
    assert (varied - base).norm() < (other - base).norm()
    with pytest.raises(CCLDError, match="variation_strength must be a number from 0 to 1"):
        fixture_pipeline.generate_latents("a castle", variation_of=3, variation_strength=2, **kw)


def test_cli_variations_are_recorded_and_strength_0_repaints_the_seed(model_flags, tmp_path):
    small = [*FAST, "--width", "64", "--height", "64", *model_flags]
    assert main(["generate", "a castle", "--seed", "3", "--out", str(tmp_path / "base"), *small]) == 0
    # (a batch of one, as the seed's picture was painted: other batch sizes round differently)
    assert main(["generate", "a castle", "--seed", "9", "-n", "2", "--batch-size", "1",
                 "--variation-of", "3", "--variation-strength", "0",
                 "--out", str(tmp_path / "var"), *small]) == 0
    for name in ("00000.png", "00001.png"):  # both start from seed 3's first picture
        assert np.array_equal(pixels(tmp_path / "var" / name), pixels(tmp_path / "base" / "00000.png"))
    params = read_png_parameters(tmp_path / "var" / "00001.png")
    assert (params["seed"], params["variation_of"], params["variation_index"],
            params["variation_strength"], params["index"]) == (9, 3, 0, 0.0, 1)


@pytest.mark.parametrize("argv, message", [
    (["--variation-strength", "0.5"], "--variation-strength needs --variation-of SEED"),
    (["--variation-index", "2"], "--variation-index needs --variation-of SEED"),
    (["--variation-of", "1", "--variation-strength", "1.5"],
     "--variation-strength must be a number from 0 to 1 (got 1.5)"),
    (["--variation-of", "-1"], "--variation-of must be a whole number from 0 to"),
])
def test_cli_refuses_bad_variation_options(model_flags, tmp_path, capsys, argv, message):
    assert main(["generate", "x", *argv, "--out", str(tmp_path / "out"), *model_flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
