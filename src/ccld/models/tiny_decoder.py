"""A tiny decoder: latents to pixels with the TAESD architecture, many times faster than KL-f8's.

TAESD (madebyollin/taesd) is a small conv decoder, no normalisation and no attention, distilled
to paint what Stable Diffusion's KL-f8 decoder paints. diffusers ships it as the decoder half of
`AutoencoderTiny`; `TinyDecoder` is that half written again in plain torch with the same
parameter names and arithmetic (tested equal), so that `AutoencoderTiny.save_pretrained` folders
and madebyollin/taesd's `diffusion_pytorch_model.safetensors` load as they are (their encoder
weights are ignored), without importing diffusers (about 3 s) on the way to a painting.

Latent units. `TinyDecoder` takes the KL autoencoder's raw latents z (what `KLAutoencoder.decode`
takes, i.e. ccld latents times the latent scale) and multiplies them by its `input_scale` first.
TAESD was trained on Stable Diffusion's scaled latents, z * 0.18215 (diffusers' pipelines hand
their latents to `AutoencoderTiny.decode` as they are; its `scaling_factor` is 1.0, and its
`latent_magnitude`/`latent_shift` only quantise encoder outputs to bytes in `forward`), so a
diffusers folder without ccld's `input_scale` key reads as 0.18215. A decoder distilled by
`ccld distill-decoder` learns on raw z and records 1.0. The output is in about [-1, 1], not
clamped, as `AutoencoderTiny.decode` gives it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..errors import CCLDError, arg
from . import empty_weights

TAESD_INPUT_SCALE = 0.18215  # Stable Diffusion's latent scale, which TAESD's inputs carry
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' name, also ours
TORCH_WEIGHTS_NAME = "diffusion_pytorch_model.bin"  # older diffusers folders
CONFIG_NAME = "config.json"
PIPELINE_SUBFOLDER = "tiny_decoder"  # where a pipeline folder keeps its tiny decoder
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU,
               "mish": nn.Mish}  # diffusers' get_activation names


@dataclass(frozen=True)
class TinyDecoderConfig:
    """The decoder half of diffusers' `AutoencoderTiny` config, plus the input scale."""
    latent_channels: int = 4
    out_channels: int = 3
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    upsampling_scaling_factor: int = 2
    input_scale: float = 1.0  # raw KL latents are multiplied by this before the first layer

    @classmethod
    def from_dict(cls, config: dict, source: str = "tiny decoder config") -> TinyDecoderConfig:
        """From a diffusers `AutoencoderTiny` config (or ours); a foreign one without
        `input_scale` is TAESD's, trained on Stable Diffusion's scaled latents."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        values.setdefault("input_scale", TAESD_INPUT_SCALE)
        for key in ("decoder_block_out_channels", "num_decoder_blocks"):
            if key in values:
                values[key] = tuple(int(c) for c in values[key])
        config = cls(**values)
        if str(config.act_fn).lower() not in ACTIVATIONS:
            raise CCLDError(f"{source}: act_fn {config.act_fn!r} is not one ccld runs (it runs "
                            f"{', '.join(ACTIVATIONS)}); pass a TAESD-style tiny decoder")
        if len(config.decoder_block_out_channels) != len(config.num_decoder_blocks):
            raise CCLDError(f"{source}: decoder_block_out_channels and num_decoder_blocks differ "
                            "in length; save the decoder again")
        if not (isinstance(config.input_scale, (int, float))
                and not isinstance(config.input_scale, bool)
                and math.isfinite(config.input_scale) and config.input_scale > 0):
            raise CCLDError(f"{source}: input_scale {config.input_scale!r} is not a positive "
                            "finite number; save the decoder again")
        return config

    def to_dict(self) -> dict:
        """diffusers' `AutoencoderTiny` keys for the decoder, and ours (`input_scale`)."""
        return {"_class_name": "TinyDecoder", **asdict(self),
                "decoder_block_out_channels": list(self.decoder_block_out_channels),
                "num_decoder_blocks": list(self.num_decoder_blocks)}


# The network: diffusers' DecoderTiny and AutoencoderTinyBlock, parameter for parameter

