"""Noise schedules in continuous time: t in [0, 1], alpha = cos(pi t / 2), sigma = sin(pi t / 2),
and the timesteps each sampler visits."""

from __future__ import annotations

import math

import torch


def t_to_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def alpha_sigma_to_t(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.atan2(sigma, alpha) / math.pi * 2


def ddpm_schedule(ddpm_t: torch.Tensor) -> torch.Tensor:
    """Timesteps of the linear-beta DDPM schedule, in continuous time."""
    log_snr = -torch.special.expm1(1e-4 + 10 * ddpm_t ** 2).log()
    alpha, sigma = log_snr.sigmoid().sqrt(), log_snr.neg().sigmoid().sqrt()
    return alpha_sigma_to_t(alpha, sigma)


def spliced_ddpm_cosine_schedule(t: torch.Tensor) -> torch.Tensor:
    """Cosine at low noise, DDPM at high noise, joined where their slopes match."""
    ddpm_crossover = 0.48536712
    cosine_crossover = 0.80074257
    big_t = t * (1 + cosine_crossover - ddpm_crossover)
    ddpm_part = ddpm_schedule(big_t + ddpm_crossover - cosine_crossover)
    return torch.where(big_t < cosine_crossover, big_t, ddpm_part)


def get_timesteps(n_steps: int, start: float = 1.0, device=None) -> torch.Tensor:
    """The demo's timesteps: `n_steps` points from `start` down to (not including) 0, spliced."""
    t = torch.linspace(start, 0, n_steps + 1, device=device)[:-1]
    return spliced_ddpm_cosine_schedule(t)


def uniform_timesteps(n_steps: int, start: float = 1.0, device=None) -> torch.Tensor:
    """`n_steps` times evenly spaced from the demo schedule's first timestep down to (not
    including) 0: the grid that progressive distillation halves, on which DDIM's last
    clean-latent prediction is its step to t = 0 (the schedule of the `distilled` sampler).

    It starts where every other schedule starts (t = 0.9957 for a whole painting, not 1), so
    that a student follows its teacher's trajectory from the same noise: from t = 1 the
    noise would be read as a slightly different latent, a difference of about 0.007 (relative)
    in the painting, as large as a 10-step solver's whole error."""
    # on the CPU: a U-Net built on the meta device makes its buffer of these
    t_start = float(spliced_ddpm_cosine_schedule(torch.tensor(start, device="cpu")))
    return torch.linspace(t_start, 0, n_steps + 1, device=device)[:-1]


UNIPC_T_MIN, UNIPC_T_MIN_STEPS = 0.06, 11  # power_timesteps' end, and up to how many steps


def power_timesteps(n_steps: int, start: float = 1.0, t_min: float | None = None,
                    rho: float = 1.1, device=None) -> torch.Tensor:
    """`n_steps` points from the demo schedule's first timestep down to `t_min`, spaced as
    (1 - u) ** rho: denser at low noise than uniform time, sparser than uniform log-SNR.

    The solvers that end on a clean-latent prediction (`unipc`) need their last model call at
    low noise, because that prediction's error grows with the noise left. t_min and rho were
    chosen on the solver benchmark (`benchmarks/bench_solvers.py`; the measurements are in
    `benchmarks/notes/solvers.md`). A t_min fixed for every step count would be a floor that
    more steps cannot pass, so by default (t_min None) it is UNIPC_T_MIN up to
    UNIPC_T_MIN_STEPS steps and moves towards 0 in proportion beyond.
    """
    if t_min is None:
        t_min = UNIPC_T_MIN * min(1.0, UNIPC_T_MIN_STEPS / max(n_steps, 1))
    t_start = float(spliced_ddpm_cosine_schedule(torch.tensor(start)))
    t_min = min(t_min, t_start / 2)  # a weak image-to-image strength starts below t_min
    u = torch.linspace(0, 1, n_steps, device=device)
    return t_min + (t_start - t_min) * (1 - u) ** rho if n_steps > 1 else \
        torch.full([1], t_start, device=device)
