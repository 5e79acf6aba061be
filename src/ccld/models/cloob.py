"""CLOOB: the frozen text and image encoders whose embeddings condition the diffusion model.

A plain PyTorch version of the released JAX/Haiku CLOOB (crowsonkb/cloob-training), computing
what its PyTorch port (`model_pt.py`) computes, with the same state-dict keys, so a state dict
saved by the port loads here unchanged. Both encoders are pre-LayerNorm transformers whose first
position, projected and L2-normalised, is the embedding.

Configs use the schema of the released `pretrained_configs/*.json`; the two published
checkpoints' configs ship in `cloob_configs/`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CCLDError, give
from . import empty_weights, meta_aware_randn, tokenizer

CONFIG_DIR = Path(__file__).resolve().parent / "cloob_configs"
_URL_BASE = "https://the-eye.eu/public/AI/models/cloob/"
# name -> where the released Haiku pickle lives and its sha256 (also the tail of its file name)
BUILTIN_CONFIGS = {
    name: {"url": f"{_URL_BASE}{name}-{sha}.pkl", "sha256": sha}
    for name, sha in [
        ("cloob_laion_400m_vit_b_16_16_epochs",
         "405a3c31572e0a38f8632fa0db704d0e4521ad663555479f86babd3d178b1892"),
        ("cloob_laion_400m_vit_b_16_32_epochs",
         "646f61628eb4bc03a01ce5c23b727a348105f0405b6037a329da062739a06441"),
    ]
}


# The model


class SelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, query_mask=None):
        n, s, d = x.shape
        x = self.norm(x)
        q, k, v = (lin(x).view(n, s, self.n_heads, -1).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)  # scaled by 1/sqrt(head size), as released
        if query_mask is not None:
            # The released model applies its text padding mask to the *queries*, not the keys (the
            # JAX code comments that this is a bug): a masked query row gets -1e30 for every key
            # logit, so that position attends uniformly to all positions, padding included, and
            # every position still serves as a key. Its embeddings were trained that way, so this
            # reproduces it: uniform attention is exactly the mean of the values.
            y = torch.where(query_mask[:, None, :, None], y, v.mean(dim=2, keepdim=True))
        return self.out(y.transpose(1, 2).reshape(n, s, d))


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear_0 = nn.Linear(d_model, d_ff)
        self.linear_1 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        # Exact erf GELU, as the PyTorch port (and so the reference embeddings) use; the JAX
        # original used the tanh approximation, which differs by about 1e-3 per activation.
        return self.linear_1(F.gelu(self.linear_0(self.norm(x))))


class Block(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads)
        self.ff = FeedForward(d_model, 4 * d_model)

    def forward(self, x, query_mask=None):
        x = x + self.attn(x, query_mask)
        return x + self.ff(x)


_WEIGHTS_LOCK = threading.Lock()  # a tower loads its weights once, whichever thread needs them


def _load_weights_first(tower, *args):
    tower.load_weights()


def _embedding(num: int, dim: int) -> nn.Embedding:
    # The same N(0, 1) table as nn.Embedding's own init, which is slow on the meta device.
    return nn.Embedding(num, dim, _weight=meta_aware_randn(num, dim))


class Encoder(nn.Module):
    """The transformer both encoders share: blocks, then the first position projected.

    Built on the meta device, a tower can hold its (memory-mapped) weights and take them up only
    when first needed (`defer_weights`): called, `state_dict()`, `load_state_dict()` or
    `load_weights()`. Until then its parameters are meta tensors, and moves (`.to(...)`) wait.
    So text prompts never read the image tower's weights, nor image prompts the text tower's.
    """

    def __init__(self, d_embed, n_layers, d_model, n_heads, seq_len):
        super().__init__()
        # An Embedding only to hold a [seq_len, d_model] table under the key `pos_embed.weight`.
        self.pos_embed = _embedding(seq_len, d_model)
        self.layers = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.proj = nn.Linear(d_model, d_embed)
        self._deferred = None  # (weights, the _apply functions seen since, hook handles)

    def defer_weights(self, weights: dict[str, torch.Tensor] | Callable[[], dict]) -> None:
        """Takes `weights` (this tower's state dict, shapes already checked, or a function that
        makes it) on first use."""
        hooks = [self.register_forward_pre_hook(_load_weights_first),
                 self.register_load_state_dict_pre_hook(_load_weights_first)]
        self._deferred = (weights, [], hooks)

    def load_weights(self) -> Encoder:
        """Takes up the deferred weights now, if any; returns the tower."""
        if self._deferred is None:
            return self
        with _WEIGHTS_LOCK:
            if self._deferred is None:  # another thread was first
                return self
            weights, moves, hooks = self._deferred
            # Outside any caller's inference mode: these become the tower's ordinary parameters.
            with torch.inference_mode(False), torch.no_grad():
                if callable(weights):
                    weights = weights()  # (a refusal leaves the tower waiting, to refuse again)
                for hook in hooks:
                    hook.remove()
                self.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
                for fn in moves:
                    super()._apply(fn)
            self._deferred = None  # last: until now other threads wait on the lock
        return self

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() ... on a tower still waiting for its weights would meet meta
        # tensors, which cannot be moved; the weights make the same moves when they arrive.
        if self._deferred is not None:
            with _WEIGHTS_LOCK:
                if self._deferred is not None:
                    self._deferred[1].append(fn)
                    return self
        return super()._apply(fn, recurse)

    def state_dict(self, *args, **kwargs):
        self.load_weights()  # a saved model holds both towers, used or not
        return super().state_dict(*args, **kwargs)

    def transform(self, x, query_mask=None):
        x = x + self.pos_embed.weight
        for layer in self.layers:
            x = layer(x, query_mask)
        return F.normalize(self.proj(x[:, 0]), dim=-1)  # no final LayerNorm in this model


class TextEncoder(Encoder):
    def __init__(self, d_embed, n_layers, d_model, n_heads, text_size, vocab_size):
        super().__init__(d_embed, n_layers, d_model, n_heads, text_size)
        self.eot_token = vocab_size - 1
        self.embed = _embedding(vocab_size, d_model)

    def forward(self, tokens):
        eot = tokens == self.eot_token
        # True up to and including the first end-of-text token, False after it.
        query_mask = eot.cumsum(-1) - eot.long() == 0
        # The embedding is read at position 0, the start token (not at the end token, as CLIP).
        return self.transform(self.embed(tokens), query_mask)


class ViTImageEncoder(Encoder):
    def __init__(self, d_embed, n_layers, d_model, n_heads, image_size, patch_size, input_channels):
        super().__init__(d_embed, n_layers, d_model, n_heads, (image_size // patch_size) ** 2 + 1)
        self.image_size = image_size
        self.embed = nn.Conv2d(input_channels, d_model, patch_size, patch_size, bias=False)
        self.class_embed = nn.Parameter(meta_aware_randn(d_model).mul_(d_model**-0.5))  # fast on meta

    def forward(self, images):
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1)
        return self.transform(x)


class CLOOB(nn.Module):
    """Both encoders, with the preprocessing each expects."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config = validate_cloob_config(config)
        c, ci, ct = config, config["image_encoder"], config["text_encoder"]
        self.image_encoder = ViTImageEncoder(c["d_embed"], ci["n_layers"], ci["d_model"],
                                             ci["n_heads"], ci["image_size"], ci["patch_size"],
                                             ci["input_channels"])
        self.text_encoder = TextEncoder(c["d_embed"], ct["n_layers"], ct["d_model"], ct["n_heads"],
                                        ct["text_size"], ct["vocab_size"])
        # From the config, not buffers: the port's state dicts lack them, and the loaders build
        # the model on the meta device, where a buffer would have no values.
        self.mean, self.std = ci["normalize"]["mean"], ci["normalize"]["std"]
        # Where the weights are, or go when a tower takes up deferred weights: moved with them.
        self._placement = torch.empty(0)

    @property
    def device(self) -> torch.device:
        return self._placement.device

    def _apply(self, fn, recurse=True):
        self._placement = fn(self._placement)
        return super()._apply(fn, recurse)

    def defer_weights(self, state_dict: dict[str, torch.Tensor],
                      source: str = "CLOOB checkpoint") -> None:
        """Keeps `state_dict` (shapes already checked); each tower takes up its part on first
        use (see `Encoder`)."""
        for name in TOWERS:
            self.defer_tower_weights(name, tower_state_dict(state_dict, name), source)

    def defer_tower_weights(self, name: str, weights: dict | Callable[[], dict],
                            source: str = "CLOOB checkpoint") -> None:
        """One tower's weights (or a function making them, on the CPU), taken up on first use,
        as `checked_weights` gives them (float32, finite: checked then, the tower's weights
        being read only then; `source` names the file in a refusal)."""
        from ..io.checkpoints import checked_weights

        device = "cpu" if callable(weights) else next(iter(weights.values())).device

        def checked() -> dict:
            return checked_weights(weights() if callable(weights) else weights, source,
                                   "CLOOB checkpoint", prefix=f"{name}.")

        getattr(self, name).defer_weights(checked)
        self._placement = torch.empty(0, device=device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the per-channel standardised input of the image encoder."""
        mean = images.new_tensor(self.mean)[:, None, None]
        return (images - mean) / images.new_tensor(self.std)[:, None, None]

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return tokenizer.tokenize(texts, self.config["text_encoder"]["text_size"])

    def encode_text(self, texts: str | list[str]) -> torch.Tensor:
        """[n, d_embed] unit vectors for n texts."""
        return self.text_encoder(self.tokenize(texts).to(self.device))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[n, d_embed] unit vectors for images [n, C, H, W] in [0, 1], already resized."""
        size = self.image_encoder.image_size
        if images.ndim != 4 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"encode_image expects images [n, C, {size}, {size}] in [0, 1], "
                             f"got {list(images.shape)}; resize them first")
        encoder = self.image_encoder.load_weights()
        weight = encoder.embed.weight
        return encoder(self.normalize(images.to(weight.device, weight.dtype)))