class TinyBlock(nn.Module):
    """diffusers' `AutoencoderTinyBlock` with equal in and out widths: three convs, a skip."""

    def __init__(self, channels: int, act_fn: str):
        super().__init__()
        act = ACTIVATIONS[act_fn.lower()]
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), act(),
                                  nn.Conv2d(channels, channels, 3, padding=1), act(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class DecoderLayers(nn.Module):
    """diffusers' `DecoderTiny`: `layers` indexed as there (activations and upsamplers hold
    places in the Sequential, so the parameter names only match if they are kept)."""

    def __init__(self, c: TinyDecoderConfig):
        super().__init__()
        widths, act = c.decoder_block_out_channels, c.act_fn
        layers = [nn.Conv2d(c.latent_channels, widths[0], 3, padding=1),
                  ACTIVATIONS[act.lower()]()]
        for i, (width, blocks) in enumerate(zip(widths, c.num_decoder_blocks)):
            last = i == len(widths) - 1
            layers += [TinyBlock(width, act) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=c.upsampling_scaling_factor,
                                          mode=c.upsample_fn))
            layers.append(nn.Conv2d(width, c.out_channels if last else width, 3, padding=1,
                                    bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        x = torch.tanh(x / 3) * 3  # TAESD's soft clamp of its inputs to about [-3, 3]
        return self.layers(x).mul(2).sub(1)  # [0, 1] -> [-1, 1], as diffusers does


class TinyDecoder(nn.Module):
    """Raw KL latents -> pixels in about [-1, 1]; parameter names as diffusers' `AutoencoderTiny`
    (`decoder.layers.*`). `decode` has `KLAutoencoder.decode`'s contract, so either decodes."""

    def __init__(self, config: TinyDecoderConfig):
        super().__init__()
        self.config = config
        self.decoder = DecoderLayers(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale = self.config.input_scale
        return self.decoder(z if scale == 1.0 else z * scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self(z)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """config.json + diffusion_pytorch_model.safetensors (the decoder's weights only), each
        written atomically: training exports replace a folder a reader may be loading."""
        from safetensors.torch import save

        from ..io.files import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = save({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()})
        atomic_write(folder / WEIGHTS_NAME, lambda f: f.write(weights), "tiny decoder weights")
        config = json.dumps(self.config.to_dict(), indent=2).encode()
        atomic_write(folder / CONFIG_NAME, lambda f: f.write(config), "tiny decoder config")
        return folder


# Loading

def tiny_decoder_from_state_dict(config: TinyDecoderConfig, state_dict: dict,
                                 source: str | os.PathLike = "tiny decoder") -> TinyDecoder:
    """A frozen tiny decoder holding `decoder.*` weights (others, such as an `AutoencoderTiny`'s
    `encoder.*`, are ignored); built on the meta device, so no random init is wasted."""
    from ..io.checkpoints import checked_weights

    weights = {k: v for k, v in state_dict.items() if k.startswith("decoder.")}
    if not weights:
        raise CCLDError(f"{source}: no decoder.layers.* weights, so not a tiny decoder in "
                        "diffusers' AutoencoderTiny layout; pass a folder written by "
                        "AutoencoderTiny.save_pretrained or `ccld distill-decoder`")
    weights = checked_weights(weights, source, "tiny decoder")  # float32, finite
    try:
        with empty_weights():
            decoder = TinyDecoder(config)
        decoder.load_state_dict(weights, strict=True, assign=True)
    except (RuntimeError, ValueError) as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        detail = (lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__))[:200]
        raise CCLDError(f"{source}: the weights do not fit the tiny decoder its config describes "
                        f"({detail}); pass the config.json that belongs to them") from None
    return decoder.eval().requires_grad_(False)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def infer_config(state_dict: dict, source: str | os.PathLike = "tiny decoder") -> TinyDecoderConfig:
    """The architecture of `decoder.layers.*` weights with no config beside them: a conv in,
    then per stage its blocks and a conv (the last one with a bias, giving the output channels).
    Activations and upsampling are TAESD's, and so is the input scale."""
    layers: dict[int, dict] = {}
    for key, value in state_dict.items():
        match = _LAYER.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
    try:
        order = sorted(layers)
        conv_in = layers[order[0]]["weight"]
        widths, blocks, count, out_channels = [], [], 0, None
        for index in order[1:]:
            if "conv.0.weight" in layers[index]:
                count += 1
                continue
            widths.append(int(layers[index]["weight"].shape[1]))
            blocks.append(count)
            count = 0
            if "bias" in layers[index]:  # the output conv
                out_channels = int(layers[index]["weight"].shape[0])
                break
        if out_channels is None:
            raise KeyError("no output conv")
        return TinyDecoderConfig(latent_channels=int(conv_in.shape[1]), out_channels=out_channels,
                                 decoder_block_out_channels=tuple(widths),
                                 num_decoder_blocks=tuple(blocks), input_scale=TAESD_INPUT_SCALE)
    except (IndexError, KeyError, AttributeError):
        raise CCLDError(f"{source}: the weights are not a TAESD-style decoder (no decoder.layers.* "
                        "convs ending in an output conv); pass an AutoencoderTiny folder or a "
                        "folder written by `ccld distill-decoder`") from None


def read_config(path: Path) -> TinyDecoderConfig:
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return TinyDecoderConfig.from_dict(raw, str(path))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise CCLDError(f"{path}: not a readable tiny decoder config ({detail}); save the "
                        "decoder again") from None


def load_tiny_decoder(path: str | os.PathLike) -> TinyDecoder:
    """A frozen tiny decoder from a folder (ours, diffusers' `AutoencoderTiny`, or a pipeline
    folder with a `tiny_decoder/` subfolder) or a weights file (its architecture from the
    config.json beside it, else from the weights)."""
    from ..io.checkpoints import load_state_file

    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() and (path / PIPELINE_SUBFOLDER).is_dir():
            path = path / PIPELINE_SUBFOLDER
        if not (path / CONFIG_NAME).is_file():
            raise CCLDError(f"{path}: a folder without {CONFIG_NAME}; give a folder written by "
                            "AutoencoderTiny.save_pretrained or `ccld distill-decoder`, or its "
                            "weights file")
        weights = path / WEIGHTS_NAME
        if not weights.is_file() and (path / TORCH_WEIGHTS_NAME).is_file():
            weights = path / TORCH_WEIGHTS_NAME
        config_path = path / CONFIG_NAME
    elif path.is_file():
        weights, config_path = path, path.parent / CONFIG_NAME
    else:
        raise CCLDError(f"{path}: no such tiny decoder file or folder; check the path")
    state_dict = load_state_file(weights, "tiny decoder weights")
    config = read_config(config_path) if config_path.is_file() else infer_config(state_dict, weights)
    return tiny_decoder_from_state_dict(config, state_dict, weights)


# The decoder option: which decoder paints

DECODER_CHOICES = "full, taesd or tiny:PATH"


@dataclass(frozen=True)
class DecoderOption:
    """`--decoder`: `full` (the KL decoder), `taesd` (madebyollin/taesd, downloaded once; only
    right for the stock Stable Diffusion kl-f8 autoencoder) or `tiny:PATH`."""
    kind: str  # "full", "taesd", "tiny"
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | os.PathLike | None, option: str = "decoder") -> DecoderOption:
        """The option, checked (a tiny:PATH must exist) before anything loads; `option` is the
        parameter it was given as, named in messages."""
        text = "full" if text is None else str(text)
        if text in ("full", "taesd"):
            return cls(text)
        if text.startswith("tiny:") and text[len("tiny:"):]:
            path = Path(text[len("tiny:"):]).expanduser()
            if not path.exists():
                raise CCLDError(f"{arg(option)} {text}: no such file or folder; give tiny:PATH of a "
                                "folder written by `ccld distill-decoder` or AutoencoderTiny")
            return cls("tiny", path.resolve())
        raise CCLDError(f"{arg(option)} {text!r}: choose {DECODER_CHOICES}")

    @property
    def label(self) -> str:
        """What the PNG parameters record: full, taesd or tiny:<absolute path>."""
        return f"tiny:{self.path}" if self.kind == "tiny" else self.kind

    def load(self) -> TinyDecoder | None:
        """The tiny decoder (None for the full one); `taesd` downloads only here."""
        if self.kind == "full":
            return None
        if self.kind == "taesd":
            from ..io.hub import taesd_files

            weights, _ = taesd_files()  # its config.json lies beside it in the hub snapshot
            return load_tiny_decoder(weights)
        return load_tiny_decoder(self.path)
