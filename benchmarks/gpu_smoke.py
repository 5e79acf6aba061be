"""The GPU (and Mac) smoke test: every device path of ccld once, on the fixture models.

    python benchmarks/gpu_smoke.py                      # cuda if there is one, else mps, else cpu
    python benchmarks/gpu_smoke.py --device cpu --skip compile,api-512   # what CI runs

One line per check (ok / FAIL / skip, its seconds, and what it measured), then a summary; the
exit status is 1 if any check failed. It paints, converts and trains with the small random-weight
models of ../shared/fixtures (`--fixtures`), so it needs no download and takes minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("generate-auto", "generate-fp32", "compile", "preview", "image-to-image", "ddpm",
          "api-512", "prompt-file-ranks", "too-many-ranks", "encode-dataset", "train",
          "train-resume", "distill")
TINY = ["--base-channels", "8", "--channel-multipliers", "1,1,1,1"]
QUIET = ["--demo-every", "0", "--num-workers", "0", "--no-tensorboard"]


class Smoke:
    def __init__(self, device: str, fixtures: Path, work: Path, skip: set[str]):
        self.device, self.fixtures, self.work, self.skip = device, fixtures, work, skip
        self.results: list[tuple[str, str]] = []
        files = {"unet": "unet.ckpt", "autoencoder": "autoencoder.ckpt",
                 "autoencoder_config": "autoencoder.yaml", "cloob": "cloob.pkl",
                 "cloob_config": "cloob.json"}
        self.files = {k: str(fixtures / v) for k, v in files.items()}
        self.encoders = [f"--{k.replace('_', '-')}={v}" for k, v in self.files.items() if k != "unet"]
        self.models = [f"--unet={self.files['unet']}", *self.encoders]

    # running checks

    def check(self, name: str, run, unless: str | None = None) -> None:
        if name in self.skip or unless:
            self._line("skip", name, 0.0, unless or "skipped (--skip)")
            return
        self._reset_peak()
        started = time.perf_counter()
        try:
            note = run() or ""
            outcome = "ok"
        except Exception as e:  # a smoke test reports every failure and goes on
            note, outcome = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "FAIL"
        self._line(outcome, name, time.perf_counter() - started, note + self._peak())

    def _line(self, outcome, name, seconds, note):
        self.results.append((outcome, name))
        print(f"{outcome:4}  {name:18} {seconds:6.1f} s  {note}", flush=True)

    def _reset_peak(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def _peak(self) -> str:
        import torch

        if not self.device.startswith("cuda"):
            return ""
        return f"  (peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB)"

    def ccld(self, *argv: str, expect: int = 0) -> str:
        """`ccld ARGV` in this process (no start-up cost); its stderr's last line."""
        from ccld.apps.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main([str(a) for a in argv])
        last = (err.getvalue().strip().splitlines() or [""])[-1]
        if status != expect:
            raise RuntimeError(f"ccld {argv[0]} exited {status}: {last}")
        return last

    def launch(self, processes: int, *argv: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", "-m", "ccld", *map(str, argv)]
        return subprocess.run(command, cwd=self.work, capture_output=True, text=True, timeout=600)

    # the checks

    def generate(self, out: str, *extra: str) -> str:
        self.ccld("generate", "a lighthouse, oil on canvas", "-n", "2", "--steps", "5", "-q",
                  "--device", self.device, "--out", self.work / out, *self.models, *extra)
        return f"{len(list((self.work / out).glob('*.png')))} PNGs"

    def api_512(self) -> str:
        import torch

        from ccld import CCLDPipeline

        pipe = CCLDPipeline.from_pretrained(device=self.device, precision="auto", **self.files)
        settings = {"steps": 5, "seed": 0, "size": 512}
        fast = pipe.decode(pipe.generate_latents("a harbour at dawn", **settings))
        chosen = pipe.precision
        pipe.to(precision="fp32")
        exact = pipe.decode(pipe.generate_latents("a harbour at dawn", **settings))
        if not (torch.isfinite(fast).all() and torch.isfinite(exact).all()):
            raise RuntimeError("non-finite pixels")
        mse = float(((fast.clamp(-1, 1) - exact.clamp(-1, 1)) ** 2).mean())
        psnr = math.inf if mse == 0 else 10 * math.log10(4 / mse)
        return f"{tuple(fast.shape[-2:])} px, {chosen} against fp32: PSNR {psnr:.1f} dB"

    def prompt_file_ranks(self) -> str:
        import torch

        ranks = torch.cuda.device_count() if self.device.startswith("cuda") else 2
        (self.work / "prompts.txt").write_text("a red boat\na blue house\na green tree\n")
        done = self.launch(ranks, "generate", "--prompts-file", "prompts.txt", "--steps", "3",
                           "-q", "--device", self.device.split(":")[0], "--out", "ranked",
                           *self.models)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        lines = (self.work / "ranked" / "manifest.jsonl").read_text().splitlines()
        return f"{ranks} processes, {len(lines)} manifest lines"

    def too_many_ranks(self) -> str:
        import torch

        ranks = torch.cuda.device_count() + 1
        done = self.launch(ranks, "generate", "--prompts-file", "prompts.txt", "--steps", "3",
                           "-q", "--device", "cuda", "--out", "too-many", *self.models)
        said = [line for line in done.stderr.splitlines() if "CUDA device(s)" in line]
        if done.returncode == 0 or not said or "Traceback" in done.stderr:
            raise RuntimeError(f"expected one line naming the device count (exit {done.returncode})")
        return said[0][:100]

    def images(self) -> Path:
        import numpy as np
        from PIL import Image

        folder = self.work / "art"
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (80, 96, 3), np.uint8)).save(folder / f"{i}.png")
        return folder

    def encode_dataset(self) -> str:
        self.ccld("encode-dataset", "--data", self.images(), "--out", self.work / "latents",
                  "--image-size", "64", "--num-workers", "0", "-q", *self.encoders,
                  *self.cpu_flag())
        return "8 images at 64 px"

    def train(self, *extra: str) -> str:
        precision = "bf16" if self.device != "mps" else "no"
        self.ccld("train", "--data", self.work / "latents", "--out", self.work / "run", *TINY,
                  *QUIET, "--batch-size", "4", "--max-steps", "4", "--checkpoint-every", "2",
                  "--mixed-precision", precision, "--gradient-checkpointing", *self.encoders,
                  *self.cpu_flag(), *extra)
        return f"mixed precision {precision}, gradient checkpointing"

    def distill(self) -> str:
        precision = "fp16" if self.device.startswith("cuda") else "no"
        self.ccld("distill", "--teacher", self.files["unet"], "--data", self.work / "latents",
                  "--out", self.work / "student", "--base-channels", "8", *QUIET,
                  "--batch-size", "4", "--max-steps", "2", "--mixed-precision", precision,
                  *self.encoders, *self.cpu_flag())
        return f"mixed precision {precision}" + ("" if precision == "fp16" else " (fp16 is CUDA's)")

    def cpu_flag(self) -> list[str]:
        return ["--cpu"] if self.device == "cpu" else []

    def run(self) -> int:
        import torch

        cuda = self.device.startswith("cuda")
        print(f"ccld smoke test on {self.device}"
              + (f" ({torch.cuda.get_device_name(self.device)})" if cuda else "")
              + f", torch {torch.__version__}", flush=True)
        self.check("generate-auto", lambda: self.generate("auto", "--precision", "auto"))
        self.check("generate-fp32", lambda: self.generate("fp32", "--precision", "fp32"))
        self.check("compile", lambda: self.generate("compiled", "--compile"))
        self.check("preview", lambda: self.generate("preview", "--preview"))
        self.check("image-to-image", lambda: self.generate(
            "img2img", "--init-image", self.images() / "0.png", "--strength", "0.6"))
        self.check("ddpm", lambda: self.generate("ddpm", "--method", "ddpm"))
        self.check("api-512", self.api_512)
        self.check("prompt-file-ranks", self.prompt_file_ranks,
                   unless="mps: one process" if self.device == "mps" else None)
        self.check("too-many-ranks", self.too_many_ranks,
                   unless=None if cuda else "needs CUDA devices to count")
        self.check("encode-dataset", self.encode_dataset)
        self.check("train", self.train)
        self.check("train-resume", lambda: self.train("--resume", "--max-steps", "6")
                   .replace("mixed", "resumed to step 6, mixed"))
        self.check("distill", self.distill)
        failed = [name for outcome, name in self.results if outcome == "FAIL"]
        ran = sum(outcome == "ok" for outcome, _ in self.results)
        skipped = sum(outcome == "skip" for outcome, _ in self.results)
        print(f"{ran} ok, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}, "
              f"{skipped} skipped", flush=True)
        return 1 if failed else 0


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best here)")
    parser.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    parser.add_argument("--skip", default="", help=f"checks to leave out, comma-separated: "
                        f"{', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    skip = {name for name in args.skip.split(",") if name}
    unknown = skip - set(CHECKS)
    if unknown:
        parser.error(f"--skip: no check {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    if not (args.fixtures / "unet.ckpt").is_file():
        parser.error(f"--fixtures {args.fixtures}: no fixture models there (unet.ckpt, ...)")
    work = Path(tempfile.mkdtemp(prefix="ccld-smoke-"))
    os.environ.setdefault("CCLD_CACHE_DIR", str(work / "cache"))  # the user's cache stays as it is
    try:
        return Smoke(args.device or default_device(), args.fixtures.resolve(), work, skip).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
