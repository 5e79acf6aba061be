"""Knowledge distillation: a student U-Net learns the frozen teacher's velocity.

On the same noised latents, timesteps and (possibly dropped) conditions as teacher training, the
student's v is pulled towards the teacher's. Options: mix in the true-v loss (`true_v_weight`),
and distil the teacher's classifier-free-guided velocity `v_u + g (v_c - v_u)` instead of its
conditional one (`guidance`); a student distilled that way already guides, and is sampled with
guidance 1.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from .objective import LatentBatch, NoisedBatch, noised_latents


class DistillationObjective:
    kind = "distill"
    export_stem = "model_student"  # named like the released student

    def __init__(self, teacher: torch.nn.Module, true_v_weight: float = 0.0,
                 guidance: float | None = None, cond_drop: float = 0.2,
                 autocast=contextlib.nullcontext):
        self.teacher = teacher.eval().requires_grad_(False)
        self.true_v_weight = float(true_v_weight)
        self.guidance = guidance
        self.cond_drop = cond_drop
        self.autocast = autocast

    def to(self, device):
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def teacher_velocity(self, batch: NoisedBatch) -> torch.Tensor:
        with self.autocast():
            if self.guidance is None:
                return self.teacher(batch.x, batch.t, batch.cond).float()
            # a dropped (zero) condition gives v_c = v_u, so those rows learn v_u as they should
            x, t = torch.cat([batch.x, batch.x]), torch.cat([batch.t, batch.t])
            cond = torch.cat([torch.zeros_like(batch.cond), batch.cond])
            v_uncond, v_cond = self.teacher(x, t, cond).float().chunk(2)
        return v_uncond + self.guidance * (v_cond - v_uncond)

    def loss(self, model, batch: LatentBatch):
        return self.match_teacher(model, noised_latents(batch, self.cond_drop))

    def match_teacher(self, model, batch: NoisedBatch):
        """The loss on given noised inputs: the student's v against the teacher's."""
        target = self.teacher_velocity(batch)
        v = model(batch.x, batch.t, batch.cond).float()
        teacher_mse = F.mse_loss(v, target)
        if not self.true_v_weight:
            return teacher_mse, {"teacher_mse": teacher_mse}
        true_mse = F.mse_loss(v, batch.v)
        return (teacher_mse + self.true_v_weight * true_mse,
                {"teacher_mse": teacher_mse, "true_v_mse": true_mse})

    def demo_rows(self, ema):
        return [("teacher", self.teacher), ("student EMA", ema)]