# Configs

_REQUIRED = {
    "": ["d_embed", "image_encoder", "text_encoder"],
    "image_encoder": ["type", "image_size", "input_channels", "normalize", "patch_size",
                      "n_layers", "d_model", "n_heads"],
    "text_encoder": ["type", "tokenizer", "text_size", "vocab_size", "n_layers", "d_model",
                     "n_heads"],
}


# The largest size of each kind a config may give (ViT-B/16's are 512, 224, 3, 16, 12, 768, 12;
# its text tower's 77 tokens of a 49408-word vocabulary): room for larger nets, none for sizes
# that only try to allocate
_MOST = {"d_embed": 8192, "image_size": 2048, "input_channels": 16, "patch_size": 256,
         "n_layers": 128, "d_model": 16384, "n_heads": 512, "text_size": 4096,
         "vocab_size": 1_000_000}


def validate_cloob_config(config: dict, source: str = "CLOOB config") -> dict:
    """Checks the keys the model needs; one-line CCLDError naming the first problem."""
    fix = "use the schema of the released CLOOB configs (see ccld/models/cloob_configs/)"
    if not isinstance(config, dict):
        raise CCLDError(f"{source}: a CLOOB config is a JSON object, not a "
                        f"{type(config).__name__}; {fix}")
    for section, keys in _REQUIRED.items():
        part = config[section] if section else config
        if not isinstance(part, dict):
            raise CCLDError(f"{source}: '{section}' is not an object; {fix}")
        for key in keys:
            if key not in part:
                raise CCLDError(f"{source}: missing '{section + '.' if section else ''}{key}'; {fix}")
    ci, ct = config["image_encoder"], config["text_encoder"]
    for what, got, want in [("image_encoder.type", ci["type"], "ViT"),
                            ("text_encoder.type", ct["type"], "transformer"),
                            ("text_encoder.tokenizer", ct["tokenizer"], "clip")]:
        if got != want:
            raise CCLDError(f"{source}: {what} is {got!r}, but ccld supports only {want!r}")
    sizes = [("d_embed", config), *((f"{section}.{key}", config[section]) for section, keys in
             [("image_encoder", ("image_size", "input_channels", "patch_size", "n_layers",
                                 "d_model", "n_heads")),
              ("text_encoder", ("text_size", "vocab_size", "n_layers", "d_model", "n_heads"))]
             for key in keys)]
    for name, part in sizes:
        value = part[name.rpartition(".")[2]]
        most = _MOST[name.rpartition(".")[2]]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise CCLDError(f"{source}: {name} is {value!r:.40}; it must be a whole number from 1 "
                            f"to {most}; {fix}")
    for section in (ci, ct):
        if section["d_model"] % section["n_heads"]:
            name = "image_encoder" if section is ci else "text_encoder"
            raise CCLDError(f"{source}: {name}.d_model {section['d_model']} is not divisible by "
                            f"its n_heads {section['n_heads']}; {fix}")
    if ci["image_size"] % ci["patch_size"]:
        raise CCLDError(f"{source}: image_encoder.image_size {ci['image_size']} is not a multiple "
                        f"of its patch_size {ci['patch_size']}; {fix}")
    norm = ci["normalize"]
    if not (isinstance(norm, dict) and len(norm.get("mean", ())) == ci["input_channels"]
            and len(norm.get("std", ())) == ci["input_channels"]):
        raise CCLDError(f"{source}: image_encoder.normalize needs 'mean' and 'std' lists of "
                        f"input_channels ({ci['input_channels']}) numbers; {fix}")
    return config


