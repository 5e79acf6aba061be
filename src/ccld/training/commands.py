"""The training commands: encode-dataset, autoencoder-scale, train, distill, distill-decoder,
evaluate.

Only argparse is imported at module level, so `ccld --help` stays fast; the heavy modules load
when a command runs. Every command works alone or under `accelerate launch -m ccld ...` /
`torchrun -m ccld ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

from ..apps.options import add_encoder_options
from ..errors import CCLDError
from .encoders import encoder_files, load_encoders, load_unet_weights, resolve_encoder_files

TEACHER_ARCHITECTURE = (192, "4,4,8,8")  # the WikiArt teacher
STUDENT_ARCHITECTURE = (192, "1,1,2,2")  # the distilled WikiArt student
DEFAULT_GUIDANCE_RANGE = "1,8"  # Meng et al.'s range, and around the demo's 3

logger = logging.getLogger(__name__)


# Shared pieces

def parse_multipliers(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or any(v < 1 for v in values):
        raise CCLDError(f"--channel-multipliers {text!r}: give four positive integers separated "
                        "by commas, e.g. 1,1,2,2")
    return values


def new_architecture(args, default: tuple[int, str]) -> tuple[int, list[int]]:
    """(base channels, multipliers) of a new U-Net: --base-channels and --channel-multipliers
    where given (checked against the limits), else `default`'s."""
    from ..limits import BASE_CHANNELS

    base = default[0] if args.base_channels is None else args.base_channels
    mults = parse_multipliers(default[1] if args.channel_multipliers is None
                              else args.channel_multipliers)
    if any(m > 64 for m in mults):
        raise CCLDError(f"--channel-multipliers {args.channel_multipliers!r}: at most 64 each "
                        "(the teacher's widest level is 8)")
    return BASE_CHANNELS.check("--base-channels", base), mults


def make_accelerator(mixed_precision: str = "no", cpu: bool = False):
    """An `Accelerator`; in a single process an earlier one with other settings is replaced."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise CCLDError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        if PartialState().num_processes > 1:
            raise
        # Accelerate keeps one global state per process; several runs in one Python process
        # (notebooks, tests, the benchmark) may each ask for their own precision.
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def check_all_processes_started(num_processes: int, environ=os.environ) -> None:
    """Refuses a run that `accelerate launch` started with one process where several were asked
    for: its plain launcher (used with --cpu, or where there are no GPUs) starts a single Python
    and leaves the others to MPI (--mpirun_hostfile). That launcher alone sets ACCELERATE_USE_CPU,
    and sets MASTER_PORT only when more than one process was asked for."""
    if num_processes == 1 and "ACCELERATE_USE_CPU" in environ and "MASTER_PORT" in environ:
        raise CCLDError("accelerate launch started 1 process where several were asked for (its "
                        "--cpu launcher needs MPI for more); start them with `accelerate launch "
                        "--multi_gpu --num_processes N -m ccld COMMAND --cpu ...`")


def start_command(mixed_precision: str = "no", cpu: bool = False):
    """What every training command starts with: its accelerator, and the console messages of
    its main process."""
    from .logs import setup_logging

    accelerator = make_accelerator(mixed_precision, cpu)
    check_all_processes_started(accelerator.num_processes)
    setup_logging(accelerator.is_main_process)
    return accelerator


def add_data_options(p: argparse.ArgumentParser, cache_ok: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="SOURCE",
                   help=("a latent cache from `ccld encode-dataset` (fastest), " if cache_ok else "")
                   + "an image folder (recursive), a .txt path list, WikiArt-layout parquet "
                     "file(s) or a hub dataset id such as huggan/wikiart")
    g.add_argument("--image-size", type=int, default=256,
                   help="images are resized (short side, Lanczos) and center-cropped to this")
    g.add_argument("--image-column", default="image", help="the parquet column of encoded images")
    g.add_argument("--num-workers", type=int, default=4, help="data loading processes per GPU")


def open_data(args):
    from .data import open_training_data

    return open_training_data(args.data, args.image_size, args.image_column)


def check_settings(args) -> None:
    """The run's options that are not training Settings (those check themselves: see
    `ccld.training.engine.Settings`), against the limits table, before any work."""
    from ..limits import BASE_CHANNELS, LATENT_SCALE, STEP_COUNT

    STEP_COUNT.check("--scale-batches", args.scale_batches)
    if not 0 <= args.cond_drop <= 1:
        raise CCLDError(f"--cond-drop is a probability in [0, 1] (got {args.cond_drop})")
    if args.autoencoder_scale is not None:
        LATENT_SCALE.check("--autoencoder-scale", args.autoencoder_scale)
    if getattr(args, "base_channels", None) is not None:
        BASE_CHANNELS.check("--base-channels", args.base_channels)
    if args.wandb_project:
        from .logs import import_wandb

        import_wandb()  # before any work: a missing package should not cost a measured scale


RUN_FOLDERS = ("checkpoints", "logs", "demo")  # what every run writes in --out, besides its exports
# the options that name files a run reads (a tiny decoder's `tiny:` prefix is stripped)
INPUT_OPTIONS = ("init", "teacher", "student_init", "data", "demo_prompts", "autoencoder",
                 "autoencoder_config", "cloob", "cloob_config")


def _absolute(path: Path) -> set[Path]:
    """A path as given (made absolute) and with its links resolved: a run that replaces either
    name loses the file the user meant."""
    path = Path(path).expanduser()
    return {Path(os.path.abspath(path)), path.resolve()}


def spare_inputs(args, exports: list[str]) -> None:
    """Refuses a run whose outputs would replace one of its own inputs, before any work: a
    checkpoint to fine-tune or distil from that lies where the run writes (`--init R/model_ema.ckpt
    --out R` would export over it). `exports` are the names the run writes in --out besides
    RUN_FOLDERS; a --resume checkpoint is meant to be continued and is not checked."""
    out = Path(args.out)
    places = [(name, place) for name in (*RUN_FOLDERS, *exports) for place in _absolute(out / name)]
    for option in INPUT_OPTIONS:
        value = getattr(args, option, None)
        if not isinstance(value, str) or not value:
            continue
        for name, place in places:
            if any(path == place or place in path.parents
                   for path in _absolute(Path(value.removeprefix("tiny:")))):
                flag = "--" + option.replace("_", "-")
                raise CCLDError(f"{flag} {value} is where this run writes ({out / name}), so the "
                                f"run would replace it; copy it out of {out} first, or choose "
                                "another --out")


def run_config(args) -> dict:
    """The command line as plain values, stored in checkpoints and sent to W&B."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k != "func" and (v is None or isinstance(v, (str, int, float, bool, list, Path)))}


