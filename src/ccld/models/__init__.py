"""The three frozen networks: the conditioned U-Net, CLOOB and the KL-f8 autoencoder."""

import contextlib
import threading

import torch
from torch import nn

# The layers whose constructors initialise their weights (by `reset_parameters`).
_INITIALISED = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
_EMPTY_LOCK = threading.Lock()


def _no_initialisation(module) -> None:
    pass


@contextlib.contextmanager
def empty_weights():
    """Builds modules as skeletons on the meta device, their initialisers not even run: the
    loaders build each net and then assign it the file's weights. (On the meta device an
    initialiser computes nothing, but each of its tensor operations still passes through
    PyTorch's device dispatch in Python: a third of a second for the three nets.)

    The layers' `reset_parameters` are switched off for the duration, for every thread, so
    builds take a lock; nothing else in ccld builds modules while a loader does.
    """
    with _EMPTY_LOCK:
        saved = {cls: cls.__dict__["reset_parameters"] for cls in _INITIALISED}
        try:
            for cls in _INITIALISED:
                cls.reset_parameters = _no_initialisation
            with torch.device("meta"):
                yield
        finally:
            for cls, method in saved.items():
                cls.reset_parameters = method


def meta_aware_randn(*shape: int) -> torch.Tensor:
    """`torch.randn(shape)` (the very same values), but only an empty tensor on the meta device.

    The loaders build each net on the meta device and then take its weights from the file, so
    nothing needs drawing there; and drawing there runs PyTorch's Python reference code, whose
    imports (sympy, torch._dynamo) take seconds on a slow CPU.
    """
    t = torch.empty(*shape)
    return t if t.is_meta else t.normal_()
