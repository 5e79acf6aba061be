"""Every image ccld reads from a user goes through one reader (`ccld.io.images.open_image`) that
lets Pillow try only PNG, JPEG, WebP, BMP, GIF and TIFF: an EPS file (which Pillow would hand to
Ghostscript, an interpreter of PostScript programs) or any other format is refused by name in
one line, identified from its first bytes and never opened."""

import io

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, features

from ccld.apps.cli import main
from ccld.errors import CCLDError
from ccld.io.images import load_image, open_image, read_png_parameters
from ccld.training.data import decode_image_bytes

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
newpath 0 0 moveto 8 8 lineto stroke
showpage
%%EOF
"""
REFUSED = "an EPS image; give a PNG, JPEG, WebP, BMP, GIF or TIFF"


@pytest.fixture
def eps(tmp_path):
    (tmp_path / "drawing.eps").write_bytes(EPS)
    return tmp_path / "drawing.eps"


@pytest.fixture
def ghostscript_calls(monkeypatch) -> list:
    """Every time Pillow's EPS plugin opens or renders a file (or looks for Ghostscript)."""
    calls = []

    def record(what):
        def called(*args, **kwargs):
            calls.append(what)
            raise OSError(f"the test forbids {what}")
        return called

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", record("EpsImageFile._open"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", record("Ghostscript"))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", record("has_ghostscript"))
    return calls


def one_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("option", ["--image-prompt", "--init-image"])
def test_an_eps_image_on_the_command_line_is_refused_and_never_opened(
        model_flags, tmp_path, capsys, eps, ghostscript_calls, option):
    argv = ["generate", "a castle", option, str(eps), "--steps", "1", "-q", "--out",
            str(tmp_path / "out"), *model_flags]
    assert main(argv) == 2
    one_line(capsys, f"drawing.eps: {REFUSED}")
    assert ghostscript_calls == []
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_every_reader_refuses_it_the_same_way(eps, ghostscript_calls):
    with pytest.raises(CCLDError, match=f"drawing.eps: {REFUSED}"):
        load_image(eps)  # image prompts, init images, web uploads, training folders
    with pytest.raises(CCLDError, match=f"row 3: {REFUSED}"):
        decode_image_bytes(EPS, "row 3")  # training data from parquet rows
    with pytest.raises(CCLDError, match="drawing.eps: an EPS image; give a PNG written by ccld"):
        read_png_parameters(eps)  # --from-png
    with pytest.raises(CCLDError, match=f"upload: {REFUSED}"):
        open_image(io.BytesIO(EPS), "upload")
    assert ghostscript_calls == []


@pytest.mark.parametrize("fmt,suffix,words", [
    ("PPM", ".ppm", "a PNM (PBM, PGM or PPM) image"), ("ICO", ".ico", "an ICO image"),
    ("PDF", ".pdf", "a PDF document"), ("JPEG2000", ".jp2", "a JPEG 2000 image"),
    ("TGA", ".tga", None)])  # no signature to name it by
def test_other_formats_pillow_knows_are_refused_by_name(tmp_path, fmt, suffix, words):
    path = tmp_path / f"picture{suffix}"
    try:
        Image.new("RGB", (16, 16), (10, 200, 30)).save(path, format=fmt)
    except (KeyError, OSError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    expected = (f"picture{suffix}: {words}; give a PNG" if words
                else "not an image file ccld can read; give a PNG")
    with pytest.raises(CCLDError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_image(path)


FORMATS = [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp"),
           ("GIF", ".gif"), ("TIFF", ".tiff")]


@pytest.mark.parametrize("fmt,suffix", FORMATS)
def test_the_raster_formats_still_load(tmp_path, fmt, suffix):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    colour = (200, 40, 20)
    path = tmp_path / f"picture{suffix}"
    Image.new("RGB", (24, 16), colour).save(path, format=fmt)
    for image in (load_image(path), decode_image_bytes(path.read_bytes(), path.name)):
        assert image.mode == "RGB" and image.size == (24, 16)
        assert np.abs(np.asarray(image, dtype=int) - colour).max() <= 12  # lossy formats, a palette


def test_a_png_written_by_ccld_still_gives_its_parameters(tmp_path):
    from ccld.io.images import save_png

    save_png(Image.new("RGB", (4, 4)), tmp_path / "p.png", {"seed": 7})
    assert read_png_parameters(tmp_path / "p.png") == {"seed": 7}
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.jpg")
    assert read_png_parameters(tmp_path / "plain.jpg") == {}  # a raster format: read as before
