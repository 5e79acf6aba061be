"""The training loop that `ccld train` and `ccld distill` share; they differ only in the objective.

Every step, on each process: a batch of posterior moments and CLOOB embeddings (from the latent
cache, or from images encoded on the fly) goes to the objective (`objective.py`) with a seeded
generator and the run's Sobol timesteps; the objective makes its inputs and targets and returns
the loss; then gradient accumulation, AdamW, and the EMA update.

Reproducibility: all the noise of step s on process r comes from a generator seeded by
(seed, r, s, micro-batch), the Sobol sequence is fast-forwarded, and the data order is a seeded
stream, so a run resumed at step k continues exactly as if it had never stopped.

Distribution is Accelerate's: the same code runs alone, under `accelerate launch` or `torchrun`;
each process reads its own slice of every epoch, and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import signal
import threading
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from .. import limits
from ..errors import CCLDError, arg
from ..io.files import remove_stale_temporaries
from .checkpointing import CheckpointFolder, cpu_state, export_weights
from .data import ShardedStream, TrainingData, encode_pixels
from .demo import DEFAULT_DEMO_PROMPTS, demo_caption, demo_settings, render_demo
from .ema import WARMUP_STEPS, ema_decay, ema_update
from .logs import RunLog, import_wandb
from .objective import LatentBatch, Objective, SobolTimesteps

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    out: Path
    batch_size: int = 64  # per process
    grad_accum: int = 1
    max_steps: int | None = None  # None: until interrupted
    lr: float = 3e-5
    lr_schedule: str = "constant"  # or "cosine", "linear": decayed towards 0 at max_steps
    weight_decay: float = 0.01
    ema_decay_at: int = 200_000
    ema_warmup_steps: int = WARMUP_STEPS
    seed: int = 0
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50_000
    keep_checkpoints: int = 0  # 0 keeps every step file
    demo_every: int = 2000  # 0: no demos
    demo_prompts: list = field(default_factory=lambda: list(DEFAULT_DEMO_PROMPTS))
    demo_steps: int = 50
    demo_guidance: float = 3.0
    log_every: int = 50
    num_workers: int = 4
    tensorboard: bool = True
    wandb_project: str | None = None

    def __post_init__(self):
        # every number against the limits table, before any work (argparse checks types only)
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if value is not None or name != "max_steps":
                setattr(self, name, limit.check(arg(name), value))


_LIMITS = {"batch_size": limits.TRAINING_BATCH, "grad_accum": limits.TRAINING_BATCH,
           "max_steps": limits.STEP_COUNT, "lr": limits.LEARNING_RATE,
           "weight_decay": limits.WEIGHT_DECAY, "ema_decay_at": limits.STEP_COUNT,
           "ema_warmup_steps": limits.STEP_INTERVAL, "seed": limits.SEED,
           "checkpoint_every": limits.STEP_INTERVAL, "keep_checkpoints": limits.STEP_INTERVAL,
           "demo_every": limits.STEP_INTERVAL, "demo_steps": limits.STEPS,
           "demo_guidance": limits.WEIGHT, "log_every": limits.STEP_COUNT,
           "num_workers": limits.WORKERS}


def derive_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from several integers (nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(
        1, dtype=np.uint64)[0] >> np.uint64(1))


LR_SCHEDULES = ("constant", "cosine", "linear")
STOP_CHECK_EVERY = 10  # steps between the processes' agreeing whether one was asked to stop


def lr_factor(schedule: str, step: int, max_steps: int | None) -> float:
    """The fraction of --lr for the update after `step` optimizer steps: 1 throughout, or a
    cosine or linear decay from 1 at the first step towards 0 after the last (a short run,
    such as a distillation round, ends closer to its optimum than at a constant rate)."""
    if schedule == "constant":
        return 1.0
    progress = min(step / max_steps, 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - progress


def make_trainable(unet: torch.nn.Module) -> torch.nn.Module:
    """Train mode, gradients for everything but the fixed random Fourier features."""
    from ..models.unet import FourierFeatures

    unet.train().requires_grad_(True)
    for m in unet.modules():
        if isinstance(m, FourierFeatures):
            m.weight.requires_grad_(False)
    return unet


def _checkpointed(forward, *args):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
    """Recomputes every conv and attention block in the backward pass instead of storing its
    activations: about a third more compute for a fraction of the activation memory."""
    from ..models.unet import ResModConvBlock, SelfAttention2d

    for m in unet.modules():
        if isinstance(m, (ResModConvBlock, SelfAttention2d)):
            m.forward = functools.partial(_checkpointed, m.forward)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes: equal on every process exactly when they are in sync."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        # reshape(-1), not contiguous(): a [n, c, 1, 1] kernel laid out channels-last counts
        # as contiguous with a last stride of c, which a byte view refuses
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step and save; a second
    signal stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        self.pid = os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data loader worker: it just keeps serving batches
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.info("\nccld: stopping after this step and saving a checkpoint (interrupt again "
                    "to stop at once, losing the steps since the last checkpoint)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class IntervalMeter:
    """Loss, its parts, skipped images and step times since the last log line."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.parts: dict[str, torch.Tensor] = {}
        self.skipped = torch.zeros((), device=self.device)
        self.steps, self.seconds = 0, 0.0

    def add_micro_batch(self, loss, parts: dict, batch: dict, grad_accum: int):
        self.loss += loss.detach() / grad_accum
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0) + v.detach() / grad_accum
        if "skipped" in batch:
            self.skipped += batch["skipped"].sum().to(self.device)

    def add_step(self, seconds: float):
        self.steps += 1
        self.seconds += seconds  # training only: demos and checkpoints are not training speed

    def report(self, acc, kind: str) -> dict:
        """Means over the interval and all processes (a collective: every process calls it)."""
        values = {f"{kind}/loss": acc.reduce(self.loss / self.steps, "mean").item()}
        for k, v in self.parts.items():
            values[f"{kind}/{k}"] = acc.reduce(v / self.steps, "mean").item()
        values["skipped_images"] = int(acc.reduce(self.skipped, "sum").item())
        values["steps_per_second"] = self.steps / self.seconds
        self.reset()
        return values


