"""The frozen encoders and starting U-Nets of the training commands: which files, downloaded
where needed (the main process first), and loaded."""

from __future__ import annotations

from pathlib import Path


def encoder_files(args, recorded: dict | None = None) -> dict:
    """The autoencoder and CLOOB files to use: given on the command line, else `recorded` (by a
    latent cache), else None (the released ones, see `resolve_encoder_files`)."""
    recorded = recorded or {}
    keys = ("autoencoder", "autoencoder_config", "cloob", "cloob_config")
    return {k: getattr(args, k, None) or recorded.get(k) for k in keys}


def resolve_encoder_files(files: dict, accelerator, need_cloob: bool = True) -> dict:
    """Absolute paths, downloading the released models for parts not given and converting them
    (main process first, so that processes never write the same download or cache entry at
    once); no CLOOB download unless `need_cloob`."""
    from ..io import hub

    files = dict(files)
    with accelerator.main_process_first():
        if files["autoencoder"] is None:
            ckpt, yaml = hub.default_autoencoder()
            files["autoencoder"] = str(ckpt)
            files["autoencoder_config"] = files["autoencoder_config"] or str(yaml)
        if files["cloob"] is None and need_cloob:
            files["cloob"] = str(hub.download_cloob(hub.builtin_cloob_name(files["cloob_config"])))
    for key in ("autoencoder", "autoencoder_config", "cloob"):
        if files[key] is not None:
            files[key] = str(Path(files[key]).expanduser().resolve())
    if files["cloob_config"] and Path(files["cloob_config"]).expanduser().is_file():
        files["cloob_config"] = str(Path(files["cloob_config"]).expanduser().resolve())
    if accelerator.num_processes > 1:
        # a first run converts the encoders into ccld's cache: the main process alone, the
        # others then read its entries (each converting at once would do the work N times)
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                load_encoders(files, need_cloob=need_cloob and files["cloob"] is not None)
    return files


def load_encoders(files: dict, need_autoencoder: bool = True, need_cloob: bool = True):
    """(autoencoder, CLOOB) from resolved files; a part not needed is None."""
    from ..models.autoencoder import load_autoencoder
    from ..models.cloob import load_cloob

    autoencoder = (load_autoencoder(files["autoencoder"], files["autoencoder_config"])
                   if need_autoencoder else None)
    cloob = load_cloob(files["cloob"], files["cloob_config"]) if need_cloob else None
    return autoencoder, cloob


def load_unet_weights(path, what: str):
    """(U-Net, whether the file stored its latent scale) from any file the loaders read, its
    weights in the reference's contiguous layout (training starts from them)."""
    import torch

    from ..models.unet import unet_from_state_dict, unet_weights

    sd, config = unet_weights(path, what)
    unet = unet_from_state_dict(sd, path, config).to(memory_format=torch.contiguous_format)
    return unet, "autoencoder_scale" in sd
