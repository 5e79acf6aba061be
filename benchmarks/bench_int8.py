"""int8 and compiled U-Net forwards against eager float32, side by side in one run (issue #23).

    pip install torchao                      # PyTorch's PT2E quantization lives there now
    python benchmarks/bench_int8.py          # the student's size: 192 channels, 1,1,2,2
    python benchmarks/bench_int8.py --base-channels 64 --json out.json

One guided step (batch 2, 32x32 latents) of a random-weight U-Net: eager float32 channels-last
(what `auto` runs on a CPU without native bf16), the same net compiled by inductor with
freezing, and its convolutions quantized to int8 by PT2E with the x86 inductor quantizer
(weights per channel, activations calibrated on noised latents at several timesteps), then
compiled. Prints the time of each, its ratio to eager float32, the one-off costs (export and
calibration, each compile's first call) and the int8 output's error relative to float32's.
Random weights say little about a trained model's quantization error: the error only shows
that the path computes the same function. Inductor's caches go to a temporary folder, removed
at the end, so each compile is a cold one (unless TORCHINDUCTOR_CACHE_DIR names another).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def quantized(net, inputs, calibration: int):
    """`net` with its convolutions int8 (PT2E, x86 inductor quantizer), calibrated on noised
    latents at `calibration` timesteps. (Linears stay float32: torchao 0.18's inductor pass for
    quantized linears with post-ops fails on torch 2.13.)"""
    import torch
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = x86.X86InductorQuantizer().set_module_type_qconfig(
        torch.nn.Conv2d, x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(net, inputs).module(), quantizer)
    generator = torch.Generator().manual_seed(1)
    x, _, embed = inputs
    with torch.no_grad():
        for i in range(calibration):
            t = torch.full((x.shape[0],), (i + 0.5) / calibration)
            prepared(torch.randn(x.shape, generator=generator), t,
                     torch.randn(embed.shape, generator=generator))
    return convert_pt2e(prepared)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-channels", type=int, default=192)
    parser.add_argument("--channel-multipliers", default="1,1,2,2")
    parser.add_argument("--calibration", type=int, default=8, help="calibration timesteps")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("bench_int8: needs torchao (pip install torchao), PyTorch's home of PT2E", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ccld-bench-inductor-") as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        return measure(args, sys.argv[1:] if argv is None else argv)


def measure(args, argv: list[str]) -> int:
    import torch
    import torch._inductor.config as inductor_config
    import torchao

    from bench_inference import best_time, cpu_name  # (beside this script)
    from ccld.models.unet import CCLDUNet

    inductor_config.freezing = True
    torch.manual_seed(0)
    multipliers = [int(m) for m in args.channel_multipliers.split(",")]
    net = CCLDUNet(args.base_channels, multipliers).eval().to(memory_format=torch.channels_last)
    inputs = (torch.randn(2, 4, 32, 32).contiguous(memory_format=torch.channels_last),
              torch.rand(2), torch.randn(2, 512))
    figures = {"recorded": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python", "benchmarks/bench_int8.py",
                                    *argv]),
               "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "torchao": torchao.__version__, "base_channels": args.base_channels,
               "channel_multipliers": multipliers}
    with torch.no_grad():
        reference = net(*inputs)
        figures["fp32_eager_s"] = best_time(lambda: net(*inputs))
        start = time.perf_counter()
        int8 = quantized(net, inputs, args.calibration)
        figures["int8_export_and_calibration_s"] = time.perf_counter() - start
        start = time.perf_counter()
        int8 = torch.compile(int8)
        out = int8(*inputs)
        figures["int8_first_call_s"] = time.perf_counter() - start
        figures["int8_compiled_s"] = best_time(lambda: int8(*inputs))
        figures["int8_relative_error"] = ((out - reference).norm() / reference.norm()).item()
        start = time.perf_counter()
        compiled = torch.compile(net)
        compiled(*inputs)
        figures["fp32_first_call_s"] = time.perf_counter() - start
        figures["fp32_compiled_s"] = best_time(lambda: compiled(*inputs))
    eager = figures["fp32_eager_s"]
    print(f"{figures['cpu']}, {figures['threads']} threads, torch {figures['torch']}, torchao "
          f"{figures['torchao']}; U-Net {args.base_channels} x {args.channel_multipliers}, "
          "one guided step (batch 2)")
    print(f"{'path':<22}{'step':>9}{'vs eager fp32':>15}{'first call':>12}")
    print(f"{'eager fp32 (ch-last)':<22}{eager:>8.3f}s{1:>14.2f}x{'':>12}")
    for name, key in (("compiled fp32", "fp32"), ("compiled int8 convs", "int8")):
        step = figures[f"{key}_compiled_s"]
        print(f"{name:<22}{step:>8.3f}s{eager / step:>14.2f}x{figures[f'{key}_first_call_s']:>11.1f}s")
    print(f"int8: export and calibration {figures['int8_export_and_calibration_s']:.1f} s, "
          f"output error {figures['int8_relative_error']:.3f} relative to fp32 (random weights)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
