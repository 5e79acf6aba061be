"""The samplers, each one function `sampler(model, x, timesteps, *, callback=None)` (the stochastic
ones also take `eta` and `generator`), and their registry.

`model(x, t)` returns v for a batch (`t` has one entry per row), `x` is the starting noise (or
noised latent), `timesteps` the decreasing times to visit. The v-diffusion family (ddim/ddpm,
prk, plms, pie, plms2, iplms) keeps the reference semantics exactly, quirks included: DDIM
returns its last clean-latent prediction; the pseudo-numerical methods step on to t = 0 and
return x. `dpmpp_2m` is DPM-Solver++(2M) and `unipc` is UniPC-2 (DPM-Solver++(2M) plus the UniC
corrector), both written for this continuous-time v-model, each on the schedule it was tuned on.
`register_sampler` adds one to `SAMPLERS` with what the rest of ccld needs to know about it;
the CLI, the web app and the pipeline read everything from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CCLDError
from .schedules import get_timesteps, power_timesteps, t_to_alpha_sigma, uniform_timesteps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None] | None


# Helpers

def _randn_like(x, generator):
    # noise is drawn on the CPU so that a seed means the same picture on every device
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def _eps(model, x, t):
    """The model's noise prediction at scalar time t."""
    alpha, sigma = t_to_alpha_sigma(t)
    v = model(x, t.expand(x.shape[0])).float()
    return x * sigma + v * alpha


def _transfer(x, eps, t_1, t_2):
    """Moves x from t_1 to t_2 along the direction eps (a DDIM step); also returns x0."""
    alpha_1, sigma_1 = t_to_alpha_sigma(t_1)
    alpha_2, sigma_2 = t_to_alpha_sigma(t_2)
    pred = (x - eps * sigma_1) / alpha_1
    return pred * alpha_2 + eps * sigma_2, pred


def _require_steps(timesteps: torch.Tensor) -> torch.Tensor:
    """`timesteps`, a 1-d tensor of at least one time: a sampler's answer is a model's
    prediction, which needs one call."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1 or len(timesteps) == 0:
        shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps)
        raise ValueError(f"timesteps must be a 1-d tensor of at least one time (got {shape})")
    return timesteps


def _notify(callback, i, t, x, pred):
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "pred": pred})


# DDIM / DDPM

@torch.no_grad()
def ddim(model: Model, x: torch.Tensor, timesteps: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """DDIM with noise level eta (eta=1 is DDPM ancestral sampling, registered as `ddpm`).

    Returns the last x0 estimate."""
    _require_steps(timesteps)
    alphas, sigmas = t_to_alpha_sigma(timesteps)
    for i in range(len(timesteps)):
        v = model(x, timesteps[i].expand(x.shape[0])).float()
        pred = x * alphas[i] - v * sigmas[i]
        eps = x * sigmas[i] + v * alphas[i]
        _notify(callback, i, timesteps[i], x, pred)
        if i < len(timesteps) - 1:
            ddim_sigma = eta * (sigmas[i + 1] ** 2 / sigmas[i] ** 2).sqrt() * \
                (1 - alphas[i] ** 2 / alphas[i + 1] ** 2).sqrt()
            adjusted_sigma = (sigmas[i + 1] ** 2 - ddim_sigma ** 2).sqrt()
            x = pred * alphas[i + 1] + eps * adjusted_sigma
            if eta:
                x = x + _randn_like(x, generator) * ddim_sigma
    return pred


# Pseudo numerical methods (PNDM, Liu et al. 2022): a classical integrator in the eps space,
# each step projected back with a DDIM transfer.

ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _prk_step(model, x, history, t_1, t_2):
    """Fourth-order pseudo Runge-Kutta; the history gets the combined eps."""
    t_mid = (t_1 + t_2) / 2
    eps_1 = _eps(model, x, t_1)
    eps_2 = _eps(model, _transfer(x, eps_1, t_1, t_mid)[0], t_mid)
    eps_3 = _eps(model, _transfer(x, eps_2, t_1, t_mid)[0], t_mid)
    eps_4 = _eps(model, _transfer(x, eps_3, t_1, t_2)[0], t_2)
    eps_prime = (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6
    return *_transfer(x, eps_prime, t_1, t_2), eps_prime


def _pie_step(model, x, history, t_1, t_2):
    """Pseudo improved Euler (Heun); the history gets the averaged eps."""
    eps_1 = _eps(model, x, t_1)
    eps_2 = _eps(model, _transfer(x, eps_1, t_1, t_2)[0], t_2)
    eps_prime = (eps_1 + eps_2) / 2
    return *_transfer(x, eps_prime, t_1, t_2), eps_prime


def _lms_step(model, x, history, t_1, t_2, order):
    """Pseudo linear multistep of `order`; the history gets this step's own eps."""
    eps = _eps(model, x, t_1)
    coeffs = ADAMS_BASHFORTH[order]
    eps_prime = coeffs[0] * eps + sum(c * e for c, e in zip(coeffs[1:], reversed(history)))
    x_new, _ = _transfer(x, eps_prime, t_1, t_2)
    return x_new, _transfer(x, eps, t_1, t_2)[1], eps


