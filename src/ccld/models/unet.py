"""The CLOOB-conditioned residual U-Net of cloob-latent-diffusion, predicting v in continuous time.

The module tree mirrors the released checkpoints key for key (`net.4.main.9.main.1.main.0.weight`
...), so bare state dicts, Lightning EMA weights and our safetensors all load with a plain
`load_state_dict`. Unlike the original, the conditioning vector is passed down explicitly instead
of through a shared mutable dict, which makes the model reentrant (threads, torch.compile).

Layout at 32x32 latents (cs = base_channels * channel_multipliers):
    32x32: 4 conv blocks              -> [16x16: 4 x (conv, attn) -> [8x8: 4 x (conv, attn)
    -> [4x4: 8 x (conv, attn)] -> 4 x (conv, attn)] -> 4 x (conv, attn)] -> 4 conv blocks
Every conv block is modulated (scale and shift) by a 1024-wide vector that a small mapping
network computes from the CLOOB embedding and the timestep.

Distilled students (`ccld distill --objective guidance|progressive`) may carry three optional
records, each present only when the feature is on, so that plain checkpoints keep their keys:
a guidance-weight input (`guidance_embed.*`: Fourier features of w, zero-initialised, added to
the mapping network's input), the guidance range they were distilled for (`guidance_range`
buffer) and the timesteps they were step-distilled to (`distilled_timesteps` buffer). Buffers
travel in every format (bare `.ckpt`, Lightning, safetensors, pipeline folders) like
`autoencoder_scale`, and the architecture inference reads all three back from the keys.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CCLDError
from ..sampling import uniform_timesteps
from . import autocast_off, empty_weights, meta_aware_randn

MAPPING_WIDTH = 1024
MAPPING_FOURIER = 128
PLANE_FOURIER = 16
GUIDANCE_FOURIER = 64
GUIDANCE_FOURIER_STD = 0.2


class FourierFeatures(nn.Module):
    """Random Fourier features of the timestep; the weights are fixed at initialisation."""

    def __init__(self, in_features: int, out_features: int, std: float = 1.0):
        super().__init__()
        # in place: out-of-place arithmetic on the meta device is slow (see meta_aware_randn)
        self.weight = nn.Parameter(meta_aware_randn(out_features // 2, in_features).mul_(std),
                                   requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # in float32 under autocast too: a reduced-precision matmul, cos and sin of times up to
        # 2 pi |w| would be off by up to 0.1 (bf16)
        with autocast_off(t.device.type):
            f = 2 * math.pi * t.float() @ self.weight.float().T
            return torch.cat([f.cos(), f.sin()], dim=-1)


class GuidanceEmbedding(nn.Module):
    """The guidance weight w as a vector to add to the mapping network's input (Meng et al. 2023).

    Fourier features of w (fixed, random, low frequencies: w spans about 1 to 10) and a linear
    layer initialised to zero, so that a student given this input starts out computing exactly
    what the checkpoint it was made from computes, whatever w.
    """

    def __init__(self, out_features: int):
        super().__init__()
        self.fourier = FourierFeatures(1, GUIDANCE_FOURIER, std=GUIDANCE_FOURIER_STD)
        self.linear = nn.Linear(GUIDANCE_FOURIER, out_features)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fourier(w[:, None]))


class ResLinearBlock(nn.Module):
    def __init__(self, f_in: int, f_mid: int, f_out: int, is_last: bool = False):
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(f_in, f_mid), nn.ReLU(),
            nn.Linear(f_mid, f_out), nn.Identity() if is_last else nn.ReLU())
        self.skip = nn.Identity() if f_in == f_out else nn.Linear(f_in, f_out, bias=False)

    def forward(self, x):
        return self.main(x) + self.skip(x)


class Modulation2d(nn.Module):
    """Feature-wise affine modulation: x * (1 + scale) + shift, both predicted from cond."""

    def __init__(self, cond_features: int, channels: int):
        super().__init__()
        self.layer = nn.Linear(cond_features, channels * 2, bias=False)

    def forward(self, x, cond):
        scales, shifts = self.layer(cond).chunk(2, dim=-1)
        return torch.addcmul(shifts[..., None, None], x, scales[..., None, None] + 1)


class ResModConvBlock(nn.Module):
    """conv -> GroupNorm(1) -> modulation -> ReLU, twice, plus a (1x1 conv) skip.

    Indices in `main` follow the release (0 conv, 1 norm, 2 modulation, 3 ReLU, 4 conv, ...);
    the last block of the net ends at its second conv.
    """

    def __init__(self, cond_features: int, c_in: int, c_mid: int, c_out: int,
                 is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.main = nn.ModuleList([
            nn.Conv2d(c_in, c_mid, 3, padding=1),
            nn.GroupNorm(1, c_mid, affine=False),
            Modulation2d(cond_features, c_mid),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 3, padding=1),
            nn.Identity() if is_last else nn.GroupNorm(1, c_out, affine=False),
            nn.Identity() if is_last else Modulation2d(cond_features, c_out),
            nn.Identity() if is_last else nn.ReLU(),
        ])
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x, cond):
        conv1, norm1, mod1, _, conv2, norm2, mod2, _ = self.main
        h = F.relu(mod1(norm1(conv1(x)), cond))
        h = conv2(h)
        if not self.is_last:
            h = F.relu(mod2(norm2(h), cond))
        return h + self.skip(x)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, n_head: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.n_head = n_head
        self.qkv_proj = nn.Conv2d(channels, channels * 3, 1)
        self.out_proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x, cond=None):
        n, c, h, w = x.shape
        qkv = self.qkv_proj(self.norm(x))
        # channels are laid out [q heads | k heads | v heads], each head a contiguous run
        qkv = qkv.view(n, 3 * self.n_head, c // self.n_head, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).reshape(n, c, h, w)
        return x + self.out_proj(y)


class CondSequential(nn.Sequential):
    """A Sequential whose blocks may take the conditioning vector as a second argument."""

    def forward(self, x, cond):
        for layer in self:
            x = layer(x, cond) if isinstance(layer, _TAKES_COND) else layer(x)
        return x


class SkipBlock(nn.Module):
    """U-Net level: runs `main` (down ... up) and concatenates its input along channels."""

    def __init__(self, *main: nn.Module):
        super().__init__()
        self.main = CondSequential(*main)

    def forward(self, x, cond):
        return torch.cat([self.main(x, cond), x], dim=1)


_TAKES_COND = (ResModConvBlock, SelfAttention2d, SkipBlock)


def _heads(channels: int) -> int:
    # the release uses 64-channel heads; tiny test nets narrower than 64 get one head
    return max(1, channels // 64)


class CCLDUNet(nn.Module):
    """v-prediction U-Net for 4-channel latents, conditioned on a CLOOB embedding.

    `forward(x, t, embed)`: x [n, 4, H, W] noised latents, t [n] in [0, 1] with
    alpha = cos(pi t / 2), sigma = sin(pi t / 2), embed [n, embed_dim] (zeros = unconditional).
    `autoencoder_scale` is the latent scale the net was trained with (latents = z / scale).

    A distilled student may also have (see the module docstring): `guidance_input`, a
    guidance-weight input (`forward(..., guidance=w)`, w = 1 when left out: the plain
    conditional velocity); `guidance_range` (lo, hi; read as `distilled_guidance`), the
    weights it was guidance-distilled for, its output being the teacher's guided velocity
    there; `distilled_steps`, the number of DDIM steps it was step-distilled to (its timesteps
    in the `distilled_timesteps` buffer).
    """

    def __init__(self, base_channels: int = 192, channel_multipliers=(1, 1, 2, 2),
                 embed_dim: int = 512, autoencoder_scale: float = 1.0,
                 guidance_input: bool = False, guidance_range=None,
                 distilled_steps: int | None = None):
        super().__init__()
        self.base_channels = int(base_channels)
        self.channel_multipliers = tuple(int(m) for m in channel_multipliers)
        if len(self.channel_multipliers) != 4:
            raise ValueError("channel_multipliers must have four entries, one per resolution")
        self.embed_dim = int(embed_dim)
        cs = [self.base_channels * m for m in self.channel_multipliers]

        self.mapping_timestep_embed = FourierFeatures(1, MAPPING_FOURIER)
        self.mapping = nn.Sequential(
            ResLinearBlock(embed_dim + MAPPING_FOURIER, MAPPING_WIDTH, MAPPING_WIDTH),
            ResLinearBlock(MAPPING_WIDTH, MAPPING_WIDTH, MAPPING_WIDTH, is_last=True))
        self.register_buffer("autoencoder_scale", torch.tensor(float(autoencoder_scale)))
        if guidance_range is not None:
            self.register_buffer("guidance_range", torch.tensor([float(w) for w in guidance_range]))
        if distilled_steps is not None:
            self.register_buffer("distilled_timesteps", uniform_timesteps(int(distilled_steps)))
        self.timestep_embed = FourierFeatures(1, PLANE_FOURIER)

        def conv(c_in, c_mid, c_out, is_last=False):
            return ResModConvBlock(MAPPING_WIDTH, c_in, c_mid, c_out, is_last)

        def stage(c_in, c, c_out, n_blocks):
            """n_blocks (conv, attention) pairs; the first takes c_in, the last gives c_out."""
            layers = []
            for i in range(n_blocks):
                out = c_out if i == n_blocks - 1 else c
                layers += [conv(c_in if i == 0 else c, c, out), SelfAttention2d(out, _heads(out))]
            return layers

        down = nn.AvgPool2d(2)
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        level3 = SkipBlock(down, *stage(cs[2], cs[3], cs[2], 8), up)
        level2 = SkipBlock(down, *stage(cs[1], cs[2], cs[2], 4), level3,
                           *stage(cs[2] * 2, cs[2], cs[1], 4), up)
        level1 = SkipBlock(down, *stage(cs[0], cs[1], cs[1], 4), level2,
                           *stage(cs[1] * 2, cs[1], cs[0], 4), up)
        self.net = CondSequential(
            conv(4 + PLANE_FOURIER, cs[0], cs[0]), conv(cs[0], cs[0], cs[0]),
            conv(cs[0], cs[0], cs[0]), conv(cs[0], cs[0], cs[0]),
            level1,
            conv(cs[0] * 2, cs[0], cs[0]), conv(cs[0], cs[0], cs[0]),
            conv(cs[0], cs[0], cs[0]), conv(cs[0], cs[0], 4, is_last=True))

        # the release's initialisation: residual branches scaled by 1/sqrt(2)
        with torch.no_grad():
            for p in [*self.mapping.parameters(), *self.net.parameters()]:
                p.mul_(0.5 ** 0.5)
        # made last, so that the other weights of a seeded new net are those it has without it
        self.guidance_embed = GuidanceEmbedding(embed_dim + MAPPING_FOURIER) if guidance_input else None

    @property
    def guidance_input(self) -> bool:
        return self.guidance_embed is not None

    @property
    def distilled_guidance(self) -> tuple[float, float] | None:
        """(lo, hi): the guidance weights this student was distilled to give in one row."""
        buffer = self._buffers.get("guidance_range")
        return None if buffer is None else (float(buffer[0]), float(buffer[1]))

    @property
    def distilled_steps(self) -> int | None:
        buffer = self._buffers.get("distilled_timesteps")
        return None if buffer is None else int(buffer.shape[0])

    @property
    def config(self) -> dict:
        """The constructor's arguments but the latent scale; the distillation records only when
        present, so that a plain net's config is what it always was."""
        config = {"base_channels": self.base_channels,
                  "channel_multipliers": list(self.channel_multipliers),
                  "embed_dim": self.embed_dim}
        if self.guidance_input:
            config["guidance_input"] = True
        if self.distilled_guidance is not None:
            config["guidance_range"] = list(self.distilled_guidance)
        if self.distilled_steps is not None:
            config["distilled_steps"] = self.distilled_steps
        return config

    def mapping_cond(self, t: torch.Tensor, embed: torch.Tensor,
                     guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The 1024-wide vector that modulates every conv block."""
        embed = F.normalize(embed, dim=-1) * embed.shape[-1] ** 0.5
        inputs = torch.cat([embed, self.mapping_timestep_embed(t[:, None])], dim=1)
        if self.guidance_embed is not None:
            w = torch.ones_like(t) if guidance is None else torch.as_tensor(guidance).to(t).expand_as(t)
            inputs = inputs + self.guidance_embed(w)
        return self.mapping(inputs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """v for noised latents x at times t under embeddings embed; `guidance` (one weight per
        row, or one for all) reaches only a net with a guidance input, which reads None as 1."""
        cond = self.mapping_cond(t, embed, guidance)
        planes = self.timestep_embed(t[:, None])[..., None, None].expand(
            -1, -1, x.shape[2], x.shape[3])
        return self.net(torch.cat([x, planes.to(x.dtype)], dim=1), cond)


RECORDS = ("guidance_range", "distilled_timesteps")  # buffers that say what a student is


def with_records(unet: CCLDUNet, **changes) -> CCLDUNet:
    """A copy of `unet` with its config changed by `changes` (`guidance_input`,
    `guidance_range`, `distilled_steps`; None removes one): the weights are `unet`'s, a new
    guidance input starts at zero, so the copy computes exactly what `unet` does until it is
    trained. What a student starts from in `ccld distill`."""
    config = {**unet.config, "autoencoder_scale": float(unet.autoencoder_scale)}
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None and v is not False}
    new = CCLDUNet(**config).to(unet.autoencoder_scale.device)
    weights = {k: v for k, v in unet.state_dict().items() if k not in RECORDS}
    if not new.guidance_input:
        weights = {k: v for k, v in weights.items() if not k.startswith("guidance_embed.")}
    missing, unexpected = new.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(k in RECORDS or k.startswith("guidance_embed.") for k in missing), missing
    return new.train(unet.training)


def widened(unet: CCLDUNet, factor: int, seed: int = 0, jitter: float = 0.1) -> CCLDUNet:
    """A copy of `unet` with `factor` times the channels in every convolution and attention
    layer, computing what `unet` computes: a wider student that starts out as its teacher.

    Every feature map of the wider net holds each of the original's channels `factor` times
    (Net2Net's widening, Chen et al. 2016). The GroupNorm(1) layers see the same mean and
    variance over a map whose channels all repeat equally often, so they normalise as before;
    a layer reading repeated channels splits each original weight among the copies. The split
    is uneven (`jitter` times the layer's RMS weight, seeded, summing to zero over the copies),
    which changes nothing the net computes but lets the copies learn apart: evenly split
    copies would get equal gradients and stay copies forever. Attention heads are repeated
    whole, with the queries rescaled for the wider heads' dot products. The mapping network,
    which has no channels, and the 4-channel input and output stay as they are.
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"widen by a whole factor of at least 1 (got {factor})")
    factor = int(factor)
    config = {**unet.config, "autoencoder_scale": float(unet.autoencoder_scale),
              "base_channels": unet.base_channels * factor}
    for record in ("guidance_range", "distilled_steps"):  # given below, as `unet` holds them
        config.pop(record, None)
    new = CCLDUNet(**config, guidance_range=unet.distilled_guidance,
                   distilled_steps=unet.distilled_steps).to(unet.autoencoder_scale.device)
    new.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith("net.")},
                        strict=False)
    generator = torch.Generator().manual_seed(seed)

    def tile(c):  # the new channels' originals: each channel `factor` times
        return torch.arange(c).repeat(factor)

    def read(weight, m_in):
        """weight[:, m_in], each original column split unevenly among its copies."""
        copies = torch.bincount(m_in, minlength=weight.shape[1])[m_in].to(weight)
        out = weight[:, m_in] / copies.view(1, -1, *[1] * (weight.dim() - 2))
        if int(copies.max()) == 1:
            return out
        noise = torch.randn(out.shape, generator=generator).to(weight)
        mean = torch.zeros_like(weight).index_add_(1, m_in, noise)[:, m_in] / copies.view(
            1, -1, *[1] * (weight.dim() - 2))
        return out + jitter * weight.pow(2).mean().sqrt() * (noise - mean)

    def linear_like(old, new_layer, m_out, m_in, scale=1.0):
        with torch.no_grad():
            new_layer.weight.copy_(read(old.weight[m_out], m_in) * scale)
            if old.bias is not None:
                new_layer.bias.copy_(old.bias[m_out] * scale)

    def modulation(old, new_mod, m):
        c = old.layer.weight.shape[0] // 2
        with torch.no_grad():
            new_mod.layer.weight.copy_(old.layer.weight[torch.cat([m, m + c])])

    def conv_block(old, new_block, m):
        o, n = old.main, new_block.main
        m_mid = tile(o[0].out_channels)
        linear_like(o[0], n[0], m_mid, m)
        modulation(o[2], n[2], m_mid)
        if isinstance(old.skip, nn.Identity):
            m_out = m  # the residual adds the block's input as it is
        elif old.is_last:
            m_out = torch.arange(o[4].out_channels)
        else:
            m_out = tile(o[4].out_channels)
        linear_like(o[4], n[4], m_out, m_mid)
        if not old.is_last:
            modulation(o[6], n[6], m_out)
        if not isinstance(old.skip, nn.Identity):
            linear_like(old.skip, new_block.skip, m_out, m)
        return m_out

    def attention(old, new_att, m):
        c = old.qkv_proj.out_channels // 3
        heads, new_heads = old.n_head, new_att.n_head
        width, new_width = c // heads, c * factor // new_heads
        if new_heads % heads or new_width % width:
            raise ValueError(f"cannot repeat {heads} attention heads of {width} channels as "
                             f"{new_heads} of {new_width}")
        j = torch.arange(c * factor)
        m_head = (j // new_width * heads // new_heads) * width + j % new_width % width
        with torch.no_grad():
            new_att.norm.weight.copy_(old.norm.weight[m])
            new_att.norm.bias.copy_(old.norm.bias[m])
        # each original channel appears new_width / width times in a head's dot products
        q_scale = (width / new_width) ** 0.5
        qkv = torch.cat([m_head, m_head + c, m_head + 2 * c])
        linear_like(old.qkv_proj, new_att.qkv_proj, qkv, m)
        with torch.no_grad():
            new_att.qkv_proj.weight[:c * factor] *= q_scale
            new_att.qkv_proj.bias[:c * factor] *= q_scale
        linear_like(old.out_proj, new_att.out_proj, m, m_head)
        return m

    def sequence(old_seq, new_seq, m):
        for old, new_layer in zip(old_seq, new_seq):
            if isinstance(old, ResModConvBlock):
                m = conv_block(old, new_layer, m)
            elif isinstance(old, SelfAttention2d):
                m = attention(old, new_layer, m)
            elif isinstance(old, SkipBlock):
                main = sequence(old.main, new_layer.main, m)
                m = torch.cat([main, m + (int(main.max()) + 1)])
            # pooling and upsampling keep the channels
        return m

    sequence(unet.net, new.net, torch.arange(unet.net[0].main[0].in_channels))
    return new.train(unet.training)


# Loading: bare state dicts, Lightning training checkpoints, safetensors

# (base_channels, multipliers) of the published nets, used to name an inferred architecture the
# way its authors did; only the products base * multiplier matter to the weights.
KNOWN_ARCHITECTURES = [
    (192, (1, 1, 2, 2)),  # distilled WikiArt student
    (192, (4, 4, 8, 8)),  # WikiArt teacher, yfcc
    (128, (4, 4, 8, 8)),  # danbooru
]
_WIDTH_KEYS = (  # the first conv of each resolution level gives that level's width
    "net.0.main.0.weight",
    "net.4.main.1.main.0.weight",
    "net.4.main.9.main.1.main.0.weight",
    "net.4.main.9.main.9.main.1.main.0.weight",
)
_EMBED_KEY = "mapping.0.main.0.weight"
_GUIDANCE_KEY = "guidance_embed.linear.weight"
# Bounds on what shapes may claim, far beyond the published nets (widths up to 1536, a 512-wide
# CLOOB embedding, a handful of distilled steps): a file's claims past them are damage.
MAX_WIDTH = 16384
MAX_EMBED_DIM = 16384
MAX_DISTILLED_STEPS = 1000


def is_unet_state_dict(sd: dict) -> bool:
    return _WIDTH_KEYS[0] in sd


def unet_state_dict(obj: dict) -> dict:
    """The U-Net weights inside a loaded file: bare, or a Lightning checkpoint (EMA weights)."""
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        for prefix in ("model_ema.", "model."):  # the EMA weights are the ones to sample with
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if sub:
                return sub
        obj = sd
    return obj


def infer_unet_config(sd: dict, source: str | os.PathLike = "checkpoint") -> dict:
    """base_channels, channel_multipliers and embed_dim from the tensor shapes alone, and the
    distillation records (guidance input, guidance range, distilled steps) where present."""
    from ..io.checkpoints import describe_foreign_state_dict

    missing = [k for k in (*_WIDTH_KEYS, _EMBED_KEY) if k not in sd]
    if missing:
        kind = describe_foreign_state_dict(sd)
        if any(k.startswith("net.0.main.0.") for k in sd):
            raise CCLDError(f"{source}: an incomplete CCLD U-Net (no {missing[0]}): the file is "
                            "cut short or holds part of a net; download or export it again")
        raise CCLDError(f"{source}: not a CCLD U-Net checkpoint ({kind}; no {missing[0]}); "
                        "pass the diffusion model file, e.g. model_student.ckpt")
    _check_architecture_shapes(sd, source)
    widths = [int(sd[k].shape[0]) for k in _WIDTH_KEYS]
    embed_dim = int(sd[_EMBED_KEY].shape[1]) - MAPPING_FOURIER
    for base, mults in KNOWN_ARCHITECTURES:
        if [base * m for m in mults] == widths:
            break
    else:
        base = math.gcd(*widths)
        mults = tuple(w // base for w in widths)
    config = {"base_channels": base, "channel_multipliers": list(mults), "embed_dim": embed_dim}
    if _GUIDANCE_KEY in sd:
        config["guidance_input"] = True
    if "guidance_range" in sd:
        config["guidance_range"] = [float(w) for w in sd["guidance_range"].float().tolist()]
    if "distilled_timesteps" in sd:
        config["distilled_steps"] = int(sd["distilled_timesteps"].shape[0])
    return config


def _check_architecture_shapes(sd: dict, source) -> None:
    """The shapes the architecture is read from are the U-Net's kinds of tensor, and within
    bounds: a damaged or hostile file names a sane net or none."""
    from ..io.checkpoints import require_tensors

    read = [*_WIDTH_KEYS, _EMBED_KEY, *(k for k in RECORDS if k in sd)]
    require_tensors({k: sd[k] for k in read}, source, "U-Net checkpoint")

    def shape(key):
        return list(sd[key].shape)

    fix = "the file is damaged or not a CCLD U-Net"
    for i, key in enumerate(_WIDTH_KEYS):
        got = shape(key)
        if not (len(got) == 4 and got[2:] == [3, 3] and got[0] >= 1
                and (i or got[1] == 4 + PLANE_FOURIER)):
            want = f"[width, {4 + PLANE_FOURIER if not i else 'channels'}, 3, 3]"
            raise CCLDError(f"{source}: its tensor {key!r} has the shape {got}, not the "
                            f"U-Net's {want}; {fix}")
        if got[0] > MAX_WIDTH:
            raise CCLDError(f"{source}: its tensor {key!r} claims a U-Net level {got[0]} "
                            f"channels wide, more than {MAX_WIDTH}; {fix}")
    got = shape(_EMBED_KEY)
    if not (len(got) == 2 and got[0] == MAPPING_WIDTH
            and 1 <= got[1] - MAPPING_FOURIER <= MAX_EMBED_DIM):
        raise CCLDError(f"{source}: its tensor {_EMBED_KEY!r} has the shape {got}, not the "
                        f"U-Net's [{MAPPING_WIDTH}, embed_dim + {MAPPING_FOURIER}] (embed_dim "
                        f"1 to {MAX_EMBED_DIM}); {fix}")
    if "guidance_range" in sd and shape("guidance_range") != [2]:
        raise CCLDError(f"{source}: its guidance_range has the shape {shape('guidance_range')}, "
                        f"not [2] (low, high); {fix}")
    if "distilled_timesteps" in sd:
        got = shape("distilled_timesteps")
        if not (len(got) == 1 and 1 <= got[0] <= MAX_DISTILLED_STEPS):
            raise CCLDError(f"{source}: its distilled_timesteps has the shape {got}, not 1 to "
                            f"{MAX_DISTILLED_STEPS} steps; {fix}")


def checked_unet_weights(sd: dict, source) -> dict:
    """`sd` as the U-Net takes it (`ccld.io.checkpoints.checked_weights`: float32, finite),
    its latent scale first checked on its own, so that a bad one is named as such."""
    from ..io.checkpoints import checked_weights, require_latent_scale, require_tensors

    require_tensors(sd, source, "U-Net checkpoint")
    if "autoencoder_scale" in sd:
        require_latent_scale(sd["autoencoder_scale"], source, "autoencoder_scale buffer")
    return checked_weights(sd, source, "U-Net checkpoint")


def unet_from_state_dict(sd: dict, source: str | os.PathLike = "checkpoint",
                         config: dict | None = None) -> CCLDUNet:
    """A frozen U-Net holding `sd` (checked and converted by `checked_unet_weights`), of the
    architecture `config` or, by default, the one the tensor shapes say."""
    sd = checked_unet_weights(sd, source)
    config = infer_unet_config(sd, source) if config is None else config
    with empty_weights():  # no wasted random init: every weight comes from the file
        unet = CCLDUNet(**config)
    sd = dict(sd)
    sd.setdefault("autoencoder_scale", torch.tensor(1.0))  # absent from some exports
    wanted = unet.state_dict().keys()
    missing = [k for k in wanted if k not in sd]
    if missing and any(k.startswith("net.0.main.0.") for k in sd):
        raise CCLDError(f"{source}: an incomplete CCLD U-Net: {len(missing)} of its {len(wanted)} "
                        f"weights are missing (the first: {missing[0]}); the file is cut short or "
                        "holds part of a net: download or export it again")
    try:
        unet.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n\t")[1:2]).strip() or str(e).splitlines()[0]
        raise CCLDError(f"{source}: weights do not fit the U-Net {config} ({detail[:200]}); "
                        "the file is damaged or not a CCLD U-Net") from None
    return unet.eval().requires_grad_(False)


def unet_weights(path: str | os.PathLike, what: str = "U-Net checkpoint", *,
                 cache: bool = True) -> tuple[dict, dict]:
    """(state dict, architecture) of any U-Net file. A `.ckpt`/`.pt` is converted once into the
    converted-weights cache, its convolution kernels stored channels-last (the fast path's
    layout, which they then take without a copy), and memory-mapped from there; a
    `.safetensors` is mapped as it is. `cache=False` maps the `.ckpt` itself (as fast): for a
    caller that lays the weights out anew whatever their layout (rounding them to bf16, moving
    them to a GPU), for whom a copy would only cost its writing."""
    from ..io.checkpoints import SAFETENSORS_SUFFIXES, load_torch_file, map_safetensors_file
    from ..io.weights_cache import load_converted

    if str(path).endswith(SAFETENSORS_SUFFIXES):  # already a fast format: mapped as it is
        sd = map_safetensors_file(path, what)
        return sd, infer_unet_config(sd, path)

    def read():
        sd = unet_state_dict(load_torch_file(path, what, mmap=True))
        return sd, {"config": infer_unet_config(sd, path)}

    def convert():
        sd, metadata = read()
        sd = checked_unet_weights(sd, path)  # stored as the net takes it: float32, finite
        unet_from_state_dict(sd, path, metadata["config"])  # cheap: a misfit is never stored
        return sd, metadata

    if cache:
        sd, metadata = load_converted("unet", [Path(path)], [], convert,
                                      channels_last=lambda name, t: True, maps_sources=True)
    else:
        sd, metadata = read()
    return sd, metadata["config"]


def stored_rounded_weights(path: str | os.PathLike, unet: CCLDUNet, dtype: torch.dtype) -> dict:
    """`unet`'s conv and linear weights rounded to `dtype`, channels-last (`rounded_weights`),
    from the converted cache: made from the file at `path` once, memory-mapped afterwards. A
    bf16 painting then neither reads the float32 weights nor holds both."""
    from ..io.weights_cache import load_converted
    from . import rounded_weights

    kind = f"unet_{str(dtype).removeprefix('torch.')}"

    def convert():
        return rounded_weights(unet, dtype, torch.channels_last), {}

    return load_converted(kind, [Path(path)], [], convert, channels_last=lambda name, t: True)[0]


def load_unet(path: str | os.PathLike, what: str = "U-Net checkpoint", *,
              stored_layout: bool = False, cache: bool = True) -> CCLDUNet:
    """A CCLD U-Net from a bare state dict, a Lightning checkpoint or a safetensors file, its
    weights contiguous as the reference's (so its arithmetic is the reference's, bit for bit);
    `stored_layout` leaves them as loaded (channels-last from the converted cache), for a
    caller that lays the net out itself, as `CCLDPipeline` does; `cache` as `unet_weights`."""
    sd, config = unet_weights(path, what, cache=cache)
    unet = unet_from_state_dict(sd, path, config)
    return unet if stored_layout else unet.to(memory_format=torch.contiguous_format)