def settings_from_args(args):
    from .demo import read_demo_prompts
    from .engine import Settings

    return Settings(
        out=Path(args.out), batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_steps=args.max_steps, lr=args.lr, lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        ema_decay_at=args.ema_decay_at,
        ema_warmup_steps=args.ema_warmup_steps, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        demo_every=args.demo_every, demo_prompts=read_demo_prompts(args.demo_prompts),
        demo_steps=args.demo_steps, demo_guidance=args.demo_guidance, log_every=args.log_every,
        num_workers=args.num_workers, tensorboard=not args.no_tensorboard,
        wandb_project=args.wandb_project)


def find_resume(args, kind: str):
    """(checkpoint, its path) to continue from, (None, None) for a new run; refuses to
    overwrite a run."""
    from .checkpointing import LAST, load_training_checkpoint

    last = Path(args.out) / "checkpoints" / LAST
    if args.resume is None:
        if last.is_file():
            raise CCLDError(f"{args.out} already holds a run ({last}); pass --resume to continue "
                            "it, or choose another --out")
        return None, None
    path = last if args.resume == "last" else Path(args.resume).expanduser()
    if not path.is_file():
        raise CCLDError(f"{path}: no checkpoint to resume from; start without --resume")
    return load_training_checkpoint(path, kind), path


def unets_from_resume(resume: dict, path: str, with_ema: bool = True):
    """(raw U-Net, EMA U-Net) of a training checkpoint; the EMA is None unless `with_ema`: only
    the main process keeps one (it alone saves and demos it), so the others never read it."""
    from ..models.unet import unet_from_state_dict
    from .checkpointing import weights_with_prefix

    state = resume["state_dict"]
    raw = unet_from_state_dict(weights_with_prefix(state, "model."), path)
    return raw, (unet_from_state_dict(weights_with_prefix(state, "model_ema."), path)
                 if with_ema else None)


def settle_autoencoder_scale(model, args, stored: bool, data, accelerator, autoencoder) -> None:
    """Sets the U-Net's latent scale: --autoencoder-scale, else the one the checkpoint stored,
    else measured on the data as the reference's autoencoder_scale.py does."""
    import torch

    if args.autoencoder_scale is not None:
        value = float(args.autoencoder_scale)
    elif stored:
        return
    else:
        from .encode import estimate_autoencoder_scale

        value = estimate_autoencoder_scale(data, accelerator, autoencoder, args.scale_batches,
                                           args.batch_size, args.seed, args.num_workers)
        logger.info(f"ccld: autoencoder scale {value:.4f} (std of posterior samples of "
                    f"{args.scale_batches} batches); pass --autoencoder-scale to fix it")
    model.autoencoder_scale.fill_(torch.tensor(value))


