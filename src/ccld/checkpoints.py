"""Reading checkpoint files safely, whatever format they were released in.

No file read here can run code. PyTorch files go through `torch.load(weights_only=True)`; the
CLOOB release is a plain pickle of numpy arrays, read by an unpickler that admits only numpy
arrays, dtypes and plain containers. Every failure becomes a one-line `CCLDError` naming the file
and what to do.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .errors import CCLDError

SAFETENSORS_SUFFIXES = (".safetensors",)


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise CCLDError(f"{path}: is a folder, not a {what} file; give the path of the file itself")
    if not path.is_file():
        raise CCLDError(f"{path}: no such {what} file; check the path, or run `ccld download` "
                        "to fetch the published models")
    if path.stat().st_size == 0:
        raise CCLDError(f"{path}: the {what} file is empty; download it again")
    return path


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> dict:
    """Loads a `torch.save` file with `weights_only=True`: tensors and containers, never code.

    `mmap` maps a zip-format file (every `torch.save` since PyTorch 1.6) instead of reading it:
    a tensor's bytes are read only when used, and processes share the pages they read."""
    path = _require_file(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers, which is exactly a
        # file that would run code (or a format that is not a checkpoint at all).
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            raise CCLDError(f"{path}: refused to load: the file asks for {refused.group(1)}, "
                            "which could run code; a checkpoint holds only tensors, so use a "
                            "trusted release file or a safetensors conversion") from None
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: {first}); "
                        "download it again") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: {detail[:120]}); "
                        "download it again") from None
    if not isinstance(obj, dict):
        raise CCLDError(f"{path}: holds a {type(obj).__name__}, not a state dict; "
                        f"this is not a {what} file")
    return obj


def load_safetensors_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _require_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CCLDError(f"{path}: not a readable safetensors file ({e}); "
                        "convert or download it again") from None


def load_state_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Loads a safetensors or torch file by its suffix (torch for anything else)."""
    if str(path).endswith(SAFETENSORS_SUFFIXES):
        return load_safetensors_file(path, what)
    return load_torch_file(path, what)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes, scalars and plain containers; refuses every other global."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            import numpy
            # numpy 2 renamed numpy.core to numpy._core; numpy 1 has only the old name.
            new = (module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core")
                   else module)
            if int(numpy.__version__.split(".")[0]) >= 2:
                module = new
            else:
                module = new.replace("numpy._core", "numpy.core", 1)
        return super().find_class(module, name)


def load_array_pickle(path: str | os.PathLike, what: str = "CLOOB checkpoint") -> dict:
    """Loads a pickle of numpy arrays in plain containers, refusing anything that could run code."""
    path = _require_file(path, what)
    data = path.read_bytes()
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if "forbidden global" in str(e):
            raise CCLDError(f"{path}: refused to load: the pickle asks for {str(e)[17:]}, which "
                            f"could run code; a {what} holds only numpy arrays") from None
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: {e}); "
                        "download it again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError) as e:
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: "
                        f"{type(e).__name__}: {e}); download it again") from None
    if not isinstance(obj, dict):
        raise CCLDError(f"{path}: holds a {type(obj).__name__}, not a dict; "
                        f"this is not a {what}")
    return obj


def describe_foreign_state_dict(sd: dict) -> str:
    keys = list(sd)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "it looks like an autoencoder"
    if "params" in sd:
        return "it looks like a CLOOB checkpoint"
    return f"{len(keys)} entries, first {keys[0]!r}" if keys else "it is empty"
