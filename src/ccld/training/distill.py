"""Knowledge distillation: a student U-Net learns what a frozen teacher computes.

`DistillationObjective` (`ccld distill`, `--objective velocity|guidance`): on the same noised
latents, timesteps and (possibly dropped) conditions as teacher training, the student's v is
pulled towards the teacher's. Options: mix in the true-v loss (`true_v_weight`), and distil the
teacher's classifier-free-guided velocity `v_u + w (v_c - v_u)` instead of its conditional one,
at one fixed w (`--distill-guidance`: the student is then sampled with guidance 1) or with w
drawn per item from a range (`--guidance-range`, Meng et al. 2023): the student takes w as an
input and gives the guided velocity in one forward instead of two.

`ProgressiveDistillationObjective` (`--objective progressive`, Salimans & Ho 2022): a student
of N DDIM steps learns to land in one step where its teacher lands in two half steps (or K
finer ones, `--teacher-substeps`, in the first round), on the uniform time grid of this
codebase's cosine schedule (alpha = cos(pi t / 2), sigma = sin(pi t / 2)) from the first
timestep every sampler starts at (`sampling.uniform_timesteps`). Each round halves N and the
student of one round teaches the next. With a guidance range the student
also takes w, and the teacher's velocity is the guided one (Meng et al.'s second stage); a
student distilled at one fixed w is already guided, and its step-distilled students with it.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from ..errors import CCLDError
from ..sampling import t_to_alpha_sigma, uniform_timesteps
from .objective import LatentBatch, NoisedBatch, noised_batch, noised_latents


def guided_velocity(teacher: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                    cond: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    """The teacher's velocity at guidance `guidance` (one weight per row; None: conditional).

    A teacher with a guidance input (a guidance-distilled student) gives it in one forward, and
    so does a student distilled for one fixed w (`--distill-guidance`), whose plain velocity is
    the guided one at that w; any other runs classifier-free guidance, v_u + w (v_c - v_u), in
    one batched forward of twice the rows. A dropped (zero) condition gives v_c = v_u, so those
    rows get v_u at any w.
    """
    if guidance is None:
        return teacher(x, t, cond).float()
    if getattr(teacher, "guidance_input", False):
        return teacher(x, t, cond, guidance=guidance).float()
    fixed = getattr(teacher, "distilled_guidance", None)
    if fixed is not None:
        return teacher(x, t, cond).float()
    v_uncond, v_cond = teacher(torch.cat([x, x]), torch.cat([t, t]),
                               torch.cat([torch.zeros_like(cond), cond])).float().chunk(2)
    return v_uncond + guidance.view(-1, 1, 1, 1) * (v_cond - v_uncond)


def draw_guidance(guidance_range, n: int, generator: torch.Generator, device) -> torch.Tensor | None:
    """n guidance weights, uniform in `guidance_range` (lo, hi), drawn from the run's generator;
    None without a range."""
    if guidance_range is None:
        return None
    low, high = guidance_range
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def student_velocity(model, x, t, cond, guidance, takes_guidance: bool) -> torch.Tensor:
    if takes_guidance:
        return model(x, t, cond, guidance=guidance).float()
    return model(x, t, cond).float()


class _TeacherObjective:
    """What the distillation objectives share: a frozen teacher (guided over `guidance_range`,
    if any), the student's optional guidance input, the condition dropout and the autocast the
    teacher runs in."""

    kind = "distill"
    export_stem = "model_student"  # named like the released student

    def __init__(self, teacher: torch.nn.Module, cond_drop: float, autocast, guidance_range,
                 student_takes_guidance: bool):
        self.teacher = teacher.eval().requires_grad_(False)
        fixed = getattr(teacher, "distilled_guidance", None)
        if (fixed is not None and not getattr(teacher, "guidance_input", False)
                and guidance_range is not None
                and tuple(map(float, guidance_range)) != (float(fixed[0]),) * 2):
            # checked once here, not per batch on the device: such a teacher guides at its w only
            raise CCLDError(f"the teacher is a student distilled for guidance {float(fixed[0]):g} "
                            f"only; distill it at --guidance {float(fixed[0]):g}")
        self.guidance_range = guidance_range
        self.student_takes_guidance = student_takes_guidance
        self.cond_drop = cond_drop
        self.autocast = autocast

    def to(self, device):
        self.teacher.to(device)
        return self

    def demo_rows(self, ema):
        return [("teacher", self.teacher), ("student EMA", ema)]


class DistillationObjective(_TeacherObjective):
    """The student's v against the teacher's (guided) v at the same noised inputs."""

    def __init__(self, teacher: torch.nn.Module, true_v_weight: float = 0.0,
                 guidance: float | None = None, cond_drop: float = 0.2,
                 autocast=contextlib.nullcontext, guidance_range=None,
                 student_takes_guidance: bool = False):
        # a fixed scale is the range [scale, scale]
        super().__init__(teacher, cond_drop, autocast,
                         (guidance, guidance) if guidance is not None else guidance_range,
                         student_takes_guidance)
        self.true_v_weight = float(true_v_weight)

    def fixed_guidance(self, n: int, device) -> torch.Tensor | None:
        if self.guidance_range is None:
            return None
        low, high = self.guidance_range
        assert low == high, "a guidance range needs the weights drawn for the batch"
        return torch.full([n], float(low), device=device)

    @torch.no_grad()
    def teacher_velocity(self, batch: NoisedBatch, guidance: torch.Tensor | None = None):
        """The target: the teacher's velocity, guided at `guidance` (default: the fixed scale)."""
        if guidance is None:
            guidance = self.fixed_guidance(batch.x.shape[0], batch.x.device)
        with self.autocast():
            return guided_velocity(self.teacher, batch.x, batch.t, batch.cond, guidance)

    def loss(self, model, batch: LatentBatch):
        noised = noised_latents(batch, self.cond_drop)
        guidance = draw_guidance(self.guidance_range, noised.x.shape[0], batch.generator,
                                 noised.x.device)
        return self.match_teacher(model, noised, guidance)

    def match_teacher(self, model, batch: NoisedBatch, guidance: torch.Tensor | None = None):
        """The loss on given noised inputs: the student's v against the teacher's."""
        if guidance is None:
            guidance = self.fixed_guidance(batch.x.shape[0], batch.x.device)
        target = self.teacher_velocity(batch, guidance)
        v = student_velocity(model, batch.x, batch.t, batch.cond, guidance,
                             self.student_takes_guidance)
        teacher_mse = F.mse_loss(v, target)
        if not self.true_v_weight:
            return teacher_mse, {"teacher_mse": teacher_mse}
        true_mse = F.mse_loss(v, batch.v)
        return (teacher_mse + self.true_v_weight * true_mse,
                {"teacher_mse": teacher_mse, "true_v_mse": true_mse})


