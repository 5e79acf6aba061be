"""The exponential moving average of the weights, which is what gets sampled and released."""

from __future__ import annotations

import torch

WARMUP_STEPS = 20_000  # the reference's first tightening point


def ema_decay(step: int, decay_at: int = 200_000, warmup_steps: int = WARMUP_STEPS) -> float:
    """The reference schedule: 0.99 for the first `warmup_steps` optimizer steps, 0.999 until
    `decay_at`, then 0.9999. `step` counts the optimizer steps taken before this update."""
    if step < warmup_steps:
        return 0.99
    if step < decay_at:
        return 0.999
    return 0.9999


@torch.no_grad()
def ema_update(model: torch.nn.Module, averaged: torch.nn.Module, decay: float) -> None:
    """averaged = decay * averaged + (1 - decay) * model for parameters; buffers are copied."""
    params = dict(model.named_parameters())
    averaged_params = dict(averaged.named_parameters())
    if params.keys() != averaged_params.keys():
        raise ValueError("the averaged model does not have the model's parameters")
    targets = [averaged_params[name] for name in params]
    sources = [p.detach().to(target.dtype) for p, target in zip(params.values(), targets)]
    torch._foreach_lerp_(targets, sources, 1 - decay)  # one call, not one per tensor
    averaged_buffers = dict(averaged.named_buffers())
    for name, b in model.named_buffers():
        averaged_buffers[name].copy_(b)
