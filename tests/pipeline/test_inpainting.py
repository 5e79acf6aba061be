"""Inpainting on the fixture models: the white part of a mask is repainted, the init image's
pixels outside it are kept exactly, through the pipeline, `ccld generate` and `--from-png`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ccld import CCLDError
from ccld.apps.cli import main
from ccld.io.images import read_png_parameters
from ccld.pipeline.inpainting import blended_model

FAST = dict(steps=3, method="ddim", progress=False, size=64)


def noise_image(size=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3),
                                                                 dtype=np.uint8))


def right_half_white(width=64, height=64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    return mask


def test_outside_the_mask_the_init_pixels_are_kept_exactly(fixture_pipeline):
    init = noise_image()
    (painted,) = fixture_pipeline("a cat", init_image=init, mask=right_half_white(), **FAST)
    kept, repainted = np.asarray(painted)[:, :32], np.asarray(painted)[:, 32:]
    assert np.array_equal(kept, np.asarray(init)[:, :32])
    assert (repainted != np.asarray(init)[:, 32:]).mean() > 0.5


def test_a_mask_of_another_size_is_scaled_to_the_picture(fixture_pipeline):
    init = noise_image()
    (small,) = fixture_pipeline("a cat", init_image=init, mask=right_half_white(16, 16), **FAST)
    (same,) = fixture_pipeline("a cat", init_image=init, mask=right_half_white(), **FAST)
    assert np.array_equal(np.asarray(small), np.asarray(same))


def test_feathering_repaints_a_band_beside_the_edge_and_keeps_the_far_side(fixture_pipeline):
    init = noise_image()
    (painted,) = fixture_pipeline("a cat", init_image=init, mask=right_half_white(),
                                  mask_blur=4, **FAST)
    pixels, original = np.asarray(painted), np.asarray(init)
    assert np.array_equal(pixels[:, :16], original[:, :16])  # beyond the feathering
    assert not np.array_equal(pixels[:, 24:32], original[:, 24:32])  # the feathered band
    assert json.loads(painted.info["parameters"])["mask_blur"] == 4


def test_the_unet_sees_the_kept_latents_noised_to_each_step():
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)

    keep = torch.zeros(1, 1, 2, 2)
    keep[..., 0] = 1  # the left column is kept
    known, noise = torch.full([1, 4, 2, 2], 3.0), torch.randn(1, 4, 2, 2)
    x = torch.randn(1, 4, 2, 2)
    t = torch.tensor([0.5])
    blended_model(model, keep, known, noise)(x, t)
    alpha, sigma = np.cos(np.pi / 4), np.sin(np.pi / 4)
    assert torch.allclose(seen[0][..., 0], (known * alpha + noise * sigma)[..., 0])
    assert torch.equal(seen[0][..., 1], x[..., 1])


def test_a_mask_that_says_nothing_is_named(fixture_pipeline):
    init = noise_image()
    with pytest.raises(CCLDError, match="mask is all black, so it repaints nothing"):
        fixture_pipeline("a cat", init_image=init, mask=Image.new("L", (64, 64), 0), **FAST)
    with pytest.warns(UserWarning, match="mask is all white: the whole picture is repainted"):
        fixture_pipeline("a cat", init_image=init, mask=Image.new("L", (64, 64), 255), **FAST)


@pytest.mark.parametrize("options, message", [
    (dict(mask="MASK"), "mask marks what to repaint of an init image, so it needs one: "
                             "init_image="),
    (dict(init_image="INIT", mask_blur=2), "mask_blur feathers an inpainting mask; give mask"),
    (dict(init_image="INIT", mask="MASK", mask_blur=-1), "mask_blur must be a whole number "
                                                         "from 0 to 256"),
    (dict(init_image="INIT", mask="MASK", mask_blur=2.5), "mask_blur must be a whole number"),
    (dict(init_image="INIT", mask="missing.png"), "mask 'missing.png': no such image file"),
])
def test_bad_inpainting_settings_are_refused_by_name(fixture_pipeline, tmp_path, options,
                                                     message):
    noise_image().save(tmp_path / "init.png")
    right_half_white().save(tmp_path / "mask.png")
    paths = {"INIT": str(tmp_path / "init.png"), "MASK": str(tmp_path / "mask.png")}
    options = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(CCLDError, match=message):
        fixture_pipeline.check_inputs("a cat", **options)


def test_cli_inpaints_records_the_mask_and_paints_it_again(model_flags, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    noise_image().save(init)
    right_half_white().save(mask)
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--init-image", str(init), "--mask", str(mask),
                 "--mask-blur", "2", "--strength", "1", "--width", "64", "--height", "64",
                 "--steps", "2", "--method", "ddim", "-q", "--out", str(out), *model_flags]) == 0
    params = read_png_parameters(out / "00000.png")
    assert (params["mask"], params["mask_blur"], params["strength"]) == (str(mask), 2, 1.0)
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(out / "00000.png"), "-q", "--out", str(again),
                 *model_flags]) == 0
    with Image.open(out / "00000.png") as a, Image.open(again / "00000.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_cli_mask_without_init_image_is_one_line(model_flags, tmp_path, capsys):
    right_half_white().save(tmp_path / "mask.png")
    assert main(["generate", "a cat", "--mask", str(tmp_path / "mask.png"), "--out",
                 str(tmp_path / "out"), *model_flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ccld: error: --mask marks what to repaint of an init image, so it needs "
                   "one: --init-image PATH, or leave --mask out"]
