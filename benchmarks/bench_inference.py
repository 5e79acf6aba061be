"""Inference speed, side by side in one run: the reference way against ccld's defaults.

    python benchmarks/bench_inference.py                 # release-size random-weight files
    python benchmarks/bench_inference.py --files DIR     # reuse files written earlier there
    python benchmarks/bench_inference.py --only forward  # one section
    python benchmarks/bench_inference.py --only throughput --pictures 4   # a quick look

Everything runs on random-weight files in the published formats and sizes
(`benchmarks/release_files.py`: student U-Net `.ckpt`, LDM autoencoder `.ckpt` + yaml, CLOOB
Haiku pickle): speed and memory do not depend on the weights. Each painting runs in a fresh
process, as a user's would. Sections:
  imports  what each dependency costs to import, in a fresh process
  forward  one guided step of the student (batch 2): contiguous fp32 against the default path,
           and the default with the U-Net compiled (an AOTInductor package: its one-off build
           time and the time a later process takes to load it)
  paint    one 256x256 image end to end, `ccld generate` as a user runs it: the baseline (the
           reference recipe: plms-15, contiguous fp32, from the release files, no converted cache)
           against the default on a first run (empty cache) and a second run (cache filled);
           wall time, peak RSS, the ratio to the baseline, and the PSNR of
           the default image against the baseline's for the same seed; and the second run again
           with a tiny decoder (`--decoder tiny:PATH`, a random-weight AutoencoderTiny decoder
           of TAESD's size), and with the U-Net compiled (`--compile`: the first repeat builds
           the package, the later ones load it). Then the same runs instrumented stage by stage
           (import, load cold or from the cache, text encode, U-Net per forward and in all,
           decode full or tiny).
  throughput  16 pictures (`--pictures`) in one `ccld generate -n 16` process, once each: the
           reference recipe, the default with the U-Net eager, the default's first `--compile`
           run (which builds the package) and a later run (which loads it), per picture.
           (ccld has no int8 U-Net yet: no int8 row.)
Each painting runs `--repeats` times (a first run each time with a new empty cache), timed by
the median, after a sync so that no run pays for the previous one's writes still going to disk.
Only ratios are meaningful on a shared machine; absolute times only on a dedicated one.
`--isa avx2` measures an AVX2-only CPU's path (float32, channels-last) on a newer CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a snowy landscape, oil on canvas"
SECTIONS = ["imports", "forward", "paint", "throughput"]
HERE = Path(__file__).resolve().parent


def best_time(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# Imports

IMPORTS = ["torch", "numpy", "PIL.Image", "safetensors.torch", "yaml", "tqdm", "huggingface_hub",
           "ccld.apps.cli", "diffusers", "accelerate", "gradio"]


def bench_imports():
    print("\n## imports: seconds to import each, in a fresh process after those above it")
    print("| module | s |")
    print("| --- | --- |")
    child = ("import importlib, json, sys, time\nout = {}\nfor name in sys.argv[1:]:\n"
             "    t = time.perf_counter(); importlib.import_module(name)\n"
             "    out[name] = time.perf_counter() - t\nprint(json.dumps(out))")
    costs = json.loads(subprocess.run([sys.executable, "-c", child, *IMPORTS], check=True,
                                      capture_output=True, text=True).stdout)
    for name, seconds in costs.items():
        print(f"| {name} | {seconds:.2f} |")
    started = json.loads(subprocess.run(
        [sys.executable, "-c", child.replace("sys.argv[1:]", "['ccld.apps.cli']")
         + "\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
           "('diffusers', 'accelerate', 'gradio', 'sympy'))))"],
        check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    heavy = ", ".join(started) or "none of diffusers, accelerate, gradio, sympy"
    print(f"\n`import ccld.apps.cli` pulls in: {heavy}")


# The guided forward

def bench_forward():
    from torch.utils.flop_counter import FlopCounterMode

    from ccld.models.autoencoder import AutoencoderConfig, KLAutoencoder
    from ccld.models.unet import CCLDUNet
    from ccld.pipeline import CCLDPipeline

    torch.manual_seed(0)
    unet = CCLDUNet(192, (1, 1, 2, 2)).eval().requires_grad_(False)
    x, t, e = torch.randn(2, 4, 32, 32), torch.rand(2), torch.randn(2, 512)
    with torch.device("meta"):  # only the U-Net is timed here
        no_autoencoder = KLAutoencoder(AutoencoderConfig())
    pipe = CCLDPipeline(unet, no_autoencoder, torch.nn.Identity())
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(x, t, e)
        flops = counter.get_total_flops()
    rows = {}
    for name, precision in [("contiguous fp32 (reference)", "fp32"), ("default (auto)", "auto")]:
        pipe.to(precision=precision)
        with pipe.autocast():
            rows[f"{name}: {pipe.precision}{', channels-last' if pipe.channels_last else ''}"] = \
                best_time(lambda: unet(x, t, e))
    compiled_note = compiled_forward(pipe, (x, t, e), rows)
    base = next(iter(rows.values()))
    print(f"\n## guided forward (student U-Net, batch 2 = one guided step, {flops / 1e9:.1f} GFLOP)")
    print("| path | s/forward | GFLOP/s | x reference |")
    print("| --- | --- | --- | --- |")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {flops / seconds / 1e9:.0f} | {base / seconds:.2f} |")
    print(compiled_note)


def compiled_forward(pipe, inputs, rows: dict) -> str:
    """Adds the default path with the U-Net compiled (`--compile`: an AOTInductor package, in a
    temporary cache) to `rows`; returns a line with its build and load times and its largest
    difference from the eager default."""
    from ccld.pipeline import compiled

    if compiled.compiler_missing():
        return f"(no compiled row: {compiled.compiler_missing()})"
    unet, previous = pipe.unet, os.environ.get("CCLD_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache, pipe.autocast():
        os.environ["CCLD_CACHE_DIR"] = cache
        try:
            eager = unet(*inputs).float()
            forwards = compiled.install(unet, build=True, say=lambda _: None)
            started = time.perf_counter()
            out = unet(*inputs).float()
            build_s = time.perf_counter() - started
            if forwards.compiled_calls != 1:
                return "(no compiled row: the package did not build)"
            layout = ", channels-last" if pipe.channels_last else ""
            rows[f"default (auto) + compiled U-Net: {pipe.precision}{layout}"] = \
                best_time(lambda: unet(*inputs))
            package = compiled.packages()[0]
            load_s = best_time(lambda: compiled._load(package, unet), repeats=3, warmup=1)
        finally:
            compiled.uninstall(unet)
            os.environ.pop("CCLD_CACHE_DIR")
            if previous is not None:
                os.environ["CCLD_CACHE_DIR"] = previous
    return (f"compiled U-Net: built once in {build_s:.0f} s, its package loads in {load_s:.3f} s "
            f"(a later process pays only this), largest difference from eager "
            f"{float((out - eager).abs().max()):.1e}")


# Painting end to end

RUNS = [  # name, extra options ({tiny}: the tiny decoder's folder), converted cache:
    # None: off; "fresh": a new empty one for each repeat; "filled": the first fresh one's
    ("baseline: --reference, no cache", ["--reference"], None),
    ("default, first run (empty cache)", [], "fresh"),
    ("default, second run", [], "filled"),
    ("default + tiny decoder, second run", ["--decoder", "tiny:{tiny}"], "filled"),
    # its first repeat compiles the U-Net into the filled cache: the median is of later runs
    ("default + compiled U-Net from the cache", ["--compile"], "filled"),
]

STAGES_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from ccld.apps.cli import build_parser
from ccld.apps.generate import settings_options
from ccld.apps.options import load_pipeline
from ccld.settings import Settings
t_import = time.perf_counter()
args = build_parser().parse_args(sys.argv[1:])
settings = Settings.build(**settings_options(args))
pipe = load_pipeline(args, settings.precision)
t_load = time.perf_counter()
forwards = []
def timed(module, inputs, output):
    forwards.append(time.perf_counter())
pipe.unet.register_forward_hook(timed)
embeds, weights = pipe.conditions(settings=settings)
t_text = time.perf_counter()
latents = pipe.generate_latents(settings=settings)
t_sample = time.perf_counter()
pipe.decode(latents)  # the tiny decoder where --decoder gives one
t_decode = time.perf_counter()
print(json.dumps({"import": t_import - t0, "load": t_load - t_import, "text": t_text - t_load,
                  "unet": t_sample - t_text, "forwards": len(forwards),
                  "decode": t_decode - t_sample,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(argv: list[str], env: dict, rss_file: Path | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of one process; its peak RSS goes to rss_file via GNU time."""
    if rss_file is not None and Path("/usr/bin/time").is_file():
        argv = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *argv]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed:\n{proc.stderr}")
    return wall, proc.stdout


