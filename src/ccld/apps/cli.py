"""The `ccld` command: generate, download, convert, info, cache.

Problems the user can fix arrive as `CCLDError` and are printed as one line with exit status 2.
This module imports only the standard library and ccld's light modules: torch and the models
load inside `main`, so that Ctrl-C during start-up is "ccld: interrupted", not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from .._version import __version__
from ..errors import CCLDError, command_line
from ..limits import (
    ETA,
    GRID_IMAGES,
    IMAGES_PER_CALL,
    IMAGES_PER_RUN,
    LATENT_SCALE,
    SEED,
    SIZE,
    STEPS,
    STRENGTH,
    VARIATION_INDEX,
    VARIATION_STRENGTH,
    WEIGHT,
)
from ..prompts import how_read, parse_weighted


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


def apply_recipe(args) -> None:
    """Fills the sampling options left out: the reference demo's recipe with --reference (plms,
    15 steps, contiguous fp32; the latent scale is the model's own reference one either way).
    Method, steps and guidance left out otherwise stay None: the pipeline fills them with the
    model's own defaults (a distilled student's, else the fast ones). Options given explicitly
    always win."""
    from ..pipeline import (
        REFERENCE_METHOD,
        REFERENCE_PRECISION,
        REFERENCE_STEPS,
    )

    reference = getattr(args, "reference", False)
    if reference and getattr(args, "method", "") is None:
        args.method = REFERENCE_METHOD
    if reference and getattr(args, "steps", 0) is None:
        args.steps = REFERENCE_STEPS
    if args.precision is None:
        args.precision = REFERENCE_PRECISION if reference else "auto"


def check_generate_args(args) -> None:
    """Every number against ccld.limits, the image prompts' weights, and that there is
    something to paint from, before anything slow (a download, loading the models)."""
    IMAGES_PER_RUN.check("-n", args.n)
    if args.batch_size is not None:
        IMAGES_PER_CALL.check("--batch-size", args.batch_size)
    if args.steps is not None:
        STEPS.check("--steps", args.steps)
    SEED.check("--seed", args.seed)
    if args.guidance is not None:
        WEIGHT.check("--guidance", args.guidance)
    ETA.check("--eta", args.eta)
    if args.latent_scale is not None:
        LATENT_SCALE.check("--latent-scale", args.latent_scale)
    if args.strength is not None:
        if args.init_image is None:
            raise CCLDError("--strength needs --init-image PATH")
        STRENGTH.check("--strength", args.strength)
    if args.prompts_file is not None:
        if args.prompts:
            raise CCLDError("give the prompts either on the command line or in --prompts-file, "
                            "not both")
        if args.grid:
            raise CCLDError("--grid is for one prompt's pictures; leave it out with "
                            "--prompts-file")
    elif not (args.prompts or args.image_prompt or args.init_image):
        raise CCLDError('nothing to paint from; give a prompt, e.g. ccld generate "a snowy '
                        'landscape, oil on canvas", or --image-prompt PATH or --init-image PATH')
    for spec in args.image_prompt:
        parse_weighted(spec, default_weight(args), "image prompt", is_path=True)
    check_picture_args(args)


def default_weight(args) -> float:
    """The weight of a prompt given without one, for the checks before the model is loaded
    (which weight it then gets, the model may say: see `CCLDPipeline.sampling_defaults`)."""
    from ..pipeline import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE if args.guidance is None else args.guidance


def cmd_generate(args) -> int:
    apply_recipe(args)
    check_generate_args(args)
    out = Path(args.out)
    check_writable_folder(out, "--out")
    if args.prompts_file is not None:
        from .batch import generate_from_file

        return generate_from_file(args, out)
    for spec in args.prompts:  # also refuses a bad weight before the models load
        note = how_read(spec, default_weight(args))
        if note:
            print(f"ccld: note: {note}", file=sys.stderr)
    from ..pipeline import DEFAULT_STRENGTH
    from .options import load_pipeline

    pipe = load_pipeline(args)
    batch_size = args.batch_size or pipe.default_batch_size
    if args.compile:
        compile_unet(pipe, args, min(batch_size, args.n))
    images = pipe.iter_images(args.prompts, image_prompts=args.image_prompt, num_images=args.n,
                              batch_size=batch_size, steps=args.steps, method=args.method,
                              guidance=args.guidance, seed=args.seed, eta=args.eta,
                              init_image=args.init_image,
                              strength=DEFAULT_STRENGTH if args.strength is None else args.strength,
                              latent_scale=args.latent_scale, progress=not args.quiet,
                              callback=preview_writer(pipe, args, out), **picture_settings(args))
    write_numbered(images, out, grid=args.grid)
    global _finished_on_disk
    _finished_on_disk = True
    return 0


# The picture's size and variations: their options, checks and pipeline settings

def add_picture_options(g: argparse.ArgumentParser) -> None:
    from ..pipeline import DEFAULT_SIZE, DEFAULT_VARIATION_STRENGTH

    g.add_argument("--width", type=int, default=DEFAULT_SIZE,
                   help=f"picture width in pixels, a multiple of 64 (default {DEFAULT_SIZE}, the "
                        "size the models were trained at and paint best near)")
    g.add_argument("--height", type=int, default=DEFAULT_SIZE,
                   help=f"picture height in pixels, a multiple of 64 (default {DEFAULT_SIZE})")
    g.add_argument("--variation-of", type=int, default=None, metavar="SEED",
                   help="paint variations of the picture this seed painted: each starting noise "
                        "is slerped from that picture's towards --seed's")
    g.add_argument("--variation-index", type=int, default=None, metavar="I",
                   help="with --variation-of: vary picture I of that seed's run (its PNG's "
                        "index; default 0, the first)")
    g.add_argument("--variation-strength", type=float, default=None, metavar="S",
                   help=f"with --variation-of: how far from that picture, 0..1 (default "
                        f"{DEFAULT_VARIATION_STRENGTH:g}; 0 paints it again)")


def check_picture_args(args) -> None:
    SIZE.check("--width", args.width)
    SIZE.check("--height", args.height)
    if args.variation_of is None:
        for option, value in (("--variation-index", args.variation_index),
                              ("--variation-strength", args.variation_strength)):
            if value is not None:
                raise CCLDError(f"{option} needs --variation-of SEED, the seed of the picture "
                                "to vary")
        return
    SEED.check("--variation-of", args.variation_of)
    if args.variation_index is not None:
        VARIATION_INDEX.check("--variation-index", args.variation_index)
    if args.variation_strength is not None:
        VARIATION_STRENGTH.check("--variation-strength", args.variation_strength)


def add_preview_option(g: argparse.ArgumentParser) -> None:
    from ..pipeline import PREVIEW_EVERY

    g.add_argument("--preview", action="store_true",
                   help=f"keep OUT/{PREVIEW_FILE} showing the current batch's clean prediction, "
                        f"updated every {PREVIEW_EVERY} sampling steps (a quick linear look at "
                        "the latents, or the tiny decoder's)")


PREVIEW_FILE = "preview.png"


def preview_writer(pipe, args, out: Path):
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
        pixels = pipe.preview(info["pred"], args.latent_scale)
        grid = make_grid([tensor_to_pil(p) for p in pixels])
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / PREVIEW_FILE, lambda f: grid.save(f, format="PNG"), "preview")

    return write


def picture_settings(args) -> dict:
    """The pipeline keyword arguments the options of `add_picture_options` give."""
    settings = dict(width=args.width, height=args.height)
    if args.variation_of is not None:
        settings["variation_of"] = args.variation_of
        if args.variation_index is not None:
            settings["variation_index"] = args.variation_index
        if args.variation_strength is not None:
            settings["variation_strength"] = args.variation_strength
    return settings


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


def compile_unet(pipe, args, batch_size: int) -> None:
    """torch.compile the U-Net and warm it up on this run's batch shape, saying what it cost."""
    import time

    started = time.perf_counter()
    pipe.compile()
    pipe.generate_latents(args.prompts, args.image_prompt, num_images=batch_size, steps=1,
                          method=args.method, guidance=args.guidance, seed=args.seed,
                          init_image=args.init_image, **picture_settings(args))
    print(f"ccld: torch.compile warm-up took {time.perf_counter() - started:.1f} s", file=sys.stderr)


