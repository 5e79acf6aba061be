"""The KL-f8 autoencoder of latent diffusion, as a plain PyTorch module.

The published autoencoder (`huggan/ccld_wa` `ae_model.ckpt` + `ae_model.yaml`) is in the CompVis
latent-diffusion format: a `torch.save` of `{'state_dict': ...}` (or of the bare state dict) with
`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` and training-only `loss.*` weights,
described by an `ldm.models.autoencoder.AutoencoderKL` yaml. diffusers is the converter of record:
its LDM converter (`convert_ldm_vae_checkpoint`) renames the weights and its config builder reads
the yaml. The network that runs them, `KLAutoencoder`, is diffusers' `AutoencoderKL` (KL-f8 kind)
written again in plain torch with the same parameter names and the same arithmetic (tested equal),
for one reason: importing diffusers costs about 3 s, more than ten U-Net forwards, and a painting
only needs the decoder. So only a first load of an LDM file imports diffusers; a converted copy
(`ccld.io.weights_cache`) or a folder written by `save_pretrained` (diffusers' own layout, which
`diffusers.AutoencoderKL.from_pretrained` also reads) needs torch alone.

CCLD's latent scale is not diffusers' `scaling_factor`: it is the U-Net's `autoencoder_scale`
buffer, applied by the pipeline. The saved `scaling_factor` is 1.0 so nothing scales twice.

An autoencoder may carry its `latent_preview` (`ccld.models.latent_preview`), the cheap
latent-to-RGB map of sampling previews: fitted when a pipeline first shows a preview, saved
beside the weights by `save_pretrained` and loaded from there.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CCLDError, give
from ..io.checkpoints import load_state_file
from . import empty_weights, finite_or_float32
from .latent_preview import LatentPreview

# The network: diffusers' AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D, SiLU, GroupNorm),
# parameter for parameter

EPS = 1e-6  # every GroupNorm of the KL autoencoder


@dataclass(frozen=True)
class AutoencoderConfig:
    """The architecture, in diffusers `AutoencoderKL` terms (so config.json round-trips)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 256
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict, source: str = "autoencoder config") -> AutoencoderConfig:
        """From a diffusers AutoencoderKL config; CCLDError for a kind this module does not run."""
        blocks = len(config.get("block_out_channels", ()))
        checks = [("down_block_types", ["DownEncoderBlock2D"] * blocks),
                  ("up_block_types", ["UpDecoderBlock2D"] * blocks), ("act_fn", "silu")]
        for key, supported in checks:
            got = config.get(key, supported)
            if (list(got) if isinstance(got, (list, tuple)) else got) != supported:
                raise CCLDError(f"{source}: {key} {got!r} is not a KL autoencoder ccld runs "
                                f"(it runs {supported!r}); pass an LDM KL-f8 autoencoder")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        for key, value in values.items():
            fits, kind = CONFIG_FIELDS[key]
            if not fits(value):
                raise CCLDError(f"{source}: {key} is {value!r:.60}, not {kind}; save the "
                                "autoencoder again or pass the LDM autoencoder .ckpt")
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(int(c) for c in values["block_out_channels"])
        made = cls(**values)
        if any(c % made.norm_num_groups for c in made.block_out_channels):
            raise CCLDError(f"{source}: block_out_channels {list(made.block_out_channels)} are not "
                            f"all multiples of norm_num_groups {made.norm_num_groups}; save the "
                            "autoencoder again or pass the LDM autoencoder .ckpt")
        return made

    def to_diffusers(self) -> dict:
        blocks = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **asdict(self),
                "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * blocks,
                "up_block_types": ["UpDecoderBlock2D"] * blocks,
                "act_fn": "silu", "scaling_factor": 1.0, "force_upcast": True}


def _whole_number(low: int, high: int):
    def fits(v):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
    return fits, f"a whole number from {low} to {high}"


def _flag(v) -> bool:
    return isinstance(v, bool)


