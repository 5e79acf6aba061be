"""`ccld generate`: its options, the settings they give, and writing the pictures.

The options that are settings of a painting have the settings' names (`dest`), so that
`settings_options` is their one translation into `ccld.Settings` keywords; everything is checked
there, before anything slow (a download, loading the models).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ..errors import CCLDError
from ..limits import GRID_IMAGES, IMAGES_PER_CALL, IMAGES_PER_RUN, SEED
from ..prompts import how_read
from ..settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_METHOD,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_UPSCALE,
    DEFAULT_VARIATION_STRENGTH,
    REFERENCE_METHOD,
    REFERENCE_PRECISION,
    REFERENCE_STEPS,
    UPSCALERS,
    Settings,
    check_options,
)

# The options of `ccld generate` that are settings, by their settings' names (their dests)
SETTING_OPTIONS = ("prompts", "image_prompts", "init_image", "strength", "mask", "mask_blur",
                   "hires", "hires_strength", "hires_steps", "hires_upscale", "num_images",
                   "batch_size", "seed", "steps", "method", "eta", "guidance", "latent_scale",
                   "width", "height", "variation_of", "variation_index", "variation_strength",
                   "precision")
PREVIEW_FILE = "preview.png"


def add_generate_command(sub) -> argparse.ArgumentParser:
    from .. import sampling
    from .options import add_model_options

    g = sub.add_parser("generate", help="paint pictures from prompts",
                       description="Paint pictures from text and image prompts. Each PNG records "
                       "its parameters; the same seed and settings paint the same picture.")
    g.add_argument("prompts", nargs="*", metavar="PROMPT[:WEIGHT]",
                   help="text prompts; a weight after the last colon (negative steers away)")
    g.add_argument("--from-png", metavar="PNG",
                   help="paint the picture a ccld PNG records again (with the same models); "
                        "options given explicitly change single settings")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="paint every row of FILE: a PROMPT[:WEIGHT] line, or a JSON object of "
                        "settings (prompts, image_prompts, seed, steps, method, guidance, width, "
                        "n, ...); the options are each row's defaults, a row's seed is --seed "
                        "plus its position. Writes OUT/manifest.jsonl; a rerun paints only what "
                        "it lacks")
    g.add_argument("--image-prompt", dest="image_prompts", action="append", default=None,
                   metavar="PATH[:WEIGHT]", help="an image prompt (repeatable)")
    g.add_argument("--init-image", metavar="PATH", help="start from this image (image to image)")
    g.add_argument("--strength", type=float, default=None,
                   help=f"how far to noise the init image, 0..1 (default {DEFAULT_STRENGTH})")
    g.add_argument("--mask", metavar="PATH",
                   help="with --init-image: inpaint, repainting the white part of this mask "
                        "(scaled to the picture) and keeping the rest of the init image exactly")
    g.add_argument("--mask-blur", type=int, default=None, metavar="PX",
                   help="feather the mask's edge by PX pixels (default 0: a hard edge)")
    g.add_argument("-n", dest="num_images", type=int, default=None,
                   help=f"number of images (default 1, at most {IMAGES_PER_RUN.high}); any "
                        "number paints in the memory of one batch")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"images sampled at once (default 16 on a GPU, else 4; at most "
                        f"{IMAGES_PER_CALL.high}); each is written as soon as its batch is done")
    g.add_argument("--seed", type=int, default=None, help=f"random seed, 0 to {SEED.high} (default 0)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default {DEFAULT_STEPS}; {REFERENCE_STEPS} with "
                        "--reference; a step-distilled student's own count)")
    g.add_argument("--method", default=None, choices=list(sampling.SAMPLERS),
                   help=f"sampler (default {DEFAULT_METHOD}; {REFERENCE_METHOD} with --reference; "
                        "distilled for a step-distilled student)")
    g.add_argument("--eta", type=float, default=None, help="DDIM noise (default 0: deterministic)")
    g.add_argument("--guidance", type=float, default=None,
                   help=f"default prompt weight (classifier-free guidance scale, default "
                        f"{DEFAULT_GUIDANCE:g}, or brought into a guidance-distilled student's "
                        "range)")
    g.add_argument("--latent-scale", type=float, default=None,
                   help="latent scale for decoding (default: 2.55 for the published WikiArt "
                        "models, as their demos decode; else the U-Net's stored autoencoder_scale)")
    g.add_argument("--width", type=int, default=None,
                   help=f"picture width in pixels, a multiple of 64 (default {DEFAULT_SIZE}, the "
                        "size the models were trained at and paint best near)")
    g.add_argument("--height", type=int, default=None,
                   help=f"picture height in pixels, a multiple of 64 (default {DEFAULT_SIZE})")
    g.add_argument("--hires", metavar="WxH", default=None,
                   help="a larger picture (\"hires fix\"): paint at --width x --height, upscale, "
                        "then refine at WxH by image to image (multiples of 64)")
    g.add_argument("--hires-strength", type=float, default=None, metavar="S",
                   help=f"how far the refinement noises the upscaled picture, 0..1 (default "
                        f"{DEFAULT_HIRES_STRENGTH})")
    g.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="sampling steps of the refinement (default: --steps)")
    g.add_argument("--hires-upscale", choices=UPSCALERS, default=None,
                   help=f"upscale the decoded picture (pixels, re-encoded) or the latents "
                        f"(default {DEFAULT_UPSCALE})")
    g.add_argument("--variation-of", type=int, default=None, metavar="SEED",
                   help="paint variations of the picture this seed painted: each starting noise "
                        "is slerped from that picture's towards --seed's")
    g.add_argument("--variation-index", type=int, default=None, metavar="I",
                   help="with --variation-of: vary picture I of that seed's run (its PNG's "
                        "index; default 0, the first)")
    g.add_argument("--variation-strength", type=float, default=None, metavar="S",
                   help=f"with --variation-of: how far from that picture, 0..1 (default "
                        f"{DEFAULT_VARIATION_STRENGTH:g}; 0 paints it again)")
    g.add_argument("--reference", action="store_true",
                   help=f"the reference demo's exact recipe: {REFERENCE_METHOD}, "
                        f"{REFERENCE_STEPS} steps, contiguous {REFERENCE_PRECISION} (options given "
                        "explicitly still win)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the U-Net for this run's batch shape if the cache lacks it (on "
                        "the CPU: a minute or more, once; later runs load it in milliseconds; "
                        "on a GPU: torch.compile, every run). By default a compiled U-Net already "
                        "in the cache is used; --no-compile never uses one")
    g.add_argument("--out", default="out", help="output folder (default out)")
    g.add_argument("--grid", action="store_true",
                   help=f"also write grid-NNNNN.png (numbered by the run's first image) of the "
                        f"first {GRID_IMAGES.high} images")
    g.add_argument("--xy", nargs="+", metavar="NAME=V1,V2", default=None,
                   help="a parameter grid: paint every combination of one or two settings' "
                        "values (e.g. guidance=1,3,5 steps=5,11,20; any setting, or weight for "
                        "the prompts' weight) from the same seed, and write xy-NNNNN.png, the "
                        "labelled grid, beside the single PNGs")
    g.add_argument("--preview", action="store_true",
                   help=f"keep OUT/{PREVIEW_FILE} showing the current batch's clean prediction, "
                        "updated every few sampling steps (a quick linear look at the latents, "
                        "or the tiny decoder's)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(g)
    g.set_defaults(func=cmd_generate, result_on_disk_at_return=True)
    return g


def settings_options(args) -> dict:
    """The settings the options give, by name: those given explicitly, and with --reference the
    reference demo's recipe where they leave it open. Each is checked now (`check_options`)."""
    options = {name: getattr(args, name) for name in SETTING_OPTIONS
               if getattr(args, name, None) not in (None, [])}
    if getattr(args, "reference", False):
        for name, value in (("method", REFERENCE_METHOD), ("steps", REFERENCE_STEPS),
                            ("precision", REFERENCE_PRECISION)):
            options.setdefault(name, value)
    check_options(options)
    return options


