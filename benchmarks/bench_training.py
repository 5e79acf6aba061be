"""Training speed with the encoded latent cache against encoding every batch on the fly.

    python benchmarks/bench_training.py                    # tiny models, runs anywhere in ~a minute
    python benchmarks/bench_training.py --preset student   # the released student's U-Net, the
                                                           # released autoencoder and CLOOB sizes

Models have random weights unless --autoencoder/--cloob files are given: speed does not depend on
the weights. Both runs train the same U-Net on the same synthetic images with the same settings;
the cached run first pays once for `encode-dataset` (reported separately).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccld.models.cloob import CLOOB, resolve_cloob_config
from ccld.models.unet import CCLDUNet
from ccld.training.commands import load_encoders, make_accelerator
from ccld.training.data import ImageDataset, ImageSource, LatentDataset, TrainingData
from ccld.training.encode import encode_dataset
from ccld.training.engine import Settings, Trainer, copy_for_ema
from ccld.training.train import VelocityObjective

PRESETS = {
    # U-Net (base, multipliers); autoencoder ddconfig; CLOOB config (None: the released one)
    "tiny": {"unet": (8, (1, 1, 1, 1)),
             "autoencoder": {"ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1},
             "cloob": {"image_size": 64, "n_layers": 2, "d_model": 64, "n_heads": 2}},
    "student": {"unet": (192, (1, 1, 2, 2)),
                "autoencoder": {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2},
                "cloob": None},
}


def random_autoencoder(dd: dict):
    from diffusers import AutoencoderKL

    from ccld.models.autoencoder import diffusers_vae_config

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "attn_resolutions": [], "dropout": 0.0, **dd}
    return AutoencoderKL(**diffusers_vae_config({"ddconfig": ddconfig, "embed_dim": 4})).eval()


def random_cloob(image_encoder: dict | None):
    config = resolve_cloob_config("cloob_laion_400m_vit_b_16_16_epochs")
    if image_encoder is not None:
        config = {**config, "image_encoder": {**config["image_encoder"], **image_encoder},
                  "text_encoder": {**config["text_encoder"], "n_layers": 2, "d_model": 64,
                                   "n_heads": 2}}
    return CLOOB(config).eval().requires_grad_(False)


def write_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        a = rng.integers(0, 256, size=(size // 8, size // 8 + 4, 3), dtype=np.uint8)
        Image.fromarray(a).resize((size + 32, size), Image.BILINEAR).save(folder / f"{i:04d}.png")


def train_speed(data: TrainingData, unet_args, args, accelerator, out: Path, autoencoder, cloob):
    torch.manual_seed(0)
    model = CCLDUNet(*unet_args)
    settings = Settings(out=out, batch_size=args.batch_size, max_steps=args.steps, lr=1e-4,
                        checkpoint_every=0, demo_every=0, log_every=args.steps,
                        num_workers=args.num_workers, tensorboard=False)
    trainer = Trainer(settings, VelocityObjective(), model, copy_for_ema(model), data, accelerator,
                      autoencoder, cloob)
    return trainer.fit()["steps_per_second"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=12, help="training steps per mode (2 are warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images", type=int, default=16, help="synthetic images to train on")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--autoencoder", help="a real autoencoder .ckpt instead of random weights")
    p.add_argument("--autoencoder-config")
    p.add_argument("--cloob", help="a real CLOOB checkpoint instead of random weights")
    p.add_argument("--cloob-config")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    accelerator = make_accelerator("no", args.cpu)

    autoencoder, cloob = load_encoders(
        {"autoencoder": args.autoencoder, "autoencoder_config": args.autoencoder_config,
         "cloob": args.cloob, "cloob_config": args.cloob_config},
        need_autoencoder=args.autoencoder is not None, need_cloob=args.cloob is not None)
    autoencoder = autoencoder or random_autoencoder(preset["autoencoder"])
    cloob = cloob or random_cloob(preset["cloob"])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", args.images, args.image_size)
        source = ImageSource("synthetic images",
                             paths=sorted(str(p) for p in (tmp / "images").iterdir()))
        start = time.perf_counter()
        encode_dataset(source, tmp / "cache", autoencoder, cloob, accelerator, args.image_size,
                       batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
        encode_seconds = time.perf_counter() - start
        cache = LatentDataset(tmp / "cache")
        cached = TrainingData(cache, cache.latent_shape, "latent cache", True)
        latent = args.image_size // 8
        on_the_fly = TrainingData(ImageDataset(source, args.image_size), (4, latent, latent),
                                  "images", False)

        cached_speed = train_speed(cached, preset["unet"], args, accelerator, tmp / "run-cached",
                                   None, None)
        fly_speed = train_speed(on_the_fly, preset["unet"], args, accelerator, tmp / "run-fly",
                                autoencoder, cloob)

    print(f"\npreset {args.preset}, {args.image_size}px, batch {args.batch_size}, "
          f"device {accelerator.device}")
    print(f"encode-dataset once:          {args.images / encode_seconds:8.2f} images/s")
    print(f"training, latent cache:       {cached_speed:8.2f} steps/s")
    print(f"training, encoding on the fly:{fly_speed:8.2f} steps/s")
    print(f"cache speed-up:               {cached_speed / fly_speed:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
