"""The three frozen networks: the conditioned U-Net, CLOOB and the KL-f8 autoencoder."""

import contextlib
import functools
import warnings

import torch
from torch import nn


def empty_weights() -> torch.device:
    """The context the loaders build each net in: on the meta device, as skeletons that hold no
    memory and draw no random numbers, to be given the file's tensors by
    `load_state_dict(assign=True)`."""
    return torch.device("meta")


def meta_aware_randn(*shape: int) -> torch.Tensor:
    """`torch.randn(shape)` (the very same values), but only an empty tensor on the meta device.

    The loaders build each net on the meta device and then take its weights from the file, so
    nothing needs drawing there; and drawing there runs PyTorch's Python reference code, whose
    imports (sympy, torch._dynamo) take seconds on a slow CPU.
    """
    t = torch.empty(*shape)
    return t if t.is_meta else t.normal_()


# The layers whose arithmetic autocast runs in its reduced dtype (CPU and CUDA alike).
_AUTOCAST_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _rounded_layers(module: nn.Module):
    """(state-dict prefix, layer, {name: float32 parameter}) of the layers `hold_weights_in`
    rounds and does not hold yet."""
    for prefix, layer in module.named_modules():
        if not isinstance(layer, _AUTOCAST_LAYERS) or "_float32_weights" in layer.__dict__:
            continue
        originals = {name: p for name, p in layer.named_parameters(recurse=False)
                     if p.dtype == torch.float32}
        if originals:
            yield prefix + "." if prefix else "", layer, originals


def _rounded(p: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format):
    return p.detach().to(dtype, memory_format=memory_format if p.dim() == 4
                         else torch.preserve_format)


def rounded_weights(module: nn.Module, dtype: torch.dtype,
                    memory_format: torch.memory_format = torch.preserve_format) -> dict:
    """The copies `hold_weights_in` would make, by state-dict name: for storing them."""
    return {prefix + name: _rounded(p, dtype, memory_format)
            for prefix, _, originals in _rounded_layers(module) for name, p in originals.items()}


def hold_weights_in(module: nn.Module, dtype: torch.dtype,
                    memory_format: torch.memory_format = torch.preserve_format,
                    rounded: dict | None = None) -> None:
    """Holds the weights of `module`'s convolutions and linear layers in `dtype`, the dtype
    autocast computes them in.

    Autocast would otherwise round every float32 weight anew at every call (it caches its casts
    only for weights that require grad): a third of a bf16 U-Net forward on a CPU. Rounded once
    here, the arithmetic is the same, bit for bit. The float32 originals stay: `state_dict()`
    gives them (a saved model is never the rounded one) and `release_held_weights` puts them
    back. The copies are laid out in `memory_format` (by default their originals'), or taken
    from `rounded` (by state-dict name, as `rounded_weights` makes them: e.g. stored ones).
    """
    rounded = rounded or {}
    for prefix, layer, originals in list(_rounded_layers(module)):
        hook = layer._register_state_dict_hook(_originals_in_state_dict)
        layer.__dict__["_float32_weights"] = (originals, hook)
        for name, p in originals.items():
            copy = rounded.get(prefix + name)
            if copy is None or copy.shape != p.shape or copy.dtype != dtype:
                copy = _rounded(p, dtype, memory_format)
            setattr(layer, name, nn.Parameter(copy, requires_grad=False))


def _held_copies(module: nn.Module) -> dict:
    """The rounded copies `hold_weights_in` holds, by state-dict name."""
    return {f"{prefix}.{name}" if prefix else name: getattr(layer, name)
            for prefix, layer in module.named_modules() if "_float32_weights" in layer.__dict__
            for name in layer.__dict__["_float32_weights"][0]}


def held_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype `hold_weights_in` holds `module`'s weights in, if it does."""
    return next((copy.dtype for copy in _held_copies(module).values()), None)


def release_held_weights(module: nn.Module) -> None:
    """Undoes `hold_weights_in`: the layers take their float32 originals back."""
    for layer in module.modules():
        held = layer.__dict__.pop("_float32_weights", None)
        if held is not None:
            originals, hook = held
            hook.remove()
            for name, p in originals.items():
                setattr(layer, name, p)


def _originals_in_state_dict(layer, state_dict, prefix, local_metadata):
    for name, p in layer.__dict__["_float32_weights"][0].items():
        state_dict[prefix + name] = p.detach()


@contextlib.contextmanager
def float32_weights(module: nn.Module):
    """The float32 originals of weights `hold_weights_in` holds rounded, for the duration: for
    computing in float32 outside autocast."""
    copies = _held_copies(module)
    release_held_weights(module)
    try:
        yield module
    finally:
        if copies:
            dtype = next(iter(copies.values())).dtype
            hold_weights_in(module, dtype, rounded=copies)  # the same copies again


# Autocast, as each device and torch version has it

@functools.lru_cache(maxsize=None)
def autocast_available(device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether this torch runs autocast on `device_type` (in `dtype`, where given). MPS has
    none before torch 2.5 (`torch.autocast("mps")` raises), and on 2.5 switches bf16 off with a
    warning; either way a net held in that dtype would then fail on mixed dtypes."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device_type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            context = torch.autocast(device_type, dtype=dtype) if dtype else torch.autocast(device_type)
        except (RuntimeError, ValueError, AssertionError):
            return False
    return bool(getattr(context, "_enabled", True))


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type` now; None where it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no per-device form
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_dtype(device_type) if enabled else None


def autocast_off(device_type: str):
    """A context with autocast off on `device_type` (nothing to switch off where this torch has
    no autocast for it: MPS before torch 2.5 refuses even `enabled=False`)."""
    if not autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def finite_or_float32(compute, module: nn.Module, device_type: str) -> torch.Tensor:
    """`compute()` (a pass of `module`); where it ran under fp16 autocast and overflowed, again in
    float32. fp16's range ends at 65504 and the KL autoencoder's activations can pass it (its
    diffusers config says `force_upcast`), while bf16 and float32 keep float32's range."""
    out = compute()
    if autocast_dtype(device_type) == torch.float16 and not bool(torch.isfinite(out).all()):
        with autocast_off(device_type), float32_weights(module):
            out = compute()
    return out