def check_writable_folder(folder: Path, option: str) -> None:
    """Fails now, before any slow work, when `folder` could not be created or written into;
    creates nothing, so a run that fails later leaves no empty folder behind."""
    existing = folder
    try:
        while not existing.exists():  # the nearest part of the path that exists
            existing = existing.parent
    except OSError as e:
        raise CCLDError(f"{option} {folder}: cannot look there ({e.strerror}); pass another "
                        "folder") from None
    if not existing.is_dir():
        where = "" if existing == folder else f" {existing} is"
        raise CCLDError(f"{option} {folder}:{where} a file, not a folder; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CCLDError(f"{option} {folder}: no permission to write in {existing}; pass a "
                        "folder you can write to")


def cmd_generate(args) -> int:
    options = settings_options(args)
    if args.xy is not None:
        if args.prompts_file is not None or args.grid or args.preview:
            raise CCLDError("--xy writes its own grid of one painting's settings; leave out "
                            "--prompts-file, --grid and --preview")
        if len(args.xy) > 2:
            raise CCLDError(f"--xy takes one or two axes, not {len(args.xy)}; e.g. --xy "
                            "guidance=1,3,5 steps=5,11,20")
    out = Path(args.out)
    if args.prompts_file is not None:
        if args.prompts or args.from_png:
            raise CCLDError("give the prompts either on the command line or in --prompts-file, "
                            "not both (nor --prompts-file with --from-png)")
        if args.grid:
            raise CCLDError("--grid is for one prompt's pictures; leave it out with "
                            "--prompts-file")
        check_writable_folder(out, "--out")
        from .batch import generate_from_file

        return generate_from_file(args, out, options)
    if args.from_png is not None:
        from ..pipeline.metadata import settings_from_png

        settings = settings_from_png(args.from_png, **options)
    else:
        settings = Settings.build(**options)
    cells = axes = None
    if args.xy is not None:
        from .xy import combinations, parse_axes

        if settings.num_images > 1:
            raise CCLDError("--xy paints one picture per combination; leave -n out")
        axes = parse_axes(args.xy)
        cells = combinations(settings, axes)  # every cell checked before anything slow
    check_writable_folder(out, "--out")
    for prompt in args.prompts:  # says how a prompt with a colon but no weight was read
        note = how_read(prompt, DEFAULT_GUIDANCE if args.guidance is None else args.guidance)
        if note:
            print(f"ccld: note: {note}", file=sys.stderr)
    from .options import load_pipeline

    args.precision = settings.precision  # a PNG's own, unless --precision says otherwise
    pipe = load_pipeline(args)
    if cells is not None:
        write_xy_grid(pipe, cells, axes, out, progress=not args.quiet)
        return 0
    images = pipe.iter_images(settings=settings, progress=not args.quiet,
                              callback=preview_writer(pipe, args, out, settings))
    write_numbered(images, out, grid=args.grid)
    return 0