def _read_config_file(path: Path) -> dict:
    from ..io.jsontext import JSONInputError, parse

    try:
        with open(path, "rb") as f:
            config = parse(f.read(1 << 20))  # a config is about a kilobyte; bounded depth
    except (OSError, UnicodeDecodeError) as e:
        raise CCLDError(f"{path}: cannot read the CLOOB config ({e.__class__.__name__}); "
                        "check the path") from None
    except JSONInputError as e:
        why = str(e)
        if why.startswith("not JSON (") and why.endswith(")"):
            why = why[len("not JSON ("):-1]
        raise CCLDError(f"{path}: not valid JSON ({why}); fix the file or pass a built-in "
                        f"{give('cloob_config')} ({', '.join(BUILTIN_CONFIGS)})") from None
    config = validate_cloob_config(config, str(path))
    config.setdefault("name", path.stem)
    return config


def resolve_cloob_config(config: str | os.PathLike | dict | None = None,
                         checkpoint_path: str | os.PathLike | None = None) -> dict:
    """A CLOOB config from a built-in name, a JSON file, a dict, or (None) the checkpoint's name.

    The released checkpoints are named `<builtin name>-<sha256>.pkl`, which is how None works.
    """
    if isinstance(config, dict):
        return validate_cloob_config(dict(config))
    if config is None:
        stem = Path(checkpoint_path).name if checkpoint_path is not None else ""
        for name in sorted(BUILTIN_CONFIGS, key=len, reverse=True):
            if stem.startswith(name):
                return resolve_cloob_config(name)
        where = f"{checkpoint_path}: " if checkpoint_path is not None else ""
        raise CCLDError(f"{where}cannot tell which CLOOB config this checkpoint needs from its "
                        f"name; pass {give('cloob_config')} (one of {', '.join(BUILTIN_CONFIGS)}, "
                        "or a JSON config file)")
    name = os.fspath(config)
    if name in BUILTIN_CONFIGS:
        return _read_config_file(CONFIG_DIR / f"{name}.json")
    path = Path(name).expanduser()
    if path.is_file():
        return _read_config_file(path)
    raise CCLDError(f"unknown CLOOB config {name!r}: neither a built-in one "
                    f"({', '.join(BUILTIN_CONFIGS)}) nor an existing JSON file")


