"""Which hires upscaling keeps more of the first stage and more detail: `pixels` (decode, Lanczos,
encode again) or `latents` (bicubic latents), measured side by side on the fixture models.

    python benchmarks/bench_hires.py            # ../shared/fixtures beside the repo

For each of a few seeds it paints the base picture, then the hires one both ways, and prints
per mode: agreement with the first stage (PSNR of the hires picture scaled down to the base
size against the base picture) and detail (mean absolute Laplacian of the luminance, relative
to the base picture scaled up with Lanczos, the detail an upscale alone has).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def laplacian_energy(image: Image.Image) -> float:
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    lap = (4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2]
           - grey[1:-1, 2:])
    return float(np.abs(lap).mean())


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255 ** 2 / max((diff ** 2).mean(), 1e-12)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures",
                        default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
    parser.add_argument("--base", type=int, default=128)
    parser.add_argument("--hires", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=11)
    args = parser.parse_args()

    from ccld import CCLDPipeline

    f = Path(args.fixtures)
    pipe = CCLDPipeline.from_files(unet=f / "unet.ckpt", autoencoder=f / "autoencoder.ckpt",
                                   cloob=f / "cloob.pkl", cloob_config=f / "cloob.json")
    results = {"pixels": [], "latents": []}
    for seed in range(args.seeds):
        common = dict(steps=args.steps, seed=seed, progress=False, size=args.base)
        (base,) = pipe("a castle on a hill", **common)
        upscaled = base.resize((args.hires, args.hires), Image.LANCZOS)
        for mode in results:
            (big,) = pipe("a castle on a hill", hires=args.hires, hires_upscale=mode, **common)
            small = big.resize(base.size, Image.LANCZOS)
            results[mode].append((psnr(small, base),
                                  laplacian_energy(big) / laplacian_energy(upscaled)))
    print(f"{args.base} -> {args.hires} px, {args.steps} steps, {args.seeds} seeds")
    print(f"{'upscale':8} {'PSNR vs first stage (dB)':>26} {'detail vs Lanczos alone':>24}")
    for mode, rows in results.items():
        fidelity, detail = np.mean(rows, axis=0)
        print(f"{mode:8} {fidelity:26.2f} {detail:24.2f}x")


if __name__ == "__main__":
    main()
