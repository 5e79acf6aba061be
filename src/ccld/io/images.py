"""Reading image prompts, preparing them for the encoders, and writing results.

Every image a user gives ccld is opened by `open_image`, which lets Pillow try only the raster
formats in `IMAGE_FORMATS` (PNG, JPEG, WebP, BMP, GIF, TIFF): any other is refused by name,
identified from its first bytes, never opened (Pillow hands EPS files to Ghostscript, an
interpreter of PostScript programs, and other formats to plugins nobody needs for a picture).
`load_image` turns whatever a user points at (grayscale, 16-bit, transparent, CMYK, rotated by
EXIF) into an RGB image, or raises a one-line `CCLDError` naming the file and the fix. Alpha is
dropped, as the reference's `convert('RGB')` drops it.
`resize_and_center_crop`, `pil_to_tensor` and `tensor_to_pil` reproduce the reference demo's
torchvision-based transforms bit for bit without importing torchvision. `save_png` writes results
atomically with their generation parameters in a PNG text chunk.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ..errors import CCLDError
from ..limits import IMAGE_ASPECT, IMAGE_PIXELS
from .files import atomic_write

# The formats ccld opens (Pillow's names), and how messages name them
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FORMATS_IN_WORDS = "a PNG, JPEG, WebP, BMP, GIF or TIFF"
MAX_PIXELS = IMAGE_PIXELS.high  # larger images are refused before their pixels are decoded
MAX_ASPECT = IMAGE_ASPECT.high  # longer strips are cut to this ratio (their middle) before resizing
PARAMETERS_KEY = "parameters"

_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                IndexError, TypeError, MemoryError, Image.DecompressionBombError,
                Image.DecompressionBombWarning)


def _too_big(path, width: int, height: int) -> CCLDError:
    return CCLDError(f"{path}: the image is {width}x{height} ({width * height / 1e6:.0f} "
                     f"megapixels), more than the {MAX_PIXELS / 1e6:.0f} megapixel limit; "
                     "resize it to a few megapixels first")


# What a file in another format is, by a signature strong enough to name it (formats without
# one, TGA say, are just "not an image ccld can read"): (offset, first bytes, in words)
_SIGNATURES = [
    (0, b"%!PS", "an EPS image"), (0, b"\xc5\xd0\xd3\xc6", "an EPS image"),
    (0, b"%PDF", "a PDF document"), (0, b"8BPS", "a PSD image"), (0, b"\0\0\1\0", "an ICO image"),
    (0, b"icns", "an ICNS image"), (0, b"\0\0\0\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (0, b"\xffO\xffQ", "a JPEG 2000 image"), (0, b"\0\0\0\x0cJXL \r\n\x87\n", "a JPEG XL image"),
    (0, b"\xff\n", "a JPEG XL image"), (4, b"ftypavif", "an AVIF image"),
    (4, b"ftypheic", "a HEIC image"), (4, b"ftypheix", "a HEIC image"),
    (4, b"ftypmif1", "a HEIF image"), (0, b"qoif", "a QOI image"), (0, b"DDS ", "a DDS image"),
    (0, b"gimp xcf", "an XCF image"), (0, b"SIMPLE  =", "a FITS image"),
    (0, b"\x01\xda", "an SGI image"), (0, b"/* XPM */", "an XPM image"),
    (0, b"#define", "an XBM image"), (0, b"\x59\xa6\x6a\x95", "a Sun raster image"),
    (0, b"\x76\x2f\x31\x01", "an OpenEXR image"), (0, b"#?RADIANCE", "an HDR image"),
    (0, b"BLP1", "a BLP image"), (0, b"BLP2", "a BLP image"), (0, b"\x0a\x05\x01", "a PCX image"),
    *((0, b"P%d%c" % (n, c), "a PNM (PBM, PGM or PPM) image") for n in range(1, 8)
      for c in b" \t\r\n"),
    (0, b"PK\x03\x04", "a zip archive"),
]


def image_format_of(fp) -> str | None:
    """What a file (a path or a seekable binary file) is, in words ("an EPS image"), if its
    first bytes say so clearly; read, never opened by an image plugin (the file's position is
    kept)."""
    try:
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "rb") as f:
                head = f.read(512)
        else:
            where = fp.tell()
            head = fp.read(512)
            fp.seek(where)
    except (OSError, ValueError, AttributeError):
        return None
    found = next((words for offset, magic, words in _SIGNATURES
                  if head[offset:offset + len(magic)] == magic), None)
    if found is None and b"<svg" in head:
        found = "an SVG image"
    return found


def open_image(fp, name=None, formats=IMAGE_FORMATS, fix: str = "") -> Image.Image:
    """`PIL.Image.open(fp, formats=formats)`: the one way ccld opens a user's image. An image of
    any other format is refused (a one-line `CCLDError`: "NAME: an EPS image; give a PNG,
    JPEG, WebP, BMP, GIF or TIFF", or `fix`), having been named from its first bytes only:
    no other plugin reads it, and no external program (Ghostscript) ever sees it. A file that
    is no image ccld can name raises Pillow's `UnidentifiedImageError`, for the caller to
    word."""
    try:
        return Image.open(fp, formats=list(formats))
    except UnidentifiedImageError:
        if hasattr(fp, "seek"):
            fp.seek(0)
        kind = image_format_of(fp)
        if kind is not None:
            shown = name if name is not None else fp
            raise CCLDError(f"{shown}: {kind}; {fix or 'give ' + FORMATS_IN_WORDS}") from None
        raise


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image from any common file, EXIF applied; transparency is dropped (each pixel keeps
    its stored colour), as the reference's `Image.open(path).convert('RGB')` does."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CCLDError(f"{path}: is a folder, not an image file; give the path of an image")
    if not path.is_file():
        raise CCLDError(f"{path}: no such image file; check the path")
    try:
        with warnings.catch_warnings():
            # Pillow only warns about decompression bombs below twice its own limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(path, path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise _too_big(path, im.width, im.height)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except CCLDError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CCLDError(f"{path}: the image is larger than the {MAX_PIXELS / 1e6:.0f} megapixel "
                        "limit; resize it to a few megapixels first") from None
    except UnidentifiedImageError:
        raise CCLDError(f"{path}: not an image file ccld can read; give a PNG, JPEG, WebP, BMP, "
                        "GIF or TIFF image") from None
    except _READ_ERRORS as e:
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise CCLDError(f"{path}: the image could not be read (damaged or truncated: {detail}); "
                        "open and re-save it, or use another copy") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """`im.convert('RGB')`, the reference's conversion (alpha dropped, not composited: the models
    were trained on images read that way), except that high bit depths are scaled, not clipped."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_8bit(im), "L").convert("RGB")
    if mode == "La":
        im = im.convert("LA")  # Pillow converts premultiplied grey to RGB only by way of LA
    with warnings.catch_warnings():
        # Pillow suggests RGBA for palettes with several transparent entries; dropping is meant
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        return im.convert("RGB")


