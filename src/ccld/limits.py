"""Every limit on what ccld takes, in one table.

The CLI, the Python API and the web app check each number they are given against a row of this
table with `Limit.check`, which raises a one-line `CCLDError` naming the input (as the caller
spells it: `--steps`, `steps`, ...), the allowed range and a fix. The table in docs/limits.md is
`markdown_table()`. A web server caps one request more tightly than the CLI caps a run (fewer
steps, fewer images, a seed a browser holds exactly); those caps are rows here too, named WEB_*.

Many images are not a memory problem for the CLI: it paints `-n` images `--batch-size` at a
time, so IMAGES_PER_RUN bounds a run and IMAGES_PER_CALL what one batch or one Python call holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import CCLDError


@dataclass(frozen=True)
class Limit:
    """The allowed range of one kind of input, with what it bounds and what to do instead."""

    low: float
    high: float
    what: str  # what the limit bounds and where, for the table in docs/limits.md
    fix: str  # advice appended to a refusal
    whole: bool = False  # whole numbers only
    low_open: bool = False  # `low` itself is not allowed (a strength of 0 would do nothing)
    multiple_of: int = 1
    default: float | None = None  # for the rows that are a setting's default cap (uploads)

    def range_text(self) -> str:
        """The range in words: "a whole number from 1 to 1000", "a number above 0 and at most 1"."""
        kind = "a whole number" if self.whole else "a number"
        if self.multiple_of > 1:
            kind = f"a multiple of {self.multiple_of}"
        if self.low_open:
            return f"{kind} above {self.low:g} and at most {self.high:g}"
        low, high = (self.low, self.high) if self.whole else (f"{self.low:g}", f"{self.high:g}")
        return f"{kind} from {low} to {high}"

    def check(self, name: str, value) -> int | float:
        """`value` as a number within this range (an int if whole); else a CCLDError naming
        `name`. Numbers written as text are read as numbers, as a web form sends them."""
        if value is None or (isinstance(value, str) and not value.strip()):
            raise CCLDError(f"{name} is missing; give {self.range_text()}")
        try:
            if isinstance(value, bool):
                raise TypeError  # True is not a number of steps
            number = value if self.whole and isinstance(value, int) else float(value)
        except (TypeError, ValueError, OverflowError):
            raise CCLDError(f"{name} must be {self.range_text()} (got {value!r}); {self.fix}") from None
        if self.whole:
            if isinstance(number, float) and number.is_integer():
                number = int(number)
            inside = isinstance(number, int) and number % self.multiple_of == 0
        else:
            inside = math.isfinite(number)
        if not (inside and self.low <= number <= self.high
                and not (self.low_open and number == self.low)):
            shown = repr(value) if isinstance(value, str) else str(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise CCLDError(f"{name} must be {self.range_text()} (got {shown}); {self.fix}")
        return number


# Sampling, in every interface
STEPS = Limit(1, 1000, "sampling steps: `--steps`, `steps=`", "10 to 50 is typical", whole=True)
WEIGHT = Limit(-100, 100, "`--guidance` and every prompt's or image prompt's weight",
               "about 1 to 10 is typical; negative steers away")
ETA = Limit(0, 1, "DDIM noise: `--eta`, `eta=` (above 1 the DDIM step is undefined)",
            "0 is deterministic, 1 is DDPM")
STRENGTH = Limit(0, 1, "how far image to image noises the init image: `--strength`, `strength=`",
                 "1 ignores the init image", low_open=True)
LATENT_SCALE = Limit(0, 100, "the decoding scale: `--latent-scale`, `latent_scale=`",
                     "the published models decode at 2.55; leave it out for the model's own",
                     low_open=True)
SEED = Limit(0, 2 ** 64 - 1, "`--seed`, `seed=` (the range of a torch generator's seed)",
             "any whole number in range paints its own pictures", whole=True)
PROMPTS = Limit(0, 64, "text prompts, and image prompts, mixed into one painting",
                "mix fewer prompts; several runs paint several", whole=True)
PROMPT_CHARS = Limit(0, 10_000, "characters of one text prompt", "the text encoder reads only "
                     "the first 77 tokens", whole=True)
SIZE = Limit(64, 1024, "picture width and height in pixels: `--width`, `--height`, `width=`, "
             "`height=`, `size=` (both), `ccld serve --size`",
             "the models were trained at 256 and paint best near it", whole=True, multiple_of=64)

# How many pictures
IMAGES_PER_RUN = Limit(1, 1_000_000, "pictures of one `ccld generate` run (`-n`) or one "
                       "`iter_images` call, painted a batch at a time",
                       "split a larger run into several (the numbering continues)", whole=True)
IMAGES_PER_CALL = Limit(1, 32, "pictures held at once: `num_images=` of one pipeline call, "
                        "`--batch-size`", "for more, use `ccld generate -n` or "
                        "`pipe.iter_images(num_images=..., batch_size=...)`", whole=True)
GRID_IMAGES = Limit(1, 64, "pictures in a `--grid`: the run's first 64", "the others are "
                    "still written one a file", whole=True)

# Variations of a picture
VARIATION_STRENGTH = Limit(0, 1, "how far a variation moves from its seed's picture: "
                           "`--variation-strength`, `variation_strength=`",
                           "0 paints that picture again, 1 an unrelated one")
VARIATION_INDEX = Limit(0, IMAGES_PER_RUN.high - 1, "which picture of the varied seed's run: "
                        "`--variation-index`, `variation_index=` (its PNG's `index`)",
                        "a run's first picture is 0", whole=True)

# Inpainting
MASK_BLUR = Limit(0, 256, "how far an inpainting mask's edge is feathered, in pixels: "
                  "`--mask-blur`, `mask_blur=`", "0 keeps a hard edge; 4 to 16 hides the seam",
                  whole=True)

# Parameter grids
XY_VALUES = Limit(1, 12, "values of one `--xy` axis (a grid holds at most 12 x 12 pictures)",
                  "split the grid in several runs", whole=True)

# Animations
FRAMES = Limit(2, 1000, "frames of one `ccld interpolate` animation (`--frames`)",
               "paint a long animation in parts", whole=True)
FPS = Limit(0.1, 60, "frames per second of an animation (`--fps`)", "8 to 24 is typical")

# Images read (prompts, init images, training data)
IMAGE_PIXELS = Limit(1, 64 * 1024 * 1024, "pixels of an image read (larger ones are refused "
                     "before decoding)", "resize it to a few megapixels first", whole=True)
IMAGE_ASPECT = Limit(1, 4, "long side over short side of an image read (longer strips are cut "
                     "to their middle first)", "crop it yourself to choose another part")

# The web app: one request, and the server's options
WEB_STEPS = Limit(1, 250, "steps of one web request", "10 to 50 is typical", whole=True)
WEB_IMAGES = Limit(1, 16, "pictures of one web request, and `ccld serve --num-images`",
                   "ask again for more", whole=True)
WEB_SEED = Limit(0, 2 ** 32 - 1, "seed of one web request (a browser's numbers are exact to "
                 "2**53 only)", "leave it blank for a random one", whole=True)
WEB_PROMPTS = Limit(0, 16, "prompt lines of one web request", "mix fewer prompts", whole=True)
WEB_PROMPT_CHARS = Limit(0, 1000, "characters of one web prompt", "the text encoder reads only "
                         "the first 77 tokens", whole=True)
WEB_IMAGE_PROMPTS = Limit(0, 8, "image prompts of one web request", "upload fewer", whole=True)
UPLOAD_MB = Limit(0, 1000, "`ccld serve --max-upload-mb`: the largest upload, in MB",
                  "uploads are images of a few MB", low_open=True, default=10)

# Training, distillation and evaluation (`ccld train`, `distill`, `distill-decoder`, `evaluate`)
LEARNING_RATE = Limit(0, 1, "`--lr`: the AdamW learning rate", "1e-5 to 1e-4 is typical",
                      low_open=True)
WEIGHT_DECAY = Limit(0, 10, "`--weight-decay`: AdamW's decoupled weight decay", "0.01 is typical")
TRAINING_BATCH = Limit(1, 65_536, "`--batch-size` of training (per process) and `--grad-accum`",
                       "accumulate gradients for larger effective batches", whole=True)
STEP_COUNT = Limit(1, 10 ** 9, "`--max-steps`, `--ema-decay-at`, `--log-every`", "a run of millions of steps "
                   "is already long", whole=True)
STEP_INTERVAL = Limit(0, 10 ** 9, "`--checkpoint-every`, `--demo-every`, "
                      "`--keep-checkpoints`, `--ema-warmup-steps` (0: never, or keep all)",
                      "0 turns it off", whole=True)
WORKERS = Limit(0, 256, "`--num-workers`: data loading processes per GPU", "0 loads in the "
                "training process", whole=True)
BASE_CHANNELS = Limit(8, 1024, "`--base-channels` of a new U-Net", "the student has 192, "
                      "the teacher 192 with wider levels", whole=True, multiple_of=8)

TABLE = {name: value for name, value in globals().items() if isinstance(value, Limit)}


def markdown_table() -> str:
    """The table as docs/limits.md shows it."""
    rows = ["| limit | allowed | bounds |", "| --- | --- | --- |"]
    for name, limit in TABLE.items():
        allowed = limit.range_text()
        if limit.default is not None:
            allowed += f" (default {limit.default:g})"
        rows.append(f"| `{name}` | {allowed} | {limit.what} |")
    return "\n".join(rows)