def run_training(args, kind: str, build):
    """Everything train and distill share: data, encoders, resume, scale; `build` makes the
    models and the objective."""
    from .engine import Trainer, TrainingModels, copy_for_ema

    check_settings(args)
    settings = settings_from_args(args)
    accelerator = start_command(args.mixed_precision, args.cpu)
    data = open_data(args)
    resume, resume_path = find_resume(args, kind)
    autoencoder = cloob = None
    files = encoder_files(args, data.dataset.index if data.cached else None)
    if not data.cached or args.demo_every > 0:
        files = resolve_encoder_files(files, accelerator)  # every process: it synchronises them
        if not data.cached or accelerator.is_main_process:  # demos are the main process's
            autoencoder, cloob = load_encoders(files)
    embed_dim = data.dataset.embed_dim if data.cached else int(cloob.config["d_embed"])
    model, ema, objective, stored_scale = build(args, accelerator, resume, resume_path, embed_dim)
    if embed_dim != model.embed_dim:
        raise CCLDError(f"the data's CLOOB embeddings have {embed_dim} dimensions, the U-Net "
                        f"takes {model.embed_dim}; use the CLOOB the model was trained with")
    if resume is None:
        settle_autoencoder_scale(model, args, stored_scale, data, accelerator, autoencoder)
        ema = copy_for_ema(model) if accelerator.is_main_process else None
    teacher = getattr(objective, "teacher", None)
    if teacher is not None:  # one latent space: the student's scale is the teacher's
        teacher.autoencoder_scale.copy_(model.autoencoder_scale)
    config = run_config(args)
    config.update({"unet": model.config, "kind": kind, "encoders": files})
    trainer = Trainer(settings, objective, TrainingModels(model, ema, autoencoder, cloob), data,
                      accelerator, config, resume)
    del resume  # the trainer lets go of the checkpoint once set up, and with it its file mapping
    return trainer.fit()


# Commands

def cmd_train(args) -> int:
    import torch

    spare_inputs(args, ["model_ema.ckpt", "model_ema.safetensors"])

    from ..models.unet import CCLDUNet
    from .train import VelocityObjective

    def build(args, accelerator, resume, resume_path, embed_dim):
        objective = VelocityObjective(args.cond_drop)
        if resume is not None:
            model, ema = unets_from_resume(resume, resume_path, accelerator.is_main_process)
            return model, ema, objective, True
        if args.init:
            model, stored = load_unet_weights(args.init, "checkpoint to fine-tune")
            if args.base_channels is not None or args.channel_multipliers is not None:
                raise CCLDError("--base-channels and --channel-multipliers are for training from "
                                "scratch; --init takes the architecture from the checkpoint")
            return model, None, objective, stored
        base, mults = new_architecture(args, TEACHER_ARCHITECTURE)
        torch.manual_seed(args.seed)  # the same initial weights on every process and run
        return CCLDUNet(base, mults, embed_dim), None, objective, False

    summary = run_training(args, "train", build)
    return 130 if summary["interrupted"] else 0


def parse_guidance_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in str(text).split(","))
    except ValueError:
        low = high = float("nan")
    if not 0 <= low <= high < float("inf"):
        raise CCLDError(f"--guidance-range {text!r}: give two weights LOW,HIGH with "
                        "0 <= LOW <= HIGH, e.g. 1,8")
    return low, high


def distill_guidance_range(args, teacher) -> tuple[float, float] | None:
    """The guidance weights the student learns to give in one row: --guidance-range,
    --distill-guidance S (the range S,S), --objective guidance's default 1,8, or for
    progressive distillation of a guidance-distilled teacher the teacher's own range (S,S for
    one distilled at a fixed w, whose plain velocity is the guided one)."""
    if args.guidance_range is not None and args.distill_guidance is not None:
        raise CCLDError("give --guidance-range LOW,HIGH or --distill-guidance SCALE, not both")
    if args.guidance_range is not None:
        return parse_guidance_range(args.guidance_range)
    if args.distill_guidance is not None:
        return (args.distill_guidance, args.distill_guidance)
    if args.objective == "guidance":
        return parse_guidance_range(DEFAULT_GUIDANCE_RANGE)
    if args.objective == "progressive" and teacher.distilled_guidance is not None:
        return teacher.distilled_guidance
    return None


def new_student(args, teacher):
    """The student before distillation: --student-init's weights, a new net of
    --base-channels/--channel-multipliers, or by default a new released-size student
    (`velocity`) or the teacher itself (`guidance`, `progressive`: Meng et al. and Salimans &
    Ho start from it); --widen F makes the init (or the teacher) F times as wide, computing
    the same."""
    import torch

    from ..models.unet import CCLDUNet, widened

    widen = args.widen
    if widen != 1 and (args.base_channels is not None or args.channel_multipliers is not None):
        raise CCLDError("--widen makes the student from the teacher (or --student-init); "
                        "--base-channels and --channel-multipliers make a new net")
    if args.student_init:
        model, _ = load_unet_weights(args.student_init, "student checkpoint")
    elif widen != 1:
        model = teacher
    elif (args.objective == "velocity" or args.base_channels is not None
          or args.channel_multipliers is not None):
        base, mults = new_architecture(args, STUDENT_ARCHITECTURE)
        torch.manual_seed(args.seed)
        model = CCLDUNet(base, mults, embed_dim=teacher.embed_dim)
    else:
        model = teacher
    if model.embed_dim != teacher.embed_dim:
        raise CCLDError(f"the student takes {model.embed_dim}-dimensional embeddings, the "
                        f"teacher {teacher.embed_dim}; they must match")
    return widened(model, widen, args.seed) if widen != 1 else model


