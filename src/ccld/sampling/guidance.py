"""Classifier-free guidance: the guided velocity of a v-model as the samplers call it,
`model(x, t)`, from a U-Net and the conditions' embeddings and weights."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .samplers import Model


def guided_model(model: Callable[..., torch.Tensor], embeds: torch.Tensor,
                 weights: torch.Tensor) -> Model:
    """v = sum_i weights[i] * model(x, t, embeds[i]), all conditions in one batched forward.

    Row 0 of `embeds` is normally the zero (unconditional) embedding with weight
    1 - sum(user weights), which makes this the usual classifier-free guidance.
    """
    k = embeds.shape[0]
    embeds_for_batch = {}  # batch size -> the conditions laid out per row, built once not per step

    def fn(x, t):
        n = x.shape[0]
        if n not in embeds_for_batch:
            embeds_for_batch[n] = embeds.repeat_interleave(n, 0)
        vs = model(x.repeat(k, 1, 1, 1), t.repeat(k), embeds_for_batch[n]).float()
        vs = vs.view(k, n, *x.shape[1:])
        return (vs * weights.view(k, 1, 1, 1, 1)).sum(0)  # the mix in float32 whatever the net ran in

    return fn


def stacked_guided_model(model: Callable[..., torch.Tensor],
                         parts: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> Model:
    """Several guided models side by side in one forward: `parts` lists (embeds, weights, rows),
    and the first `rows` rows of x are guided as `guided_model(model, embeds, weights)` guides
    them, the next rows by the next part, and so on. Requests with different prompts (even
    different numbers of them) thus share the U-Net's batch."""
    counts = [rows for _, _, rows in parts]
    sizes = [embeds.shape[0] for embeds, _, _ in parts]
    embeds_per_row = torch.cat([embeds.repeat_interleave(rows, 0) for embeds, _, rows in parts])

    def fn(x, t):
        xs, ts = x.split(counts), t.split(counts)
        vs = model(torch.cat([xi.repeat(k, 1, 1, 1) for xi, k in zip(xs, sizes)]),
                   torch.cat([ti.repeat(k) for ti, k in zip(ts, sizes)]), embeds_per_row).float()
        mixed = []
        for (_, weights, rows), k, v in zip(parts, sizes, vs.split([k * n for k, n in zip(sizes, counts)])):
            mixed.append((v.view(k, rows, *x.shape[1:]) * weights.view(k, 1, 1, 1, 1)).sum(0))
        return torch.cat(mixed)

    return fn


def distilled_guidance_model(model: Callable[..., torch.Tensor], embed: torch.Tensor,
                             guidance: float) -> Model:
    """v = model(x, t, embed, guidance): a guidance-distilled student gives the guided velocity
    in one row per image, where `guided_model` needs a row per condition."""
    embeds_for_batch = {}

    def fn(x, t):
        n = x.shape[0]
        if n not in embeds_for_batch:
            embeds_for_batch[n] = embed.reshape(1, -1).expand(n, -1)
        w = torch.full([n], float(guidance), device=x.device)
        return model(x, t, embeds_for_batch[n], guidance=w).float()

    return fn


def one_row_guidance(guidance_range: tuple[float, float] | None,
                     weights: Sequence[float]) -> float | None:
    """The w at which a guidance-distilled student (distilled for `guidance_range`) gives the
    guided velocity of conditions with user `weights` in one row, or None where it cannot.

    One condition whose weight lies in the range: that weight. Anything else (several
    conditions, which mix; a negative weight or one outside the range; no condition) needs
    ordinary guidance over the student's plain velocities (at w = 1, its conditional and
    unconditional ones), a row per condition as for any model.
    """
    if guidance_range is None or len(weights) != 1:
        return None
    low, high = guidance_range
    return float(weights[0]) if low <= float(weights[0]) <= high else None


def condition_weights(user_weights: Sequence[float], device=None) -> torch.Tensor:
    """Prepends the unconditional weight 1 - sum(w), as the reference demo does."""
    user_weights = [float(w) for w in user_weights]
    return torch.tensor([1 - sum(user_weights), *user_weights], device=device)
