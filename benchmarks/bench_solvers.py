"""Sampler accuracy: each method and step count against a 500-step solution from the same noise.

    python benchmarks/bench_solvers.py                        # both tables
    python benchmarks/bench_solvers.py --only trained --seeds 0-15
    python benchmarks/bench_solvers.py --only random --reference-steps 200

For every setting (method, steps) the table gives the guided forwards it costs and the relative
RMS error of its final latent against plms with --reference-steps steps (500 by default) from
the same noise and condition, at guidance 3: the mean and the worst over the seeds, and both as
a ratio to the demo's plms-15 (per seed, then averaged / the worst). Two models:

  random   the released student's architecture (U-Net 192 x 1,1,2,2, 32x32 latents) with
           random weights, conditioned on a random unit embedding (one per seed)
  trained  the small U-Net of benchmarks/fixtures/toy_unet.safetensors, trained here on
           synthetic shapes by benchmarks/make_toy_model.py (16x16 latents), conditioned on
           the CLOOB embeddings of held-out images (seed s uses image s mod 8)

A random net's velocity field is far rougher than a trained one's, so the ranking of solvers
may differ between the two; the last line names the fastest setting (fewest guided forwards)
whose mean error is no worse than plms-15's on every table run.

The reference solutions are cached (see --cache-dir), keyed by the model weights, noise,
condition and step count, so a second run costs only the table itself. Cost on the 2-core
development machine, one thread, shared: trained, 8 seeds, about 6 minutes (2 with cached
references); random, 2 seeds, about 28 minutes (8 cached): a guided forward of the student
at 32x32 takes about 1 s there, and each seed needs 509 for its reference and 210 for the table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ccld import sampling
from ccld.models.unet import CCLDUNet, load_unet

HERE = Path(__file__).resolve().parent
TOY_UNET = HERE / "fixtures" / "toy_unet.safetensors"
TOY_HELDOUT = HERE / "fixtures" / "toy_heldout.safetensors"
STUDENT = (192, (1, 1, 2, 2))
GUIDANCE = 3.0
DEMO = ("plms", 15)  # the reference demo's default: the accuracy to match
REFERENCE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ccld" / "bench_solvers"

SOLVER_SETTINGS = [("plms", 15), ("plms", 10), ("iplms", 10), ("plms2", 10), ("ddim", 10),
                   ("dpm++2m", 8), ("dpm++2m", 10), ("dpm++2m", 12), ("dpm++2m", 15),
                   ("unipc", 6), ("unipc", 7), ("unipc", 8), ("unipc", 9), ("unipc", 10),
                   ("unipc", 11), ("unipc", 12), ("unipc", 13), ("unipc", 15),
                   ("unipc", 20), ("unipc", 30)]


@dataclass
class Case:
    """One seed of one table: a guided model, its starting noise, and what identifies them."""
    model: Callable  # guided: model(x, t) -> v
    noise: torch.Tensor
    key: bytes  # the weights, noise, condition and guidance, for the reference cache


def fingerprint(*tensors: torch.Tensor) -> hashlib._Hash:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().float().contiguous().cpu()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h


def weights_digest(unet: torch.nn.Module) -> bytes:
    return fingerprint(*unet.state_dict().values()).digest()


def guided_case(unet, weights_key: bytes, embed: torch.Tensor, noise: torch.Tensor) -> Case:
    embeds = torch.cat([torch.zeros_like(embed), embed])
    weights = sampling.condition_weights([GUIDANCE])
    key = fingerprint(embeds, noise, weights)
    key.update(weights_key)
    return Case(sampling.guided_model(unet, embeds, weights), noise, key.digest())


def random_cases(seeds: list[int]) -> tuple[str, list[Case]]:
    torch.manual_seed(0)  # one net for every seed; the seed picks the noise and the condition
    unet = CCLDUNet(*STUDENT).eval().requires_grad_(False)
    digest = weights_digest(unet)
    cases = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn([1, 4, 32, 32], generator=g)
        embed = torch.nn.functional.normalize(torch.randn([1, 512], generator=g), dim=-1)
        cases.append(guided_case(unet, digest, embed, noise))
    return "student U-Net 192 x 1,1,2,2, random weights, 32x32 latents", cases


def trained_cases(seeds: list[int]) -> tuple[str, list[Case]]:
    from safetensors.torch import load_file

    if not TOY_UNET.is_file():
        raise SystemExit(f"{TOY_UNET} is missing: run benchmarks/make_toy_model.py")
    unet = load_unet(TOY_UNET).float()  # stored in fp16
    held = load_file(str(TOY_HELDOUT))["embed"].float()
    digest = weights_digest(unet)
    size = 16
    cases = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn([1, 4, size, size], generator=g)
        cases.append(guided_case(unet, digest, held[seed % len(held)][None], noise))
    return (f"toy U-Net {unet.base_channels} x {','.join(map(str, unet.channel_multipliers))} "
            f"trained on synthetic shapes, {size}x{size} latents, held-out image embeddings",
            cases)


def reference(case: Case, steps: int, cache: Path | None) -> torch.Tensor:
    path = None
    if cache is not None:
        h = hashlib.sha256(case.key)
        h.update(f"plms-{steps}".encode())
        path = cache / f"{h.hexdigest()[:32]}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
    out = sampling.plms(case.model, case.noise, sampling.get_timesteps(steps))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def relative_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def run_setting(case: Case, method: str, steps: int) -> torch.Tensor:
    solver = sampling.get_sampler(method)
    return solver(case.model, case.noise, solver.timesteps(steps))


@torch.inference_mode()
def measure(cases: list[Case], settings, reference_steps: int, cache: Path | None) -> dict:
    """{(method, steps): [error per case]}."""
    errors = {s: [] for s in settings}
    for case in cases:
        ref = reference(case, reference_steps, cache)
        for method, steps in settings:
            errors[(method, steps)].append(relative_rms(run_setting(case, method, steps), ref))
    return errors


def summarise(errors: dict) -> dict:
    """Per setting: mean and worst error, and the mean and worst of its ratio to plms-15."""
    demo = errors[DEMO]
    rows = {}
    for setting, errs in errors.items():
        ratios = [e / d for e, d in zip(errs, demo)]
        rows[setting] = {"mean": sum(errs) / len(errs), "worst": max(errs),
                         "ratio_mean": sum(ratios) / len(ratios), "ratio_worst": max(ratios),
                         "seeds_no_worse": sum(r <= 1 for r in ratios), "seeds": len(errs)}
    demo_mean = rows[DEMO]["mean"]
    for row in rows.values():
        row["ok"] = row["mean"] <= demo_mean
    return rows


def print_table(title: str, rows: dict, reference_steps: int, seeds: list[int], seconds: float):
    print(f"\n## {title}\n")
    print(f"relative RMS error against plms-{reference_steps} from the same noise, guidance "
          f"{GUIDANCE:g}, seeds {format_seeds(seeds)} ({seconds:.0f} s)\n")
    print("| method | steps | guided forwards | mean error | worst error | mean / plms-15 "
          "| worst / plms-15 | seeds no worse | no worse on average |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (method, steps), r in rows.items():
        forwards = sampling.get_sampler(method).forwards(steps)
        print(f"| {method} | {steps} | {forwards} | {r['mean']:.4f} | {r['worst']:.4f} | "
              f"{r['ratio_mean']:.2f} | {r['ratio_worst']:.2f} | {r['seeds_no_worse']}/"
              f"{r['seeds']} | {'yes' if r['ok'] else 'no'} |")


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += list(range(int(first), int(last or first) + 1))
    return seeds


def format_seeds(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


TABLES = {"random": random_cases, "trained": trained_cases}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=list(TABLES), help="one table (default: both)")
    p.add_argument("--reference-steps", type=int, default=500)
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="noise seeds, e.g. 0-7 or 0,3,5 (default: 0-7 trained, 0-1 random, "
                        "whose 32x32 student forwards cost ~25x more)")
    p.add_argument("--cache-dir", type=Path,
                   default=REFERENCE_CACHE, help="where reference solutions are kept")
    p.add_argument("--no-cache", action="store_true", help="recompute the references")
    args = p.parse_args()
    cache = None if args.no_cache else args.cache_dir
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tables = {}
    for name in [args.only] if args.only else list(TABLES):
        seeds = args.seeds or (parse_seeds("0-7") if name == "trained" else [0, 1])
        started = time.perf_counter()
        title, cases = TABLES[name](seeds)
        tables[name] = summarise(measure(cases, SOLVER_SETTINGS, args.reference_steps, cache))
        print_table(f"{name}: {title}", tables[name], args.reference_steps, seeds,
                    time.perf_counter() - started)
    # fewest forwards first; among equals, the smallest mean ratio to plms-15 on its worse table
    passing = [s for s in SOLVER_SETTINGS if all(rows[s]["ok"] for rows in tables.values())]
    best = min(passing, key=lambda s: (sampling.get_sampler(s[0]).forwards(s[1]),
                                       max(rows[s]["ratio_mean"] for rows in tables.values())))
    print(f"\nfastest setting no worse than plms-15 on average on the {' and '.join(tables)} "
          f"table{'s' if len(tables) > 1 else ''}: {best[0]} {best[1]} steps "
          f"({sampling.get_sampler(best[0]).forwards(best[1])} guided forwards)")


if __name__ == "__main__":
    main()
