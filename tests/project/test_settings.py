"""The one settings schema: the rules every front-end shares, the types it takes, and its JSON.

Where the front-ends used to disagree, the schema's rule won everywhere: an init image with no
prompt is a painting (image to image towards the unconditional model), which the CLI and prompt
files painted and the web app refused; a strength given without an init image is refused (it means
nothing), where the web form's strength slider, which always holds a value, counts as given only
with an upload."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ccld import CCLDError
from ccld.apps.batch import read_prompts_file
from ccld.apps.cli import main
from ccld.settings import Settings


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), (90, 120, 30)).save(path)
    return path


def web_request(**form):
    pytest.importorskip("gradio")
    from ccld.apps import web

    return web.check_request(max_upload_bytes=10 ** 6, **form)


def test_an_init_image_alone_is_a_painting_on_every_front_end(png, tmp_path, model_flags):
    assert Settings(init_image=str(png)).init_image.label == str(png)
    rows = read_prompts_file(_file(tmp_path, {"init_image": str(png)}), {}, {})
    assert rows[0].settings.init_image is not None and rows[0].settings.prompts == ()
    assert web_request(prompts="", init_image=str(png)).init_image is not None
    out = tmp_path / "out"
    assert main(["generate", "--init-image", str(png), "--steps", "2", "-q", "--out", str(out),
                 *model_flags]) == 0
    assert (out / "00000.png").is_file()


def test_a_strength_without_an_init_image_is_refused_on_every_front_end(tmp_path, capsys):
    with pytest.raises(CCLDError, match=r"strength is how far to noise an init image; give "
                                        r"init_image=PATH too"):
        Settings(prompts=["a cat"], strength=0.5)
    with pytest.raises(CCLDError, match=r"line 1: strength is how far .* give init_image=PATH"):
        read_prompts_file(_file(tmp_path, {"prompts": ["a cat"], "strength": 0.5}), {}, {})
    assert main(["generate", "a cat", "--strength", "0.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--strength is how far to noise an init image; give --init-image PATH too" in err
    # the web form's strength slider always holds a value: without an upload it is not given
    assert web_request(prompts="a cat", strength=0.5).strength is None


def test_nothing_to_paint_is_one_rule(tmp_path, capsys):
    with pytest.raises(CCLDError, match="nothing to paint from"):
        Settings()
    assert main(["generate", "--out", str(tmp_path / "o")]) == 2
    assert "nothing to paint from; give a prompt" in capsys.readouterr().err


def test_numpy_and_torch_scalars_are_numbers_and_a_wrong_type_is_named():
    settings = Settings(prompts=["x"], steps=np.int64(7), guidance=torch.tensor(2.5),
                        seed=np.uint32(3), eta=np.float32(0.25))
    assert (settings.steps, settings.guidance, settings.seed, settings.eta) == (7, 2.5, 3, 0.25)
    assert all(type(v) in (int, float) for v in (settings.steps, settings.guidance, settings.seed))
    with pytest.raises(CCLDError, match="steps"):
        Settings(prompts=["x"], steps="many")
    with pytest.raises(CCLDError, match="guidance"):
        Settings(prompts=["x"], guidance=float("nan"))
    with pytest.raises(CCLDError, match="steps"):
        Settings(prompts=["x"], steps=2.5)


def test_the_settings_round_trip_through_their_json(png):
    settings = Settings.build(["a red tower:2", "fog"], [f"{png}:0.5"], guidance=4.0, seed=9,
                              steps=12, method="ddim", eta=0.3, batch_size=2, width=192,
                              height=128, variation_of=4, variation_strength=0.2,
                              init_image=str(png), strength=0.6, precision="fp32",
                              channels_last=True)
    data = json.loads(json.dumps(settings.to_dict()))
    assert Settings.from_dict(data) == settings
    # unknown keys are named; a PNG's records are skipped only where asked
    with pytest.raises(CCLDError, match="'colour'"):
        Settings.from_dict({**data, "colour": "red"})
    assert Settings.from_dict({**data, "ccld_version": "0"}, records=True) == settings


def test_a_picture_of_a_batch_must_lie_in_its_run():
    settings = Settings(prompts=["x"], index=4, num_images=3, picture=5)
    assert list(settings.wanted) == [1]
    with pytest.raises(CCLDError, match="picture 9 is not one of the run's pictures"):
        Settings(prompts=["x"], index=4, num_images=3, picture=9)


def _file(tmp_path, row: dict):
    path = tmp_path / "prompts.txt"
    path.write_text(json.dumps(row) + "\n")
    return path