# AutoencoderConfig's fields as a config.json may give them, bounded where a net can be built
CONFIG_FIELDS = {
    "in_channels": _whole_number(1, 16), "out_channels": _whole_number(1, 16),
    "latent_channels": _whole_number(1, 64), "layers_per_block": _whole_number(1, 16),
    "norm_num_groups": _whole_number(1, 1024), "sample_size": _whole_number(8, 8192),
    "block_out_channels": (lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8
                           and all(_whole_number(1, 4096)[0](c) for c in v),
                           "a list of 1 to 8 whole numbers from 1 to 4096"),
    "use_quant_conv": (_flag, "true or false"), "use_post_quant_conv": (_flag, "true or false"),
    "mid_block_add_attention": (_flag, "true or false"),
}


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        # In place where nothing records a graph (painting; the same bits either way): at
        # 256x256 each activation is 33 MB that a fresh tensor would page-fault in anew.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over the pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.group_norm(x.view(n, c, h * w)).transpose(1, 2)
        q, k, v = (proj(y)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.to_out[0](y).transpose(1, 2).reshape(n, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


# Along each axis, output pixel 2i of nearest doubling then a 3x3 conv takes input rows
# (i-1, i, i) and pixel 2i+1 rows (i, i, i+1): the taps (w0, w1, w2) fold into the 4-tap kernel
# (w2, w1+w2, w0+w1, w0) of a stride-2 transposed conv. _FOLD maps 3 taps to those 4.
_FOLD = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def transposed_upsampling_weight(weight: torch.Tensor) -> torch.Tensor:
    """The 4x4 kernel [in, out, 4, 4] of the stride-2 transposed conv (padding 1) that equals
    doubling by nearest neighbour and then a 3x3 conv (padding 1) of `weight` [out, in, 3, 3]:
    4 multiply-adds per output pixel and channel pair instead of 9. One small matmul folds
    both axes at once (each folded tap a sum of at most 4 weights, rounded once)."""
    out_channels, in_channels = weight.shape[:2]
    fold = torch.kron(_FOLD, _FOLD).to(weight).t()  # [9 taps, 16 taps]
    folded = (weight.reshape(out_channels * in_channels, 9) @ fold).view(
        out_channels, in_channels, 4, 4)
    return folded.transpose(0, 1).contiguous()


class Resample(nn.Module):
    """The conv of a resolution change; `Downsample` pads right/bottom and strides, `Upsample`
    doubles by nearest neighbour first (or, once `fold_upsampling` ran, does both in one
    transposed conv)."""

    def __init__(self, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1,
                              padding=0 if down else 1)
        self.folded = False
        self.folded_weight = None  # made at the first folded forward

    def fold_upsampling(self, enabled: bool):
        """The decoder's three upsamplers are 28% of its multiply-adds (KL-f8 at 256x256); as
        transposed convs they run 2.1x faster on an AVX2 EPYC and stay within 1e-5 of the
        nearest-then-conv result, but not bit-equal, hence only on the fast path. Folded now,
        from the weights as they are (a pipeline folds its float32 weights before it holds
        them rounded for reduced precision)."""
        self.folded = enabled
        self.folded_weight = transposed_upsampling_weight(self.conv.weight) if enabled else None

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        if self.folded:
            if self.folded_weight is None or self.folded_weight.device != x.device:
                self.folded_weight = transposed_upsampling_weight(self.conv.weight)
            return F.conv_transpose2d(x, self.folded_weight, self.conv.bias, stride=2, padding=1)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResolutionBlock(nn.Module):
    """Resnets at one resolution, then a down- or upsampler unless it is the last level."""

    def __init__(self, c_in: int, c_out: int, n_layers: int, groups: int, down: bool,
                 resample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups)
                                      for i in range(n_layers)])
        self.samplers_name = "downsamplers" if down else "upsamplers"  # diffusers' key names
        setattr(self, self.samplers_name, nn.ModuleList([Resample(c_out, down)] if resample else []))

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in getattr(self, self.samplers_name):
            x = sampler(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            ResolutionBlock(widths[max(i - 1, 0)], w, c.layers_per_block, groups, down=True,
                            resample=i < len(widths) - 1) for i, w in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths, groups = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            ResolutionBlock(widths[max(i - 1, 0)], w, c.layers_per_block + 1, groups, down=False,
                            resample=i < len(widths) - 1) for i, w in enumerate(widths)])
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def fold_upsampling(self, enabled: bool = True):
        """Upsample by transposed convs (fast, within 1e-5) or as the reference does (exact)."""
        for block in self.up_blocks:
            for sampler in block.upsamplers:
                sampler.fold_upsampling(enabled)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class KLAutoencoder(nn.Module):
    """The KL autoencoder: images in [-1, 1] <-> latents (unscaled), diffusers' parameter names."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        self.latent_preview: LatentPreview | None = None  # set by the loaders

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean, logvar)` of the posterior; logvar before any clamping."""
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (not clamped) from latents."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """diffusers' folder layout: config.json + diffusion_pytorch_model.safetensors."""
        from safetensors.torch import save_file

        from ..io.files import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        config = json.dumps(self.config.to_diffusers(), indent=2).encode()
        atomic_write(folder / "config.json", lambda f: f.write(config), "autoencoder config")
        if self.latent_preview is not None:
            self.latent_preview.save(folder)
        return folder


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def autoencoder_from_state_dict(config: AutoencoderConfig, state_dict: dict,
                                source: str | os.PathLike = "checkpoint") -> KLAutoencoder:
    """A frozen autoencoder holding diffusers-named weights (as `checked_weights` gives them:
    float32, finite); built on the meta device, so no random initialisation is spent on
    weights the file replaces."""
    from ..io.checkpoints import checked_weights

    state_dict = checked_weights(state_dict, source, "autoencoder checkpoint")
    try:
        with empty_weights():
            ae = KLAutoencoder(config)
    except ValueError as e:  # e.g. channels not divisible by the number of groups
        raise CCLDError(f"{source}: the config does not make an autoencoder ({str(e).strip()[:160]}); "
                        "pass the autoencoder's own yaml") from None
    try:
        ae.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        detail = (lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__))[:200]
        raise CCLDError(f"{source}: the weights do not fit the autoencoder its config describes "
                        f"({detail}); pass the config that belongs to this checkpoint") from None
    return ae.eval().requires_grad_(False)


