"""`ccld evaluate`: a distilled student against its teacher, on the same noise and prompts.

For every prompt both models sample from the same seeded noise with the same guided sampler.
Reported: the v-MSE between the student's and the teacher's guided velocity at every input the
teacher saw along its own trajectory; the PSNR of the student's image against the teacher's;
the CLOOB similarity of each model's images to the prompt; and seconds per image (sampling and
decoding) for each.

Each model is sampled as what it is: a guidance-distilled student gives the guided velocity at
the requested guidance in one row per image (guiding it again, as for a plain model, would
apply guidance twice), and a step-distilled student runs its own `distilled` sampler at its own
step count, whatever --method and --steps say for the teacher. The table shows each model's
forwards and rows per image.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .. import sampling
from ..pipeline.noise import NoiseStream
from ..pipeline.painting import Guide, Trajectory, decoding_scale, guided_model, paint, timesteps
from ..settings import Settings
from .data import cloob_input


@dataclass
class HowSampled:
    """How `evaluate_student` samples one model: its sampler, steps and guide."""
    method: str
    steps: int
    guidance: float | None  # the one-row w of a guidance-distilled student, else None
    forwards: int
    rows_per_image: int

    @classmethod
    def of(cls, unet, method: str, steps: int, guidance: float) -> HowSampled:
        if unet.distilled_steps is not None:
            method, steps = "distilled", unet.distilled_steps
        one_row = sampling.one_row_guidance(unet.distilled_guidance, [guidance])
        return cls(method, steps, one_row, sampling.get_sampler(method).forwards(steps),
                   1 if one_row is not None else 2)

    def describe(self) -> dict:
        return {"method": self.method, "steps": self.steps, "forwards": self.forwards,
                "rows_per_image": self.rows_per_image, "one_row_guidance": self.guidance}


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _sample_images(unet, how: HowSampled, autoencoder, guide: Guide, noise, record=None):
    """(pixels in [-1, 1], seconds) for one sampling run and its decoding, as the pipeline
    paints (`ccld.pipeline.painting`)."""
    device = noise.device
    sampler = sampling.get_sampler(how.method)
    path = Trajectory(sampler, timesteps(unet, sampler, how.steps, device=device))
    _synchronize(device)
    start = time.perf_counter()
    pixels = paint(unet, autoencoder, [(guide, noise.shape[0])], noise, path,
                   scale=decoding_scale(unet), record=record)
    _synchronize(device)
    return pixels.clamp(-1, 1), time.perf_counter() - start


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak 1 after mapping to [0, 1])."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


@torch.no_grad()
def cloob_similarity(cloob, pixels: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's CLOOB embedding to the text's."""
    size = cloob.config["image_encoder"]["image_size"]
    images = cloob_input((pixels + 1) / 2, size).clamp(0, 1)
    embeds = torch.nn.functional.normalize(cloob.encode_image(images).float(), dim=-1)
    return embeds @ torch.nn.functional.normalize(text_embed.float(), dim=-1)


