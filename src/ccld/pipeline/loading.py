"""Loading and saving pipelines: from the release files, from a folder written by
`save_pretrained`, or from a known hub model; `CCLDPipeline` inherits it (`PipelineLoading`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union

import torch

from .._version import __version__
from ..errors import CCLDError, give
from ..io import checkpoints, hub
from ..models import hold_weights_in
from .metadata import model_identity
from .precision import REDUCED_DTYPES, check_device, resolve_precision

PathLike = Union[str, os.PathLike]
MODEL_INDEX = "model_index.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
CLOOB_WEIGHTS = "model.safetensors"
FILE_ARGUMENTS = ("unet", "autoencoder", "autoencoder_config", "cloob", "cloob_config")


def check_file_arguments(files: dict) -> None:
    """Each file argument is a path or None (a CLOOB config may also be a dict); anything else
    is a CCLDError naming the argument, not a TypeError deep in a loader."""
    for name, value in files.items():
        is_path = value is None or isinstance(value, (str, os.PathLike))
        if not is_path and not (name == "cloob_config" and isinstance(value, dict)):
            raise CCLDError(f"{give(name)}{value!r:.60}: not a file path but "
                            f"{type(value).__name__}; pass the path as a str or pathlib.Path")


CONFIG_BYTES = 1 << 20  # a pipeline folder's JSON configs are a few hundred bytes


def read_json_config(path: Path, what: str):
    """The value of a pipeline folder's JSON file, bounded in size and depth (ccld.io.jsontext);
    a CCLDError naming the file otherwise."""
    from ..io.jsontext import parse_file_text

    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_BYTES + 1)
    except OSError as e:
        raise CCLDError(f"{path}: cannot read the {what} ({e.strerror}); convert the model "
                        "again") from None
    if len(raw) > CONFIG_BYTES:
        raise CCLDError(f"{path}: more than {CONFIG_BYTES >> 20} MiB, not a {what}; convert the "
                        "model again")
    value = parse_file_text(raw, str(path), "convert the model again")
    if not isinstance(value, dict):
        raise CCLDError(f"{path}: a JSON {type(value).__name__}, not the {what}'s object; "
                        "convert the model again")
    return value


def _bounded_whole(low: int, high: int):
    def fits(v):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
    return fits, (f"a positive integer up to {high}" if low == 1
                  else f"a whole number from {low} to {high}")


def folder_unet_architecture(folder: Path, config: dict) -> dict:
    """The U-Net architecture a pipeline folder's unet/config.json records, checked against
    the bounds a net can be built in (see `ccld.limits`)."""
    from ..limits import BASE_CHANNELS, STEPS

    positive, _ = _bounded_whole(1, 64)
    wanted = {"base_channels": _bounded_whole(int(BASE_CHANNELS.low), int(BASE_CHANNELS.high)),
              "embed_dim": _bounded_whole(1, 4096),
              "channel_multipliers": (lambda v: isinstance(v, list) and len(v) == 4
                                      and all(map(positive, v)),
                                      "a list of four whole numbers from 1 to 64")}
    architecture = {}
    for key, (fits, kind) in wanted.items():
        value = config.get(key) if isinstance(config, dict) else None
        if not fits(value):
            raise CCLDError(f"{folder}/unet/config.json: {key} is {value!r}, not {kind}; convert "
                            "the model again")
        architecture[key] = value
    # a distilled student's records (see ccld.models.unet), present only when it has them
    optional = {"guidance_input": (lambda v: v is True, "true"),
                "guidance_range": (lambda v: isinstance(v, list) and len(v) == 2 and all(
                    isinstance(w, (int, float)) and not isinstance(w, bool)
                    and math.isfinite(w) for w in v) and v[0] <= v[1],
                    "a [low, high] pair of finite numbers"),
                "distilled_steps": _bounded_whole(1, int(STEPS.high))}
    for key, (fits, kind) in optional.items():
        if key in config:
            if not fits(config[key]):
                raise CCLDError(f"{folder}/unet/config.json: {key} is {config[key]!r}, not "
                                f"{kind}; convert the model again")
            architecture[key] = config[key]
    return architecture


class PipelineLoading:
    """`from_files`, `from_pretrained` and `save_pretrained`, for a pipeline class whose
    constructor takes (unet, autoencoder, cloob, sources, latent_scale, decoder, precision)."""

    @classmethod
    def from_files(cls, unet: PathLike | None = None, autoencoder: PathLike | None = None,
                   autoencoder_config: PathLike | None = None, cloob: PathLike | None = None,
                   cloob_config: PathLike | dict | None = None,
                   decoder: str | None = None, precision: str | None = None):
        """Builds from release files; any part left out is the published default (downloaded
        once). Parts given as files load first, so a bad path is reported before any download.
        `decoder`: full (None), taesd or tiny:PATH, as `ccld generate --decoder` takes it;
        `precision` as `to` takes it (given here, the weights are laid out for it once; None:
        fp32 on the CPU, `auto` once moved to a GPU)."""
        from ..models.autoencoder import import_converter_early, load_autoencoder
        from ..models.cloob import load_cloob
        from ..models.tiny_decoder import DecoderOption
        from ..models.unet import load_unet, stored_rounded_weights

        check_file_arguments(dict(unet=unet, autoencoder=autoencoder, cloob=cloob,
                                  autoencoder_config=autoencoder_config, cloob_config=cloob_config))
        decoder_option = DecoderOption.parse(decoder)  # checked before anything loads
        # The converted cache gives the U-Net what its release file cannot: channels-last
        # kernels, which float32 on a CPU then takes without a copy. Rounded to bf16 or fp16
        # (copied whatever the layout), or kept contiguous (fp32), it maps the file itself.
        on_cpu = resolve_precision(precision or "fp32", torch.device("cpu"))
        cache_unet = precision not in (None, "fp32") and on_cpu == "fp32"
        built_rounded = REDUCED_DTYPES.get(on_cpu)

        # part -> (the files given, or None; the default's files; how to load the files)
        parts = {
            # (the weights as stored: the pipeline lays them out for its precision when used)
            "unet": (None if unet is None else (unet,), lambda: (hub.default_unet(),),
                     lambda path: load_unet(path, stored_layout=True, cache=cache_unet)),
            "autoencoder": (None if autoencoder is None else (autoencoder, None),
                            hub.default_autoencoder,
                            lambda ckpt, yaml: load_autoencoder(ckpt, autoencoder_config or yaml,
                                                                stored_layout=True)),
            "cloob": (None if cloob is None else (cloob,),
                      lambda: (hub.download_cloob(hub.builtin_cloob_name(cloob_config)),),
                      lambda path: load_cloob(path, cloob_config)),
        }
        # An autoencoder to convert loads last, its converter imported meanwhile; but a given
        # file is never checked after a download.
        may_wait = autoencoder is None or all(given for given, _, _ in parts.values())
        loaded, sources, last = {}, {}, []
        for name in sorted(parts, key=lambda name: parts[name][0] is None):
            given, default, load = parts[name]
            files = given if given is not None else default()
            sources[name] = model_identity(files[0])
            if name == "unet":
                unet_file = str(files[0])
            if (name == "autoencoder" and may_wait
                    and import_converter_early(files[0], autoencoder_config or files[1])):
                last.append((name, files))
                continue
            loaded[name] = load(*files)
        for name, files in last:
            loaded[name] = parts[name][2](*files)
        if built_rounded is not None and not unet_file.endswith(checkpoints.SAFETENSORS_SUFFIXES):
            # the rounded copies as stored by a former run (or now, for the next): `to` keeps them
            hold_weights_in(loaded["unet"], built_rounded, torch.channels_last,
                            stored_rounded_weights(unet_file, loaded["unet"], built_rounded))
        # the published student is decoded as its demo did, whatever its buffer says
        latent_scale = hub.PUBLISHED_LATENT_SCALE if unet is None else None
        tiny = decoder_option.load()
        if tiny is not None:
            sources["tiny_decoder"] = model_identity(decoder_option.label)
        return cls(**loaded, sources=sources, latent_scale=latent_scale, decoder=tiny,
                   precision=precision)

    @classmethod
    def from_pretrained(cls, source: PathLike | None = None, device: str | torch.device | None = None,
                        precision: str | None = None, decoder: str | None = None, **files):
        """A pipeline from a folder written by `save_pretrained`, a known hub repo, or (None)
        the default student; `files` (unet=, autoencoder=, cloob=, ...) override single parts.
        `decoder` (full, taesd, tiny:PATH) replaces a folder's own choice (its `tiny_decoder/`
        if it has one). `precision` left out is fp32 on the CPU (the reference's numbers) and
        `auto` on a GPU (fp16), there or after a later `.to("cuda")`."""
        if source is not None and not isinstance(source, (str, os.PathLike)):
            raise CCLDError(f"from_pretrained({source!r:.40}): not a folder or a hub model's "
                            f"name but a {type(source).__name__}; pass a path or "
                            f"{hub.DEFAULT_UNET[0]!r}")
        # the device first: a pipeline for a GPU is not laid out (rounded, cached) for the CPU
        target = None if device is None else check_device(device)
        build = precision if target is None or target.type == "cpu" else None
        if source is not None and Path(source).is_dir():
            pipe = cls._from_folder(Path(source), decoder, build)
        elif source is None or str(source) == hub.DEFAULT_UNET[0]:
            pipe = cls.from_files(decoder=decoder, precision=build, **files)
        elif str(source) == hub.TEACHER_REPO:
            if files.get("unet") is None:
                files["unet"] = hub.teacher_checkpoint(source)
            pipe = cls.from_files(decoder=decoder, precision=build, **files)
            pipe.latent_scale = hub.PUBLISHED_LATENT_SCALE  # the teacher's cfg_sample.py decodes so
        else:
            raise CCLDError(f"{source}: not a pipeline folder (no {MODEL_INDEX}) nor a known hub "
                            f"model ({hub.DEFAULT_UNET[0]}, {hub.TEACHER_REPO}); "
                            "pass a folder written by `ccld convert`")
        return pipe.to(device, precision)

    @classmethod
    def _from_folder(cls, folder: Path, decoder: str | None = None, precision: str | None = None):
        from ..models.autoencoder import load_autoencoder
        from ..models.cloob import cloob_from_state_dict
        from ..models.tiny_decoder import PIPELINE_SUBFOLDER, DecoderOption, load_tiny_decoder
        from ..models.unet import unet_from_state_dict

        index_path = folder / MODEL_INDEX
        if not index_path.is_file():
            raise CCLDError(f"{folder}: no {MODEL_INDEX}; give a folder written by "
                            "`ccld convert` or `CCLDPipeline.save_pretrained`")
        index = read_json_config(index_path, "pipeline index")
        unet_config = read_json_config(folder / "unet" / "config.json", "U-Net config")
        cloob_config = read_json_config(folder / "cloob" / "config.json", "CLOOB config")
        latent_scale = index.get("latent_scale")
        if latent_scale is not None:
            from ..limits import LATENT_SCALE

            latent_scale = LATENT_SCALE.check(f"{index_path}: latent_scale", latent_scale)
        unet_sd = checkpoints.load_safetensors_file(folder / "unet" / UNET_WEIGHTS, "U-Net weights")
        architecture = folder_unet_architecture(folder, unet_config)
        unet = unet_from_state_dict(unet_sd, folder / "unet", architecture)
        cloob_sd = checkpoints.load_safetensors_file(folder / "cloob" / CLOOB_WEIGHTS, "CLOOB weights")
        # the folder, and what it was converted from (earlier folders kept paths: their names)
        recorded = index.get("sources", {})
        sources = {"pipeline": model_identity(folder),
                   **{k: Path(str(v)).name if os.path.isabs(str(v)) else str(v)
                      for k, v in (recorded.items() if isinstance(recorded, dict) else ())}}
        if decoder is not None:
            option = DecoderOption.parse(decoder)
            tiny, sources = option.load(), {**sources, "tiny_decoder": model_identity(option.label)}
        elif (folder / PIPELINE_SUBFOLDER).is_dir():
            tiny = load_tiny_decoder(folder / PIPELINE_SUBFOLDER)
        else:
            tiny = None
        return cls(unet, load_autoencoder(folder / "vae"), cloob_from_state_dict(cloob_config, cloob_sd),
                   sources, latent_scale, decoder=tiny, precision=precision)

    def save_pretrained(self, folder: PathLike) -> Path:
        """Writes a self-contained folder of safetensors and JSON configs. It appears whole or
        not at all (an earlier pipeline folder there is replaced in one step; see
        `ccld.io.files.write_folder`)."""
        from ..io.files import write_folder

        self.latent_preview  # noqa: B018 - fitted first if missing, so the folder keeps one
        return write_folder(folder, self._write_folder, "pipeline folder",
                            replaceable=lambda existing: (existing / MODEL_INDEX).is_file())

    def _write_folder(self, folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / "unet").mkdir()
        (folder / "cloob").mkdir()
        unet_sd = {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
        save_file(unet_sd, str(folder / "unet" / UNET_WEIGHTS))
        unet_config = {**self.unet.config, "autoencoder_scale": float(self.unet.autoencoder_scale)}
        (folder / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2))
        cloob_sd = {k: v.detach().contiguous().cpu() for k, v in self.cloob.state_dict().items()}
        save_file(cloob_sd, str(folder / "cloob" / CLOOB_WEIGHTS))
        (folder / "cloob" / "config.json").write_text(json.dumps(self.cloob.config, indent=2))
        self.autoencoder.save_pretrained(folder / "vae")
        index = {"_class_name": type(self).__name__, "ccld_version": __version__,
                 "unet": ["ccld", "CCLDUNet"], "vae": ["diffusers", "AutoencoderKL"],
                 "cloob": ["ccld", "CLOOB"], "sources": self.sources}
        if self.tiny_decoder is not None:
            from ..models.tiny_decoder import PIPELINE_SUBFOLDER

            self.tiny_decoder.save_pretrained(folder / PIPELINE_SUBFOLDER)
            index["tiny_decoder"] = ["ccld", "TinyDecoder"]
        if self.latent_scale is not None:
            index["latent_scale"] = self.latent_scale
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2))