@dataclass
class TrainingModels:
    """The nets of a training run. `model` and `ema`: CPU or device U-Nets, or tiny decoders (raw
    and averaged weights; `ema` None on processes other than the main one, which alone saves and
    demos it); the frozen `autoencoder` and `cloob`, None where nothing reads them (CLOOB when
    the objective reads no embeddings, both on a latent cache without demos)."""
    model: torch.nn.Module
    ema: torch.nn.Module | None
    autoencoder: torch.nn.Module | None = None
    cloob: torch.nn.Module | None = None


class Trainer:
    """Minimises an objective (`train.VelocityObjective`, `distill.DistillationObjective`,
    `decoder.DecoderDistillationObjective`).

    `models` holds what is trained and what it reads (`TrainingModels`); `config` is the run's
    record, written into its exports and checkpoints; `resume` is a training checkpoint to
    continue from (its weights already in the models).
    """

    def __init__(self, settings: Settings, objective: Objective, models: TrainingModels,
                 data: TrainingData, accelerator, config: dict | None = None,
                 resume: dict | None = None):
        self.s = settings
        self.objective = objective
        self.model, self.ema = models.model, models.ema
        self.autoencoder, self.cloob = models.autoencoder, models.cloob
        self.data = data
        self.acc = accelerator
        self.config = dict(config or {})
        self.resume = resume
        if not data.cached and self.autoencoder is None:
            raise ValueError("training on images needs the autoencoder to encode them (and CLOOB "
                             "for their embeddings, where the objective reads them)")

    def fit(self) -> dict:
        """Trains until --max-steps or a stop request, saves, and returns a summary of the run."""
        self._setup()
        try:
            with StopRequest() as stop:
                # made inside, so that loader workers inherit the handler rather than die on Ctrl-C
                batches = iter(self._loader(self.samples))
                while self.s.max_steps is None or self.step < self.s.max_steps:
                    self._optimizer_step(batches)
                    self._log_if_due()
                    self._save_outputs_if_due()
                    if self._stop_requested(stop):
                        self.interrupted = True
                        break
        except BaseException:
            self.log.close()  # a run that stops on an error still ends its logs whole
            raise
        return self._finish()

    # Setup

    def _setup(self) -> None:
        """The run folder and logs, the position to start from, the models and the optimizer."""
        s, acc = self.s, self.acc
        if s.lr_schedule not in LR_SCHEDULES:
            raise CCLDError(f"--lr-schedule {s.lr_schedule!r}: choose one of "
                            f"{', '.join(LR_SCHEDULES)}")
        if s.lr_schedule != "constant" and s.max_steps is None:
            raise CCLDError(f"--lr-schedule {s.lr_schedule} decays over the run: give "
                            "--max-steps")
        if s.wandb_project:
            import_wandb()  # a missing wandb fails the run here, before its folder is made
        if s.batch_size > self.data.num_items // acc.num_processes:
            raise CCLDError(f"--batch-size {s.batch_size} is more than the {self.data.num_items} "
                            f"items give each of {acc.num_processes} processes; use a smaller "
                            "batch or more data")
        self.checkpoints = CheckpointFolder(s.out / "checkpoints", s.keep_checkpoints)
        if acc.is_main_process:
            (s.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(s.out / "checkpoints")
            remove_stale_temporaries(s.out)
        self.log = RunLog(s.out / "logs", acc.is_main_process, s.tensorboard, s.wandb_project,
                          self.config, (self.resume or {}).get("wandb_run_id"))
        # the demos' settings, checked before the first step rather than at the first demo
        self.demo_settings = (demo_settings(s.demo_prompts, self.data.latent_shape, s.demo_steps,
                                            s.demo_guidance, s.seed) if s.demo_every > 0 else None)
        self.step, self.samples = self._start_position()
        self._prepare_models()
        self.timesteps = SobolTimesteps(derive_seed(s.seed, acc.process_index, 1), self.samples)
        self.meter = IntervalMeter(acc.device)
        self.losses, self.step_times, self.finite_steps = [], [], []
        if acc.device.type == "cuda":  # the trained nets' shapes are fixed: tune, and use TF32
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.last_saved = self.step if self.resume is not None else None
        self.resume = None  # all taken: let the checkpoint (a mapping of its file) go
        self.interrupted = False
        logger.info(f"ccld: {self.objective.kind} on {self.data.description} "
                    f"({self.data.num_items} items, {acc.num_processes} process(es), batch "
                    f"{s.batch_size} x {s.grad_accum} accumulation per process), "
                    f"autoencoder scale {float(self.scale):.4f}, from step {self.step}")

    def _start_position(self) -> tuple[int, int]:
        """(optimizer steps done, items this process has consumed)."""
        if self.resume is None:
            return 0, 0
        pos = self.resume["data_position"]
        if int(pos["seed"]) != self.s.seed:
            logger.warning(f"continuing with the run's seed {pos['seed']}, not --seed "
                           f"{self.s.seed}")
            self.s.seed = int(pos["seed"])
        step = int(self.resume["global_step"])
        samples = int(pos["samples_per_rank"])
        world = self.acc.num_processes
        if int(pos["world_size"]) != world:
            samples = samples * int(pos["world_size"]) // world
            logger.warning(f"the checkpoint was written by {pos['world_size']} processes, this "
                           f"run has {world}; the data order within this epoch will differ")
        return step, samples

    def _prepare_models(self) -> None:
        """Everything on the device, AdamW, the resumed optimizer and random states, and the
        model as Accelerate wraps it (`self.model`) beside the bare one (`self.raw_model`)."""
        s, acc = self.s, self.acc
        model = make_trainable(self.model).to(acc.device)
        if self.ema is not None:
            self.ema = self.ema.to(acc.device).eval().requires_grad_(False)
        for part in (self.autoencoder, self.cloob):
            if part is not None:
                part.to(acc.device)
        self.objective.to(acc.device)
        if s.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=s.lr, weight_decay=s.weight_decay)
        if self.resume is not None:
            optimizer.load_state_dict(self.resume["optimizer"])
            for group in optimizer.param_groups:  # the command line may change these on resume
                group["lr"], group["weight_decay"] = s.lr, s.weight_decay
            torch.set_rng_state(self.resume["rng"]["torch"])
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if self.resume is not None and acc.scaler is not None and "grad_scaler" in self.resume:
            acc.scaler.load_state_dict(self.resume["grad_scaler"])
        self.raw_model = acc.unwrap_model(self.model)
        # a model with no latent scale of its own (a tiny decoder) works on raw latents
        scale = getattr(self.raw_model, "autoencoder_scale", None)
        self.scale = torch.ones((), device=acc.device) if scale is None else scale.float()

    def _loader(self, start: int) -> DataLoader:
        sampler = ShardedStream(self.data.num_items, self.acc.process_index,
                                self.acc.num_processes, self.s.seed, start, self.data.read_blocks)
        return DataLoader(self.data.dataset, self.s.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.s.num_workers, pin_memory=self.acc.device.type == "cuda")

    # One step

    def _optimizer_step(self, batches) -> None:
        """AdamW on the gradients of `grad_accum` micro-batches, then the EMA update."""
        s, acc = self.s, self.acc
        started = time.perf_counter()
        finite = torch.ones((), device=acc.device, dtype=torch.bool)
        for micro in range(s.grad_accum):
            batch = next(batches)
            latents = self._latent_batch(batch, micro)
            last = micro == s.grad_accum - 1
            # processes exchange gradients once per step, in the last micro-batch's backward
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                loss, parts = self.objective.loss(self.model, latents)
                acc.backward(loss / s.grad_accum)
            self.meter.add_micro_batch(loss, parts, batch, s.grad_accum)
            finite = finite & torch.isfinite(loss.detach())
        self.finite_steps.append(finite)  # read at the next log line or checkpoint, not now
        self.samples += s.batch_size * s.grad_accum
        for group in self.optimizer.param_groups:  # a function of the step: resumes exactly
            group["lr"] = s.lr * lr_factor(s.lr_schedule, self.step, s.max_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            ema_update(self.raw_model, self.ema,
                       ema_decay(self.step, s.ema_decay_at, s.ema_warmup_steps))
        self.step += 1
        self.step_times.append(time.perf_counter() - started)
        self.meter.add_step(self.step_times[-1])

    def _latent_batch(self, batch: dict, micro: int) -> LatentBatch:
        """A loaded batch on the device, encoding images if need be, with its own generator."""
        device = self.acc.device
        if "pixels" in batch:
            mean, logvar, embed = encode_pixels(self.autoencoder, self.cloob,
                                                batch["pixels"].to(device, non_blocking=True))
        else:
            mean, logvar, embed = (batch[k].to(device, non_blocking=True)
                                   for k in ("mean", "logvar", "embed"))
        seed = derive_seed(self.s.seed, self.acc.process_index, self.step, micro)
        return LatentBatch(mean, logvar, embed, self.scale, torch.Generator().manual_seed(seed),
                           self.timesteps)

    # After each step

    def _check_finite(self) -> None:
        """Stops the run if a loss since the last check went non-finite (on every process alike:
        all call it at the same steps). Checked where the run logs or saves, not at every step,
        which would wait on the device each time; a non-finite step's update made the weights
        NaN, so nothing after it is saved and the last checkpoint is the last good state."""
        if not self.finite_steps:
            return
        finite = torch.stack(self.finite_steps).float()
        first = self.step - len(self.finite_steps) + 1
        self.finite_steps = []
        if self.acc.num_processes > 1:
            finite = self.acc.reduce(finite, "sum") / self.acc.num_processes
        bad = (finite < 1).nonzero()
        if len(bad):
            raise CCLDError(f"step {first + int(bad[0])}: the loss went non-finite (NaN or "
                            f"infinity); the run stopped at step {self.step} without saving "
                            "since, and its last checkpoint is its last good state; lower --lr, "
                            "or train in --mixed-precision no")

    def _log_if_due(self) -> None:
        s, step, kind = self.s, self.step, self.objective.kind
        if step % s.log_every != 0 and step != s.max_steps:
            return
        self._check_finite()
        values = self.meter.report(self.acc, kind)
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        values["ema_decay"] = ema_decay(step - 1, s.ema_decay_at, s.ema_warmup_steps)
        self.log.scalars(step, values)
        loss = values[f"{kind}/loss"]
        self.losses.append((step, loss))
        skipped = values["skipped_images"]
        logger.info(f"step {step}: loss {loss:.4f}, {values['steps_per_second']:.2f} steps/s"
                    + (f", {skipped} unreadable images skipped" if skipped else ""))

    def _save_outputs_if_due(self) -> None:
        s = self.s
        if s.demo_every and (self.step - 1) % s.demo_every == 0 and self.acc.is_main_process:
            self._demo()
        if s.checkpoint_every and self.step % s.checkpoint_every == 0:
            self._save()

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop: every process must stop at the same step, so
        with several they agree every STOP_CHECK_EVERY steps (an exchange that waits on the
        devices), alone at every step."""
        if self.acc.num_processes == 1:
            return stop.requested
        if self.step % STOP_CHECK_EVERY:
            return False
        requested = torch.tensor(float(stop.requested), device=self.acc.device)
        return self.acc.reduce(requested, "sum").item() > 0

    def _finish(self) -> dict:
        """The last checkpoint unless the last step has one; the run's summary."""
        if self.last_saved != self.step:
            self._save()
        self.log.close()
        warm = min(2, max(0, len(self.step_times) - 1))  # the first steps pay for start-up
        timed = self.step_times[warm:]
        if self.interrupted:
            logger.info(f"ccld: stopped at step {self.step}; saved {self.checkpoints.last}; "
                        "continue with --resume")
        return {"step": self.step, "losses": self.losses, "interrupted": self.interrupted,
                "checkpoint": str(self.checkpoints.last),
                "autoencoder_scale": float(self.scale),
                "steps_per_second": len(timed) / sum(timed) if timed else float("nan")}

    # Outputs

    def _demo(self) -> None:
        if self.autoencoder is None or self.cloob is None:
            return
        from ..io.images import save_png

        s, step = self.s, self.step
        rows = self.objective.demo_rows(self.ema)
        grid = render_demo(rows, self.autoencoder, self.cloob, self.demo_settings,
                           self.acc.autocast)
        folder = s.out / "demo"
        folder.mkdir(parents=True, exist_ok=True)
        path = save_png(grid, folder / f"demo-{step:08d}.png",
                        {"step": step, "prompts": s.demo_prompts, "rows": [r for r, _ in rows],
                         "method": "plms", "steps": s.demo_steps,
                         "guidance": s.demo_guidance, "seed": s.seed})
        self.log.image(step, "demo_grid", grid, demo_caption(rows, s.demo_prompts))
        self.log.event(step, {"demo": str(path)})

    def _save(self) -> None:
        """A training checkpoint and the exported EMA weights (every process calls it: the
        processes compare their weights first)."""
        from accelerate.utils import gather_object

        self._check_finite()  # nothing non-finite is saved
        step = self.step
        fingerprints = gather_object([weights_fingerprint(self.raw_model)])
        if self.acc.is_main_process:
            if len(set(fingerprints)) > 1:
                logger.warning(f"the processes' weights differ at step {step} "
                               f"({len(set(fingerprints))} versions); the checkpoint holds the "
                               "main process's")
            path = self.checkpoints.save(self._checkpoint(), step)
            export = getattr(self.objective, "export", None)  # a model that is no U-Net's
            exports = (export(self.ema, self.s.out) if export is not None
                       else export_weights(self.ema, self.s.out, self.objective.export_stem))
            self.log.event(step, {"checkpoint": str(path), "exports": [str(p) for p in exports],
                                  "replica_sha256": fingerprints,
                                  "replicas_in_sync": len(set(fingerprints)) == 1})
            logger.info(f"ccld: step {step}: saved {path} and {exports[0].name}")
        self.acc.wait_for_everyone()
        self.last_saved = step

    def _checkpoint(self) -> dict:
        """Everything a resumed run needs to continue exactly, in plain containers."""
        from .._version import __version__

        s, acc = self.s, self.acc
        state = {**{f"model.{k}": v for k, v in cpu_state(self.raw_model).items()},
                 **{f"model_ema.{k}": v for k, v in cpu_state(self.ema).items()}}
        rng = {"torch": torch.get_rng_state(), "seed": s.seed, "sobol_draws": self.samples}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint = {
            "state_dict": state,
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.step,
            "data_position": {"samples_per_rank": self.samples, "world_size": acc.num_processes,
                              "seed": s.seed, "batch_size": s.batch_size,
                              "grad_accum": s.grad_accum},
            "rng": rng,
            "config": self.config,
            "ccld": {"kind": self.objective.kind, "version": __version__},
        }
        if acc.scaler is not None:
            checkpoint["grad_scaler"] = acc.scaler.state_dict()
        if self.log.wandb_run_id is not None:  # --resume continues this W&B run
            checkpoint["wandb_run_id"] = self.log.wandb_run_id
        return checkpoint


def copy_for_ema(model: torch.nn.Module) -> torch.nn.Module:
    return deepcopy(model).eval().requires_grad_(False)
