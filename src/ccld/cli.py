"""The `ccld` command: generate, download, convert, info, cache.

Problems the user can fix arrive as `CCLDError` and are printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import sampling
from ._version import __version__
from .errors import CCLDError
from .loading import add_model_options, describe_checkpoint, download_defaults, load_pipeline
from .pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_METHOD,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    REFERENCE_METHOD,
    REFERENCE_PRECISION,
    REFERENCE_STEPS,
)


def next_index(out: Path) -> int:
    """The first free image number in out, so earlier pictures are never overwritten."""
    taken = [int(p.stem) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]*.png") if p.stem.isdigit()]
    return max(taken, default=-1) + 1


def apply_recipe(args) -> None:
    """Fills the sampling options left out: the reference demo's recipe with --reference (plms,
    15 steps, contiguous fp32; the latent scale is the model's own reference one either way),
    else the fast defaults. Options given explicitly always win."""
    reference = getattr(args, "reference", False)
    if getattr(args, "method", "") is None:
        args.method = REFERENCE_METHOD if reference else DEFAULT_METHOD
    if getattr(args, "steps", 0) is None:
        args.steps = REFERENCE_STEPS if reference else DEFAULT_STEPS
    if args.precision is None:
        args.precision = REFERENCE_PRECISION if reference else "auto"


def cmd_generate(args) -> int:
    from .images import make_grid, save_png

    apply_recipe(args)
    if args.n < 1:
        raise CCLDError(f"-n must be at least 1 (got {args.n})")
    if args.steps < 1:
        raise CCLDError(f"--steps must be at least 1 (got {args.steps})")
    if args.init_image is None and args.strength is not None:
        raise CCLDError("--strength needs --init-image PATH")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CCLDError(f"{out}: cannot create the output folder ({e.strerror}); "
                        "pass another --out") from None
    pipe = load_pipeline(args)
    if args.compile:
        compile_unet(pipe, args)
    images = pipe(args.prompts, image_prompts=args.image_prompt, num_images=args.n,
                  steps=args.steps, method=args.method, guidance=args.guidance, seed=args.seed,
                  eta=args.eta, init_image=args.init_image,
                  strength=DEFAULT_STRENGTH if args.strength is None else args.strength,
                  latent_scale=args.latent_scale, progress=not args.quiet)
    start = next_index(out)
    for i, image in enumerate(images):
        path = out / f"{start + i:05}.png"
        save_png(image, path, json.loads(image.info["parameters"]))
        print(path)
    if args.grid:  # numbered like the images, so a later run never overwrites it
        path = out / f"grid-{start:05}.png"
        save_png(make_grid(images), path, {**json.loads(images[0].info["parameters"]), "grid": True})
        print(path)
    return 0


def compile_unet(pipe, args) -> None:
    """torch.compile the U-Net and warm it up on this run's shapes, saying what it cost."""
    import time

    started = time.perf_counter()
    pipe.compile()
    pipe.generate_latents(args.prompts, args.image_prompt, num_images=args.n, steps=1,
                          method=args.method, guidance=args.guidance, seed=args.seed,
                          init_image=args.init_image)
    print(f"ccld: torch.compile warm-up took {time.perf_counter() - started:.1f} s", file=sys.stderr)


def cmd_download(args) -> int:
    for p in download_defaults(args.cloob):
        print(p)
    return 0


def cmd_convert(args) -> int:
    pipe = load_pipeline(args)
    folder = pipe.save_pretrained(args.output)
    print(f"wrote {folder}; use it with `ccld generate --model {folder}` or "
          f"CCLDPipeline.from_pretrained({str(folder)!r})")
    return 0


def cmd_info(args) -> int:
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
    from . import weights_cache

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
    p = argparse.ArgumentParser(prog="ccld", description="CLOOB-conditioned latent diffusion: "
                                "paint from text and image prompts.")
    p.add_argument("--version", action="version", version=f"ccld {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="paint pictures from prompts",
                       description="Paint pictures from text and image prompts. Each PNG records "
                       "its parameters; the same seed and settings paint the same picture.")
    g.add_argument("prompts", nargs="*", metavar="PROMPT[:WEIGHT]",
                   help="text prompts; a weight after the last colon (negative steers away)")
    g.add_argument("--image-prompt", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="an image prompt (repeatable)")
    g.add_argument("--init-image", metavar="PATH", help="start from this image (image to image)")
    g.add_argument("--strength", type=float, default=None,
                   help=f"how far to noise the init image, 0..1 (default {DEFAULT_STRENGTH})")
    g.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default {DEFAULT_STEPS}; {REFERENCE_STEPS} with --reference)")
    g.add_argument("--method", default=None, choices=list(sampling.SAMPLERS),
                   help=f"sampler (default {DEFAULT_METHOD}; {REFERENCE_METHOD} with --reference)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise (default 0: deterministic)")
    g.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"default prompt weight (classifier-free guidance scale, default "
                        f"{DEFAULT_GUIDANCE:g})")
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
                   help="also write grid-NNNNN.png (numbered by the run's first image)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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
    from .training.commands import add_training_commands
    add_training_commands(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its retry chatter would bury our one-line errors
    try:
        return args.func(args)
    except CCLDError as e:
        print(f"ccld: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ccld: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
