"""One home for choosing and loading models in the commands.

The command-line options that name the models (`add_model_options` for the pipeline,
`add_encoder_options` for training's frozen encoders), turning them into loaded models
(`load_pipeline`, `resolve_encoder_files`, `load_encoders`, `load_unet_weights`) and saying what a
file is (`describe_checkpoint`). The CLI, the web app and the training commands all use it; where
the published files live and how they are fetched is `ccld.io.hub`'s, building each network from
its weights is the model modules'.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import CCLDError
from ..pipeline import PRECISIONS, CCLDPipeline
from ..pipeline.precision import check_device


def _add_encoder_arguments(g, cloob_config_default: str, cloob: bool = True) -> None:
    g.add_argument("--autoencoder", metavar="PATH", help="LDM KL-f8 autoencoder .ckpt")
    g.add_argument("--autoencoder-config", metavar="YAML",
                   help="its yaml config (default: the .yaml beside the .ckpt)")
    if not cloob:
        return
    g.add_argument("--cloob", metavar="PATH", help="CLOOB checkpoint (.pkl release or .safetensors)")
    g.add_argument("--cloob-config", metavar="JSON",
                   help=f"CLOOB config: a JSON file or a built-in name ({cloob_config_default})")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options that choose the three models; shared by generate, convert and serve."""
    g = p.add_argument_group("models (default: the distilled WikiArt student, downloaded once)")
    g.add_argument("--model", metavar="FOLDER",
                   help="a pipeline folder written by `ccld convert` (loads fastest)")
    g.add_argument("--unet", metavar="PATH",
                   help="U-Net checkpoint: bare state dict, Lightning .ckpt or .safetensors; "
                        "its architecture is read from the weights")
    _add_encoder_arguments(g, "default: inferred from the checkpoint's file name")
    g.add_argument("--decoder", metavar="full|taesd|tiny:PATH", default=None,
                   help="what paints the latents: full (the KL decoder), tiny:PATH (a tiny "
                        "decoder from `ccld distill-decoder` or an AutoencoderTiny folder; many "
                        "times faster), or taesd (madebyollin/taesd, downloaded once: only for the "
                        "stock Stable Diffusion kl-f8 autoencoder). Default: the --model folder's "
                        "tiny decoder if it has one, else full")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: auto)")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="arithmetic (default auto: fp16 on CUDA, bf16 on CPUs with native bf16 "
                        "(AMX/AVX512-BF16), else fp32, all with channels-last convolutions); "
                        "fp32 is contiguous and bit-faithful to the reference demo")


def add_encoder_options(p: argparse.ArgumentParser, what: str, cloob: bool = True) -> None:
    """The options that choose training's frozen encoders (no U-Net: training makes that);
    `cloob=False` for a command that needs only the autoencoder."""
    _add_encoder_arguments(p.add_argument_group(f"frozen encoders ({what})"),
                           "default: inferred from the checkpoint's file name", cloob)


