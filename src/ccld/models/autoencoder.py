"""The KL-f8 autoencoder of latent diffusion, loaded into diffusers' `AutoencoderKL`.

The published autoencoder (`huggan/ccld_wa` `ae_model.ckpt` + `ae_model.yaml`) is in the CompVis
latent-diffusion format: a `torch.save` of `{'state_dict': ...}` (or of the bare state dict) with
`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` and training-only `loss.*` weights,
described by an `ldm.models.autoencoder.AutoencoderKL` yaml. The weights are renamed by diffusers'
own LDM converter (`diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint`); the
architecture comes from the yaml's `ddconfig`. A folder written by `AutoencoderKL.save_pretrained`
loads as it is.

CCLD's latent scale is not the diffusers `scaling_factor`: it is the U-Net's `autoencoder_scale`
buffer, applied by the pipeline. The converted model's `scaling_factor` is set to 1.0 so nothing
scales twice by accident.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoints import load_state_file
from ..errors import CCLDError

LDM_PREFIXES = ("", "first_stage_model.", "vae.")  # bare, or inside a full LDM/SD checkpoint


def _ldm_vae_tools():
    """diffusers' LDM-VAE config builder and weight converter, whichever version is installed."""
    try:  # diffusers >= 0.28
        from diffusers.loaders.single_file_utils import (
            convert_ldm_vae_checkpoint,
            create_vae_diffusers_config_from_ldm as create_config,
        )
    except ImportError:  # older diffusers: the same functions under their former names
        from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
            convert_ldm_vae_checkpoint,
            create_vae_diffusers_config as _old_create,
        )

        def create_config(original_config, checkpoint, image_size=None, scaling_factor=None):
            return _old_create(original_config, image_size=image_size)
    return create_config, convert_ldm_vae_checkpoint


def _default_config_path(path: Path) -> Path:
    for suffix in (".yaml", ".yml"):
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return path.with_suffix(".yaml")


def read_autoencoder_config(config_path: str | os.PathLike) -> dict:
    """`{'ddconfig': ..., 'embed_dim': ...}` from an LDM AutoencoderKL yaml."""
    import yaml

    config_path = Path(config_path).expanduser()
    if not config_path.is_file():
        raise CCLDError(f"{config_path}: no such autoencoder config file; pass the LDM yaml "
                        "(e.g. ae_model.yaml) with --autoencoder-config")
    try:
        doc = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        detail = " ".join(str(e).split())[:160]
        raise CCLDError(f"{config_path}: not a readable yaml file ({detail}); pass the LDM "
                        "autoencoder yaml (e.g. ae_model.yaml) with --autoencoder-config") from None
    params = doc
    if isinstance(params, dict) and isinstance(params.get("model"), dict):
        params = params["model"]
    if isinstance(params, dict) and isinstance(params.get("params"), dict):
        params = params["params"]
    if isinstance(params, dict) and isinstance(params.get("first_stage_config"), dict):
        params = params["first_stage_config"].get("params")  # a full LDM config: its autoencoder
    if not (isinstance(params, dict) and isinstance(params.get("ddconfig"), dict)):
        raise CCLDError(f"{config_path}: not an LDM autoencoder config (no model.params.ddconfig); "
                        "pass the autoencoder's yaml (e.g. ae_model.yaml) with --autoencoder-config")
    dd = params["ddconfig"]
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch")
               if k not in dd]
    if missing:
        raise CCLDError(f"{config_path}: the ddconfig lacks {', '.join(missing)}; "
                        "pass the autoencoder's own yaml")
    if not dd.get("double_z", True):
        raise CCLDError(f"{config_path}: double_z is false, which is not a KL autoencoder; "
                        "pass the KL-f8 autoencoder's yaml")
    if dd.get("attn_resolutions"):
        raise CCLDError(f"{config_path}: attention at resolutions {dd['attn_resolutions']} is not "
                        "supported (diffusers' AutoencoderKL has attention only in the middle "
                        "block); pass a KL autoencoder config with attn_resolutions: []")
    embed_dim = params.get("embed_dim", dd["z_channels"])
    if embed_dim != dd["z_channels"]:
        raise CCLDError(f"{config_path}: embed_dim {embed_dim} differs from z_channels "
                        f"{dd['z_channels']}, which diffusers' AutoencoderKL cannot represent")
    return {"ddconfig": dict(dd), "embed_dim": embed_dim}