def preview_writer(pipe, args, out: Path, settings: Settings):
    """With --preview, the sampling callback that replaces OUT/preview.png (atomically: a
    viewer never reads half a file) every PREVIEW_EVERY steps and at each batch's last step."""
    if not args.preview:
        return None
    from ..io.files import atomic_write
    from ..io.images import make_grid, tensor_to_pil
    from ..pipeline import PREVIEW_EVERY

    def write(info: dict) -> None:
        done = info["i"] + 1
        if done % PREVIEW_EVERY and done != info["steps"]:
            return
        pixels = pipe.preview(info["pred"], settings.latent_scale)
        grid = make_grid([tensor_to_pil(p) for p in pixels])
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / PREVIEW_FILE, lambda f: grid.save(f, format="PNG"), "preview")

    return write


def write_numbered(images, out: Path, grid: bool) -> None:
    """Writes each image as soon as it is painted, numbered on from the pictures already in
    `out`, and prints its path; then the grid of the first GRID_IMAGES, numbered like the first
    image. `out` is created for the first picture, and removed again if that cannot be written."""
    from ..io.images import make_grid, next_index, save_numbered

    first = number = None
    in_grid = []
    for image in images:
        if first is None:
            created = [folder for folder in [out, *out.parents] if not folder.exists()]
            try:
                out.mkdir(parents=True, exist_ok=True)
                path, first = save_numbered(image, out, next_index(out))
            except BaseException as e:
                for folder in created:  # deepest first; each is empty unless another run wrote
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                if isinstance(e, OSError):
                    raise CCLDError(f"--out {out}: cannot create the folder ({e.strerror}); "
                                    "pass another folder") from None
                raise
            number = first
        else:
            path, number = save_numbered(image, out, number + 1)
        print(path)
        if grid and len(in_grid) < GRID_IMAGES.high:
            in_grid.append(image)
    if in_grid:
        painted = json.loads(in_grid[0].info["parameters"])["num_images"]
        if painted > len(in_grid):
            print(f"ccld: the grid shows the first {len(in_grid)} of the {painted} pictures",
                  file=sys.stderr)
        picture = make_grid(in_grid)
        picture.info["parameters"] = json.dumps({**json.loads(in_grid[0].info["parameters"]),
                                                 "grid": True})
        print(save_numbered(picture, out, first, prefix="grid-")[0])


def write_xy_grid(pipe, cells, axes, out: Path, progress: bool) -> None:
    """Paints every cell of a parameter grid (sharing batches where they may), writes each as a
    numbered PNG, in the grid's order, as soon as it is painted, then the labelled grid
    xy-NNNNN.png, numbered like the first cell."""
    from ..io.images import next_index, save_numbered
    from .xy import grid_parameters, labelled_grid

    out.mkdir(parents=True, exist_ok=True)
    first = next_index(out)
    pictures = [None] * len(cells)
    for position, image in pipe.iter_many(cells, progress=progress):
        print(save_numbered(image, out, first + position)[0])
        pictures[position] = image
    grid = labelled_grid(pictures, axes)
    grid.info["parameters"] = json.dumps(grid_parameters(pictures[0], axes))
    print(save_numbered(grid, out, first, prefix="xy-")[0])


