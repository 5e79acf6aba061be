"""int8 and compiled U-Net forwards against eager float32, side by side in one run (issue #23).

    pip install torchao                      # PyTorch's PT2E quantization lives there now
    python benchmarks/bench_int8.py          # the student's size: 192 channels, 1,1,2,2
    python benchmarks/bench_int8.py --base-channels 64 --json out.json
    python benchmarks/bench_int8.py --toy-error      # int8's error on the trained toy model

One guided step (batch 2, 32x32 latents) of a random-weight U-Net: eager float32 channels-last
(what `auto` runs on a CPU without native bf16), the same net compiled by inductor with
freezing, and its convolutions quantized to int8 by PT2E with the x86 inductor quantizer
(weights per channel, activations calibrated on noised latents at several timesteps), then
compiled. Prints the time of each, its ratio to eager float32, the one-off costs (export and
calibration, each compile's first call) and the int8 output's error relative to float32's.
Random weights say little about a trained model's quantization error: the error only shows
that the path computes the same function. `--toy-error` measures it on the trained toy model
of `make_toy_model.py` instead, as `bench_solvers.py` measures solvers (against plms-500).
Inductor's caches go to a temporary folder, removed at the end, so each compile is a cold one
(unless TORCHINDUCTOR_CACHE_DIR names another).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path


def quantized(net, example, calibration, keep_float: str | None = None):
    """`net` with its convolutions int8 (PT2E, x86 inductor quantizer: weights per channel),
    exported at `example`'s shapes and its activations calibrated on the `calibration` inputs;
    convolutions whose module names match the regular expression `keep_float` stay float32.
    (Linears stay float32: torchao 0.18's inductor pass for quantized linears with post-ops
    fails on torch 2.13.)"""
    import torch
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = x86.X86InductorQuantizer().set_module_type_qconfig(
        torch.nn.Conv2d, x86.get_default_x86_inductor_quantization_config())
    for name, module in net.named_modules():  # (a module's name outranks its type)
        if keep_float and isinstance(module, torch.nn.Conv2d) and re.search(keep_float, name):
            quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(torch.export.export(net, example).module(), quantizer)
    with torch.no_grad():
        for inputs in calibration:
            prepared(*inputs)
    return convert_pt2e(prepared)


def noised_inputs(example, count: int) -> list:
    """Random latents and embeddings at `count` evenly spread timesteps."""
    import torch

    generator = torch.Generator().manual_seed(1)
    x, _, embed = example
    return [(torch.randn(x.shape, generator=generator), torch.full((x.shape[0],), (i + 0.5) / count),
             torch.randn(embed.shape, generator=generator)) for i in range(count)]


def toy_error(args, argv: list[str]) -> int:
    """The int8 U-Net's error on the trained toy model (benchmarks/make_toy_model.py), as the
    solver table measures it: the relative RMS error of the final latent against plms-500 from
    the same noise and held-out condition (guidance 3), for UniPC-11 (the default) in float32
    and with int8 convolutions, against plms-15's; and what int8 adds, the error of its
    UniPC-11 latent against float32's. Activations are calibrated on the model's own UniPC-11
    trajectories from other noise (every U-Net call's inputs)."""
    import torch
    from safetensors.torch import load_file

    import bench_solvers as solvers  # (beside this script)
    from bench_inference import cpu_name
    from ccld.models.unet import load_unet

    if not solvers.TOY_UNET.is_file():
        print(f"bench_int8: {solvers.TOY_UNET} is missing: run benchmarks/make_toy_model.py",
              file=sys.stderr)
        return 2
    unet = load_unet(solvers.TOY_UNET).float().eval()
    held = load_file(str(solvers.TOY_HELDOUT))["embed"].float()
    digest = solvers.weights_digest(unet)

    def case(net, seed):
        noise = torch.randn([1, 4, 16, 16], generator=torch.Generator().manual_seed(seed))
        return solvers.guided_case(net, digest, held[seed % len(held)][None], noise)

    calls = []

    def recorded(x, t, embed):
        calls.append((x.clone(), t.clone(), embed.clone()))
        return unet(x, t, embed)

    started = time.perf_counter()
    with torch.inference_mode():
        for seed in range(1000, 1000 + args.calibration):  # noise never measured below
            solvers.run_setting(case(recorded, seed), "unipc", 11)
    with torch.no_grad():
        int8 = torch.compile(quantized(unet, calls[0], calls, args.keep_float))
        int8(*calls[0])
    setup_s = time.perf_counter() - started
    rows = []
    with torch.no_grad():
        for seed in range(args.seeds):
            float32, quantized_case = case(unet, seed), case(int8, seed)
            ref = solvers.reference(float32, 500, solvers.REFERENCE_CACHE)
            fp32_out = solvers.run_setting(float32, "unipc", 11)
            int8_out = solvers.run_setting(quantized_case, "unipc", 11)
            rows.append({"seed": seed,
                         "plms15": solvers.relative_rms(solvers.run_setting(float32, *solvers.DEMO), ref),
                         "unipc11_fp32": solvers.relative_rms(fp32_out, ref),
                         "unipc11_int8": solvers.relative_rms(int8_out, ref),
                         "int8_added": solvers.relative_rms(int8_out, fp32_out)})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "seed"}
    added_ratio = max(r["int8_added"] / r["plms15"] for r in rows)
    print(f"toy U-Net {unet.base_channels} x {','.join(map(str, unet.channel_multipliers))}, "
          f"{args.seeds} seeds, int8 convolutions calibrated on {len(calls)} U-Net calls "
          f"({args.calibration} UniPC-11 trajectories; quantize and compile {setup_s:.0f} s)"
          + (f"; float32: convolutions matching {args.keep_float!r}" if args.keep_float else ""))
    print("relative RMS error of the final latent against plms-500 (mean over seeds):")
    for name, key in (("plms-15 fp32", "plms15"), ("unipc-11 fp32", "unipc11_fp32"),
                      ("unipc-11 int8", "unipc11_int8"), ("int8 against fp32 unipc-11", "int8_added")):
        print(f"  {name:<28}{mean[key]:.4f}")
    print(f"int8's added error / plms-15's error: worst seed {added_ratio:.2f} (the bound: 0.25)")
    if args.json:
        args.json.write_text(json.dumps({
            "recorded": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python", "benchmarks/bench_int8.py", *argv]),
            "cpu": cpu_name(), "torch": torch.__version__,
            "what": " ".join(toy_error.__doc__.split()),
            "calibration_calls": len(calls), "keep_float": args.keep_float, "mean": mean,
            "worst_added_over_plms15": added_ratio, "per_seed": rows}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-channels", type=int, default=192)
    parser.add_argument("--channel-multipliers", default="1,1,2,2")
    parser.add_argument("--calibration", type=int, default=8, help="calibration timesteps")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--toy-error", action="store_true",
                        help="instead: int8's error on the trained toy model against plms-500 "
                             "(--calibration UniPC-11 trajectories, --seeds seeds)")
    parser.add_argument("--seeds", type=int, default=8, help="toy-error seeds (default 8)")
    parser.add_argument("--keep-float", metavar="REGEX",
                        help="convolutions whose module names match stay float32, e.g. "
                             r"'^net\.(0|8)\.|_proj$' (the outermost blocks and attention)")
    args = parser.parse_args(argv)
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("bench_int8: needs torchao (pip install torchao), PyTorch's home of PT2E", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ccld-bench-inductor-") as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        run = toy_error if args.toy_error else measure
        return run(args, sys.argv[1:] if argv is None else argv)


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
        int8 = quantized(net, inputs, noised_inputs(inputs, args.calibration))
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
