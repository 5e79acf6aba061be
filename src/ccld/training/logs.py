"""What a run tells: console messages, and run logs written by the main process only.

Console messages go through `logging.getLogger("ccld.training")` and its children. The training
commands call `setup_logging`, which writes informational lines plainly to stdout and warnings to
stderr as `ccld: warning: ...`, on the main process only.

`metrics.jsonl` is plain and always there (one JSON object a line, with `step`), so a run can be
inspected without extra packages; TensorBoard is used when installed, W&B when asked for.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from ..errors import CCLDError

logger = logging.getLogger(__name__)


# Console messages

class ConsoleHandler(logging.Handler):
    """Writes to sys.stdout or sys.stderr as they are when a message comes (tests and notebooks
    replace them), through tqdm so that a message never tears a progress bar."""

    def __init__(self, stream_name: str):
        super().__init__()
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        stream = getattr(sys, self.stream_name)
        try:
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:
            self.handleError(record)


class LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"ccld: {record.levelname.lower()}: {super().format(record)}"


def setup_logging(main_process: bool = True) -> None:
    """Info lines plain on stdout, warnings and worse on stderr as `ccld: warning: ...`; other
    processes than the main one stay silent. The handlers are added once per Python process
    (several commands may run in one); each call sets who speaks."""
    training = logging.getLogger("ccld.training")
    if not any(isinstance(h, ConsoleHandler) for h in training.handlers):
        info = ConsoleHandler("stdout")
        info.addFilter(lambda record: record.levelno < logging.WARNING)
        warnings = ConsoleHandler("stderr")
        warnings.setLevel(logging.WARNING)
        warnings.setFormatter(LevelPrefix())
        training.addHandler(info)
        training.addHandler(warnings)
        training.propagate = False  # the lines are complete; a root handler would repeat them
    training.setLevel(logging.INFO if main_process else logging.CRITICAL + 1)


# Run logs

def import_wandb():
    """The wandb module, or the one-line error that says how to get it."""
    try:
        import wandb
    except ImportError:
        raise CCLDError("--wandb-project needs the wandb package; pip install wandb, or "
                        "leave the option out to log to TensorBoard") from None
    return wandb


class RunLog:
    """`wandb_run_id`: the W&B run to continue (a resumed training run logs to its own)."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None,
                 wandb_run_id: str | None = None):
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        self.file = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed, logging to metrics.jsonl only "
                               "(pip install tensorboard for TensorBoard logs)")
            else:
                self.tensorboard = SummaryWriter(str(folder))
        if wandb_project:
            self.wandb = import_wandb().init(project=wandb_project, config=config or {},
                                             dir=str(folder), id=wandb_run_id, resume="allow")

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.event(step, values)
        if self.tensorboard is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def event(self, step: int, values: dict) -> None:
        """A record in metrics.jsonl only (checkpoints, notes)."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()

    def image(self, step: int, name: str, image, caption: str = "") -> None:
        if not self.enabled:
            return
        if self.tensorboard is not None:
            import numpy as np

            self.tensorboard.add_image(name, np.asarray(image), step, dataformats="HWC")
            if caption:
                self.tensorboard.add_text(f"{name}/prompts", caption, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image, caption=caption)}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
