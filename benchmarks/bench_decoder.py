"""The tiny decoder against the KL decoder: how faithfully a distilled one paints, how fast.

    python benchmarks/bench_decoder.py                   # a few minutes on a small CPU
    python benchmarks/bench_decoder.py --steps 3000 --width 64 --skip-timing

fidelity  On the fixture autoencoder (../shared/fixtures/autoencoder.ckpt, 64 px, random weights)
          and a deterministic set of synthetic images (coloured shapes drawn here), encoded once
          by `ccld encode-dataset`, `ccld distill-decoder` trains a tiny decoder for --steps
          steps. On the latents of held-out images: the PSNR against the KL decoder's pixels of
          (a) the distilled tiny decoder (its exported EMA weights) and (b) the baseline, a 4x3
          linear latent-to-RGB map plus bias fitted by least squares to the same training
          latents and the KL decoder's pixels of them averaged down to latent size, upsampled
          bilinearly. Latents are posterior means by default: the fixture's random encoder has
          a posterior three times wider than its means (the released kl-f8's is narrow), so
          its samples are mostly noise.
timing    One 256x256 decode (batch 1, fp32) by the released-size KL decoder (KLAutoencoder's
          default config) and by TAESD's tiny decoder, both with random weights (speed does not
          depend on them), contiguous and channels-last: seconds and the ratio.

Writes nothing that stays (a temporary folder unless --keep FOLDER; an interrupted run kept there
continues with the same command). Only the ratios mean much on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ccld.apps.cli import main as ccld
from ccld.io.images import load_image
from ccld.models.autoencoder import AutoencoderConfig, KLAutoencoder, load_autoencoder
from ccld.models.latent_preview import fit_linear_map
from ccld.models.tiny_decoder import TinyDecoder, TinyDecoderConfig, load_tiny_decoder
from ccld.training.data import LatentDataset, list_image_folder, prepare_pixels, sample_posterior
from ccld.training.decoder import psnr

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
IMAGE_SIZE = 64  # the fixture autoencoder's resolution


def draw_shapes(folder: Path, count: int, seed: int) -> Path:
    """`count` PNGs of 1 to 4 coloured ellipses, rectangles and triangles on a two-colour
    gradient, the same for the same seed."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, IMAGE_SIZE)[:, None, None]
    for i in range(count):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        background = (top * (1 - ramp) + bottom * ramp).repeat(IMAGE_SIZE, axis=1)
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.integers(-8, IMAGE_SIZE - 8, 2)
            w, h = rng.integers(8, IMAGE_SIZE // 2, 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            shape = rng.integers(3)
            if shape == 0:
                draw.ellipse(box, fill=colour)
            elif shape == 1:
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                             fill=colour)
        image.save(folder / f"shapes-{i:04d}.png")
    return folder


def posterior_latents(mean, logvar, posterior: str, seed: int) -> torch.Tensor:
    if posterior == "mean":
        return mean
    return sample_posterior(mean, logvar, torch.randn(mean.shape,
                                                      generator=torch.Generator().manual_seed(seed)))


def cached_latents(cache: Path, posterior: str) -> torch.Tensor:
    """The training latents, as distill-decoder reads them from the cache."""
    dataset = LatentDataset(cache)
    items = [dataset[i] for i in range(len(dataset))]
    mean, logvar = (torch.stack([item[k] for item in items]) for k in ("mean", "logvar"))
    return posterior_latents(mean, logvar, posterior, seed=1)


@torch.no_grad()
def encoded_latents(autoencoder, folder: Path, posterior: str) -> torch.Tensor:
    """The held-out latents: a folder's images encoded here."""
    pixels = torch.stack([prepare_pixels(load_image(p), IMAGE_SIZE)
                          for p in list_image_folder(folder)])
    mean, logvar = autoencoder.encode_moments(pixels * 2 - 1)
    return posterior_latents(mean, logvar, posterior, seed=2)