def cmd_download(args) -> int:
    from .options import download_defaults

    for p in download_defaults(args.cloob):
        print(p)
    return 0


def cmd_convert(args) -> int:
    from .options import load_pipeline

    output = Path(args.output)
    check_writable_folder(output, "the output folder")
    pipe = load_pipeline(args)
    folder = pipe.save_pretrained(output)
    print(f"wrote {folder}; use it with `ccld generate --model {folder}` or "
          f"CCLDPipeline.from_pretrained({str(folder)!r})")
    return 0


def cmd_info(args) -> int:
    from .options import describe_checkpoint

    info = describe_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def cmd_cache(args) -> int:
    from ..io import weights_cache

    converted = weights_cache.converted_dir()
    if args.action == "clear":
        if converted is None:
            print(f"the converted-weights cache is off ({weights_cache.ENV_VAR}=off); "
                  "nothing to clear")
            return 0
        removed, freed = weights_cache.clear_converted()
        print(f"removed {removed} entries ({_megabytes(freed)}) from {converted}; "
              "downloads are kept")
        return 0
    print(f"cache folder: {weights_cache.cache_root()}")
    if converted is None:
        print(f"converted weights: off ({weights_cache.ENV_VAR}=off)")
        return 0
    entries = weights_cache.cache_entries()
    print(f"converted weights: {converted}")
    for entry in entries:
        sources = ", ".join(entry.sources) or "?"
        print(f"  {entry.folder.name}  {_megabytes(entry.size):>10}  {entry.kind:<10} {sources}")
    total = sum(entry.size for entry in entries)
    print(f"{len(entries)} entries, {_megabytes(total)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import sampling
    from ..pipeline import (
        DEFAULT_GUIDANCE,
        DEFAULT_METHOD,
        DEFAULT_STEPS,
        DEFAULT_STRENGTH,
        REFERENCE_METHOD,
        REFERENCE_PRECISION,
        REFERENCE_STEPS,
    )
    from .options import add_model_options

    p = argparse.ArgumentParser(prog="ccld", description="CLOOB-conditioned latent diffusion: "
                                "paint from text and image prompts.")
    p.add_argument("--version", action="version", version=f"ccld {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="paint pictures from prompts",
                       description="Paint pictures from text and image prompts. Each PNG records "
                       "its parameters; the same seed and settings paint the same picture.")
    g.add_argument("prompts", nargs="*", metavar="PROMPT[:WEIGHT]",
                   help="text prompts; a weight after the last colon (negative steers away)")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="paint every row of FILE: a PROMPT[:WEIGHT] line, or a JSON object of "
                        "settings (prompts, image_prompts, seed, steps, method, guidance, size, "
                        "n, ...); the options are each row's defaults, a row's seed is --seed "
                        "plus its position. Writes OUT/manifest.jsonl; a rerun paints only what "
                        "it lacks")
    g.add_argument("--image-prompt", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="an image prompt (repeatable)")
    g.add_argument("--init-image", metavar="PATH", help="start from this image (image to image)")
    g.add_argument("--strength", type=float, default=None,
                   help=f"how far to noise the init image, 0..1 (default {DEFAULT_STRENGTH})")
    g.add_argument("-n", type=int, default=1,
                   help=f"number of images (default 1, at most {IMAGES_PER_RUN.high}); any "
                        "number paints in the memory of one batch")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"images sampled at once (default 16 on a GPU, else 4; at most "
                        f"{IMAGES_PER_CALL.high}); each is written as soon as its batch is done")
    g.add_argument("--seed", type=int, default=0,
                   help=f"random seed, 0 to {SEED.high} (default 0)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default {DEFAULT_STEPS}; {REFERENCE_STEPS} with "
                        "--reference; a step-distilled student's own count)")
    g.add_argument("--method", default=None, choices=list(sampling.SAMPLERS),
                   help=f"sampler (default {DEFAULT_METHOD}; {REFERENCE_METHOD} with --reference; "
                        "distilled for a step-distilled student)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise (default 0: deterministic)")
    g.add_argument("--guidance", type=float, default=None,
                   help=f"default prompt weight (classifier-free guidance scale, default "
                        f"{DEFAULT_GUIDANCE:g}, or brought into a guidance-distilled student's "
                        "range)")
    g.add_argument("--latent-scale", type=float, default=None,
                   help="latent scale for decoding (default: 2.55 for the published WikiArt "
                        "models, as their demos decode; else the U-Net's stored autoencoder_scale)")
    g.add_argument("--reference", action="store_true",
                   help=f"the reference demo's exact recipe: {REFERENCE_METHOD}, "
                        f"{REFERENCE_STEPS} steps, contiguous {REFERENCE_PRECISION} (options given "
                        "explicitly still win)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net first (pays a warm-up, reported; worth it for "
                        "many images)")
    g.add_argument("--out", default="out", help="output folder (default out)")
    g.add_argument("--grid", action="store_true",
                   help=f"also write grid-NNNNN.png (numbered by the run's first image) of the "
                        f"first {GRID_IMAGES.high} images")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_picture_options(g)
    add_preview_option(g)
    add_model_options(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("download", help="fetch the default models into the Hugging Face cache")
    d.add_argument("--cloob", default=None, help="built-in CLOOB config name")
    d.set_defaults(func=cmd_download)

    c = sub.add_parser("convert", help="write a safetensors pipeline folder from release files")
    c.add_argument("output", help="the folder to write")
    add_model_options(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="say what a checkpoint is")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("cache", help="show or clear the converted-weights cache",
                       description="Release files are converted once into safetensors copies "
                       "that later loads memory-map. The folder is CCLD_CACHE_DIR (default: "
                       "beside the Hugging Face cache; CCLD_CACHE_DIR=off turns it off).")
    k.add_argument("action", choices=["info", "clear"],
                   help="info: the folder and its entries; clear: delete the converted copies "
                        "(downloads stay)")
    k.set_defaults(func=cmd_cache)

    from .web import add_serve_command
    add_serve_command(sub)
    from ..training.commands import add_training_commands
    add_training_commands(sub)
    return p


INTERRUPTED = 130  # main's status after Ctrl-C: 128 + SIGINT, what a shell reports for it


def main(argv=None) -> int:
    try:  # everything, imports included: Ctrl-C while torch loads is an interruption too
        args = build_parser().parse_args(argv)
        warnings.simplefilter("default")
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its retry chatter would bury our one-line errors
        with command_line():
            status = args.func(args)
        # A first run's converted-weights copies may still be being written: waited for here,
        # where Ctrl-C is an interruption (the interpreter's own wait at exit would print a
        # traceback), and leaves only a temporary that the next writer removes.
        from ..io.weights_cache import finish_writes

        finish_writes()
        return status
    except CCLDError as e:
        print(f"ccld: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ccld: interrupted", file=sys.stderr)
        return INTERRUPTED


# Set by a command whose whole result is on disk when it returns (one process's paintings): the
# console command then ends without the interpreter's teardown, which frees every tensor and
# module one by one (0.3 s after a painting) and only delays the prompt. Commands that may leave
# work to exit handlers (training's trackers, a launcher's process group) never set it.
_finished_on_disk = False


def _die_of_sigint() -> None:
    """Ends the process by SIGINT itself, as the shell convention asks of an interrupted
    program: a shell loop of `ccld` runs then stops at Ctrl-C instead of starting the next one.
    Python does this on its own only sometimes (it remembers an interrupt that left Python code
    run from C, as parts of a start-up's imports are, even when the interrupt was caught later),
    so without this an interrupted `ccld` ended by status 130 or by the signal, depending on when
    the key was pressed. Nothing is left to tear down: the interruption abandoned the work."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(INTERRUPTED)  # where the signal cannot end it (it is blocked): the same status


def entry() -> None:
    """The `ccld` console command and `python -m ccld`."""
    status = main()
    if status == INTERRUPTED:
        _die_of_sigint()
    # (not under a profiler or a tracer, e.g. coverage: their results are written at exit)
    if _finished_on_disk and sys.getprofile() is None and sys.gettrace() is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