@torch.no_grad()
def _pseudo_sample(model, x, timesteps, choose_step, callback):
    _require_steps(timesteps)
    timesteps = torch.cat([timesteps, timesteps.new_zeros([1])])
    history = []
    for i in range(len(timesteps) - 1):
        step = choose_step(len(history))
        x, pred, eps = step(model, x, history, timesteps[i], timesteps[i + 1])
        history = (history + [eps])[-3:]
        _notify(callback, i, timesteps[i], x, pred)
    return x


def _lms(order):
    return lambda model, x, history, t_1, t_2: _lms_step(model, x, history, t_1, t_2, order)


def _pseudo_sampler(choose_step: Callable, doc: str) -> Callable[..., torch.Tensor]:
    """A sampler `(model, x, timesteps, *, callback)` of the pseudo family: `choose_step(n)` picks
    the step to take when the history holds n earlier eps."""
    def sampler(model: Model, x: torch.Tensor, timesteps: torch.Tensor, *,
                callback: Callback = None) -> torch.Tensor:
        return _pseudo_sample(model, x, timesteps, choose_step, callback)

    sampler.__doc__ = doc
    return sampler


prk = _pseudo_sampler(lambda n: _prk_step, "Fourth-order pseudo Runge-Kutta (4 forwards a step).")
plms = _pseudo_sampler(lambda n: _prk_step if n < 3 else _lms(4),
                       "Fourth-order PLMS, started with three PRK steps (24 forwards for 15 steps).")
pie = _pseudo_sampler(lambda n: _pie_step, "Pseudo improved Euler (2 forwards a step).")
plms2 = _pseudo_sampler(lambda n: _pie_step if n < 1 else _lms(2),
                        "Second-order PLMS, started with one PIE step.")
iplms = _pseudo_sampler(lambda n: _lms(min(n + 1, 4)), "Improved PLMS: lower-order "
                        "Adams-Bashforth while the history fills (one forward a step).")


# DPM-Solver++(2M) (Lu et al. 2022) in continuous time for a v-model

