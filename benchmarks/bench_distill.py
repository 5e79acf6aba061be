"""Few-step students at toy scale: guidance distillation, then progressive distillation to 4 steps.

    python benchmarks/bench_distill.py --seed 0 --json distill-0.json

Everything runs through ccld's own commands (`ccld train`, `ccld distill --objective guidance`,
`ccld distill --objective progressive`), in this process, on a data set the script makes:

1. coloured shapes (`make_toy_model.draw_image`, seeded), as 4 x 8 x 8 "latents" (the RGB
   image pooled to 8 x 8, and its centred grey level), with a synthetic 32-dimensional
   condition per image: a fixed random projection of its 2 x 2 colour layout (a lossy summary,
   as a CLOOB embedding is). No autoencoder, no CLOOB: the latent cache is written directly.
2. a small teacher trained on them (U-Net 16 x 1,1,2,2, condition dropped 20% of the time);
3. the teacher's own guided (w = 3, unipc-10) paintings of the training conditions, from new
   noise: the latents the students learn on (`--students-learn-on images` for the training
   images instead). Guidance pushes a painting off the data set, so the latents a guided
   trajectory passes through at low noise are unlike any noised training image;
4. a guidance-distilled student (started from the teacher): by default the fixed-w case,
   `--distill-guidance 3`, since everything is evaluated at w = 3 (`--guidance-range 1,8` for
   a student taking w as an input), learning on conditioned rows only (`--distill-cond-drop`);
5. progressive distillation of that student to 4 steps: a first round in which an 8-step
   student learns the guidance student's 64-step DDIM (`--start-steps` 64,
   `--teacher-substeps` 8), then a round halving it (`--rounds` 2), the second round's teacher
   the first round's student. `--teacher-substeps 2 --rounds 4` is Salimans & Ho's chain of
   halvings, 64 -> 32 -> 16 -> 8 -> 4, as accurate at 8 steps on seed 0 but slower.
   `--progressive-teacher teacher` has the first round learn the plain teacher's guided
   (classifier-free) DDIM-64 instead, its student started from the guidance student: more
   accurate targets, the same students on seed 0. Every distillation run decays its learning
   rate to 0 (`--lr-schedule cosine`).

Then, on held-out conditions (images never trained on) and held-out noise, each setting's
relative RMS error of the final clean latent against the teacher's 500-step guided solution
(plms, w = 3) from the same noise, with its forwards and U-Net rows per image per forward:
teacher plms-15, unipc-10 and unipc-4 (classifier-free guidance, 2 rows), the guidance student
with unipc-10 (1 row), and the final 4-step student (1 row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_toy_model's shapes

SIDE = 8  # latent side
EMBED_DIM = 32
GUIDANCE = 3.0
TRAIN_ITEMS = 1024
HELD_OUT = 16  # conditions, each with its own noise


# 1. Data

def shape_latents(seed: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [count, 4, 8, 8], conditions [count, 32]) of images first..first+count-1."""
    from make_toy_model import draw_image

    pixels = []
    for i in range(first, first + count):
        image = draw_image(np.random.default_rng([seed, i]), 4 * SIDE)
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1))
    rgb = F.avg_pool2d(torch.stack(pixels) / 127.5 - 1, 4)
    grey = rgb.mean(1, keepdim=True)
    latents = torch.cat([rgb, grey - grey.mean((2, 3), keepdim=True)], 1) * 1.5
    layout = F.avg_pool2d(rgb, SIDE // 2).flatten(1)  # 3 colours x 2 x 2 quadrants
    projection = torch.randn([12, EMBED_DIM], generator=torch.Generator().manual_seed(1234))
    return latents, layout @ projection


def write_latent_cache(folder: Path, latents: torch.Tensor, embeds: torch.Tensor) -> Path:
    """A latent cache as `ccld encode-dataset` writes one: posterior means, a log-variance so
    low that every posterior sample is the mean, and the conditions."""
    from safetensors.torch import save_file

    from ccld.training.data import CACHE_FORMAT, CACHE_INDEX, CACHE_VERSION, shard_name

    folder.mkdir(parents=True, exist_ok=True)
    n = len(latents)
    save_file({"mean": latents.contiguous(), "logvar": torch.full_like(latents, -30.0),
               "embed": embeds.contiguous(), "index": torch.arange(n)},
              str(folder / shard_name(0)),
              metadata={"first": "0", "stop": str(n), "count": str(n), "skipped": "[]"})
    index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "source": "bench_distill shapes",
             "latent_shape": [4, SIDE, SIDE], "embed_dim": EMBED_DIM, "num_shards": 1,
             "complete": True, "num_encoded": n, "num_skipped": 0,
             "shards": [{"file": shard_name(0), "first": 0, "stop": n, "count": n}],
             "skipped": []}
    (folder / CACHE_INDEX).write_text(json.dumps(index))
    return folder


# 2-4. Training, with ccld's commands

