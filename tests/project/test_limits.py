"""One table of limits (ccld.limits) for the CLI, the Python API and the web app: every number is
checked for finiteness and range with one line naming the input, the range and a fix."""

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image

from ccld import CCLDError, CCLDPipeline, limits
from ccld.apps.cli import build_parser, main
from ccld.apps.generate import settings_options
from ccld.limits import IMAGES_PER_CALL, SEED, STEPS, WEIGHT

LIMITS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "limits.md"


def test_the_limits_page_shows_the_table():
    assert limits.markdown_table() in LIMITS_PAGE.read_text()


def test_check_reads_numbers_and_refuses_the_rest():
    assert STEPS.check("steps", 10) == 10 and STEPS.check("steps", "12") == 12
    assert STEPS.check("steps", 3.0) == 3 and isinstance(WEIGHT.check("w", 2), float)
    assert SEED.check("seed", 2 ** 64 - 1) == 2 ** 64 - 1
    for value, shown in [(0, "0"), (2.5, "2.5"), (float("nan"), "nan"), (True, "True"),
                         ("ten", "'ten'"), (10 ** 400, "1000000000")]:
        with pytest.raises(CCLDError) as e:
            STEPS.check("--steps", value)
        message = str(e.value)
        assert message.startswith("--steps must be a whole number from 1 to 1000 (got " + shown)
        assert message.endswith("; 10 to 50 is typical") and len(message) < 200
    with pytest.raises(CCLDError, match="steps is missing; give a whole number from 1 to 1000"):
        STEPS.check("steps", None)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a command gets as far as loading (or downloading) the models."""
    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded before the inputs were checked")

    monkeypatch.setattr("ccld.apps.options.load_pipeline", refuse)
    monkeypatch.setattr("ccld.io.hub.hub_download", refuse)


@pytest.mark.parametrize("argv, fragment", [
    (["--guidance", "nan"], "--guidance must be a number from -100 to 100 (got nan)"),
    (["--guidance", "inf"], "--guidance must be a number from -100 to 100 (got inf)"),
    (["x:1e30"], "the weight in prompt 'x:1e30' must be a number from -100 to 100"),
    (["--image-prompt", "missing.png:1e30"], "the weight in image prompt 'missing.png:1e30'"),
    (["--eta", "nan"], "--eta must be a number from 0 to 1 (got nan)"),
    (["--eta", "100"], "--eta must be a number from 0 to 1 (got 100"),
    (["--steps", "0"], "--steps must be a whole number from 1 to 1000 (got 0)"),
    (["-n", "0"], "-n must be a whole number from 1 to 1000000 (got 0)"),
    (["--batch-size", "0"], "--batch-size must be a whole number from 1 to 32"),
    (["--seed", "46116860184273879040000"], "--seed must be a whole number from 0 to 18446744"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to"),
    (["--latent-scale", "nan"], "--latent-scale must be a number above 0 and at most 100"),
    (["--latent-scale", "0"], "--latent-scale must be a number above 0"),
    (["--init-image", "x.png", "--strength", "nan"], "--strength must be a number above 0"),
    (["--init-image", "x.png", "--strength", "1.5"], "--strength must be a number above 0"),
])
def test_cli_refuses_bad_numbers_before_loading(model_flags, tmp_path, capsys, no_model_loading,
                                                argv, fragment):
    argv = ["a castle", *argv] if argv[0].startswith("-") else argv
    out = tmp_path / "out"
    assert main(["generate", *argv, "--out", str(out), "-q", *model_flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ccld: error: ") and fragment in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_images": 0}, "num_images must be a whole number from 1 to 32 (got 0)"),
    ({"num_images": 33}, "iter_images"),  # the fix names the way to paint more
    ({"guidance": float("nan")}, "guidance must be a number from -100 to 100 (got nan)"),
    ({"eta": 100.0}, "eta must be a number from 0 to 1"),
    ({"latent_scale": float("nan")}, "latent_scale must be a number above 0"),
    ({"seed": 2 ** 64}, "seed must be a whole number from 0 to"),
    ({"steps": 0}, "steps must be a whole number from 1 to 1000"),
    ({"size": 100}, "size must be a multiple of 64 from 64 to 1024 (got 100)"),
    ({"prompts": ("x", 1e30)}, "the weight of prompt 'x' must be a number from -100 to 100"),
    ({"prompts": "x:1e30"}, "the weight in prompt 'x:1e30'"),
    ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.0}, "strength must be a number above 0"),
])
def test_python_api_refuses_bad_numbers(fixture_pipeline, kwargs, fragment):
    kwargs = {"prompts": "a castle", "steps": 1, "progress": False, **kwargs}
    with pytest.raises(CCLDError) as e:
        fixture_pipeline(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_run_of_many_images_is_not_the_per_call_limit(fixture_pipeline, model_flags):
    many = IMAGES_PER_CALL.high + 1
    with pytest.raises(CCLDError, match="num_images must be a whole number from 1 to 32"):
        fixture_pipeline("a castle", num_images=many, steps=1, progress=False)
    images = fixture_pipeline.iter_images("a castle", num_images=many, batch_size=2, steps=1,
                                          progress=False)
    assert len(list(itertools.islice(images, 2))) == 2  # painted two at a time
    args = build_parser().parse_args(["generate", "a castle", "-n", "100000", *model_flags])
    args.steps = 10
    from ccld import Settings

    assert Settings.build(**settings_options(args)).num_images == 100000  # the CLI takes it


def test_web_checks_against_the_same_table():
    gr = pytest.importorskip("gradio")
    from ccld.apps import web

    form = dict(prompts="a cat", image_prompts=None, image_weight=None, init_image=None,
                strength=None, method="ddim", steps=1, guidance=3.0, seed=1, num_images=1,
                max_upload_bytes=10 ** 6)
    for change, fragment in [({"guidance": float("inf")}, WEIGHT.range_text()),
                             ({"prompts": "a cat:1e30"}, WEIGHT.range_text()),
                             ({"steps": 251}, limits.WEB_STEPS.range_text()),
                             ({"seed": 2 ** 32}, limits.WEB_SEED.range_text())]:
        with pytest.raises(gr.Error) as e:
            web.check_request(**{**form, **change})
        assert fragment in e.value.message


class _NaNAfterFirstCall(torch.nn.Module):
    """A U-Net whose every call after the first returns NaN, as an overflow would."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, 0
        self.config, self.autoencoder_scale = unet.config, unet.autoencoder_scale

    def __getattr__(self, name):  # what a pipeline reads of its U-Net, the wrapped one's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    def forward(self, *args, **kwargs):
        self.calls += 1
        v = self.unet(*args, **kwargs)
        return v if self.calls == 1 else v * float("nan")


def test_non_finite_sampling_stops_with_a_message_and_no_png(fixture_pipeline, model_flags,
                                                           tmp_path, capsys, monkeypatch):
    def load_nan_pipeline(args):
        f = fixture_pipeline
        return CCLDPipeline(_NaNAfterFirstCall(f.unet), f.autoencoder, f.cloob)

    monkeypatch.setattr("ccld.apps.options.load_pipeline", load_nan_pipeline)
    out = tmp_path / "out"
    assert main(["generate", "a castle", "--steps", "4", "--method", "ddim", "--out", str(out),
                 "-q", *model_flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ccld: error: sampling step 2 of 4 went non-finite (NaN or infinity); lower "
                   "the guidance or the prompt weights, or use fp32 precision"]
    assert not out.exists()