def _high_depth_to_8bit(im: Image.Image) -> np.ndarray:
    """8-bit grey from 16-bit, 32-bit integer or float grey, scaled by the format's range."""
    mode = im.mode
    if mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        a = a / 257.0  # 65535 -> 255; a plain conversion to "L" would clip to white
    else:
        a = np.asarray(im.convert("F") if mode == "I" and im.format != "PNG" else im,
                       dtype=np.float64)
        if not np.isfinite(a).all():
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        elif mode == "I" and (im.format == "PNG" or 255 < hi <= 65535) and lo >= 0:
            a = a / 257.0  # older Pillow opens 16-bit grey PNGs as "I"
        elif lo < 0.0 or hi > 255.0:
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def crop_to_aspect(image: Image.Image, max_aspect: float) -> Image.Image:
    """The middle of an image whose long side is more than `max_aspect` times its short side,
    cut to that ratio; other images unchanged.

    Scaling a 1x10000 strip so its short side is 256 would make a 256x2560000 image (2 GB) only
    to keep its middle: cutting the middle out first bounds memory by the output size.
    """
    w, h = image.size
    if max(w, h) <= max_aspect * min(w, h):
        return image
    keep = max(1, round(max_aspect * min(w, h)))
    if w > h:
        left = (w - keep) // 2
        return image.crop((left, 0, left + keep, h))
    top = (h - keep) // 2
    return image.crop((0, top, w, top + keep))


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The reference demo's transform: scale so the short side is `size` (LANCZOS), crop the middle.

    The crop is torchvision's `center_crop` arithmetic. `int(fac * w)` can fall one pixel short of
    `size` through floating-point rounding; torchvision then pads with black, and so does PIL's
    crop outside the image, so that corner case is reproduced as well.
    """
    return resize_to_cover(image, size, size)


def resize_to_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image scaled (LANCZOS) just to cover `width` x `height`, its middle cut out: the
    aspect ratio is kept and what sticks out is cropped (`resize_and_center_crop` for squares)."""
    image = crop_to_aspect(image, MAX_ASPECT)
    w, h = image.size
    fac = max(width / w, height / h)
    image = image.resize((int(fac * w), int(fac * h)), Image.LANCZOS)
    w, h = image.size
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """float [3, H, W] in [0, 1], like torchvision's `to_tensor` on an RGB image."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    a = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous().float().div(255)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """An RGB image from one image tensor [3, H, W] in [-1, 1].

    Like the reference demo's `to_pil_image((x.clamp(-1, 1) + 1) / 2)`: torchvision converts a
    float tensor with `mul(255).byte()`, which truncates rather than rounds; kept so that outputs
    are bit-identical to the reference.
    """
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"tensor_to_pil expects one image [3, H, W], got {list(x.shape)}")
    x = x.detach().to("cpu", torch.float32).clamp(-1, 1).add(1).div(2)
    a = x.mul(255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict | None = None,
             exclusive: bool = False) -> Path:
    """Writes a PNG holding `json.dumps(parameters)` in its `parameters` text chunk, atomically;
    by default the parameters the image carries (a pipeline's images carry theirs: PIL's own
    `image.save` would drop them).

    A crash never leaves a half-written PNG under the final name (see `ccld.io.files`).
    `exclusive`: FileExistsError rather than replacing a file at `path`.
    """
    if parameters is None:
        carried = image.info.get(PARAMETERS_KEY)
        parameters = json.loads(carried) if isinstance(carried, str) else {}
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(parameters))
    info.add_text("Software", "ccld")
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info), "image",
                        exclusive=exclusive)


def next_index(out: Path) -> int:
    """The first free image number in out, so earlier pictures are never overwritten."""
    taken = [int(p.stem) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]*.png") if p.stem.isdigit()]
    return max(taken, default=-1) + 1


def save_numbered(image, out: Path, number: int, prefix: str = "") -> tuple[Path, int]:
    """Writes `image` as out/PREFIX{number:05}.png, or under the next free number; (its path,
    the number). Each name is claimed atomically, so that two runs writing into one folder at
    once never overwrite each other's pictures."""
    parameters = json.loads(image.info["parameters"])
    while True:
        try:
            return save_png(image, out / f"{prefix}{number:05}.png", parameters, exclusive=True), number
        except FileExistsError:
            number += 1