@torch.no_grad()
def kl_pixels(autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """The KL decoder's pixels, clamped as a PNG shows them (distill-decoder's targets)."""
    return torch.cat([autoencoder.decode(chunk).clamp(-1, 1) for chunk in latents.split(32)])


def run(argv: list[str], what: str) -> float:
    """A ccld command in this process; its wall time in seconds."""
    started = time.perf_counter()
    code = ccld(argv)
    if code != 0:
        raise SystemExit(f"ccld {what} failed with status {code}")
    return time.perf_counter() - started


def bench_fidelity(args, work: Path) -> None:
    autoencoder = load_autoencoder(args.autoencoder)
    train = draw_shapes(work / "train", args.train_images, seed=0)
    held_out = draw_shapes(work / "held-out", args.held_out_images, seed=1)
    cache, out = work / "cache", work / "run"
    resume = ["--resume"] if (out / "checkpoints" / "last.ckpt").is_file() else []  # a --keep run
    encoding = run(["encode-dataset", "--data", str(train), "--out", str(cache),
                    "--image-size", str(IMAGE_SIZE), "--autoencoder", str(args.autoencoder),
                    "--cloob", str(FIXTURES / "cloob.pkl"),
                    "--cloob-config", str(FIXTURES / "cloob.json"), "--num-workers", "0", "-q"],
                   "encode-dataset")
    distilling = run(["distill-decoder", "--data", str(cache), "--out", str(out), *resume,
                      "--latents", args.latents, "--width", str(args.width),
                      "--feature-weight", str(args.feature_weight),
                      "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                      "--max-steps", str(args.steps), "--log-every", str(max(1, args.steps // 10)),
                      "--checkpoint-every", "0", "--num-workers", "0", "--no-tensorboard"],
                     "distill-decoder")
    tiny = load_tiny_decoder(out / "tiny_decoder")
    training = cached_latents(cache, args.latents)
    linear_map = fit_linear_map(training, kl_pixels(autoencoder, training))  # ccld's previews' map
    latents = encoded_latents(autoencoder, held_out, args.latents)
    target = kl_pixels(autoencoder, latents)
    with torch.no_grad():
        ours, baseline = psnr(tiny(latents), target), psnr(linear_map(latents), target)
    print(f"\nfidelity on the fixture autoencoder, {IMAGE_SIZE} px, posterior {args.latents}s: "
          f"{args.train_images} training images (encoded in {encoding:.0f} s), "
          f"{args.held_out_images} held out")
    print(f"tiny decoder: width {args.width}, {args.steps} steps of {args.batch_size}, lr "
          f"{args.lr:g}, feature weight {args.feature_weight:g} ({distilling:.0f} s"
          + (", resumed)" if resume else ")"))
    print(f"PSNR against the KL decoder on held-out latents: tiny decoder {ours:.2f} dB, "
          f"linear baseline {baseline:.2f} dB ({ours - baseline:+.2f} dB)")


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


@torch.inference_mode()
def bench_timing(args) -> None:
    torch.manual_seed(0)
    full = KLAutoencoder(AutoencoderConfig()).eval()
    tiny = TinyDecoder(TinyDecoderConfig()).eval()
    z = torch.randn(1, 4, 32, 32)
    print(f"\ntiming: one 256x256 decode, fp32, {torch.get_num_threads()} thread(s), best of "
          f"{args.repeats}")
    print(f"{'layout':<16}{'KL decoder':>12}{'tiny decoder':>14}{'speed-up':>10}")
    for layout in (torch.contiguous_format, torch.channels_last):
        full.to(memory_format=layout)
        tiny.to(memory_format=layout)
        full_s = best_time(lambda: full.decode(z), args.repeats)
        tiny_s = best_time(lambda: tiny(z), args.repeats)
        name = "channels-last" if layout is torch.channels_last else "contiguous"
        print(f"{name:<16}{full_s:>10.2f} s{tiny_s:>12.3f} s{full_s / tiny_s:>9.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--autoencoder", type=Path, default=FIXTURES / "autoencoder.ckpt",
                   help="an LDM autoencoder with its yaml beside it (default: the fixture's)")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--held-out-images", type=int, default=64)
    p.add_argument("--latents", choices=["mean", "sample"], default="mean",
                   help="train and compare on posterior means or samples")
    p.add_argument("--steps", type=int, default=800, help="distill-decoder steps")
    p.add_argument("--width", type=int, default=16, help="the tiny decoder's channels")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--feature-weight", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2, help="timed decodes of each kind")
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--keep", type=Path, metavar="FOLDER", help="keep the images and the run here")
    args = p.parse_args()
    if not args.skip_fidelity:
        if args.keep:
            bench_fidelity(args, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="ccld-bench-decoder-") as work:
                bench_fidelity(args, Path(work))
    if not args.skip_timing:
        bench_timing(args)


if __name__ == "__main__":
    main()