# Weights

# Haiku module path (below the encoder's base module) -> PyTorch module path, and each Haiku
# parameter name -> (PyTorch parameter name, layout change). Haiku's Linear keeps w as [in, out],
# PyTorch's weight is [out, in]; its Conv2D kernel is HWIO, PyTorch's OIHW.
_LINEAR = {"w": ("weight", torch.t), "b": ("bias", None)}
_LAYER_NORM = {"scale": ("weight", None), "offset": ("bias", None)}
_MODULES = {
    "": ("", {"class_embed": ("class_embed", None)}),
    "embed": ("embed", {"w": ("weight", lambda a: a.permute(3, 2, 0, 1)),  # ViT patch conv
                        "embeddings": ("weight", None)}),  # text token table
    "pos_embed": ("pos_embed", {"w": ("weight", None)}),
    "proj": ("proj", _LINEAR),
    "self_attention/layer_norm": ("attn.norm", _LAYER_NORM),
    "self_attention/multi_head_attention/query": ("attn.query", _LINEAR),
    "self_attention/multi_head_attention/key": ("attn.key", _LINEAR),
    "self_attention/multi_head_attention/value": ("attn.value", _LINEAR),
    "self_attention/multi_head_attention/linear": ("attn.out", _LINEAR),
    "feed_forward/layer_norm": ("ff.norm", _LAYER_NORM),
    "feed_forward/linear_0": ("ff.linear_0", _LINEAR),
    "feed_forward/linear_1": ("ff.linear_1", _LINEAR),
}
_BASES = {"vi_t_image_encoder": "image_encoder", "text_encoder": "text_encoder"}
TOWERS = ("text_encoder", "image_encoder")


