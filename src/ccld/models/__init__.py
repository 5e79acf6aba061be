"""The three frozen networks: the conditioned U-Net, CLOOB and the KL-f8 autoencoder."""

import torch


def meta_aware_randn(*shape: int) -> torch.Tensor:
    """`torch.randn(shape)` (the very same values), but only an empty tensor on the meta device.

    The loaders build each net on the meta device and then take its weights from the file, so
    nothing needs drawing there; and drawing there runs PyTorch's Python reference code, whose
    imports (sympy, torch._dynamo) take seconds on a slow CPU.
    """
    t = torch.empty(*shape)
    return t if t.is_meta else t.normal_()
