import json
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import ccld.io.images as images
from ccld.errors import CCLDError
from ccld.io.images import (
    load_image,
    make_grid,
    pil_to_tensor,
    read_png_parameters,
    resize_and_center_crop,
    save_png,
    tensor_to_pil,
)


def _loaded(path, size):
    im = load_image(path)
    assert im.mode == "RGB" and im.size == size
    return np.asarray(im)


def test_grayscale_8_and_16_bit(tmp_path):
    Image.new("L", (12, 7), 200).save(tmp_path / "l.png")
    assert (_loaded(tmp_path / "l.png", (12, 7)) == 200).all()

    grey16 = np.full((7, 12), 32896, np.uint16)  # 128 * 257: mid-grey in 16 bits
    grey16[0, 0] = 65535
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    a = _loaded(tmp_path / "g16.png", (12, 7))
    assert (a[1:] == 128).all() and (a[0, 0] == 255).all()

    Image.fromarray(np.full((7, 12), 0.5, np.float32), "F").save(tmp_path / "f.tiff")
    assert abs(int(_loaded(tmp_path / "f.tiff", (12, 7))[3, 3, 0]) - 128) <= 1


def test_transparency_is_dropped_as_the_reference_drops_it(tmp_path):
    # the reference reads images with convert('RGB'): a transparent pixel keeps its own colour
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 255, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    a = _loaded(tmp_path / "rgba.png", (10, 6))
    assert tuple(a[0, 0]) == (0, 255, 0) and tuple(a[5, 9]) == (255, 0, 0)

    Image.new("LA", (10, 6), (40, 0)).save(tmp_path / "la.png")
    assert (_loaded(tmp_path / "la.png", (10, 6)) == 40).all()

    p = Image.new("P", (10, 6), 1)
    p.putpalette([0, 0, 255, 200, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=1)
    a = _loaded(tmp_path / "p.png", (10, 6))
    assert tuple(a[0, 0]) == (0, 0, 255) and tuple(a[5, 9]) == (200, 0, 0)
    p.save(tmp_path / "p_alphas.png", transparency=bytes([128, 0]))  # a palette of alphas

    for name in ("rgba.png", "la.png", "p.png", "p_alphas.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to tell the user: dropping alpha is meant
            loaded = load_image(tmp_path / name)
        with Image.open(tmp_path / name) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.array_equal(np.asarray(loaded), np.asarray(im.convert("RGB"))), name


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
    assert (_loaded(tmp_path / "c.jpg", (16, 8)) > 240).all()


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif)
    _loaded(tmp_path / "rot.jpg", (20, 40))


def test_unreadable_files(tmp_path):
    (tmp_path / "x.png").write_text("not an image at all\n")
    with pytest.raises(CCLDError, match=r"x\.png: not an image file") as e:
        load_image(tmp_path / "x.png")
    assert "\n" not in str(e.value)

    with pytest.raises(CCLDError, match=r"missing\.jpg: no such image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(CCLDError, match="is a folder"):
        load_image(tmp_path)

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CCLDError, match=r"cut\.png: the image could not be read") as e:
        load_image(tmp_path / "cut.png")
    assert "\n" not in str(e.value)


def _png_claiming(path, width, height):
    """A PNG whose header claims width x height; its pixel data is never reached."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def test_huge_images_refused(tmp_path, monkeypatch):
    for w, h in [(9000, 9000), (20000, 20000)]:  # under and over Pillow's own bomb limit
        with pytest.raises(CCLDError, match="megapixel") as e:
            load_image(_png_claiming(tmp_path / f"huge{w}.png", w, h))
        assert f"huge{w}.png" in str(e.value)
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    load_image(tmp_path / "small.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(CCLDError, match=r"small\.png: the image is 20x20"):
        load_image(tmp_path / "small.png")


def test_resize_and_center_crop():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = resize_and_center_crop(im, 16)
    assert out.size == (16, 16)
    # by hand: fac = max(16/50, 16/30) = 16/30 -> 26 x 16; crop_left = round(10 / 2) = 5
    expected = im.resize((26, 16), Image.LANCZOS).crop((5, 0, 21, 16))
    assert np.array_equal(np.asarray(out), np.asarray(expected))

    tall = Image.fromarray(rng.integers(0, 256, (41, 20, 3), dtype=np.uint8))
    out = resize_and_center_crop(tall, 10)
    # fac = 0.5 -> 10 x 20; crop_top = round(10 / 2) = 5
    expected = tall.resize((10, 20), Image.LANCZOS).crop((0, 5, 10, 15))
    assert out.size == (10, 10) and np.array_equal(np.asarray(out), np.asarray(expected))

    # int(fac * w) one pixel short (103 * (512 / 103) < 512): torchvision pads black on the right
    odd = Image.new("RGB", (103, 200), (200, 200, 200))
    out = np.asarray(resize_and_center_crop(odd, 512))
    assert out.shape == (512, 512, 3)
    assert (out[:, -1] == 0).all() and (out[:, :-1] > 150).all()


def test_tensor_conversions():
    im = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10)
    t = pil_to_tensor(im)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)

    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 5.0]).view(1, 1, 6).expand(3, 1, 6)
    a = np.asarray(tensor_to_pil(x))[0, :, 0]
    # (x + 1) / 2 * 255 truncated: 0 -> 127 (not 128), 0.999 -> 254 (not 255)
    assert a.tolist() == [0, 0, 127, 254, 255, 255]
    assert tensor_to_pil(x.unsqueeze(0)).size == (6, 1)
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(2, 3, 4, 4))


def test_png_parameters_round_trip_and_atomic(tmp_path):
    params = {"prompt": "a painting of a lighthouse, «nuit»", "seed": 42, "steps": 50,
              "weights": [3.0, 1.0], "nested": {"eta": 0.0}}
    im = Image.new("RGB", (8, 8), (1, 2, 3))
    out = save_png(im, tmp_path / "out.png", params)
    assert out == tmp_path / "out.png"
    assert read_png_parameters(out) == params
    with Image.open(out) as again:
        assert again.text["Software"] == "ccld"
        assert json.loads(again.text["parameters"]) == params
        assert np.array_equal(np.asarray(again), np.asarray(im))
    save_png(Image.new("RGB", (8, 8)), out, {"seed": 1})  # replaces the old file
    assert read_png_parameters(out) == {"seed": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp files left

    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_png_parameters(tmp_path / "plain.png") == {}
    with pytest.raises(CCLDError, match="could not write"):
        save_png(im, tmp_path / "no" / "such" / "dir.png", params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "plain.png"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    class Boom(Exception):
        pass

    def explode(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise Boom

    monkeypatch.setattr(Image.Image, "save", explode)
    with pytest.raises(Boom):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "out.png", {})
    assert list(tmp_path.iterdir()) == []


def test_make_grid():
    ims = [Image.new("RGB", (4, 3), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(ims)
    assert grid.size == (3 * 4, 2 * 3)  # 5 images: 3 columns, 2 rows
    assert grid.getpixel((4, 0)) == (40, 0, 0) and grid.getpixel((4, 3)) == (160, 0, 0)
    assert make_grid(ims, cols=5).size == (20, 3)
    assert make_grid(ims[:4]).size == (8, 6)
    assert make_grid(ims[:1]).size == (4, 3)
    with pytest.raises(ValueError):
        make_grid([])


PEAK_RSS_CHILD = """
import resource, sys
from ccld.io.images import load_image, resize_and_center_crop
out = resize_and_center_crop(load_image(sys.argv[1]), 256)
assert out.size == (256, 256)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
"""


def test_extreme_aspect_ratios_are_cut_first_so_memory_stays_bounded(tmp_path):
    import subprocess
    import sys

    Image.new("RGB", (1, 10000), (200, 30, 30)).save(tmp_path / "strip.png")  # a few hundred bytes
    Image.new("RGB", (1, 100), (200, 30, 30)).save(tmp_path / "short.png")
    peak = {name: int(subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(tmp_path / name)],
                                     check=True, capture_output=True, text=True).stdout)
            for name in ("strip.png", "short.png")}
    # uncut, the strip would be resized to 256 x 2560000 (about 2 GB) before the crop
    assert peak["strip.png"] - peak["short.png"] < 100 * 1024, peak
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 200, 3), dtype=np.uint8))
    cut = images.crop_to_aspect(wide, 4.0)
    assert cut.size == (40, 10) and np.array_equal(np.asarray(cut), np.asarray(wide)[:, 80:120])
    assert images.crop_to_aspect(wide.crop((0, 0, 40, 10)), 4.0).size == (40, 10)  # at the limit


def test_save_png_keeps_the_parameters_an_image_carries(tmp_path):
    from ccld.io.images import read_png_parameters, save_png

    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = json.dumps({"seed": 4, "prompts": [["a cat", 3.0]]})
    save_png(image, tmp_path / "a.png")
    assert read_png_parameters(tmp_path / "a.png") == {"seed": 4, "prompts": [["a cat", 3.0]]}


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "its 'parameters' text is nested 100000 levels deep"),
    ('{"seed": 1' + "0" * 5000 + "}", "its 'parameters' text is a number of 5001 digits"),
    ("not json", "its 'parameters' text is not JSON"),
])
def test_png_parameters_are_read_bounded(tmp_path, text, message):
    from PIL import PngImagePlugin

    from ccld.io.images import read_png_parameters

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (4, 4)).save(tmp_path / "p.png", pnginfo=info)
    with pytest.raises(CCLDError, match=re.escape(message)):
        read_png_parameters(tmp_path / "p.png")