def load_pipeline(args, precision: str | None = None) -> CCLDPipeline:
    """The pipeline the model options name, on their device, in `precision` (default the
    --precision option's, else auto)."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)  # before the slow loading
    precision = precision or getattr(args, "precision", None) or "auto"
    # built in its precision on the CPU, so that the weights are laid out once for it
    built_in = precision if device == "cpu" else "fp32"
    if args.model:
        pipe = CCLDPipeline.from_pretrained(args.model, decoder=args.decoder, precision=built_in)
    else:
        pipe = CCLDPipeline.from_files(unet=args.unet, autoencoder=args.autoencoder,
                                       autoencoder_config=args.autoencoder_config,
                                       cloob=args.cloob, cloob_config=args.cloob_config,
                                       decoder=args.decoder, precision=built_in)
    try:
        pipe.to(device, precision=precision)
    except (RuntimeError, AssertionError) as e:
        raise CCLDError(f"cannot use device {device!r} ({str(e).splitlines()[0][:120]}); "
                        "pass --device cpu or an available device") from None
    wanted = getattr(args, "compile", None)  # --compile True, --no-compile False, else None
    if wanted is not False:  # None: a compiled U-Net already in the cache, never a compile
        pipe.compile(build=bool(wanted))
    return pipe


def download_defaults(cloob_name: str | None = None) -> list[Path]:
    """Fetches the default models into the local caches (`ccld download`)."""
    from ..io import hub

    return [hub.default_unet(), *hub.default_autoencoder(), hub.download_cloob(cloob_name)]


def unet_file_latent_scale(path: Path, stored: float | None) -> str:
    """Which latent scale `ccld generate --unet path` decodes with, and why, for `ccld info`."""
    from ..io import hub

    scale = 1.0 if stored is None else stored
    said = f"{scale} (the file's stored autoencoder_scale; --latent-scale overrides it)"
    if path.name == hub.DEFAULT_UNET[1]:
        said += (f"; named like the published student, whose demo decodes with "
                 f"{hub.PUBLISHED_LATENT_SCALE}: pass --latent-scale "
                 f"{hub.PUBLISHED_LATENT_SCALE} to match it")
    return said


UNET_RECORDS = ("autoencoder_scale", "guidance_range", "distilled_timesteps")  # buffers, not weights


def distillation_summary(config: dict) -> dict:
    """How a distilled student samples by default, in words, for `ccld info`."""
    from ..pipeline import sampling_defaults

    if not any(k in config for k in ("guidance_input", "guidance_range", "distilled_steps")):
        return {}
    defaults = sampling_defaults(config)
    return {"distilled": f"samples by default with {defaults['method']}, {defaults['steps']} "
                         f"steps, guidance {defaults['guidance']:g} in "
                         f"{defaults['rows_per_image']} row(s) per image per step"}


CONFIG_SUFFIXES = (".yaml", ".yml")  # (a JSON file is told by its first bytes)


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What a file is: kind, architecture, parameter count and latent scale where it has one."""
    from ..io.checkpoints import describe_foreign_state_dict, load_array_pickle, load_state_file
    from ..models.unet import infer_unet_config, is_unet_state_dict, unet_state_dict
    from ..pipeline.loading import read_json_config

    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            index = read_json_config(p / "model_index.json", "pipeline index")
            scale = index.get("latent_scale")
            why = (f"{scale} (recorded when converted from a published WikiArt model)"
                   if scale is not None else "the U-Net's stored autoencoder_scale")
            info = {"kind": "ccld pipeline folder", "path": str(p), **index, "latent_scale": why}
            if not (p / "unet" / "config.json").is_file():
                return info
            unet_config = read_json_config(p / "unet" / "config.json", "U-Net config")
            return {**info, "unet": unet_config, **distillation_summary(unet_config)}
        raise CCLDError(f"{p}: a folder without model_index.json; give a checkpoint file or a "
                        "folder written by `ccld convert`")
    if p.suffix.lower() in CONFIG_SUFFIXES and p.is_file():
        raise CCLDError(f"{p}: a config file, not a checkpoint; `ccld info` describes checkpoint "
                        "files and pipeline folders (an autoencoder's yaml goes with "
                        "--autoencoder-config, a CLOOB config with --cloob-config)")
    if p.suffix == ".pkl":
        obj = load_array_pickle(p)
        params = obj.get("params")
        if not (isinstance(params, (tuple, list)) and len(params) == 2):
            raise CCLDError(f"{p}: a pickle, but not a CLOOB checkpoint (no 'params' pair)")
        count = sum(int(a.size) for tree in params for mod in tree.values() for a in mod.values())
        return {"kind": "CLOOB checkpoint (Haiku pickle)", "path": str(p), "parameters": count,
                "image_modules": len(params[0]), "text_modules": len(params[1])}
    obj = load_state_file(p)
    lightning = isinstance(obj.get("state_dict"), dict)
    sd = unet_state_dict(obj)
    if is_unet_state_dict(sd):
        config = infer_unet_config(sd, p)
        info = {"kind": "CCLD U-Net" + (" (Lightning checkpoint, EMA weights)" if lightning else ""),
                "path": str(p), **config,
                "parameters": sum(int(v.numel()) for k, v in sd.items() if k not in UNET_RECORDS)}
        if "autoencoder_scale" in sd:
            info["autoencoder_scale"] = round(float(sd["autoencoder_scale"]), 6)
        info.update(distillation_summary(config))
        info["latent_scale"] = unet_file_latent_scale(p, info.get("autoencoder_scale"))
        if lightning and "global_step" in obj:
            info["global_step"] = int(obj["global_step"])
        return info
    if any(k.startswith("encoder.") for k in sd):
        return {"kind": "KL autoencoder (latent-diffusion format)", "path": str(p),
                "parameters": sum(int(v.numel()) for k, v in sd.items()
                                  if not k.startswith("loss."))}
    if any(k.startswith(("image_encoder.", "text_encoder.")) for k in sd):
        return {"kind": "CLOOB (PyTorch state dict)", "path": str(p),
                "parameters": sum(int(v.numel()) for v in sd.values())}
    raise CCLDError(f"{p}: not a checkpoint ccld knows ({describe_foreign_state_dict(sd)}); "
                    "expected a CCLD U-Net, an LDM autoencoder or a CLOOB checkpoint")