class ProgressiveDistillationObjective(_TeacherObjective):
    """One round of progressive distillation: the student takes `student_steps` DDIM steps on
    the uniform grid t = T i / N (T = 0.9957, the first timestep of every sampler), and learns
    to jump from t to t - T/N where the teacher gets in two DDIM steps (through t - T/(2N)),
    or in `teacher_substeps` K steps of T/(KN): a finer solve of a teacher that knows every t
    (not a step-distilled student, which knows only its own grid), so that one round can
    replace several halvings.

    For each item the trainer's Sobol timestep u picks the grid point i = floor(u N) + 1. From
    where the teacher lands, x'', the student's target clean latent is the one a single DDIM
    step from x_t must predict to land on x'':
        x~ = (x'' - (sigma''/sigma) x_t) / (alpha'' - (sigma''/sigma) alpha),
    and its target velocity v~ = (alpha x_t - x~) / sigma. The loss is the paper's truncated-SNR
    weighting, max(SNR, 1) |x^ - x~|^2, which in v is max(alpha^2, sigma^2) |v^ - v~|^2.
    """

    def __init__(self, teacher: torch.nn.Module, student_steps: int, cond_drop: float = 0.2,
                 autocast=contextlib.nullcontext, guidance_range=None,
                 student_takes_guidance: bool = False, teacher_substeps: int = 2):
        super().__init__(teacher, cond_drop, autocast, guidance_range, student_takes_guidance)
        if teacher_substeps < 2:
            raise ValueError(f"the teacher takes at least 2 steps per student step "
                             f"(got {teacher_substeps})")
        self.student_steps = int(student_steps)
        self.teacher_substeps = int(teacher_substeps)
        self.step_size = float(uniform_timesteps(self.student_steps)[0]) / self.student_steps

    def noised(self, batch: LatentBatch) -> NoisedBatch:
        """The inputs: clean latents noised at grid points of the student's schedule."""
        n = self.student_steps
        i = (batch.timesteps.draw(batch.mean.shape[0]) * n).floor().clamp(max=n - 1) + 1
        return noised_batch(batch.mean, batch.logvar, batch.embed, batch.autoencoder_scale,
                            i * self.step_size, batch.generator, self.cond_drop)

    @torch.no_grad()
    def target(self, batch: NoisedBatch, guidance: torch.Tensor | None) -> torch.Tensor:
        """v~: the velocity whose one DDIM step from t lands where the teacher's
        `teacher_substeps` DDIM steps do."""
        x, t = batch.x, batch.t
        substep = self.step_size / self.teacher_substeps
        x_end = x
        with self.autocast():
            for k in range(self.teacher_substeps):
                x_end = self.ddim_step(x_end, t - k * substep, t - (k + 1) * substep,
                                       batch.cond, guidance)
        alpha, sigma = (a[:, None, None, None] for a in t_to_alpha_sigma(t))
        alpha_end, sigma_end = (a[:, None, None, None] for a in t_to_alpha_sigma(t - self.step_size))
        ratio = sigma_end / sigma
        x0 = (x_end - ratio * x) / (alpha_end - ratio * alpha)
        return (alpha * x - x0) / sigma

    def ddim_step(self, x, t, t_next, cond, guidance):
        v = guided_velocity(self.teacher, x, t, cond, guidance)
        alpha, sigma = (a[:, None, None, None] for a in t_to_alpha_sigma(t))
        alpha_next, sigma_next = (a[:, None, None, None] for a in t_to_alpha_sigma(t_next))
        pred, eps = x * alpha - v * sigma, x * sigma + v * alpha
        return pred * alpha_next + eps * sigma_next

    def loss(self, model, batch: LatentBatch):
        noised = self.noised(batch)
        guidance = draw_guidance(self.guidance_range, noised.x.shape[0], batch.generator,
                                 noised.x.device)
        return self.match_two_steps(model, noised, guidance)

    def match_two_steps(self, model, batch: NoisedBatch, guidance: torch.Tensor | None = None):
        target = self.target(batch, guidance)
        v = student_velocity(model, batch.x, batch.t, batch.cond, guidance,
                             self.student_takes_guidance)
        alpha, sigma = t_to_alpha_sigma(batch.t)
        weight = torch.maximum(alpha, sigma).square()[:, None, None, None]
        loss = (weight * (v - target).square()).mean()
        return loss, {"v_mse": F.mse_loss(v, target)}