def distill_round(args, teacher_path, student_steps: int | None, teacher_substeps: int = 2):
    """One `ccld distill` training run: the objective's student learns from the teacher in
    `teacher_path`; `student_steps` is the progressive round's step count (None otherwise),
    each step its teacher's `teacher_substeps` DDIM steps."""
    from ..models.unet import with_records
    from .distill import DistillationObjective, ProgressiveDistillationObjective

    spare_inputs(args, ["model_student.ckpt", "model_student.safetensors"])

    def build(args, accelerator, resume, resume_path, embed_dim):
        teacher, teacher_scale = load_unet_weights(teacher_path, "teacher checkpoint")
        teacher_steps = None if student_steps is None else student_steps * teacher_substeps
        if teacher_steps is not None and teacher.distilled_steps not in (None, teacher_steps):
            # its velocities are trained for jumps between its own grid points only
            raise CCLDError(f"the teacher is a {teacher.distilled_steps}-step student: it can "
                            f"teach only on its own grid, not in {teacher_steps} steps; give "
                            f"--start-steps {teacher.distilled_steps} --teacher-substeps 2")
        guidance_range = distill_guidance_range(args, teacher)
        # a guidance input only where w varies: a fixed scale is in the weights already
        takes_guidance = guidance_range is not None and guidance_range[0] < guidance_range[1]
        if resume is not None:
            model, ema = unets_from_resume(resume, resume_path, accelerator.is_main_process)
        else:
            records = {"guidance_input": takes_guidance or None, "guidance_range": guidance_range}
            if student_steps is not None:
                records["distilled_steps"] = student_steps
            model, ema = with_records(new_student(args, teacher), **records), None
            model.autoencoder_scale.copy_(teacher.autoencoder_scale)
        if student_steps is None:
            objective = DistillationObjective(
                teacher, args.true_v_weight, None, args.cond_drop, accelerator.autocast,
                guidance_range=guidance_range, student_takes_guidance=takes_guidance)
        else:
            objective = ProgressiveDistillationObjective(
                teacher, student_steps, args.cond_drop, accelerator.autocast,
                guidance_range=guidance_range, student_takes_guidance=takes_guidance,
                teacher_substeps=teacher_substeps)
        return model, ema, objective, resume is not None or teacher_scale

    summary = run_training(args, "distill", build)
    return summary