@torch.no_grad()
def dpmpp_2m(model: Model, x: torch.Tensor, timesteps: torch.Tensor, *,
             callback: Callback = None) -> torch.Tensor:
    """Second-order multistep solver in log-SNR on the data prediction; one forward a step.

    Steps from each timestep to the next and finally to t = 0, where it returns the clean
    latent. lambda = log(alpha / sigma) is the half log-SNR.
    """
    _require_steps(timesteps)
    timesteps = torch.cat([timesteps, timesteps.new_zeros([1])])
    alphas, sigmas = t_to_alpha_sigma(timesteps)
    lambdas = torch.log(alphas) - torch.log(sigmas)
    landing = sigmas.eq(0).tolist()  # read once: a test per step would wait on the device
    old_pred, h_last = None, None
    for i in range(len(timesteps) - 1):
        v = model(x, timesteps[i].expand(x.shape[0])).float()
        pred = x * alphas[i] - v * sigmas[i]
        _notify(callback, i, timesteps[i], x, pred)
        if landing[i + 1]:
            x = pred  # the final step lands on the data prediction itself
            break
        h = lambdas[i + 1] - lambdas[i]
        denoised = pred
        if old_pred is not None:
            r = h_last / h
            denoised = (1 + 1 / (2 * r)) * pred - (1 / (2 * r)) * old_pred
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * torch.expm1(-h) * denoised
        old_pred, h_last = pred, h
    return x


# UniPC (Zhao et al. 2023) in its second-order B(h) = expm1(h) form on the data prediction

@torch.no_grad()
def unipc(model: Model, x: torch.Tensor, timesteps: torch.Tensor, *,
          callback: Callback = None) -> torch.Tensor:
    """UniPC-2: the DPM-Solver++(2M) predictor, then after each model call the UniC corrector
    refines the point that call was made at, reusing that same output (no extra forwards).

    One forward a step. Returns the clean-latent prediction at the last timestep, shifted by
    the last correction: near t = 0 the prediction moves by dx / alpha when x moves by dx.
    """
    _require_steps(timesteps)
    schedule = _LogSNRSchedule.of(timesteps)
    x_last = pred_last = pred_older = None  # the previous point, its prediction, the one before
    for i in range(len(timesteps)):
        v = model(x, timesteps[i].expand(x.shape[0])).float()
        pred = x * schedule.alphas[i] - v * schedule.sigmas[i]
        _notify(callback, i, timesteps[i], x, pred)
        correction = 0.0
        if x_last is not None:
            corrected = schedule.unipc_step(i - 1, x_last, (pred_older, pred_last, pred))
            correction, x = corrected - x, corrected
        if i == len(timesteps) - 1:
            return pred + correction / schedule.alphas[i]
        x_last, pred_older, pred_last = x, pred_last, pred
        x = schedule.unipc_step(i, x, (pred_older, pred, None))


@dataclass(frozen=True)
class _LogSNRSchedule:
    """alpha, sigma and lambda = log(alpha / sigma) (the half log-SNR) at each timestep."""
    alphas: torch.Tensor
    sigmas: torch.Tensor
    lambdas: torch.Tensor

    @classmethod
    def of(cls, timesteps: torch.Tensor) -> _LogSNRSchedule:
        alphas, sigmas = t_to_alpha_sigma(timesteps)
        return cls(alphas, sigmas, torch.log(alphas) - torch.log(sigmas))

    def unipc_step(self, i: int, x: torch.Tensor, preds: tuple) -> torch.Tensor:
        """A UniPC-2 step from timestep i to i + 1. `preds` are the clean-latent predictions
        at i - 1 (None at the first step), i, and i + 1: given the last, the step is the
        corrector, else the predictor."""
        pred_old, pred, pred_new = preds
        alphas, sigmas, lambdas = self.alphas, self.sigmas, self.lambdas
        h = lambdas[i + 1] - lambdas[i]
        b_h = -torch.expm1(-h)  # the first-order (DDIM) coefficient 1 - e^-h, also UniPC's B(h)
        x_next = (sigmas[i + 1] / sigmas[i]) * x + alphas[i + 1] * b_h * pred
        if pred_old is None:
            if pred_new is None:
                return x_next  # the first step is first order
            return x_next + alphas[i + 1] * b_h * 0.5 * (pred_new - pred)
        r = (lambdas[i - 1] - lambdas[i]) / h  # where the older prediction sits, in units of h (< 0)
        d_old = (pred_old - pred) / r
        if pred_new is None:
            return x_next + alphas[i + 1] * b_h * 0.5 * d_old
        # the corrector's weights solve [[1, 1], [r, 1]] @ (rho_old, rho_new) = (b_1, b_2), where
        # b_k are the exponential integrator's phi_k(h) terms scaled by k! / B(h)
        phi_1 = 1 - b_h / h
        b_1, b_2 = phi_1 / b_h, (1 - 2 * phi_1 / h) / b_h
        rho_old = (b_1 - b_2) / (1 - r)
        rho_new = b_1 - rho_old
        return x_next + alphas[i + 1] * b_h * (rho_old * d_old + rho_new * (pred_new - pred))