def _as_float_tensor(array, relayout, contiguous: bool = True) -> torch.Tensor:
    """A contiguous float32 tensor of a pickled float array (any precision or byte order) in
    PyTorch's layout, copied at most once (600 MB of them: a copy more is a second of a first
    run and a peak of memory); with `contiguous=False` a view where the layout differs (its
    shape is all a check needs)."""
    if array.dtype == numpy.float32 and array.flags.writeable and array.dtype.isnative:
        t = torch.from_numpy(array)  # the array's own memory, freed with the tensor
    else:
        t = torch.from_numpy(array.astype(numpy.float32))
    t = relayout(t) if relayout else t
    return t.contiguous() if contiguous else t


def convert_haiku_params(image_params: dict, text_params: dict,
                         source: str = "CLOOB checkpoint", release: bool = False,
                         towers: Sequence[str] = TOWERS) -> dict:
    """The PyTorch state dict of the released Haiku parameter trees (module path -> {name: array}).

    `release`: empty the trees while converting, so that each array is freed once converted and
    the pickle's arrays and their conversion are never both whole in memory. The towers not
    in `towers` come as views in PyTorch's shapes, not laid out: enough to check them.
    """
    from ..io.checkpoints import refuse_weight_type

    state = {}
    for tree in (image_params, text_params):
        for module_path in list(tree):
            params = tree.pop(module_path) if release else tree[module_path]
            base, _, rest = module_path.partition("/")
            layer = re.match(r"layer_(\d+)/(.*)", rest)
            if layer:
                rest = layer[2]
            if base not in _BASES or rest not in _MODULES or not isinstance(params, dict):
                raise CCLDError(f"{source}: unexpected Haiku module {module_path!r}; this is not "
                                "a CLOOB checkpoint ccld knows")
            module, names = _MODULES[rest]
            prefix = ".".join(filter(None, [_BASES[base], layer and f"layers.{layer[1]}", module]))
            for name in list(params):
                array = params.pop(name) if release else params[name]
                if name not in names:
                    raise CCLDError(f"{source}: unexpected Haiku parameter {module_path}/{name}; "
                                    "this is not a CLOOB checkpoint ccld knows")
                key, relayout = names[name]
                if not isinstance(array, numpy.ndarray):
                    raise CCLDError(f"{source}: {module_path}/{name} is a {type(array).__name__}, "
                                    "not an array of numbers; this is not a CLOOB checkpoint "
                                    "ccld knows")
                if array.dtype.kind != "f":  # the rule of every loader (checked_weights)
                    raise refuse_weight_type(source, f"{module_path}/{name}", array.dtype,
                                             "CLOOB checkpoint")
                state[f"{prefix}.{key}"] = _as_float_tensor(array, relayout,
                                                             _BASES[base] in towers)
    return state


def tower_state_dict(state_dict: dict, tower: str) -> dict:
    """The part of a CLOOB state dict that one tower holds, under the tower's own names."""
    prefix = f"{tower}."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def cloob_from_state_dict(config: dict, state_dict: dict, source: str = "CLOOB checkpoint") -> CLOOB:
    """A frozen CLOOB in eval mode holding `state_dict`, each tower taking up its weights on first
    use; CCLDError if the weights do not fit the config."""
    model = _checked_model(config, state_dict, source)
    model.defer_weights(state_dict, source)
    return model


def _checked_model(config: dict, state_dict: dict, source: str,
                   towers: Sequence[str] = TOWERS) -> CLOOB:
    """CLOOB of `config` on the meta device, frozen, once `state_dict` (the weights of `towers`)
    is checked to fit it."""
    from ..io.checkpoints import describe_foreign_state_dict, require_held, require_tensors

    if not any(k.startswith(("image_encoder.", "text_encoder.")) for k in state_dict):
        raise CCLDError(f"{source}: not a CLOOB checkpoint ({describe_foreign_state_dict(state_dict)}); "
                        f"pass the CLOOB release (.pkl) or its conversion with {give('cloob')}")
    # floating point, holding what they claim (cheap: no data read); converted and checked
    # finite when a tower takes them up
    require_tensors(state_dict, source, "CLOOB checkpoint")
    require_held(state_dict, source)
    with empty_weights():  # no wasted random init: the weights come from the file
        model = CLOOB(config)
    expected = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in towers}
    name = model.config.get("name", "given")
    fix = f"pass the right {give('cloob_config')}"
    for key, value in expected.items():
        got = state_dict.get(key)
        if got is None:
            raise CCLDError(f"{source}: does not match the CLOOB config {name} ({key}: expected "
                            f"{list(value.shape)}, missing); {fix}")
        if tuple(got.shape) != tuple(value.shape):
            raise CCLDError(f"{source}: does not match the CLOOB config {name} ({key}: expected "
                            f"{list(value.shape)}, got {list(got.shape)}); {fix}")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise CCLDError(f"{source}: does not match the CLOOB config {name} ({extra[0]}: not in "
                        f"the model, {len(extra)} such keys); {fix}")
    return model.eval().requires_grad_(False)


