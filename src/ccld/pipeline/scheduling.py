"""Scheduling: the pictures of one or many paintings, a batch at a time.

Paintings with a deterministic sampler and the same sampler, schedule, size and decoding share
batches: each row is guided by its own painting's prompts and starts from its own seed's noise,
so every picture is the one its painting paints alone (float rounding aside). A stochastic
sampler's pictures depend on their batches (its step noise is drawn per batch from the seed's
stream), so such a painting is painted alone, from its run's first picture, in its own batches.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

from .conditioning import SamplingPlan
from .hires import pictures_per_call, refine
from .metadata import describe, with_parameters
from .noise import NoiseStream
from .painting import require_finite, sample

Batch = list[tuple[int, list[int]]]  # (painting number, its pictures' places in its run)


def batches(plans: Sequence[SamplingPlan], wanted: Sequence[Sequence[int]],
            batch_size: int) -> list[Batch]:
    """The batches that paint pictures `wanted[n]` (places in painting n's seed run) of each
    plan: shared between plans that may share, in order. A stochastic plan gets batches of its
    own, from its run's first picture up to the last one wanted (the others are dropped); a
    plan of one `picture` paints its whole run in one batch and keeps that picture."""
    groups: dict[tuple, list[int]] = {}
    for number, plan in enumerate(plans):
        if wanted[number]:
            groups.setdefault(plan.shares_batches_with(), []).append(number)
    work = []
    for numbers in groups.values():
        settings = plans[numbers[0]].settings
        end = settings.index + settings.num_images
        if plans[numbers[0]].stochastic:  # whole batches: their pictures depend on them
            (number,) = numbers
            work += [[(number, list(range(first, min(first + batch_size, end))))]
                     for first in range(0, max(wanted[number]) + 1, batch_size)]
            continue
        if settings.picture is not None:  # one picture, in the one batch of its run
            (number,) = numbers
            work.append([(number, list(range(settings.index, end)))])
            continue
        items = [(n, i) for n in numbers for i in sorted(wanted[n])]
        for k in range(0, len(items), batch_size):
            batch: Batch = []
            for number, index in items[k:k + batch_size]:
                if batch and batch[-1][0] == number:
                    batch[-1][1].append(index)
                else:
                    batch.append((number, [index]))
            work.append(batch)
    return work


def paint(pipe, plans: Sequence[SamplingPlan], wanted: Sequence[Sequence[int]],
          batch_size: int, progress: bool = True,
          callback=None) -> Iterator[tuple[int, object]]:
    """(painting number, PIL image with its parameters) of the pictures `wanted[n]` (0 is
    painting n's first picture) of each plan, as each batch is decoded. `callback(info)` is
    called after every sampling step."""
    from tqdm.auto import tqdm

    places = [[plan.settings.index + i for i in w] for plan, w in zip(plans, wanted)]
    wanted_sets = [set(w) for w in places]
    work = batches(plans, places, batch_size)
    streams = [NoiseStream(plan.settings) for plan in plans]
    params = [describe(pipe, plan.settings) for plan in plans]
    for number, plan in enumerate(plans):
        if plan.stochastic:  # its pictures depend on its batches, which its PNGs then record
            params[number]["batch_size"] = batch_size
    total = sum(_steps(plans[batch[0][0]], batch) for batch in work)
    name = plans[0].sampler.name if len({id(p.sampler) for p in plans}) == 1 else "sampling"
    with tqdm(total=total, desc=f"{name} sampling", disable=not progress, leave=False) as bar:
        def step(info: dict) -> None:
            bar.update(1)
            if callback is not None:
                callback(info)

        for batch in work:
            noise = [_noise(streams[number], indices) for number, indices in batch]
            plan = plans[batch[0][0]]
            generator = streams[batch[0][0]].generator if plan.stochastic else None
            with pipe.autocast():
                latents = sample(pipe.unet, [(plans[n].guide, len(i)) for n, i in batch],
                                 _cat(noise), plan.trajectory(generator),
                                 init=[plans[n].init_latent for n, _ in batch],
                                 keep=[_keep(plans[n]) for n, _ in batch], callback=step)
            pixels = pipe.decode(latents, plan.settings.latent_scale,
                                 full_decoder=plan.settings.full_decoder)
            if plan.hires is not None:  # painted alone: the batch is one run's pictures
                pixels = refine(pipe, plan, latents, pixels, batch[0][1], callback=step)
            del latents  # not held while the caller writes the images
            yield from _images(pixels, batch, params, wanted_sets, plans)


def _noise(stream: NoiseStream, indices: list[int]):
    """The noise of pictures `indices` (ascending) of a run, drawn in consecutive runs."""
    import torch

    parts = []
    for _, run in itertools.groupby(enumerate(indices), lambda pair: pair[1] - pair[0]):
        run = [index for _, index in run]
        parts.append(stream.take(run[0], len(run)))
    return torch.cat(parts)


def _steps(plan: SamplingPlan, batch: Batch) -> int:
    """The sampling steps a batch takes: its plan's, and a larger picture's refinement's."""
    steps = len(plan.timesteps)
    if plan.hires is not None:
        calls = -(-len(batch[0][1]) // pictures_per_call(plan.hires))
        steps += calls * len(plan.hires.times)
    return steps


def _keep(plan: SamplingPlan):
    return None if plan.inpainting is None else plan.inpainting.keep


def _cat(tensors):
    import torch

    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _images(pixels, batch: Batch, params, wanted_sets, plans) -> Iterator[tuple[int, object]]:
    from ..io.images import tensor_to_pil

    pixels = iter(require_finite(pixels.float().cpu(), "decoding"))
    # a batch of one run's consecutive pictures is recorded, so that each can be painted again
    # exactly, in the same company (kernels of other batch sizes round differently)
    company = None
    if len(batch) == 1 and len(batch[0][1]) > 1:
        first, count = batch[0][1][0], len(batch[0][1])
        if batch[0][1] == list(range(first, first + count)):
            company = [first, count]
    for number, indices in batch:
        for index in indices:
            image = next(pixels)
            if index in wanted_sets[number]:
                picture = tensor_to_pil(image)
                if plans[number].inpainting is not None:
                    picture = plans[number].inpainting.composite(picture)
                yield number, with_parameters(picture, params[number], index, company)
