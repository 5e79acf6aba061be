"""Teacher training and fine-tuning: the model learns the true velocity (JD-P's recipe)."""

from __future__ import annotations

from torch.nn import functional as F

from .engine import NoisedBatch


class VelocityObjective:
    """MSE between the model's v and the true v = alpha * noise - sigma * x0."""

    kind = "train"
    export_stem = "model_ema"  # the EMA weights in the released (bare state dict) format

    def to(self, device):
        return self

    def loss(self, model, batch: NoisedBatch):
        v = model(batch.x, batch.t, batch.cond)
        return F.mse_loss(v.float(), batch.v), {}

    def demo_rows(self, ema):
        return [("EMA", ema)]
