"""Precision and layout: which arithmetic the networks run in, and laying their weights out for it.

`auto` is fp16 on CUDA, bf16 on CPUs with native bf16 (AMX / AVX512-BF16) and float32 elsewhere,
always with channels-last convolutions; an explicit `fp32` is contiguous and bit-faithful to the
reference demo. Reduced precision runs every network under autocast, with the painting nets'
convolution and linear weights held rounded to its dtype as autocast would round them at every
call (the same bits; the float32 originals stay).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ..errors import CCLDError, arg
from ..models import float32_weights, held_dtype, hold_weights_in, release_held_weights
from ..settings import PRECISIONS

REDUCED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) under which its kernels have no bf16
# arithmetic: set to one of these, a CPU with AVX512-BF16 or AMX runs as one without.
_ISAS_WITHOUT_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core",
                      "avx512_core_vnni"}


def fast_bf16_cpu() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AMX or AVX512-BF16), as oneDNN is
    allowed to use it. Elsewhere bf16 is emulated and many times slower than float32, so `auto`
    keeps float32."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower() in _ISAS_WITHOUT_BF16:
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: fp16 on CUDA, bf16 on a CPU with native bf16, else the bit-faithful fp32."""
    if precision not in PRECISIONS:
        raise CCLDError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and fast_bf16_cpu():
        return "bf16"
    return "fp32"


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device) -> torch.device:
    """`device` as a torch.device ccld can paint on, checked before anything moves; a
    CCLDError naming it otherwise (a pipeline moved to an unusable device would be broken)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CCLDError(f"{arg('device')} {device!r} is not a device; give one of cpu, cuda, cuda:N "
                        "or mps") from None
    if parsed.type not in DEVICE_TYPES:
        raise CCLDError(f"{arg('device')} {device!r}: ccld paints on {', '.join(DEVICE_TYPES)}; give one "
                        "of them")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CCLDError(f"{arg('device')} {device!r}: CUDA is not available in this torch ({build}); "
                            "use cpu, or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CCLDError(f"{arg('device')} {device!r}: this machine has {torch.cuda.device_count()} "
                            "CUDA device(s); give cuda:0 to cuda:"
                            f"{torch.cuda.device_count() - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CCLDError(f"{arg('device')} {device!r}: MPS is not available here (it needs Apple silicon "
                        "and a torch built with it); use cpu")
    return parsed


def check_autocast(precision: str, device: torch.device) -> None:
    """A CCLDError naming the fix where this torch has no autocast in `precision` on `device`
    (MPS before torch 2.5; bf16 on MPS), which the reduced precisions run under."""
    from ..models import autocast_available

    if precision != "fp32" and not autocast_available(device.type, REDUCED_DTYPES[precision]):
        raise CCLDError(f"{arg('precision')} {precision} on {device.type}: this torch "
                        f"({torch.__version__}) has no {precision} autocast there; use fp32"
                        + (", or fp16 with torch 2.5 or later" if device.type == "mps" else ""))


def faithful_cuda_arithmetic(layout: Layout) -> None:
    """On a GPU, fp32 is the reference's arithmetic only without TF32, which cuDNN uses for
    float32 convolutions by default on Ampere and newer: off for fp32 (and float32 matmuls too),
    torch's defaults under the reduced precisions. (The switches are the process's.)"""
    if layout.device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = layout.precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = False


@dataclass(frozen=True)
class Layout:
    """Where the networks run and in which arithmetic. A precision never chosen (`chosen`
    False: a pipeline built without one) is the reference's fp32 on a CPU and `auto` on a GPU,
    so `from_pretrained().to("cuda")` paints in fp16."""
    device: torch.device
    precision: str  # fp32, bf16 or fp16: resolved
    channels_last: bool
    chosen: bool = True

    @classmethod
    def wanted(cls, current: Layout, device, precision: str | None,
               channels_last: bool | None = None) -> Layout:
        """The layout `to(device, precision, channels_last)` asks for; what is not given stays
        as it is. Channels-last convolutions measure faster in every precision, and stay within
        1e-5 of contiguous fp32; so a precision given without a layout is channels-last, except
        an explicit fp32, which keeps the reference's layout, bit for bit."""
        new_device = current.device if device is None else check_device(device)
        chosen = current.chosen or precision is not None
        if precision is None and not current.chosen:
            precision = "fp32" if new_device.type == "cpu" else "auto"
        if precision is None:
            new_precision = current.precision
            layout = current.channels_last
        else:
            new_precision = resolve_precision(precision, new_device)
            layout = precision != "fp32"
        check_autocast(new_precision, new_device)
        return cls(new_device, new_precision, layout if channels_last is None else channels_last,
                   chosen)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @contextlib.contextmanager
    def autocast(self):
        """The context every network runs in: inference mode, plus autocast when reduced."""
        with torch.inference_mode():
            if self.precision == "fp32":
                yield
                return
            with torch.autocast(self.device.type, dtype=REDUCED_DTYPES[self.precision]):
                yield


def lay_out(parts: dict, painting_nets: list, old: Layout, new: Layout) -> None:
    """Moves `parts` (every network, by name) from `old.device` to `new.device` and lays the
    painting nets out for its precision: the originals move and are laid out, rounded copies
    are made last (copies already held in the new dtype on the same device are kept)."""
    faithful_cuda_arithmetic(new)
    for net in painting_nets:
        if new.device != old.device or held_dtype(net) != REDUCED_DTYPES.get(new.precision):
            release_held_weights(net)
    if new.device != old.device:
        for part in parts.values():
            if part is not None:
                part.to(new.device)
    if new.precision == "fp32":
        # Weights come channels-last from the converted cache: the fast path takes them as they
        # are, only the exact one copies them. The encoder (init images only) is left as it is
        # loaded, so its memory-mapped weights are not even read for a painting.
        for net in painting_nets:
            net.to(memory_format=new.memory_format)
    decoder = parts["autoencoder"].decoder
    with float32_weights(decoder):  # folded from the float32 weights
        decoder.fold_upsampling(new.channels_last)
    if new.precision != "fp32":
        # the rounded copies are laid out; the float32 originals stay as they are loaded
        for net in painting_nets:
            hold_weights_in(net, REDUCED_DTYPES[new.precision], new.memory_format)