# Loading: LDM checkpoints (converted by diffusers) and diffusers folders

LDM_PREFIXES = ("", "first_stage_model.", "vae.")  # bare, or inside a full LDM/SD checkpoint
LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # the autoencoder's own


def _ldm_vae_tools():
    """diffusers' LDM-VAE config builder and weight converter, whichever version is installed."""
    try:  # diffusers >= 0.28
        from diffusers.loaders.single_file_utils import (
            convert_ldm_vae_checkpoint,
        )
        from diffusers.loaders.single_file_utils import (
            create_vae_diffusers_config_from_ldm as create_config,
        )
    except ImportError:  # older diffusers: the same functions under their former names
        from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
            convert_ldm_vae_checkpoint,
        )
        from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
            create_vae_diffusers_config as _old_create,
        )

        def create_config(original_config, checkpoint, image_size=None, scaling_factor=None):
            return _old_create(original_config, image_size=image_size)
    return create_config, convert_ldm_vae_checkpoint


def import_converter_early(path: str | os.PathLike,
                           config_path: str | os.PathLike | None = None) -> bool:
    """Starts importing diffusers' converter in a background thread when loading `path` will
    convert it (an LDM file without a converted copy in the cache); True if it did.

    The import costs about a second (most of it torch._dynamo, which diffusers pulls in), all
    of it Python: run while the other parts load, whose reading, copying and writing run outside
    the interpreter lock, it costs a first run little. The loader imports as usual and, should
    the thread still be importing, waits for it (Python's import lock)."""
    from ..io.weights_cache import open_converted

    path = Path(path).expanduser()
    config_path = Path(config_path).expanduser() if config_path else _default_config_path(path)
    if not (path.is_file() and config_path.is_file()):
        return False
    try:
        if open_converted(*_cache_entry(path, config_path)) is not None:
            return False
    except OSError:
        return False

    def import_quietly():
        try:
            _ldm_vae_tools()
        except Exception:  # (the loader's own import says what is wrong)
            pass

    # (not a daemon: a process that fails meanwhile waits for it rather than tearing Python
    # down under an import)
    threading.Thread(target=import_quietly, name="ccld diffusers import").start()
    return True


