"""Parameter grids (`ccld generate --xy`) on the fixture models: every combination painted
from the same seed, one labelled grid of the right size, each cell the picture it paints alone."""


import numpy as np
import pytest
from PIL import Image

from ccld.apps.cli import main
from ccld.apps.xy import LABEL_HEIGHT, parse_axis
from ccld.io.images import read_png_parameters

FAST = ["--method", "ddim", "--width", "64", "--height", "64", "-q"]


def test_a_3x3_grid_has_every_combination_and_labels(model_flags, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "a castle", "--seed", "5", "--xy", "guidance=1,3,5",
                 "steps=1,2,3", *FAST, "--out", str(out), *model_flags]) == 0
    singles = sorted(out.glob("0*.png"))
    assert len(singles) == 9
    cells = [read_png_parameters(p) for p in singles]
    assert [(c["guidance"], c["steps"]) for c in cells] == [
        (g, s) for s in (1, 2, 3) for g in (1.0, 3.0, 5.0)]
    assert {c["seed"] for c in cells} == {5}
    with Image.open(out / "xy-00000.png") as grid:
        grid = grid.convert("RGB")
        left = grid.width - 3 * 64
        assert left > 0 and grid.height == LABEL_HEIGHT + 3 * 64
        pixels = np.asarray(grid)
        # the labels: dark text on the white bands over the columns and beside the rows
        assert (pixels[:LABEL_HEIGHT, left:] < 100).any() and (pixels[LABEL_HEIGHT:, :left] < 100).any()
        for k, single in enumerate(singles):  # each cell is its single PNG
            x, y = left + (k % 3) * 64, LABEL_HEIGHT + (k // 3) * 64
            with Image.open(single) as picture:
                assert np.array_equal(pixels[y:y + 64, x:x + 64], np.asarray(picture))
    params = read_png_parameters(out / "xy-00000.png")
    assert params["grid"] is True and params["xy"] == [["guidance", [1, 3, 5]], ["steps", [1, 2, 3]]]
    # a cell paints again alone from its PNG, as it came out of the shared batches
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(singles[4]), "-q", "--out", str(again),
                 *model_flags]) == 0
    with Image.open(singles[4]) as a, Image.open(again / "00000.png") as b:
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_methods_seeds_and_prompt_weights_are_axes(model_flags, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "a castle", "--steps", "1", "--xy", "method=ddim,plms",
                 "weight=2,-1", *FAST, "--out", str(out), *model_flags]) == 0
    cells = [read_png_parameters(p) for p in sorted(out.glob("0*.png"))]
    assert [(c["method"], c["prompts"][0][1]) for c in cells] == [
        ("ddim", 2.0), ("plms", 2.0), ("ddim", -1.0), ("plms", -1.0)]
    out = tmp_path / "seeds"
    assert main(["generate", "a castle", "--steps", "1", "--xy", "seed=1,2", *FAST,
                 "--out", str(out), *model_flags]) == 0
    assert [read_png_parameters(p)["seed"] for p in sorted(out.glob("0*.png"))] == [1, 2]
    with Image.open(out / "xy-00000.png") as grid:
        assert grid.size == (2 * 64, LABEL_HEIGHT + 64)


@pytest.mark.parametrize("axes, message", [
    (["guidance"], "write an axis as NAME=V1,V2"),
    (["colour=1,2"], "'colour' is not a setting; choose from weight, batch_size"),
    (["steps=1,,2"], "an empty value"),
    (["steps=" + ",".join(map(str, range(1, 14)))], "the number of values must be a whole "
                                                    "number from 1 to 12"),
    (["steps=1,2", "steps=3"], "names 'steps' twice"),
    (["steps=1,2", "guidance=1", "seed=1"], "one or two axes, not 3"),
    (["steps=1,5000"], "cell steps=5000: --steps must be a whole number from 1 to 1000"),
    (["guidance=1,nan"], "cell guidance=nan: --guidance must be"),
    (["method=ddim,euler"], "cell method=euler: unknown method 'euler'; choose from"),
])
def test_bad_axes_are_one_line_before_any_model_loads(tmp_path, capsys, axes, message):
    out = tmp_path / "out"
    assert main(["generate", "a castle", "--xy", *axes, "--unet", str(tmp_path / "none.ckpt"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_xy_refuses_what_it_cannot_combine(tmp_path, capsys):
    for extra in (["-n", "2"], ["--grid"], ["--preview"]):
        assert main(["generate", "a castle", "--xy", "steps=1,2", *extra, "--out",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ccld: error: --xy") for line in err)


def test_values_read_as_json_where_they_can():
    axis = parse_axis("guidance=1,2.5,true,ddim")
    assert axis.values == (1, 2.5, True, "ddim")
    assert axis.label(2.5) == "guidance=2.5"
