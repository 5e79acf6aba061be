"""Makes the small trained U-Net that `bench_solvers.py` measures the samplers on.

    python benchmarks/make_toy_model.py                    # writes benchmarks/fixtures/toy_unet.*
    python benchmarks/make_toy_model.py --max-steps 50     # a quick try in a scratch folder

A random net's velocity field is far rougher than a trained one's, so a solver ranking measured
on random weights alone may not hold for real models. This script trains a real (if tiny) model
with the project's own commands, deterministically:

1. a synthetic image set, seeded: coloured ellipses, rectangles and triangles on flat or
   gradient backgrounds (`--images` training images and `--held-out` more, never trained on);
2. `ccld encode-dataset` of both with the fixture autoencoder (its posterior log-variance
   lowered by 14, as the tests do, so that latents are mostly signal like the released KL-f8's)
   and the fixture CLOOB (../shared/fixtures beside the repo, or --fixtures);
3. `ccld train` of a small U-Net on the cache (cond-drop as default, so guidance works);
4. the EMA weights stored in fp16 (`toy_unet.safetensors`, a plain ccld U-Net file: upcast to
   float32 after loading), the held-out images' CLOOB embeddings and latents
   (`toy_heldout.safetensors`) and how it was all made, with the loss before and after
   training (`toy_unet.json`).

The U-Net file is 16 MB although the net is tiny: its mapping network and the modulation layers
of every block are 1024 wide whatever the base width (7.5 of its 8.0 M parameters), so no
choice of --base-channels makes the file much smaller.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# the shared reference fixtures, where the tests look for them: ../shared/fixtures beside the repo
DEFAULT_FIXTURES = Path(os.environ.get("CCLD_FIXTURES", HERE.parents[1] / "shared" / "fixtures"))


# 1. Synthetic images

def random_colour(rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def draw_image(rng, size: int):
    """One image: a flat or two-colour gradient background and one to three filled shapes."""
    from PIL import Image, ImageDraw

    a, b = np.array(random_colour(rng), float), np.array(random_colour(rng), float)
    if rng.random() < 0.5:
        background = np.broadcast_to(a, (size, size, 3))
    else:
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        u = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] / math.sqrt(0.5) + 0.5
        background = a * (1 - u) + b * u
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["ellipse", "rectangle", "triangle"])
        r = rng.uniform(0.12, 0.3) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        colour = random_colour(rng)
        if kind == "ellipse":
            draw.ellipse([cx - r, cy - r * rng.uniform(0.6, 1), cx + r, cy + r], fill=colour)
        elif kind == "rectangle":
            draw.rectangle([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r], fill=colour)
        else:
            turn = rng.uniform(0, 2 * math.pi)
            draw.polygon([(cx + r * math.cos(turn + k * 2 * math.pi / 3),
                           cy + r * math.sin(turn + k * 2 * math.pi / 3)) for k in range(3)],
                         fill=colour)
    return image


def make_images(folder: Path, first: int, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        rng = np.random.default_rng([seed, i])  # image i is the same whatever the counts
        draw_image(rng, size).save(folder / f"shape{i:05d}.png")


# 2. Encoders

def narrow_autoencoder(fixtures: Path, folder: Path) -> Path:
    """The fixture autoencoder with its posterior log-variance lowered by 14 (as in the tests)."""
    ckpt = torch.load(fixtures / "autoencoder.ckpt", weights_only=True)
    ckpt["state_dict"]["quant_conv.bias"][4:] -= 14
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "narrow.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", folder / "narrow.yaml")
    return folder / "narrow.ckpt"


def ccld(*args: str) -> list[str]:
    """Runs `python -m ccld ARGS` (the ccld this interpreter imports); returns the command."""
    command = [sys.executable, "-m", "ccld", *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    return ["ccld", *args]


def read_cache(folder: Path) -> dict:
    from safetensors.torch import load_file

    shards = sorted(folder.glob("shard-*.safetensors"))
    parts = [load_file(p) for p in shards]
    return {k: torch.cat([p[k] for p in parts]) for k in ("mean", "logvar", "embed", "index")}


# 4. Loss before and after

@torch.no_grad()
def v_loss(unet, mean, embed, scale: float, seed: int = 0, repeats: int = 8) -> float:
    """The training objective on clean latents `mean` (posterior means, conditioned), with
    `repeats` seeded draws of timestep and noise per latent: the same draws for every model."""
    from ccld.sampling import t_to_alpha_sigma

    g = torch.Generator().manual_seed(seed)
    x0 = mean.float() / scale
    total = 0.0
    for _ in range(repeats):
        t = torch.rand(len(mean), generator=g)
        noise = torch.randn(mean.shape, generator=g)
        alpha, sigma = (a[:, None, None, None] for a in t_to_alpha_sigma(t))
        v = noise * alpha - x0 * sigma
        total += (unet(x0 * alpha + noise * sigma, t, embed.float()) - v).pow(2).mean().item()
    return total / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES,
                   help="the shared reference fixtures (autoencoder.ckpt, cloob.pkl, cloob.json)")
    p.add_argument("--work", type=Path, default=Path("/tmp/ccld-toy-model"),
                   help="scratch folder: images, latent caches, the training run")
    p.add_argument("--dest", type=Path, default=HERE / "fixtures",
                   help="where toy_unet.safetensors, toy_heldout.safetensors, toy_unet.json go")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--held-out", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128, help="pixels (latents are 1/8)")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--channel-multipliers", default="1,1,2,2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    started = time.perf_counter()
    make_images(work / "train", 0, args.images, args.image_size, args.seed)
    make_images(work / "heldout", args.images, args.held_out, args.image_size, args.seed)
    autoencoder = narrow_autoencoder(args.fixtures, work / "encoders")
    encoders = ["--autoencoder", str(autoencoder), "--cloob", str(args.fixtures / "cloob.pkl"),
                "--cloob-config", str(args.fixtures / "cloob.json")]
    commands = []
    for part in ("train", "heldout"):
        commands.append(ccld("encode-dataset", "--data", str(work / part),
                             "--out", str(work / f"{part}-cache"), "--image-size",
                             str(args.image_size), "--num-workers", "0", "-q", "--cpu", *encoders))
    train_started = time.perf_counter()
    commands.append(ccld(
        "train", "--data", str(work / "train-cache"), "--out", str(work / "run"),
        "--base-channels", str(args.base_channels),
        "--channel-multipliers", args.channel_multipliers, "--batch-size", str(args.batch_size),
        "--max-steps", str(args.max_steps), "--lr", str(args.lr), "--seed", str(args.seed),
        "--log-every", "25", "--demo-every", "0", "--num-workers", "0", "--no-tensorboard",
        "--scale-batches", str(max(1, args.images // args.batch_size)), "--cpu"))
    train_seconds = time.perf_counter() - train_started

    from safetensors.torch import save_file

    from ccld.models.unet import CCLDUNet, load_unet

    ema = load_unet(work / "run" / "model_ema.safetensors").float()
    scale = float(ema.autoencoder_scale)
    torch.manual_seed(args.seed)  # the initial weights `ccld train` started from
    init = CCLDUNet(args.base_channels, [int(m) for m in args.channel_multipliers.split(",")],
                    ema.embed_dim, scale).eval()
    train, held = read_cache(work / "train-cache"), read_cache(work / "heldout-cache")
    fp16 = {k: v.half() if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    stored = load_unet_from(fp16)
    check = train["index"][:64]
    losses = {
        "train_log": [json.loads(line) for line in
                      (work / "run" / "logs" / "metrics.jsonl").read_text().splitlines()],
        "fixed_t": {
            name: {"train_64": v_loss(net, train["mean"][check], train["embed"][check], scale),
                   "held_out": v_loss(net, held["mean"], held["embed"], scale)}
            for name, net in [("initial", init), ("ema", ema), ("ema_fp16", stored)]},
    }
    losses["train_log"] = [{"step": r["step"], "loss": round(r["train/loss"], 5)}
                           for r in losses["train_log"] if "train/loss" in r]
    embeds = held["embed"].float()
    similarity = embeds @ embeds.T
    off_diagonal = similarity[~torch.eye(len(embeds), dtype=bool)]

    args.dest.mkdir(parents=True, exist_ok=True)
    save_file(fp16, str(args.dest / "toy_unet.safetensors"),
              metadata={"format": "ccld-unet", "made_by": "benchmarks/make_toy_model.py"})
    save_file({"embed": embeds.contiguous(), "mean": held["mean"].float().contiguous()},
              str(args.dest / "toy_heldout.safetensors"))
    record = {
        "what": "a small CCLD U-Net trained by `ccld train` on synthetic shapes, for "
                "benchmarks/bench_solvers.py; EMA weights in fp16 (upcast after loading)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("work", "dest", "fixtures")},
        "unet": {**ema.config, "params": sum(p.numel() for p in ema.parameters()),
                 "autoencoder_scale": scale,
                 "latent_shape": [4, args.image_size // 8, args.image_size // 8]},
        "encoders": "the shared fixtures' autoencoder.ckpt (quant_conv.bias[4:] - 14) and "
                    "cloob.pkl + cloob.json",
        "commands": [" ".join(c).replace(str(work), "$WORK").replace(str(args.fixtures),
                                                                    "$FIXTURES")
                     for c in commands],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "losses": losses,
        "held_out": {"images": list(range(args.images, args.images + args.held_out)),
                     "file": "toy_heldout.safetensors (embed: CLOOB image embeddings to "
                             "condition on; mean: their latent posterior means)",
                     "embed_cosine_off_diagonal": {"min": off_diagonal.min().item(),
                                                   "mean": off_diagonal.mean().item(),
                                                   "max": off_diagonal.max().item()}},
    }
    (args.dest / "toy_unet.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("unet", "train_seconds")}, indent=1))
    print("loss at fixed t:", json.dumps(losses["fixed_t"], indent=1))
    print("training loss log:", losses["train_log"][0], "->", losses["train_log"][-1])


def load_unet_from(state: dict):
    from ccld.models.unet import unet_from_state_dict

    return unet_from_state_dict(state, "fp16 weights").float()


if __name__ == "__main__":
    main()