def _cache_entry(path: Path, config_path: Path) -> tuple[str, list, list]:
    """(kind, sources, configs) of an LDM file's converted-weights cache entry."""
    return "autoencoder", [path], [config_path.read_bytes()]


def _default_config_path(path: Path) -> Path:
    for suffix in (".yaml", ".yml"):
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return path.with_suffix(".yaml")


YAML_BYTES = 64 << 10  # an autoencoder's yaml is about a kilobyte
YAML_DEPTH = 16  # nesting levels (the LDM layout needs 5)


def _whole(low: int, high: int):
    def fits(v):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
    return fits, f"a whole number from {low} to {high}"


# The ddconfig's sizes, bounded where a KL autoencoder can be built (the published one: ch 128,
# ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 4, resolution 256)
DDCONFIG_FIELDS = {
    "ch": _whole(1, 1024), "num_res_blocks": _whole(1, 16), "z_channels": _whole(1, 64),
    "in_channels": _whole(1, 16), "out_ch": _whole(1, 16), "resolution": _whole(8, 8192),
    "ch_mult": (lambda v: isinstance(v, list) and 1 <= len(v) <= 8
                and all(_whole(1, 16)[0](m) for m in v), "a list of 1 to 8 whole numbers from 1 to 16"),
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                "a number from 0 to below 1"),
}


def _check_yaml_shape(text: str, path: Path, fix: str) -> None:
    """Refuses, before anything is built from it, a yaml that uses aliases (an anchor repeated
    through aliases grows without bound: "billion laughs") or nests deeper than YAML_DEPTH."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent):
            raise CCLDError(f"{path}: uses yaml aliases (*{event.anchor}), which ccld does not "
                            f"expand; write the values out, or {fix}")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > YAML_DEPTH:
                raise CCLDError(f"{path}: nested more than {YAML_DEPTH} levels deep; {fix}")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def read_autoencoder_config(config_path: str | os.PathLike) -> dict:
    """`{'ddconfig': ..., 'embed_dim': ...}` from an LDM AutoencoderKL yaml."""
    import yaml

    config_path = Path(config_path).expanduser()
    if not config_path.is_file():
        raise CCLDError(f"{config_path}: no such autoencoder config file; pass the LDM yaml "
                        f"(e.g. ae_model.yaml) with {give('autoencoder_config')}")
    fix = f"pass the LDM autoencoder yaml (e.g. ae_model.yaml) with {give('autoencoder_config')}"
    try:
        if config_path.stat().st_size > YAML_BYTES:
            raise CCLDError(f"{config_path}: more than {YAML_BYTES >> 10} KiB, not an autoencoder "
                            f"config; {fix}")
        text = config_path.read_text(encoding="utf-8")
        _check_yaml_shape(text, config_path, fix)
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        detail = " ".join(str(e).split())[:160]
        raise CCLDError(f"{config_path}: not a readable yaml file ({detail}); pass the LDM "
                        f"autoencoder yaml (e.g. ae_model.yaml) with {give('autoencoder_config')}"
                        ) from None
    params = doc
    if isinstance(params, dict) and isinstance(params.get("model"), dict):
        params = params["model"]
    if isinstance(params, dict) and isinstance(params.get("params"), dict):
        params = params["params"]
    if isinstance(params, dict) and isinstance(params.get("first_stage_config"), dict):
        params = params["first_stage_config"].get("params")  # a full LDM config: its autoencoder
    if not (isinstance(params, dict) and isinstance(params.get("ddconfig"), dict)):
        raise CCLDError(f"{config_path}: not an LDM autoencoder config (no model.params.ddconfig); "
                        f"pass the autoencoder's yaml (e.g. ae_model.yaml) with "
                        f"{give('autoencoder_config')}")
    dd = params["ddconfig"]
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch")
               if k not in dd]
    if missing:
        raise CCLDError(f"{config_path}: the ddconfig lacks {', '.join(missing)}; "
                        "pass the autoencoder's own yaml")
    for key, (fits, kind) in DDCONFIG_FIELDS.items():
        if key in dd and not fits(dd[key]):
            raise CCLDError(f"{config_path}: ddconfig.{key} is {dd[key]!r:.60}, not {kind}; "
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
    """The autoencoder's weights in an LDM file, under their names there: never its training
    loss (`loss.*`) nor, in a full LDM checkpoint, the other models' weights."""
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    for prefix in LDM_PREFIXES:
        if (any(k.startswith(prefix + "encoder.") for k in sd)
                and any(k.startswith(prefix + "decoder.") for k in sd)):
            parts = tuple(prefix + part for part in LDM_PARTS)
            return {k: v for k, v in sd.items() if k.startswith(parts)}
    raise CCLDError(f"{path}: not an autoencoder checkpoint (no encoder.*/decoder.* weights); "
                    "pass the LDM autoencoder .ckpt (e.g. ae_model.ckpt)")