def haiku_pickle_state_dict(path: str | os.PathLike, towers: Sequence[str] = TOWERS) -> dict:
    """The PyTorch state dict of a released CLOOB Haiku pickle (the towers not in `towers`
    only as views, for checking; see `convert_haiku_params`)."""
    from ..io.checkpoints import load_array_pickle

    params = load_array_pickle(path).get("params")
    if not (isinstance(params, (tuple, list)) and len(params) == 2
            and all(isinstance(p, dict) for p in params)):
        raise CCLDError(f"{path}: a pickle, but not a CLOOB checkpoint (no 'params' pair of "
                        "image and text parameters)")
    return convert_haiku_params(*params, source=str(path), release=True, towers=towers)


def load_cloob(path: str | os.PathLike, config: str | os.PathLike | dict | None = None) -> CLOOB:
    """CLOOB from a released Haiku pickle (.pkl), a safetensors file, or a torch state dict.

    A pickle is converted into the converted-weights cache a tower at a time (the text tower
    when the pickle is first read, the image tower when first used) and memory-mapped from there
    afterwards; a safetensors file is memory-mapped as it is.
    """
    from ..io.checkpoints import SAFETENSORS_SUFFIXES, load_state_file, map_safetensors_file

    config = resolve_cloob_config(config, path)
    source = str(path)
    if source.endswith(".pkl"):
        return _load_release_pickle(Path(path), config)
    elif source.endswith(SAFETENSORS_SUFFIXES):
        state_dict = map_safetensors_file(path, "CLOOB checkpoint")
    else:
        state_dict = load_state_file(path, "CLOOB checkpoint")
    return cloob_from_state_dict(config, state_dict, source)


_CACHE_KINDS = {"text_encoder": "cloob_text", "image_encoder": "cloob_image"}


def _load_release_pickle(path: Path, config: dict) -> CLOOB:
    """CLOOB from a release pickle through the converted-weights cache, an entry per tower.

    A first load reads and checks the whole pickle and stores the text tower, which nearly
    every run uses; the image tower's conversion (more than half of the weights) is let go at
    once, and the pickle read again (a fraction of a second) to store it when it is first used.
    So a text-only run neither writes the image tower nor holds it in memory.
    """
    from ..io.checkpoints import checked_weights
    from ..io.weights_cache import load_converted, open_converted

    source = str(path)
    keyed_by = [json.dumps(config, sort_keys=True)]  # weights checked against exactly this config

    def stored_tower(tower: str, convert) -> dict:
        return load_converted(_CACHE_KINDS[tower], [path], keyed_by, convert)[0]

    def checked_tower(state_dict: dict, tower: str) -> dict:  # stored as the tower takes it
        return checked_weights(tower_state_dict(state_dict, tower), source, "CLOOB checkpoint",
                               prefix=f"{tower}.")

    def read_tower(tower: str) -> tuple[dict, dict]:
        return checked_tower(haiku_pickle_state_dict(path, [tower]), tower), {}

    stored = {t: open_converted(_CACHE_KINDS[t], [path], keyed_by) for t in TOWERS}
    stored = {t: entry[0] for t, entry in stored.items() if entry is not None}
    if not stored:
        state_dict = haiku_pickle_state_dict(path, ["text_encoder"])  # the image tower checked only
        _checked_model(config, state_dict, source)  # a misfit is never stored
        text = checked_tower(state_dict, "text_encoder")
        del state_dict
        stored["text_encoder"] = stored_tower("text_encoder", lambda: (text, {}))
        del text
    # (else the pickle was read and checked whole when the first entry was made: entries are
    # keyed by its size, mtime and ends)
    model = _checked_model(config, {f"{t}.{k}": v for t, sd in stored.items()
                                    for k, v in sd.items()}, source, list(stored))
    for tower in TOWERS:
        model.defer_tower_weights(tower, stored.get(tower) or functools.partial(
            stored_tower, tower, functools.partial(read_tower, tower)), source)
    return model