def ccld(*args) -> None:
    from ccld.apps.cli import main

    print("$ ccld", " ".join(map(str, args)), flush=True)
    if main([str(a) for a in args]) != 0:
        raise SystemExit(f"ccld {args[0]} failed")


def run_options(args, steps: int, lr: float, batch_size: int, schedule: str,
                cond_drop: float = 0.2) -> list:
    return ["--batch-size", batch_size, "--max-steps", steps, "--lr", lr,
            "--lr-schedule", schedule, "--cond-drop", cond_drop,
            "--seed", args.seed, "--autoencoder-scale", 1, "--ema-warmup-steps", 10 ** 9,
            "--checkpoint-every", 0, "--log-every", 100, "--demo-every", 0,
            "--num-workers", 0, "--no-tensorboard", "--cpu"]


# 5. Errors against the teacher's 500-step guided solution

def relative_rms(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per case."""
    return (out - ref).pow(2).flatten(1).mean(1).sqrt() / ref.pow(2).flatten(1).mean(1).sqrt()


def guided_model(unet, embeds: torch.Tensor):
    """v(x, t) guided at w = GUIDANCE for a whole batch, each case its own condition."""
    from ccld import sampling

    weights = sampling.condition_weights([GUIDANCE])

    def fn(x, t):
        n = x.shape[0]
        embed = torch.cat([torch.zeros_like(embeds), embeds])
        v = unet(torch.cat([x, x]), torch.cat([t, t]), embed).float()
        return (v.view(2, n, *x.shape[1:]) * weights.view(2, 1, 1, 1, 1)).sum(0)
    return fn


@torch.inference_mode()
def teacher_paintings(teacher_file: Path, embeds: torch.Tensor, seed: int) -> torch.Tensor:
    """The teacher's w = GUIDANCE latents for the training conditions (unipc-10, new noise):
    the data the students learn on. Guidance pushes paintings off the data set (saturated
    colours), so the latents a guided trajectory passes through at low noise are unlike any
    noised training image; noising the teacher's own guided paintings gives the students
    those inputs to learn on (the guidance student's error falls by about a fifth)."""
    from ccld import sampling
    from ccld.models.unet import load_unet

    noise = torch.randn([len(embeds), 4, SIDE, SIDE],
                        generator=torch.Generator().manual_seed(20_000 + seed))
    return sampling.unipc(guided_model(load_unet(teacher_file), embeds), noise,
                          sampling.power_timesteps(10))


@torch.inference_mode()
def evaluate(teacher, guidance_student, student, embeds, noise, reference_steps: int) -> dict:
    from ccld import sampling

    def guided(unet):
        return guided_model(unet, embeds)

    def one_row(unet):
        return lambda x, t: unet(x, t, embeds, guidance=torch.full_like(t, GUIDANCE)).float()

    ref = sampling.plms(guided(teacher), noise, sampling.get_timesteps(reference_steps))
    settings = {
        "teacher_plms15": (guided(teacher), "plms", 15, 2, None),
        "teacher_unipc10": (guided(teacher), "unipc", 10, 2, None),
        "teacher_unipc4": (guided(teacher), "unipc", 4, 2, None),
        "guidance_student_unipc10": (one_row(guidance_student), "unipc", 10, 1, None),
        "student": (one_row(student), "distilled", student.distilled_steps, 1,
                    student.distilled_timesteps),
    }
    rows = {}
    for name, (model, method, steps, rows_per_image, timesteps) in settings.items():
        solver = sampling.get_sampler(method)
        out = solver(model, noise, solver.timesteps(steps) if timesteps is None else timesteps)
        errors = relative_rms(out, ref)
        rows[name] = {"method": method, "steps": steps, "forwards": solver.forwards(steps),
                      "rows_per_image": rows_per_image, "error": errors.mean().item(),
                      "worst": errors.max().item()}
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the nets and the noise")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: temporary)")
    p.add_argument("--teacher-batch-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="of the distillation runs")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--guidance-steps", type=int, default=1600)
    p.add_argument("--guidance-lr", type=float, default=1e-3)
    p.add_argument("--students-learn-on", choices=["paintings", "images"], default="paintings",
                   help="the teacher's guided paintings of the training conditions, or the "
                        "training images themselves")
    p.add_argument("--guidance-range", default=None,
                   help="distil for a range of w, e.g. 1,8 (default: the fixed w = 3 at which "
                        "everything is evaluated, --distill-guidance 3)")
    p.add_argument("--distill-cond-drop", type=float, default=None,
                   help="condition dropout of the distillation runs (default: 0 for the fixed-w "
                        "student, which is only ever sampled conditioned, at w = 3, so dropped "
                        "rows' unconditional velocities would be steps spent on nothing; ccld's "
                        "0.2 with --guidance-range, whose student keeps them for w = 1)")
    p.add_argument("--progressive-teacher", choices=["teacher", "guidance"], default="guidance",
                   help="whose solve the first progressive round's student learns: the "
                        "guidance student's (Meng et al.: the student starts from its teacher), "
                        "or the plain teacher's, guided by classifier-free guidance (two rows a "
                        "forward), the student starting from the guidance student "
                        "(--student-init)")
    p.add_argument("--round-steps", type=int, default=500, help="optimizer steps per round")
    p.add_argument("--round-lr", type=float, default=5e-4)
    p.add_argument("--lr-schedule", default="cosine", help="of every distillation run")
    p.add_argument("--start-steps", type=int, default=64)
    p.add_argument("--teacher-substeps", type=int, default=8,
                   help="the first round's teacher steps per student step (2: halving)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reference-steps", type=int, default=500)
    args = p.parse_args()

    if args.distill_cond_drop is None:
        args.distill_cond_drop = 0.2 if args.guidance_range else 0.0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    stages = {}  # seconds of each stage: where the time goes

    def stage_done(name):
        stages[name] = round(time.perf_counter() - started - sum(stages.values()), 1)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        latents, embeds = shape_latents(args.seed, 0, TRAIN_ITEMS)
        cache = write_latent_cache(work / "cache", latents, embeds)
        ccld("train", "--data", cache, "--out", work / "teacher", "--base-channels", 16,
             "--channel-multipliers", "1,1,2,2",
             *run_options(args, args.teacher_steps, 1e-3, args.teacher_batch_size, "constant"))
        teacher_file = work / "teacher" / "model_ema.safetensors"
        stage_done("teacher")
        if args.students_learn_on == "paintings":
            cache = write_latent_cache(work / "paintings",
                                       teacher_paintings(teacher_file, embeds, args.seed), embeds)
            stage_done("teacher_paintings")
        guidance = (["--guidance-range", args.guidance_range] if args.guidance_range
                    else ["--distill-guidance", GUIDANCE])
        ccld("distill", "--objective", "guidance", *guidance, "--data", cache,
             "--out", work / "guidance", "--teacher", teacher_file,
             *run_options(args, args.guidance_steps, args.guidance_lr, args.batch_size,
                         args.lr_schedule, args.distill_cond_drop))
        guidance_file = work / "guidance" / "model_student.safetensors"
        stage_done("guidance_distillation")
        if args.progressive_teacher == "teacher":  # guided by CFG, the student from `guidance`
            first_round = ["--teacher", teacher_file, *guidance, "--student-init", guidance_file]
        else:
            first_round = ["--teacher", guidance_file]
        ccld("distill", "--objective", "progressive", "--data", cache, "--out",
             work / "progressive", *first_round, "--start-steps", args.start_steps,
             "--teacher-substeps", args.teacher_substeps, "--rounds", args.rounds,
             *run_options(args, args.round_steps, args.round_lr, args.batch_size,
                          args.lr_schedule, args.distill_cond_drop))
        trained = time.perf_counter() - started
        stage_done("progressive_rounds")

        from ccld.models.unet import load_unet

        teacher, guidance_student, student = (
            load_unet(path) for path in (teacher_file, guidance_file,
                                         work / "progressive" / "model_student.safetensors"))
        _, held_embeds = shape_latents(args.seed, TRAIN_ITEMS, HELD_OUT)
        noise = torch.randn([HELD_OUT, 4, SIDE, SIDE],
                            generator=torch.Generator().manual_seed(10_000 + args.seed))
        rows = evaluate(teacher, guidance_student, student, held_embeds, noise,
                        args.reference_steps)

    print(f"\nseed {args.seed}: relative RMS error of the final latent against the teacher's "
          f"plms-{args.reference_steps} guided solution (w = {GUIDANCE:g}), {HELD_OUT} held-out "
          f"conditions and noises; trained in {trained:.0f} s, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| setting | forwards | rows per image | U-Net rows per image | mean error | worst |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} ({r['method']}-{r['steps']}) | {r['forwards']} | {r['rows_per_image']} "
              f"| {r['forwards'] * r['rows_per_image']} | {r['error']:.4f} | {r['worst']:.4f} |")
    stage_done("evaluation")  # the 500-step references and every setting's sampling
    print("seconds per stage:", ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    result = {f"{name}_error": r["error"] for name, r in rows.items()}
    result.update(student_forwards=rows["student"]["forwards"],
                  student_rows_per_image=rows["student"]["rows_per_image"],
                  seed=args.seed, settings=rows, train_seconds=round(trained, 1),
                  total_seconds=round(time.perf_counter() - started, 1), stage_seconds=stages,
                  options={k: v for k, v in vars(args).items() if k not in ("json", "work")},
                  threads=torch.get_num_threads())
    ok = (result["student_error"] <= result["teacher_unipc10_error"]
          and result["student_error"] <= 0.7 * result["teacher_unipc4_error"])
    result["targets_met"] = ok
    print(f"\n4-step student no worse than teacher unipc-10 and at most 0.7x teacher unipc-4: "
          f"{'yes' if ok else 'no'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not math.isfinite(result["student_error"]):
        raise SystemExit("the student's samples are not finite")


if __name__ == "__main__":
    main()
