"""Training checkpoints: written atomically, readable with `torch.load(weights_only=True)`.

A training checkpoint is a Lightning-style dict holding only tensors and plain containers:
`state_dict` with `model.*` (the raw weights) and `model_ema.*` (the averaged ones, which
`ccld.io.checkpoints.load_unet` picks), the optimizer state, `global_step`, the data position, the
random state and the run's config. Every file goes to a temporary name in the same folder, is
fsynced, and then replaces the final name, so a crash mid-save leaves the last good file in place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import CCLDError
from ..io import files

LAST = "last.ckpt"
STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


def atomic_write(path: Path, write) -> Path:
    """`ccld.io.files.atomic_write` with the message a failed checkpoint write deserves."""
    return files.atomic_write(path, write, "checkpoint",
                              "free disk space or choose another --out; the previous checkpoint "
                              "is untouched")


def save_torch(obj, path: Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
    return atomic_write(path, lambda f: f.write(data))


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class CheckpointFolder:
    """`step-NNNNNNNN.ckpt` files and `last.ckpt` in one folder; optionally keeps the newest few."""

    def __init__(self, folder: Path, keep: int = 0):
        self.folder = Path(folder)
        self.keep = keep

    @property
    def last(self) -> Path:
        return self.folder / LAST

    def step_path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.ckpt"

    def save(self, checkpoint: dict, step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = save_torch(checkpoint, self.step_path(step))
        self._point_last_at(path, checkpoint)
        self._prune()
        return path

    def _point_last_at(self, path: Path, checkpoint: dict) -> None:
        # a hard link costs no space (teacher checkpoints are many GB); it goes in under a
        # temporary name and replaces last.ckpt in one rename, like every other write here
        tmp = files.temporary_name(self.last)
        try:
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:
            tmp.unlink(missing_ok=True)
            save_torch(checkpoint, self.last)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        steps = sorted(p for p in self.folder.iterdir() if STEP_FILE.match(p.name))
        for old in steps[:-self.keep]:
            old.unlink(missing_ok=True)


def load_training_checkpoint(path: Path, kind: str) -> dict:
    """A checkpoint written by `ccld train`/`ccld distill` (`kind`), checked for what resuming
    needs. Its file is mapped, not read: each process reads only the tensors it uses (a
    teacher's checkpoint is many GB, and every process of a run resumes from it)."""
    from ..io.checkpoints import load_torch_file

    ckpt = load_torch_file(path, "training checkpoint", mmap=True)
    missing = [k for k in ("state_dict", "optimizer", "global_step", "data_position", "ccld")
               if k not in ckpt]
    if missing:
        raise CCLDError(f"{path}: not a checkpoint written by `ccld {kind}` (no {missing[0]}); to "
                        "start from its weights use --init instead of --resume")
    if ckpt["ccld"].get("kind") != kind:
        raise CCLDError(f"{path}: written by `ccld {ckpt['ccld'].get('kind')}`, cannot resume it "
                        f"with `ccld {kind}`; use the same command or another --out")
    return ckpt


def split_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """The raw (`model.*`) and averaged (`model_ema.*`) weights of a training checkpoint."""
    return weights_with_prefix(state_dict, "model."), weights_with_prefix(state_dict, "model_ema.")


def weights_with_prefix(state_dict: dict, prefix: str) -> dict:
    """The entries of `state_dict` under `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def export_weights(unet: torch.nn.Module, folder: Path, stem: str) -> list[Path]:
    """The U-Net as released: a bare `torch.save` state dict (`.ckpt`) and `.safetensors`."""
    import json

    state = cpu_state(unet)
    folder.mkdir(parents=True, exist_ok=True)
    # the buffers already carry everything the loaders need; the metadata says it to other tools
    metadata = {"format": "ccld-unet", "config": json.dumps(unet.config),
                "autoencoder_scale": str(float(unet.autoencoder_scale))}
    return [save_torch(state, folder / f"{stem}.ckpt"),
            save_safetensors(state, folder / f"{stem}.safetensors", metadata)]