# The registry

@dataclass(frozen=True)
class Sampler:
    """A sampler and what the rest of ccld needs to know about it."""
    name: str
    fn: Callable[..., torch.Tensor]  # fn(model, x, timesteps, *, callback[, eta, generator])
    forwards: Callable[[int], int]  # (guided) model calls for n steps
    schedule: Callable[..., torch.Tensor]  # schedule(n_steps, start, device=) -> timesteps
    stochastic: bool = False  # takes eta and draws noise from a generator
    fixed_eta: float | None = None  # an eta the sampler always uses (ddpm)

    def timesteps(self, n_steps: int, start: float = 1.0, device=None) -> torch.Tensor:
        return self.schedule(n_steps, start, device=device)

    def eta(self, requested: float) -> float:
        """The eta this sampler runs at when `requested` is asked for (0 if deterministic)."""
        if not self.stochastic:
            return 0.0
        return requested if self.fixed_eta is None else self.fixed_eta

    def __call__(self, model: Model, x: torch.Tensor, timesteps: torch.Tensor, *,
                 eta: float = 0.0, generator: torch.Generator | None = None,
                 callback: Callback = None) -> torch.Tensor:
        noise = {"eta": self.eta(eta), "generator": generator} if self.stochastic else {}
        return self.fn(model, x, _require_steps(timesteps), callback=callback, **noise)


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, fn: Callable[..., torch.Tensor], *,
                     forwards: Callable[[int], int] = lambda n: n,
                     schedule: Callable[..., torch.Tensor] = get_timesteps,
                     stochastic: bool = False, fixed_eta: float | None = None) -> Sampler:
    """Makes `fn` a sampler of the CLI, the web app and the pipeline under `name`."""
    SAMPLERS[name] = Sampler(name, fn, forwards, schedule, stochastic, fixed_eta)
    return SAMPLERS[name]


register_sampler("plms", plms, forwards=lambda n: 4 * min(3, n) + max(0, n - 3))
register_sampler("ddim", ddim, stochastic=True)
register_sampler("ddpm", ddim, stochastic=True, fixed_eta=1.0)
register_sampler("prk", prk, forwards=lambda n: 4 * n)
register_sampler("pie", pie, forwards=lambda n: 2 * n)
register_sampler("plms2", plms2, forwards=lambda n: 2 * min(1, n) + max(0, n - 1))
register_sampler("iplms", iplms)
register_sampler("dpm++2m", dpmpp_2m)
register_sampler("unipc", unipc, schedule=power_timesteps)
# a step-distilled student's own sampler: DDIM on the uniform grid it was distilled on
register_sampler("distilled", ddim, schedule=uniform_timesteps)


def get_sampler(method: str) -> Sampler:
    """The sampler registered under `method`; a one-line CCLDError naming the choices if none."""
    if method not in SAMPLERS:
        raise CCLDError(f"unknown method {method!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[method]


def sample(method: str, model: Model, x: torch.Tensor, timesteps: torch.Tensor, *,
           eta: float = 0.0, generator: torch.Generator | None = None,
           callback: Callback = None) -> torch.Tensor:
    """Runs the named sampler; eta and generator reach only the stochastic ones."""
    return get_sampler(method)(model, x, timesteps, eta=eta, generator=generator,
                               callback=callback)
