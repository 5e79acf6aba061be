"""One table of limits (ccld.limits) for the CLI, the Python API and the web app: every number is
checked for finiteness and range with one line naming the input, the range and a fix."""

import pytest
from PIL import Image

from ccld import CCLDError, limits
from ccld.limits import SEED, STEPS, WEIGHT


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


def test_web_checks_against_the_same_table():
    gr = pytest.importorskip("gradio")
    from ccld import web

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