def progressive_rounds(args) -> list[tuple[int, int, int]]:
    """(round, teacher steps, student steps) of each round: --start-steps divided by
    --teacher-substeps in the first round, then halved in each later one."""
    rounds, steps = [], args.start_steps
    for k in range(1, args.rounds + 1):
        factor = args.teacher_substeps if k == 1 else 2
        if steps < factor or steps % factor:
            raise CCLDError(f"--start-steps {args.start_steps} cannot be divided by "
                            f"--teacher-substeps {args.teacher_substeps} and then halved "
                            f"{args.rounds - 1} times into whole steps; give powers of two, "
                            "e.g. 64 and 8")
        rounds.append((k, steps, steps // factor))
        steps //= factor
    return rounds


def cmd_distill(args) -> int:
    import argparse as _argparse
    import shutil

    if args.distill_guidance is not None and args.distill_guidance < 0:
        raise CCLDError(f"--distill-guidance must be at least 0 (got {args.distill_guidance})")
    if args.true_v_weight < 0:
        raise CCLDError(f"--true-v-weight must be at least 0 (got {args.true_v_weight})")
    if args.widen < 1:
        raise CCLDError(f"--widen must be at least 1 (got {args.widen})")
    if args.guidance_range is not None:
        parse_guidance_range(args.guidance_range)
    if args.objective != "progressive":
        summary = distill_round(args, args.teacher, None)
        return 130 if summary["interrupted"] else 0

    if args.max_steps is None:
        raise CCLDError("--objective progressive needs --max-steps (the optimizer steps of each "
                        "round)")
    if args.rounds < 1:
        raise CCLDError(f"--rounds must be at least 1 (got {args.rounds})")
    if args.teacher_substeps < 2:
        raise CCLDError(f"--teacher-substeps must be at least 2 (got {args.teacher_substeps})")
    if args.true_v_weight:
        raise CCLDError("--true-v-weight is for --objective velocity or guidance")
    if args.resume not in (None, "last"):
        raise CCLDError("--objective progressive resumes with a bare --resume: it continues the "
                        "first unfinished round in --out")
    rounds = progressive_rounds(args)
    spare_inputs(args, ["model_student.ckpt", "model_student.safetensors",
                        *(f"round-{k:02d}" for k, _, _ in rounds)])
    out, teacher = Path(args.out), args.teacher
    for k, teacher_steps, student_steps in rounds:
        folder = out / f"round-{k:02d}"
        started = (folder / "checkpoints" / "last.ckpt").is_file()
        round_args = _argparse.Namespace(**{**vars(args), "out": str(folder), "teacher": teacher,
                                            "resume": "last" if started and args.resume else None,
                                            # later rounds start from their teacher
                                            **({} if k == 1 else {"student_init": None,
                                                                  "widen": 1,
                                                                  "base_channels": None,
                                                                  "channel_multipliers": None})})
        logger.info(f"ccld: progressive distillation round {k} of {args.rounds}: "
                    f"{teacher_steps} teacher steps -> {student_steps} student steps")
        summary = distill_round(round_args, teacher, student_steps, teacher_steps // student_steps)
        if summary["interrupted"]:
            return 130
        teacher = str(folder / "model_student.safetensors")  # the EMA student teaches the next
    for suffix in (".ckpt", ".safetensors"):
        shutil.copyfile(out / f"round-{args.rounds:02d}" / f"model_student{suffix}",
                        out / f"model_student{suffix}")
    logger.info(f"ccld: the {student_steps}-step student is {out / 'model_student.safetensors'}")
    return 0


def cmd_distill_decoder(args) -> int:
    from ..models.tiny_decoder import PIPELINE_SUBFOLDER, DecoderOption
    from .decoder import DecoderDistillationObjective, new_tiny_decoder, tiny_decoders_from_resume
    from .engine import Trainer, TrainingModels, copy_for_ema

    spare_inputs(args, [PIPELINE_SUBFOLDER])
    if args.width < 1:
        raise CCLDError(f"--width must be at least 1 (got {args.width})")
    if not args.feature_weight >= 0:
        raise CCLDError(f"--feature-weight must be at least 0 (got {args.feature_weight})")
    init = DecoderOption.parse(args.init, "init") if args.init else None
    if init is not None and init.kind == "full":
        raise CCLDError("--init full: the full decoder is no tiny decoder; give tiny:PATH or taesd")
    check_settings(args)
    settings = settings_from_args(args)
    accelerator = start_command(args.mixed_precision, args.cpu)
    data = open_data(args)
    resume, resume_path = find_resume(args, "distill-decoder")
    files = encoder_files(args, data.dataset.index if data.cached else None)
    files.update(cloob=None, cloob_config=None)  # the pixels need no embeddings
    files = resolve_encoder_files(files, accelerator, need_cloob=False)
    autoencoder, _ = load_encoders(files, need_cloob=False)
    if resume is not None:
        model, ema = tiny_decoders_from_resume(resume, resume_path)
    else:
        model = init.load() if init is not None else new_tiny_decoder(args.width, args.seed)
        ema = copy_for_ema(model)
    if model.config.latent_channels != autoencoder.config.latent_channels:
        raise CCLDError(f"the tiny decoder takes {model.config.latent_channels} latent channels, "
                        f"the autoencoder makes {autoencoder.config.latent_channels}; they must match")
    objective = DecoderDistillationObjective(autoencoder, args.feature_weight,
                                             args.latents == "mean", accelerator.autocast)
    config = run_config(args)
    config.update({"kind": "distill-decoder", "encoders": files,
                   "tiny_decoder": model.config.to_dict()})
    trainer = Trainer(settings, objective, TrainingModels(model, ema, autoencoder), data,
                      accelerator, config, resume)
    return 130 if trainer.fit()["interrupted"] else 0


def cmd_encode_dataset(args) -> int:
    from .data import open_image_source
    from .encode import Encoding, encode_dataset

    encoding = Encoding(args.image_size, args.batch_size, args.shard_size, args.dtype,
                        args.num_workers)
    accelerator = start_command("no", args.cpu)
    source = open_image_source(args.data, args.image_column)
    files = resolve_encoder_files(encoder_files(args), accelerator)
    index = encode_dataset(source, Path(args.out), load_encoders(files), accelerator, encoding,
                           models=files, progress=not args.quiet)
    logger.info(f"ccld: encoded {index['num_encoded']} images into {args.out} "
                f"({index['num_shards']} shards, {index['num_skipped']} unreadable images skipped)")
    logger.info(f"train with: ccld train --data {args.out} ...")
    return 0


def cmd_autoencoder_scale(args) -> int:
    from .encode import estimate_autoencoder_scale

    if args.batches < 1 or args.batch_size < 1:
        raise CCLDError("--batches and --batch-size must be at least 1")
    accelerator = start_command("no", args.cpu)
    data = open_data(args)
    autoencoder = None
    if not data.cached:
        files = resolve_encoder_files(encoder_files(args), accelerator, need_cloob=False)
        autoencoder, _ = load_encoders(files, need_cloob=False)
    value = estimate_autoencoder_scale(data, accelerator, autoencoder, args.batches,
                                       args.batch_size, args.seed, args.num_workers)
    if accelerator.is_main_process:
        print(f"{value:.6f}")
    return 0


def check_evaluation_target(out: Path) -> None:
    """--json may replace an evaluation ccld wrote, nothing else (a checkpoint or a config
    passed there by mistake would be lost)."""
    from ..io.jsontext import JSONInputError, parse

    if not out.exists() and not out.is_symlink():
        return
    try:
        earlier = parse(out.read_bytes()) if out.is_file() and out.stat().st_size < 1 << 20 else None
    except (OSError, JSONInputError):
        earlier = None
    if not (isinstance(earlier, dict) and {"teacher", "student"} <= earlier.keys()):
        raise CCLDError(f"--json {out}: exists and is not an evaluation ccld wrote; pass another "
                        "--json, or remove it first")


def finite_or_none(value):
    """`value` with every non-finite float (a PSNR of identical pictures is infinite) as None:
    JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def cmd_evaluate(args) -> int:
    from ..io.files import atomic_write
    from ..models.unet import load_unet
    from ..settings import Settings
    from .demo import read_demo_prompts
    from .evaluate import evaluate_student, format_table

    prompts = list(args.prompts) or read_demo_prompts(args.prompts_file)
    # every setting checked by the schema, and the output file, before any loading
    settings = Settings.build(prompts, num_images=args.n, steps=args.steps, method=args.method,
                              guidance=args.guidance, seed=args.seed, size=args.size)
    out = Path(args.json)
    check_evaluation_target(out)
    accelerator = start_command("no", args.cpu)
    device = accelerator.device
    teacher = load_unet(args.teacher).to(device)
    student = load_unet(args.student).to(device)
    if abs(float(teacher.autoencoder_scale) - float(student.autoencoder_scale)) > 1e-6:
        logger.warning(f"the teacher's latent scale {float(teacher.autoencoder_scale):.4f} "
                       f"differs from the student's {float(student.autoencoder_scale):.4f}")
    files = resolve_encoder_files(encoder_files(args), accelerator)
    autoencoder, cloob = load_encoders(files)
    result = evaluate_student(teacher, student, autoencoder.to(device), cloob.to(device),
                              settings, args.images)
    result.update({"teacher": str(args.teacher), "student": str(args.student)})
    print(format_table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(finite_or_none(result), indent=2, allow_nan=False).encode()
    atomic_write(out, lambda f: f.write(data), "evaluation")
    logger.info(f"wrote {out}")
    return 0


# The parser

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


# What `add_run_options(..., diffusion=False)` leaves out, fixed: no latent scale, conditions or
# demo grids for a model that is no U-Net (check_settings and settings_from_args still read them)
NON_DIFFUSION_DEFAULTS = dict(cond_drop=0.0, autoencoder_scale=None, scale_batches=1,
                              gradient_checkpointing=False, demo_every=0, demo_prompts=None,
                              demo_steps=1, demo_guidance=1.0)


def add_run_options(p: argparse.ArgumentParser, lr: float, scale_help: str | None,
                    diffusion: bool = True) -> None:
    """The optimisation and output options; `diffusion=False` for a model that is no U-Net."""
    g = p.add_argument_group("optimisation (defaults: the reference recipe)")
    g.add_argument("--out", required=True, metavar="FOLDER",
                   help="run folder: checkpoints/, exported weights, demo/, logs/")
    g.add_argument("--batch-size", type=int, default=64, help="images per step per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: until interrupted; "
                        "Ctrl-C saves a checkpoint first)")
    g.add_argument("--lr", type=float, default=lr, help="AdamW learning rate")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                   help="constant, or decayed from --lr towards 0 at --max-steps (cosine, "
                        "linear): short runs such as distillation rounds end nearer their optimum")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    if diffusion:
        g.add_argument("--cond-drop", type=float, default=0.2,
                       help="probability of training on the zero (unconditional) embedding")
    g.add_argument("--ema-decay-at", type=int, default=200_000,
                   help="EMA decay 0.99 below --ema-warmup-steps, 0.999 below this, then 0.9999")
    g.add_argument("--ema-warmup-steps", type=int, default=20_000,
                   help="EMA decay 0.99 below this step (the reference's 20000)")
    g.add_argument("--seed", type=int, default=0, help="seeds the initial weights, data order and noise")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast precision (fp16 uses loss scaling; CUDA only)")
    if diffusion:
        g.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass to save memory")
        g.add_argument("--autoencoder-scale", type=float, default=None, help=scale_help)
        g.add_argument("--scale-batches", type=int, default=32,
                       help="batches to measure the autoencoder scale on when it is not known")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue the run in --out from checkpoints/last.ckpt (or CKPT): weights, "
                        "optimizer, EMA, step, data position and noise")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    o = p.add_argument_group("outputs")
    o.add_argument("--checkpoint-every", type=int, default=50_000,
                   help="write a checkpoint every N steps (and always at the end)")
    o.add_argument("--keep-checkpoints", type=int, default=0,
                   help="keep only the newest N step checkpoints (0: keep all)")
    if diffusion:
        o.add_argument("--demo-every", type=int, default=2000,
                       help="demo grid every N steps (0: never)")
        o.add_argument("--demo-prompts", metavar="TXT", help="demo prompts, one a line")
        o.add_argument("--demo-steps", type=int, default=50, help="PLMS steps of the demo grid")
        o.add_argument("--demo-guidance", type=float, default=3.0, help="guidance scale of the demo")
    else:
        p.set_defaults(**NON_DIFFUSION_DEFAULTS)
    o.add_argument("--log-every", type=int, default=50, help="log the loss every N steps")
    o.add_argument("--no-tensorboard", action="store_true", help="only logs/metrics.jsonl")
    o.add_argument("--wandb-project", metavar="NAME", help="also log to this W&B project")


def add_training_commands(sub) -> None:
    add_encode_dataset_command(sub)
    add_autoencoder_scale_command(sub)
    add_train_command(sub)
    add_distill_command(sub)
    add_distill_decoder_command(sub)
    add_evaluate_command(sub)


def add_encode_dataset_command(sub) -> None:
    p = sub.add_parser("encode-dataset", formatter_class=HELP_FORMAT,
                       help="encode images once into latent shards for fast training",
                       description="One pass of the frozen autoencoder and CLOOB over a dataset, "
                       "storing each image's latent posterior (mean, log-variance) and CLOOB "
                       "image embedding in shards. Run it again to resume.")
    add_data_options(p, cache_ok=False)
    p.add_argument("--out", required=True, metavar="FOLDER", help="the cache folder to write")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    p.add_argument("--shard-size", type=int, default=2048, help="images per shard file")
    p.add_argument("--dtype", default="float32", help="storage type of mean and log-variance "
                   "(float32, float16, bfloat16)")
    p.add_argument("--cpu", action="store_true", help="encode on the CPU even if a GPU is there")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_encoder_options(p, "default: the released ones, downloaded once")
    p.set_defaults(func=cmd_encode_dataset)


def add_autoencoder_scale_command(sub) -> None:
    p = sub.add_parser("autoencoder-scale", formatter_class=HELP_FORMAT,
                       help="measure the latent scale of a dataset",
                       description="The std of autoencoder posterior samples over a few batches, "
                       "as the reference's autoencoder_scale.py computes it.")
    add_data_options(p)
    p.add_argument("--batches", type=int, default=32, help="number of batches")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="seeds the order and the samples")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    add_encoder_options(p, "images only; default: the released autoencoder")
    p.set_defaults(func=cmd_autoencoder_scale)


def add_train_command(sub) -> None:
    p = sub.add_parser("train", formatter_class=HELP_FORMAT,
                       help="train or fine-tune a CCLD U-Net (teacher) on your images",
                       description="Train a CLOOB-conditioned latent diffusion U-Net on the "
                       "v objective, from scratch or fine-tuning a checkpoint. Runs on many GPUs "
                       "with `accelerate launch -m ccld train ...`.")
    add_data_options(p)
    m = p.add_argument_group("model")
    m.add_argument("--init", metavar="CKPT",
                   help="fine-tune these weights (any U-Net file `ccld generate` reads)")
    m.add_argument("--base-channels", type=int, default=None,
                   help=f"from scratch: base width (default {TEACHER_ARCHITECTURE[0]})")
    m.add_argument("--channel-multipliers", default=None,
                   help=f"from scratch: four multipliers (default {TEACHER_ARCHITECTURE[1]})")
    add_run_options(p, 3e-5, "latent scale (default: the --init checkpoint's, else measured)")
    add_encoder_options(p, "default: recorded in the latent cache, else the released ones")
    p.set_defaults(func=cmd_train)


def add_distill_command(sub) -> None:
    p = sub.add_parser("distill", formatter_class=HELP_FORMAT,
                       help="distil a fast student from a teacher U-Net",
                       description="Train a student U-Net to match a frozen teacher's velocity "
                       "on noised latents of your data (--objective velocity), its guided "
                       "velocity in one forward (guidance), or two of its DDIM steps in one "
                       "(progressive).")
    add_data_options(p)
    m = p.add_argument_group("models")
    m.add_argument("--teacher", required=True, metavar="CKPT", help="the teacher U-Net")
    m.add_argument("--student-init", metavar="CKPT", help="start the student from these weights")
    m.add_argument("--base-channels", type=int, default=None,
                   help=f"student base width (default {STUDENT_ARCHITECTURE[0]})")
    m.add_argument("--channel-multipliers", default=None,
                   help=f"student multipliers (default {STUDENT_ARCHITECTURE[1]})")
    m.add_argument("--widen", type=int, default=1, metavar="F",
                   help="start the student from the teacher (or --student-init) with F times "
                        "its channels, each repeated F times: a wider student that starts out "
                        "computing exactly what it was made from (progressive: the first round's)")
    m.add_argument("--true-v-weight", type=float, default=0.0,
                   help="add this times the true-v loss to the teacher-matching loss")
    m.add_argument("--objective", choices=["velocity", "guidance", "progressive"],
                   default="velocity",
                   help="velocity: the teacher's velocity (a smaller student); guidance: its "
                        "guided velocity at a weight w drawn from --guidance-range, which the "
                        "student takes as an input (one row per image instead of two); "
                        "progressive: halve the sampling steps --rounds times from "
                        "--start-steps (each round's teacher is the previous student)")
    m.add_argument("--guidance-range", metavar="LOW,HIGH", default=None,
                   help=f"guidance weights to distil (default {DEFAULT_GUIDANCE_RANGE} for "
                        "--objective guidance; progressive: the teacher's own, if it has one)")
    m.add_argument("--distill-guidance", type=float, default=None, metavar="SCALE",
                   help="match the teacher's guided velocity at this one scale (the range "
                        "SCALE,SCALE; no guidance input)")
    m.add_argument("--start-steps", type=int, default=64,
                   help="progressive: the teacher's DDIM steps in the first round")
    m.add_argument("--teacher-substeps", type=int, default=2, metavar="K",
                   help="progressive: the first round's teacher takes K DDIM steps over each "
                        "student step (2: Salimans & Ho's halving; more: a first student of "
                        "--start-steps/K steps learns a finer solve, with no round between); "
                        "later rounds halve, their teachers knowing only their own grid")
    m.add_argument("--rounds", type=int, default=4,
                   help="progressive: rounds, each halving the steps (64 and 4 rounds: 4 steps; "
                        "the first divides them by --teacher-substeps); --max-steps is per "
                        "round, each round in OUT/round-NN")
    add_run_options(p, 1e-4, "latent scale (default: the teacher's)")
    add_encoder_options(p, "default: recorded in the latent cache, else the released ones")
    p.set_defaults(func=cmd_distill)


def add_distill_decoder_command(sub) -> None:
    p = sub.add_parser("distill-decoder", formatter_class=HELP_FORMAT,
                       help="train a tiny decoder that paints like the autoencoder's, many times "
                            "faster",
                       description="Train a TAESD-architecture decoder to reproduce the frozen KL "
                       "decoder's pixels from latents of your images (pixel MSE plus a feature "
                       "loss on the KL encoder's activations). The EMA decoder is exported to "
                       "OUT/tiny_decoder, for `ccld generate --decoder tiny:OUT/tiny_decoder`.")
    add_data_options(p)
    m = p.add_argument_group("tiny decoder")
    m.add_argument("--width", type=int, default=64,
                   help="channels of every stage of a new decoder (TAESD's width)")
    m.add_argument("--init", metavar="tiny:PATH|taesd",
                   help="start from this tiny decoder (keeping its architecture and input scale) "
                        "instead of a new one")
    m.add_argument("--feature-weight", type=float, default=0.1,
                   help="weight of the KL-encoder feature loss beside the pixel MSE (0: MSE only)")
    m.add_argument("--latents", choices=["sample", "mean"], default="sample",
                   help="decode posterior samples or the posterior means of the images")
    add_run_options(p, 1e-3, None, diffusion=False)
    add_encoder_options(p, "default: recorded in the latent cache, else the released "
                        "autoencoder", cloob=False)
    p.set_defaults(func=cmd_distill_decoder)


def add_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", formatter_class=HELP_FORMAT,
                       help="compare a student with its teacher",
                       description="Sample teacher and student from the same noise and prompts; "
                       "report v-MSE, image PSNR, CLOOB text-image similarity and time per "
                       "image as a table and JSON.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: the demo prompts)")
    p.add_argument("--teacher", required=True, metavar="CKPT")
    p.add_argument("--student", required=True, metavar="CKPT")
    p.add_argument("--prompts-file", metavar="TXT", help="prompts, one a line")
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=15, help="sampling steps")
    p.add_argument("--method", default="plms", help="sampler")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale")
    p.add_argument("--seed", type=int, default=0, help="noise seed (prompt i uses seed + i)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--json", default="evaluation.json", help="where to write the results")
    p.add_argument("--images", metavar="FOLDER", help="also write teacher/student comparison grids")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    add_encoder_options(p, "default: the released ones")
    p.set_defaults(func=cmd_evaluate)