@torch.no_grad()
def evaluate_student(teacher, student, autoencoder, cloob, settings: Settings,
                     images_folder=None) -> dict:
    """Both models paint every prompt of `settings` (prompt j from seed + j), as each samples
    (see `HowSampled`); the metrics per prompt and their means."""
    device = next(teacher.parameters()).device
    how = {"teacher": HowSampled.of(teacher, settings.method, settings.steps, settings.guidance),
           "student": HowSampled.of(student, settings.method, settings.steps, settings.guidance)}
    rows = []
    totals = {"teacher_seconds": 0.0, "student_seconds": 0.0}
    for j, prompt in enumerate(p.value for p in settings.prompts):
        text_embed = cloob.encode_text([prompt]).float().to(device)
        conditions = torch.cat([torch.zeros_like(text_embed), text_embed])
        guides = {name: Guide.of(unet, conditions, [settings.guidance])
                  for name, unet in (("teacher", teacher), ("student", student))}
        noise = NoiseStream(settings.replace(seed=settings.seed + j)).take(
            0, settings.num_images).to(device)
        record = []
        teacher_pixels, teacher_seconds = _sample_images(teacher, how["teacher"], autoencoder,
                                                         guides["teacher"], noise, record)
        student_pixels, student_seconds = _sample_images(student, how["student"], autoencoder,
                                                         guides["student"], noise)
        teacher_guided = guided_model(teacher, [(guides["teacher"], noise.shape[0])])
        student_guided = guided_model(student, [(guides["student"], noise.shape[0])])
        v_mse = sum(torch.nn.functional.mse_loss(student_guided(x, t).float(),
                                                 teacher_guided(x, t).float()).item()
                    for x, t in record) / len(record)
        rows.append({
            "prompt": prompt, "v_mse": v_mse,
            "psnr_db": psnr(student_pixels, teacher_pixels).mean().item(),
            "cloob_similarity_teacher": cloob_similarity(cloob, teacher_pixels, text_embed[0]).mean().item(),
            "cloob_similarity_student": cloob_similarity(cloob, student_pixels, text_embed[0]).mean().item(),
        })
        totals["teacher_seconds"] += teacher_seconds
        totals["student_seconds"] += student_seconds
        if images_folder is not None:
            _save_comparison(images_folder, j, prompt, teacher_pixels, student_pixels)
    count = len(settings.prompts) * settings.num_images
    summary = {k: sum(r[k] for r in rows) / len(rows)
               for k in ("v_mse", "psnr_db", "cloob_similarity_teacher", "cloob_similarity_student")}
    summary["seconds_per_image_teacher"] = totals["teacher_seconds"] / count
    summary["seconds_per_image_student"] = totals["student_seconds"] / count
    summary["speedup"] = totals["teacher_seconds"] / max(totals["student_seconds"], 1e-12)
    return {"settings": {"num_images": settings.num_images, "steps": settings.steps,
                         "method": settings.method, "guidance": settings.guidance,
                         "seed": settings.seed, "size": settings.width, "device": str(device)},
            "sampled": {name: h.describe() for name, h in how.items()},
            "prompts": rows, "summary": summary}


def _save_comparison(folder, j, prompt, teacher_pixels, student_pixels):
    from pathlib import Path

    from ..io.images import make_grid, save_png, tensor_to_pil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = [tensor_to_pil(p) for p in torch.cat([teacher_pixels, student_pixels])]
    save_png(make_grid(images, cols=len(teacher_pixels)), folder / f"compare-{j:03d}.png",
             {"prompt": prompt, "rows": ["teacher", "student"]})


def format_table(result: dict) -> str:
    """A plain-text table of the per-prompt metrics and the summary."""
    header = f"{'prompt':<40} {'v-MSE':>10} {'PSNR dB':>8} {'CLOOB T':>8} {'CLOOB S':>8}"
    lines = [header, "-" * len(header)]
    for r in result["prompts"]:
        name = r["prompt"] if len(r["prompt"]) <= 40 else r["prompt"][:37] + "..."
        lines.append(f"{name:<40} {r['v_mse']:>10.5f} {r['psnr_db']:>8.2f} "
                     f"{r['cloob_similarity_teacher']:>8.4f} {r['cloob_similarity_student']:>8.4f}")
    s = result["summary"]
    lines.append("-" * len(header))
    lines.append(f"{'mean':<40} {s['v_mse']:>10.5f} {s['psnr_db']:>8.2f} "
                 f"{s['cloob_similarity_teacher']:>8.4f} {s['cloob_similarity_student']:>8.4f}")
    for name, how in result.get("sampled", {}).items():
        lines.append(f"{name}: {how['method']} {how['steps']} steps, {how['forwards']} forwards "
                     f"x {how['rows_per_image']} row(s) per image"
                     + (f" (guidance {how['one_row_guidance']:g} distilled into one row)"
                        if how["one_row_guidance"] is not None else ""))
    speed = s["speedup"]
    lines.append(f"seconds per image: teacher {s['seconds_per_image_teacher']:.3f}, student "
                 f"{s['seconds_per_image_student']:.3f} "
                 f"({speed:.2f}x {'faster' if speed >= 1 else 'slower'})"
                 if math.isfinite(speed) else "")
    return "\n".join(lines)
