"""Inference speed and solver accuracy, measured side by side in one run.

    python benchmarks/bench_inference.py                       # everything, student-size models
    python benchmarks/bench_inference.py --only solvers --reference-steps 200
    python benchmarks/bench_inference.py --fast-precision bf16 # force a precision for the fast path

Models are the released sizes (student U-Net 192 x 1,1,2,2; CLOOB ViT-B/16; KL-f8 autoencoder)
with random weights: speed and solver error do not depend on the weights. Sections:
  forward  one guided step (batch 2) of the U-Net: fp32 eager baseline vs the fast path, and the
           fast path as a fraction of this machine's matmul peak in the fast path's dtype
  generate `ccld generate` of one 256x256 image with the demo's defaults (plms, 15 steps), each
           path in its own process: wall time and peak RSS, plus the PSNR of the fast-path image
           against the fp32 image for the same seed
  load     seconds to load a converted (safetensors) pipeline folder
  solvers  error of each method and step count against a long reference solution from the same
           noise, with the number of guided forwards each costs
Only ratios are meaningful on a shared machine; absolute times only on a dedicated one.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ccld import sampling
from ccld.models.unet import CCLDUNet
from ccld.pipeline import CCLDPipeline, resolve_precision

STUDENT = (192, (1, 1, 2, 2))


def best_time(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / best_time(lambda: a @ b, repeats=3, warmup=1)


def random_pipeline(seed=0) -> CCLDPipeline:
    """Released-size models with random weights."""
    from diffusers import AutoencoderKL

    from ccld.models.cloob import CLOOB, resolve_cloob_config

    torch.manual_seed(seed)
    unet = CCLDUNet(*STUDENT, autoencoder_scale=4.3084)
    autoencoder = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=1.0)
    cloob = CLOOB(resolve_cloob_config("cloob_laion_400m_vit_b_16_16_epochs"))
    return CCLDPipeline(unet, autoencoder, cloob, {"unet": "random", "autoencoder": "random",
                                                   "cloob": "random"})


def bench_forward(fast_precision):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    unet = CCLDUNet(*STUDENT).eval().requires_grad_(False)
    x, t, e = torch.randn(2, 4, 32, 32), torch.rand(2), torch.randn(2, 512)
    pipe = CCLDPipeline(unet, torch.nn.Identity(), torch.nn.Identity())
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(x, t, e)
        flops = counter.get_total_flops()
        baseline = best_time(lambda: unet(x, t, e))
    pipe.to(precision=fast_precision)
    with pipe.autocast():
        fast = best_time(lambda: unet(x, t, e))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[pipe.precision]
    peak = matmul_peak(dtype)
    print(f"\n## guided forward (student U-Net, batch 2 = one guided step, {flops / 1e9:.1f} GFLOP)")
    print("| path | s/forward | GFLOP/s | x baseline | of matmul peak |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| fp32 eager (reference) | {baseline:.3f} | {flops / baseline / 1e9:.0f} | 1.00 | "
          f"{flops / baseline / matmul_peak(torch.float32):.0%} of fp32 |")
    print(f"| fast path ({pipe.precision}) | {fast:.3f} | {flops / fast / 1e9:.0f} | "
          f"{baseline / fast:.2f} | {flops / fast / peak:.0%} of {pipe.precision} "
          f"({peak / 1e9:.0f} GFLOP/s) |")


GENERATE_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from ccld import CCLDPipeline
pipe = CCLDPipeline.from_pretrained(sys.argv[1], precision=sys.argv[2])
t1 = time.perf_counter()
image = pipe("a snowy landscape, oil on canvas", seed=0, progress=False)[0]
t2 = time.perf_counter()
image.save(sys.argv[3])
print(json.dumps({"load": t1 - t0, "generate": t2 - t1, "precision": pipe.precision,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def psnr(a, b):
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def bench_generate(folder: Path, fast_precision):
    runs = {}
    for name, precision in [("fp32", "fp32"), ("fast", fast_precision)]:
        out = folder.parent / f"{name}.png"
        proc = subprocess.run([sys.executable, "-c", GENERATE_CHILD, str(folder), precision,
                               str(out)], capture_output=True, text=True, check=True)
        runs[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "png": out}
    base, fast = runs["fp32"], runs["fast"]
    print("\n## end to end: 1 image, 256x256, plms 15 steps (CLOOB text + sampling + decode)")
    print("| path | generate s | x baseline | peak RSS MB | load s |")
    print("| --- | --- | --- | --- | --- |")
    for name, run in runs.items():
        print(f"| {name} ({run['precision']}) | {run['generate']:.2f} | "
              f"{base['generate'] / run['generate']:.2f} | {run['rss_mb']:.0f} | {run['load']:.2f} |")
    print(f"\nPSNR of the fast-path image against the fp32 image: "
          f"{psnr(fast['png'], base['png']):.1f} dB")


def bench_load(folder: Path):
    start = time.perf_counter()
    CCLDPipeline.from_pretrained(folder)
    print(f"\n## load: converted (safetensors) pipeline folder in {time.perf_counter() - start:.2f} s "
          "(in this process, imports already done)")


SOLVER_SETTINGS = [("plms", 15), ("plms", 10), ("iplms", 10), ("plms2", 10), ("ddim", 10),
                   ("dpm++2m", 8), ("dpm++2m", 10), ("dpm++2m", 15), ("unipc", 6), ("unipc", 8),
                   ("unipc", 10), ("unipc", 15)]


def bench_solvers(reference_steps: int, seed=0):
    torch.manual_seed(seed)
    unet = CCLDUNet(*STUDENT).eval().requires_grad_(False)
    embeds = torch.cat([torch.zeros(1, 512), torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)])
    model = sampling.guided_model(unet, embeds, sampling.condition_weights([3.0]))
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        reference = sampling.plms(model, noise, sampling.get_timesteps(reference_steps))
        rows = []
        for method, steps in SOLVER_SETTINGS:
            out = sampling.sample(method, model, noise, sampling.get_sampler(method).timesteps(steps))
            rms = ((out - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
            rows.append((method, steps, sampling.get_sampler(method).forwards(steps), rms))
    demo_error = rows[0][3]
    print(f"\n## solver error against plms-{reference_steps} from the same noise "
          "(student U-Net, random weights, guidance 3)")
    print("| method | steps | guided forwards | relative RMS error | vs plms-15 |")
    print("| --- | --- | --- | --- | --- |")
    for method, steps, forwards, rms in rows:
        print(f"| {method} | {steps} | {forwards} | {rms:.4f} | {rms / demo_error:.2f} |")
    wins = [f"{m}-{s}" for m, s, f, rms in rows if f <= 10 and rms <= demo_error]
    print(f"\nsettings with <= 10 forwards at least as accurate as plms-15: {', '.join(wins) or 'none'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["forward", "generate", "load", "solvers"], action="append")
    p.add_argument("--fast-precision", default="auto", help="the fast path's precision")
    p.add_argument("--reference-steps", type=int, default=500)
    args = p.parse_args()
    sections = args.only or ["forward", "generate", "load", "solvers"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; fast path on this CPU: "
          f"{resolve_precision(args.fast_precision, torch.device('cpu'))}")
    if "forward" in sections:
        bench_forward(args.fast_precision)
    if {"generate", "load"} & set(sections):
        with tempfile.TemporaryDirectory() as tmp:
            folder = random_pipeline().save_pretrained(Path(tmp) / "model")
            if "generate" in sections:
                bench_generate(folder, args.fast_precision)
            if "load" in sections:
                bench_load(folder)
    if "solvers" in sections:
        bench_solvers(args.reference_steps)


if __name__ == "__main__":
    main()
