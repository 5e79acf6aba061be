"""`ccld interpolate` on the fixture models: N frames and an animated file of N frames, whose
first and last frames are the plain paintings of the end prompts (and seeds)."""

import numpy as np
import pytest
from PIL import Image

from ccld.apps.cli import main
from ccld.io.images import read_png_parameters
from ccld.pipeline.interpolation import frame_position

SMALL = ["--steps", "2", "--method", "ddim", "--width", "64", "--height", "64", "-q"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("fmt", ["webp", "gif"])
def test_frames_and_animation_whose_ends_are_the_plain_paintings(model_flags, tmp_path, fmt):
    out = tmp_path / "frames"
    assert main(["interpolate", "a red castle", "a blue sea", "--frames", "5", "--seed", "4",
                 "--seed-to", "9", "--format", fmt, "--fps", "10", *SMALL, "--out", str(out),
                 *model_flags]) == 0
    frames = sorted(out.glob("0*.png"))
    assert len(frames) == 5
    with Image.open(out / f"animation-00000.{fmt}") as animation:
        assert animation.n_frames == 5 and animation.size == (64, 64)
        animation.load()  # (WebP says a frame's duration once it is read)
        assert animation.info.get("duration") == 100
    records = [read_png_parameters(p)["interpolation"] for p in frames]
    assert [r["frame"] for r in records] == list(range(5))
    assert records[0]["prompts"] == ["a red castle", "a blue sea"] and records[0]["seed_to"] == 9
    # the ends: plain paintings of each end prompt with its seed (a level of rounding apart,
    # as pictures painted in batches of other sizes may be)
    for prompt, seed, frame in (("a red castle", 4, frames[0]), ("a blue sea", 9, frames[-1])):
        plain = tmp_path / f"plain-{seed}"
        assert main(["generate", prompt, "--seed", str(seed), *SMALL, "--out", str(plain),
                     *model_flags]) == 0
        assert np.abs(pixels(plain / "00000.png") - pixels(frame)).max() <= 1
    middle = pixels(frames[2])
    assert np.abs(middle - pixels(frames[0])).max() > 1 and np.abs(middle - pixels(frames[-1])).max() > 1


def test_frames_spread_evenly_over_the_prompts():
    assert [frame_position(i, 5, 3) for i in range(5)] == [
        (0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5), (1, 1.0)]
    assert frame_position(0, 1, 2) == (0, 0.0)


@pytest.mark.parametrize("options, message", [
    (["a cat"], "give two or more"),
    (["a cat", "a dog", "--frames", "1"], "--frames must be a whole number from 2 to 1000"),
    (["a cat", "a dog", "--fps", "0"], "--fps must be a number from 0.1 to 60"),
    (["a cat", "a dog", "--seed-to", "-1"], "seed must be a whole number"),
    (["a cat", "", "--steps", "2"], "an empty prompt"),
])
def test_bad_interpolations_are_one_line(tmp_path, capsys, options, message):
    out = tmp_path / "frames"
    assert main(["interpolate", *options, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_frame_is_not_painted_again_as_if_it_were_its_first_prompt(model_flags, tmp_path,
                                                                     capsys):
    out = tmp_path / "frames"
    assert main(["interpolate", "a cat", "a dog", "--frames", "2", *SMALL, "--out", str(out),
                 *model_flags]) == 0
    capsys.readouterr()
    assert main(["generate", "--from-png", str(out / "00001.png"), "--out",
                 str(tmp_path / "again"), *model_flags]) == 2
    assert "a frame of `ccld interpolate`" in capsys.readouterr().err


def test_painted_one_to_a_batch_the_end_frames_are_the_plain_paintings_exactly(model_flags,
                                                                              tmp_path):
    out = tmp_path / "frames"
    assert main(["interpolate", "a red castle", "a blue sea", "a green hill", "--frames", "3",
                 "--seed", "4", "--batch-size", "1", *SMALL, "--out", str(out),
                 *model_flags]) == 0
    frames = sorted(out.glob("0*.png"))
    for prompt, frame in (("a red castle", frames[0]), ("a blue sea", frames[1]),
                          ("a green hill", frames[2])):  # frame 1 sits on the middle prompt
        plain = tmp_path / prompt.replace(" ", "-")
        assert main(["generate", prompt, "--seed", "4", *SMALL, "--out", str(plain),
                     *model_flags]) == 0
        assert np.array_equal(pixels(plain / "00000.png"), pixels(frame))
