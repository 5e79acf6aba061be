"""One home for choosing and loading models: the command-line options that name them and the
function that turns those options into a ready pipeline. The CLI, the web app and training use it.
"""

from __future__ import annotations

import argparse

from .errors import CCLDError


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options that choose the three models; shared by generate, convert and serve."""
    g = p.add_argument_group("models (default: the distilled WikiArt student, downloaded once)")
    g.add_argument("--model", metavar="FOLDER",
                   help="a pipeline folder written by `ccld convert` (loads fastest)")
    g.add_argument("--unet", metavar="PATH",
                   help="U-Net checkpoint: bare state dict, Lightning .ckpt or .safetensors; "
                        "its architecture is read from the weights")
    g.add_argument("--autoencoder", metavar="PATH", help="LDM KL-f8 autoencoder .ckpt")
    g.add_argument("--autoencoder-config", metavar="YAML",
                   help="its yaml config (default: the .yaml beside the .ckpt)")
    g.add_argument("--cloob", metavar="PATH", help="CLOOB checkpoint (.pkl release or .safetensors)")
    g.add_argument("--cloob-config", metavar="JSON",
                   help="CLOOB config: a JSON file or a built-in name (default: inferred from "
                        "the checkpoint's file name)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="arithmetic: auto is fp16 on CUDA, bf16 on CPUs with native bf16 "
                        "(AMX/AVX512-BF16), else fp32; fp32 is bit-faithful to the reference demo")


def load_pipeline(args):
    import torch

    from .pipeline import CCLDPipeline

    if args.model:
        pipe = CCLDPipeline.from_pretrained(args.model)
    else:
        pipe = CCLDPipeline.from_files(unet=args.unet, autoencoder=args.autoencoder,
                                       autoencoder_config=args.autoencoder_config,
                                       cloob=args.cloob, cloob_config=args.cloob_config)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return pipe.to(device, precision=args.precision)
    except (RuntimeError, AssertionError) as e:
        raise CCLDError(f"cannot use device {device!r} ({str(e).splitlines()[0][:120]}); "
                        "pass --device cpu or an available device") from None


