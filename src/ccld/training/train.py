"""Teacher training and fine-tuning: the model learns the true velocity (JD-P's recipe)."""

from __future__ import annotations

from torch.nn import functional as F

from .objective import LatentBatch, noised_latents


class VelocityObjective:
    """MSE between the model's v and the true v = alpha * noise - sigma * x0."""

    kind = "train"
    export_stem = "model_ema"  # the EMA weights in the released (bare state dict) format

    def __init__(self, cond_drop: float = 0.2):
        self.cond_drop = cond_drop

    def to(self, device):
        return self

    def loss(self, model, batch: LatentBatch):
        noised = noised_latents(batch, self.cond_drop)
        v = model(noised.x, noised.t, noised.cond)
        return F.mse_loss(v.float(), noised.v), {}

    def demo_rows(self, ema):
        return [("EMA", ema)]