def read_png_parameters(path: str | os.PathLike) -> dict:
    """The parameters `save_png` stored in a PNG; {} if it has none."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CCLDError(f"{path}: no such image file; check the path")
    try:
        with open_image(path, path, fix="give a PNG written by ccld") as im:
            im.load()  # text chunks after the image data are read only with the pixels
            text = getattr(im, "text", None) or im.info
            raw = text.get(PARAMETERS_KEY)
    except _READ_ERRORS as e:
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise CCLDError(f"{path}: not a readable PNG ({detail}); give a PNG written by ccld") from None
    if raw is None:
        return {}
    from .jsontext import JSONInputError, parse

    try:
        value = parse(raw) if isinstance(raw, (str, bytes)) else None
    except JSONInputError as e:
        raise CCLDError(f"{path}: its 'parameters' text is {e}; it was not written by ccld") from None
    if value is None:
        raise CCLDError(f"{path}: its 'parameters' text is not JSON; it was not written by ccld")
    if not isinstance(value, dict):
        raise CCLDError(f"{path}: its 'parameters' text is not a JSON object; it was not written by ccld")
    return value


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """The images in a near-square grid, row by row, without padding; empty cells are black."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    cols = max(1, min(n, cols if cols else math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cw, rows * ch))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * cw, (i // cols) * ch))
    return grid