def convert_ldm(state_dict: dict, ae_config: dict,
                source: str | os.PathLike = "checkpoint") -> tuple[dict, AutoencoderConfig]:
    """(diffusers-named weights, architecture) of LDM-format weights and their yaml's config,
    by diffusers' own converter."""
    _, convert = _ldm_vae_tools()
    diffusers_config = diffusers_vae_config(ae_config, state_dict)
    config = AutoencoderConfig.from_dict(diffusers_config, str(source))
    try:
        return convert(state_dict, diffusers_config), config
    except (RuntimeError, KeyError, IndexError, AttributeError) as e:
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise CCLDError(f"{source}: the weights do not fit the autoencoder its yaml describes "
                        f"({detail}); pass the yaml that belongs to this checkpoint") from None


def autoencoder_from_ldm(state_dict: dict, ae_config: dict,
                         source: str | os.PathLike = "checkpoint") -> KLAutoencoder:
    """A `KLAutoencoder` holding LDM-format weights, renamed by diffusers' converter."""
    weights, config = convert_ldm(state_dict, ae_config, source)
    return autoencoder_from_state_dict(config, weights, source)


def load_autoencoder(path: str | os.PathLike, config_path: str | os.PathLike | None = None, *,
                     stored_layout: bool = False) -> KLAutoencoder:
    """The KL autoencoder, eval mode, frozen, its weights contiguous as the reference's (its
    arithmetic the reference's, bit for bit); `stored_layout` leaves them as loaded (the
    decoder channels-last from the converted cache), for a caller that lays the decoder out
    itself, as `CCLDPipeline` does.

    `path`: an LDM `.ckpt` (or `.safetensors`) with its yaml beside it (`model.ckpt` ->
    `model.yaml`) unless `config_path` is given; or a folder written by `save_pretrained` or
    diffusers' `AutoencoderKL.save_pretrained` (or a pipeline folder with a `vae/` subfolder).
    An LDM file is converted (by diffusers) once; later loads memory-map the converted copy
    (`ccld.io.weights_cache`) and need no diffusers import.
    """
    from ..io.weights_cache import load_converted

    path = Path(path).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise CCLDError(f"{path}: no such autoencoder checkpoint file; check the path, or run "
                        "`ccld download` to fetch the published models")
    given = config_path is not None
    config_path = Path(config_path).expanduser() if given else _default_config_path(path)
    if not config_path.is_file():
        # the weights first: a file of the wrong kind is the more useful thing to hear about
        _ldm_state_dict(load_state_file(path, "autoencoder checkpoint"), path)
        if not given:
            raise CCLDError(f"{path}: no autoencoder config {config_path.name} beside it; pass "
                            f"the LDM yaml (e.g. ae_model.yaml) with {give('autoencoder_config')}")
        read_autoencoder_config(config_path)  # says the given config is missing, in one line

    def convert() -> tuple[dict, dict]:
        from ..io.checkpoints import checked_weights

        # mapped: the release's training-loss weights (LPIPS, discriminator) are never read
        state_dict = _ldm_state_dict(load_state_file(path, "autoencoder checkpoint", mmap=True),
                                     path)
        # checked under the file's own names, converted to float32 before diffusers sees them
        state_dict = checked_weights(state_dict, path, "autoencoder checkpoint")
        weights, config = convert_ldm(state_dict, read_autoencoder_config(config_path), path)
        # stored as the net takes them (the converter only renames and reshapes)
        return checked_weights(weights, path, "autoencoder checkpoint"), {"config": asdict(config)}

    # The latent preview map is not fitted here: it costs seconds (encoding and decoding its
    # pictures) that a painting without previews should not pay; `CCLDPipeline.latent_preview`
    # fits it when first asked, and saved folders keep it.
    # The decoder's kernels are stored channels-last, the fast path's layout (the encoder's as
    # the reference runs them: init images are encoded in fp32 exactly as it encodes them).
    weights, metadata = load_converted(*_cache_entry(path, config_path), convert,
                                       channels_last=lambda name, t: name.startswith("decoder."),
                                       maps_sources=True)
    ae = autoencoder_from_state_dict(AutoencoderConfig.from_dict(metadata["config"]), weights, path)
    return ae if stored_layout else ae.to(memory_format=torch.contiguous_format)