def diffusers_vae_config(ae_config: dict, state_dict: dict | None = None) -> dict:
    """The diffusers `AutoencoderKL` config for an LDM ddconfig, built by diffusers itself."""
    create_config, _ = _ldm_vae_tools()
    dd = ae_config["ddconfig"]
    # diffusers' builder reads the Stable Diffusion layout; our yaml is the autoencoder's own.
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": dd}}}}}
    resolution = int(dd.get("resolution", 256))
    config = create_config(original, state_dict if state_dict is not None else {},
                           scaling_factor=1.0)
    config["sample_size"] = resolution  # diffusers would guess it from a full SD checkpoint
    config["latent_channels"] = ae_config["embed_dim"]
    return config


def _ldm_state_dict(obj: dict, path: Path) -> dict:
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # the training loss only
    for prefix in LDM_PREFIXES:
        if (any(k.startswith(prefix + "encoder.") for k in sd)
                and any(k.startswith(prefix + "decoder.") for k in sd)):
            return sd
    raise CCLDError(f"{path}: not an autoencoder checkpoint (no encoder.*/decoder.* weights); "
                    "pass the LDM autoencoder .ckpt (e.g. ae_model.ckpt)")


def autoencoder_from_ldm(state_dict: dict, ae_config: dict, path: str | os.PathLike = "checkpoint"):
    """An `AutoencoderKL` holding LDM-format weights, renamed by diffusers' converter."""
    from diffusers import AutoencoderKL

    _, convert = _ldm_vae_tools()
    config = diffusers_vae_config(ae_config, state_dict)
    try:
        ae = AutoencoderKL(**config)
    except (ValueError, TypeError, RuntimeError) as e:  # e.g. channels not divisible by 32 groups
        raise CCLDError(f"{path}: the config does not make an autoencoder ({str(e).strip()[:160]}); "
                        "pass the autoencoder's own yaml") from None
    try:
        converted = convert(state_dict, config)
        ae.load_state_dict(converted, strict=True)
    except (RuntimeError, KeyError, IndexError, AttributeError) as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        detail = (lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__))[:200]
        raise CCLDError(f"{path}: the weights do not fit the autoencoder its yaml describes "
                        f"({detail}); pass the yaml that belongs to this checkpoint") from None
    return ae.eval().requires_grad_(False)


def load_autoencoder(path: str | os.PathLike, config_path: str | os.PathLike | None = None):
    """The KL autoencoder, eval mode, frozen.

    `path`: an LDM `.ckpt` (or `.safetensors`) with its yaml beside it (`model.ckpt` ->
    `model.yaml`) unless `config_path` is given; or a folder written by
    `AutoencoderKL.save_pretrained` (or a pipeline folder with a `vae/` subfolder).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_diffusers_folder(path)
    if not path.is_file():
        raise CCLDError(f"{path}: no such autoencoder checkpoint file; check the path, or run "
                        "`ccld download` to fetch the published models")
    # the weights first: a file of the wrong kind is the more useful thing to hear about
    state_dict = _ldm_state_dict(load_state_file(path, "autoencoder checkpoint"), path)
    if config_path is None:
        config_path = _default_config_path(path)
        if not config_path.is_file():
            raise CCLDError(f"{path}: no autoencoder config {config_path.name} beside it; pass the "
                            "LDM yaml (e.g. ae_model.yaml) with --autoencoder-config")
    return autoencoder_from_ldm(state_dict, read_autoencoder_config(config_path), path)


def _load_diffusers_folder(folder: Path):
    from diffusers import AutoencoderKL

    subfolder = None
    if not (folder / "config.json").is_file():
        if (folder / "vae" / "config.json").is_file():
            subfolder = "vae"
        else:
            raise CCLDError(f"{folder}: a folder without config.json; give an LDM autoencoder "
                            ".ckpt or a folder written by AutoencoderKL.save_pretrained")
    try:
        ae = AutoencoderKL.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise CCLDError(f"{folder}: not a loadable diffusers autoencoder folder ({detail}); "
                        "save it again or pass the LDM autoencoder .ckpt") from None
    return ae.eval().requires_grad_(False)


def encode_moments(ae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean, logvar)` of the posterior for images in [-1, 1]; logvar before any clamping.

    This is LDM's `quant_conv(encoder(x)).chunk(2, dim=1)`; diffusers' `encode()` would clamp
    logvar to [-30, 20] inside its DiagonalGaussianDistribution.
    """
    param = next(ae.parameters())
    h = ae.encoder(images.to(device=param.device, dtype=param.dtype))
    if ae.quant_conv is not None:
        h = ae.quant_conv(h)
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar


def decode_latents(ae, z: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] (not clamped) from latents: `decoder(post_quant_conv(z))`."""
    param = next(ae.parameters())
    return ae.decode(z.to(device=param.device, dtype=param.dtype)).sample
