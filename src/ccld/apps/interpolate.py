"""`ccld interpolate`: an animation walking between prompts (and seeds), written as numbered
PNG frames, each with its parameters, and one animated WebP or GIF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CCLDError
from ..limits import FPS, FRAMES
from ..settings import Settings, check_options

# the options that are settings of every frame, by their settings' names (their dests)
FRAME_SETTINGS = ("seed", "steps", "method", "guidance", "width", "height", "latent_scale",
                  "precision")


def add_interpolate_command(sub) -> argparse.ArgumentParser:
    from .. import sampling
    from .options import add_model_options

    p = sub.add_parser("interpolate", help="an animation walking between prompts",
                       description="Paint frames walking between the prompts' embeddings (and "
                       "from --seed's noise to --seed-to's), write them as numbered PNGs and one "
                       "animated WebP or GIF. The first and last frames are the plain paintings "
                       "of the end prompts.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="two or more text prompts, in order")
    p.add_argument("--frames", type=int, default=16, help="frames in all (default 16)")
    p.add_argument("--seed", type=int, default=None, help="the seed of the first frame's noise (default 0)")
    p.add_argument("--seed-to", type=int, default=None, metavar="T",
                   help="walk the noise too, to this seed's by the last frame")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of the animation (default 8)")
    p.add_argument("--format", choices=("webp", "gif"), default="webp",
                   help="the animated file's format (default webp)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--method", default=None, choices=list(sampling.SAMPLERS),
                   help="the sampler (a deterministic one; default as for generate)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--latent-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="frames sampled at once")
    p.add_argument("--out", default="frames", help="output folder (default frames)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=cmd_interpolate, result_on_disk_at_return=True)
    return p


def cmd_interpolate(args) -> int:
    from .generate import check_writable_folder

    if len(args.prompts) < 2:
        raise CCLDError("interpolate walks between prompts; give two or more")
    frames = FRAMES.check("--frames", args.frames)
    fps = FPS.check("--fps", args.fps)
    options = {name: getattr(args, name) for name in FRAME_SETTINGS
               if getattr(args, name, None) is not None}
    if args.seed_to is not None:
        check_options({"seed": args.seed_to})
    if args.batch_size is not None:
        check_options({"batch_size": args.batch_size})
    settings = Settings.build(prompts=[args.prompts[0]], **options)
    for text in args.prompts[1:]:  # each prompt checked as the first was
        Settings.build(prompts=[text])
    from ..pipeline.interpolation import paint_frames, require_deterministic

    require_deterministic(args.method)  # before the slow loading
    out = Path(args.out)
    check_writable_folder(out, "--out")
    from ..io.images import next_index, save_numbered
    from .options import load_pipeline

    pipe = load_pipeline(args)
    settings = pipe.check_inputs(settings=settings)
    out.mkdir(parents=True, exist_ok=True)
    number = next_index(out)
    painted = []
    for frame in paint_frames(pipe, args.prompts, frames, settings, seed_to=args.seed_to,
                              batch_size=args.batch_size, progress=not args.quiet):
        print(save_numbered(frame, out, number)[0])
        number += 1
        painted.append(frame)
    animation = out / f"animation-{number - frames:05d}.{args.format}"
    extra = {"lossless": False, "quality": 90} if args.format == "webp" else {}
    painted[0].save(animation, save_all=True, append_images=painted[1:],
                    duration=round(1000 / fps), loop=0, **extra)
    print(animation)
    if args.format == "gif":
        print("ccld: note: GIF holds 256 colours a frame; --format webp keeps them all",
              file=sys.stderr)
    return 0