def _load_folder(folder: Path) -> KLAutoencoder:
    from ..io.checkpoints import load_safetensors_file

    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise CCLDError(f"{folder}: a folder without config.json; give an LDM autoencoder "
                        ".ckpt or a folder written by AutoencoderKL.save_pretrained")
    from ..io.jsontext import JSONInputError, parse

    try:
        with open(folder / "config.json", "rb") as f:
            raw = parse(f.read(1 << 20))  # a config is a few hundred bytes; bounded depth
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        config = AutoencoderConfig.from_dict(raw, str(folder / "config.json"))
    except (OSError, ValueError, TypeError, JSONInputError) as e:
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise CCLDError(f"{folder}: not a loadable diffusers autoencoder folder ({detail}); "
                        "save it again or pass the LDM autoencoder .ckpt") from None
    weights = load_safetensors_file(folder / WEIGHTS_NAME, "autoencoder weights")
    ae = autoencoder_from_state_dict(config, weights, folder)
    ae.latent_preview = LatentPreview.load(folder)  # None in folders saved before the maps
    return ae


def encode_moments(ae: KLAutoencoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean, logvar)` of the posterior for images in [-1, 1] on the autoencoder's device and
    dtype; logvar before any clamping (LDM's `quant_conv(encoder(x)).chunk(2)`; diffusers'
    `encode()` would clamp it to [-30, 20])."""
    param = next(ae.parameters())
    moments = finite_or_float32(
        lambda: torch.cat(ae.encode_moments(images.to(device=param.device, dtype=param.dtype)), 1),
        ae, param.device.type)
    return moments.chunk(2, dim=1)


def decode_latents(ae: KLAutoencoder, z: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] (not clamped) from latents: `decoder(post_quant_conv(z))`."""
    param = next(ae.parameters())
    return finite_or_float32(lambda: ae.decode(z.to(device=param.device, dtype=param.dtype)),
                             ae, param.device.type)