def peak_rss_mb(rss_file: Path) -> float:
    try:
        return int(rss_file.read_text().split()[-1]) / 1024  # GNU time reports KiB
    except (OSError, ValueError, IndexError):
        return math.nan


def psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def write_tiny_decoder(folder: Path) -> Path:
    """A random-weight tiny decoder of TAESD's default size (speed does not depend on weights)."""
    from ccld.models.tiny_decoder import TinyDecoder, TinyDecoderConfig

    torch.manual_seed(0)
    return TinyDecoder(TinyDecoderConfig()).save_pretrained(folder)


def bench_paint(files: dict, work: Path, repeats: int):
    model = [arg for option, path in files.items() for arg in (option, path)]
    tiny = write_tiny_decoder(work / "tiny_decoder")
    rows, stages = [], []
    for name, extra, cache in RUNS:
        extra = [arg.format(tiny=tiny) for arg in extra]
        out = work / "out" / str(len(rows))
        args = [PROMPT, "--seed", "0", "-q", "--device", "cpu", "--out", str(out), *extra, *model]
        walls, peaks = [], []
        for i in range(repeats):
            # the real command, timed from outside: interpreter start to PNG on disk; each
            # repeat starts with no dirty pages left by the one before (whose cache writes
            # would otherwise still be going to disk)
            folder = {None: None, "fresh": f"cache-{i}", "filled": "cache-0"}[cache]
            env = {**os.environ, "CCLD_CACHE_DIR": str(work / folder) if folder else "off"}
            os.sync()
            wall, _ = run_child([sys.executable, "-m", "ccld", "generate", *args], env,
                                work / "rss.txt")
            walls.append(wall)
            peaks.append(peak_rss_mb(work / "rss.txt"))
        rows.append((name, statistics.median(walls), max(peaks), out / "00000.png"))
        # the same again, instrumented, with a cache of its own that fills the same way
        env["CCLD_CACHE_DIR"] = str(work / "stages-cache") if cache else "off"
        for _ in range(2 if "--compile" in extra else 1):  # (the first one compiles)
            os.sync()
            _, report = run_child([sys.executable, "-c", STAGES_CHILD, "generate", *args], env)
        stages.append((name, json.loads(report.strip().splitlines()[-1])))
    base = rows[0][1]
    print(f"\n## paint: one 256x256 image, `ccld generate` end to end ({cpu_name()}; median of "
          f"{repeats} runs, peak RSS the largest)")
    print("| run | wall s | x baseline | peak RSS MB | PSNR vs baseline dB |")
    print("| --- | --- | --- | --- | --- |")
    for name, wall, rss, png in rows:
        quality = "-" if png == rows[0][3] or "tiny" in name else f"{psnr(png, rows[0][3]):.1f}"
        print(f"| {name} | {wall:.1f} | {base / wall:.2f} | {rss:.0f} | {quality} |")
    print("\n### the same runs, stage by stage (seconds; instrumented, in fresh processes)")
    print("| run | import | load | text encode | U-Net total | forwards | s/forward | decode |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in stages:
        print(f"| {name} | {s['import']:.2f} | {s['load']:.2f} | {s['text']:.2f} | "
              f"{s['unet']:.2f} | {s['forwards']} | {s['unet'] / max(1, s['forwards']):.3f} | "
              f"{s['decode']:.2f} |")


# Many pictures in one process

THROUGHPUT_RUNS = [  # name, options; every run but the baseline's shares one filled cache
    ("baseline: --reference, no cache", ["--reference"]),
    ("default, eager U-Net (--no-compile)", ["--no-compile"]),
    ("default + --compile, first run (compiles the batch shape)", ["--compile"]),
    ("default, later run (compiled U-Net from the cache)", []),
]


def bench_throughput(files: dict, work: Path, pictures: int):
    """`ccld generate -n PICTURES` in one process per run, once each (minutes a run): the
    per-picture time with the U-Net eager and compiled, and what the first compile costs."""
    model = [arg for option, path in files.items() for arg in (option, path)]
    args = [PROMPT, "--seed", "0", "-q", "--device", "cpu", *model]
    cache = {**os.environ, "CCLD_CACHE_DIR": str(work / "throughput-cache")}
    run_child([sys.executable, "-m", "ccld", "generate", *args, "--steps", "1",
               "--out", str(work / "fill")], cache)  # converts the release files, untimed
    rows = []
    for name, extra in THROUGHPUT_RUNS:
        env = {**os.environ, "CCLD_CACHE_DIR": "off"} if "--reference" in extra else cache
        out = work / "throughput" / str(len(rows))
        os.sync()
        wall, _ = run_child([sys.executable, "-m", "ccld", "generate", *args, "-n", str(pictures),
                             "--out", str(out), *extra], env, work / "rss.txt")
        rows.append((name, wall, peak_rss_mb(work / "rss.txt")))
    base = rows[0][1]
    print(f"\n## throughput: {pictures} pictures of 256x256 in one `ccld generate -n {pictures}` "
          f"process ({cpu_name()}; one run each)")
    print("| run | wall s | s/picture | x baseline | peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {wall / pictures:.2f} | {base / wall:.2f} | {rss:.0f} |")
    print(f"the first compile cost {rows[2][1] - rows[3][1]:.0f} s once; a later run loads the "
          "package in milliseconds (the forward section times the load)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=SECTIONS, action="append")
    p.add_argument("--files", type=Path, help="folder for the release-format files (reused)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each painting, timed by their median (default 3)")
    p.add_argument("--pictures", type=int, default=16,
                   help="pictures of each throughput run (default 16)")
    p.add_argument("--isa", choices=["avx2"],
                   help="compute as a CPU with only this instruction set would (torch's kernels "
                        "and oneDNN's capped, so `auto` is float32): an AVX2-only machine's "
                        "figures from a newer one")
    args = p.parse_args()
    if args.isa and os.environ.get("ONEDNN_MAX_CPU_ISA") != args.isa.upper():
        # both are read when torch first computes: set for this process (started again, since
        # torch is imported) and every child it runs
        os.environ.update(ATEN_CPU_CAPABILITY=args.isa, ONEDNN_MAX_CPU_ISA=args.isa.upper())
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sections = args.only or SECTIONS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, CPU "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    if "imports" in sections:
        bench_imports()
    if "forward" in sections:
        bench_forward()
    if {"paint", "throughput"} & set(sections):
        sys.path.insert(0, str(HERE))
        from release_files import write_release_files

        with tempfile.TemporaryDirectory() as tmp:
            folder = args.files or Path(tmp) / "release"
            files = write_release_files(folder)
            if "paint" in sections:
                bench_paint(files, Path(tmp), args.repeats)
            if "throughput" in sections:
                bench_throughput(files, Path(tmp), args.pictures)


if __name__ == "__main__":
    main()
